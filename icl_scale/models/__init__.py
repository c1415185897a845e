"""Model loading, architecture adapters, the hook system and the head/FFN gates built on it."""

from .adapters import FAMILIES, SUPPORTED_MODEL_TYPES, Adapter, HeadGeometry, UnsupportedArchitecture
from .gates import Gates, MaskError, check_mask
from .hooks import HOOK_POINTS, AttentionView, HookError, Hooks
from .loading import LoadedModel, ModelConfigError, load_model, preset

__all__ = [
    "FAMILIES", "HOOK_POINTS", "SUPPORTED_MODEL_TYPES", "Adapter", "AttentionView", "Gates", "HeadGeometry",
    "HookError", "Hooks", "LoadedModel", "MaskError", "ModelConfigError", "UnsupportedArchitecture",
    "check_mask", "load_model", "preset",
]
