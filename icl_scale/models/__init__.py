"""Model loading, architecture adapters and head/FFN gates."""

from .adapters import FAMILIES, SUPPORTED_MODEL_TYPES, Adapter, HeadGeometry, UnsupportedArchitecture
from .gates import Gates, MaskError, check_mask
from .loading import LoadedModel, ModelConfigError, load_model, preset

__all__ = [
    "FAMILIES", "SUPPORTED_MODEL_TYPES", "Adapter", "HeadGeometry", "UnsupportedArchitecture", "Gates",
    "MaskError", "check_mask", "LoadedModel", "ModelConfigError", "load_model", "preset",
]
