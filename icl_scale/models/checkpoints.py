"""Checkpoints in a folder or on the hub, checked before any weights load: every failure is one
line naming the field and the fix (ModelConfigError)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ModelConfigError(ValueError):
    """A model setting is wrong or its files are unusable; the message names the field and the fix."""


UNSET = (None, "", "???")  # ??? is OmegaConf's mandatory value, left as a string by to_container


CHECKPOINT = "a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files)"


WEIGHTS = ("*.safetensors", "*.bin")


HUB_FIX = "download it first or use model=local model.path=..."


def first_line(e: BaseException, limit: int = 200) -> str:
    msg = (str(e).strip().splitlines() or [""])[0].strip()
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


@contextmanager
def loading_errors(what: str, fix: str, values: bool = False) -> Iterator[None]:
    """File errors while transformers/safetensors load (OSError: missing, unreachable, unreadable;
    SafetensorError: corrupt; with `values` also ValueError: a file's content, e.g. JSON) ->
    ModelConfigError `what (Error: first line); fix`. Other ValueErrors (a setting transformers
    refuses, e.g. model.attn_implementation) keep their own message: the fix here would be wrong."""
    from safetensors import SafetensorError

    errors = (OSError, SafetensorError, ValueError) if values else (OSError, SafetensorError)
    try:
        yield
    except ModelConfigError:
        raise
    except errors as e:
        raise ModelConfigError(f"{what} ({type(e).__name__}: {first_line(e)}); {fix}") from None


def is_local(spec: dict) -> bool:
    """model=local, or model=hf whose model.id is a folder path (an existing folder, or one written as a path:
    /..., ./..., ~/...) rather than a hub id."""
    if spec.get("source") == "local":
        return True
    mid = spec.get("id")
    if spec.get("source") != "hf" or mid in UNSET:
        return False
    return Path(str(mid)).expanduser().is_dir() or str(mid).startswith(("/", ".", "~"))


def checkpoint_key(spec: dict) -> str:
    """The setting naming a local checkpoint folder: model.path (model=local) or model.id (model=hf)."""
    return "model.id" if spec.get("source") == "hf" else "model.path"


def local_checkpoint(spec: dict) -> Path:
    """model.path (model.id for model=hf), checked: set, a folder, with a readable config.json and a weight file."""
    key = checkpoint_key(spec)
    p = spec.get(key.split(".")[1])
    if p in UNSET:
        raise ModelConfigError("model.path is required for model=local: add model.path=/path/to/checkpoint")
    path = Path(str(p)).expanduser()
    fix = f"set {key} to {CHECKPOINT}"
    if not path.exists():
        raise ModelConfigError(f"{key}={p} does not exist; {fix}")
    if not path.is_dir():
        raise ModelConfigError(f"{key}={p} is a file, not a folder; {fix}")
    config = path / "config.json"
    if not config.is_file():
        raise ModelConfigError(f"{key}={p} has no config.json, so it is not a checkpoint folder; {fix}")
    restore = "restore the file (copy or download the checkpoint again)"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{key}={p}: config.json is not valid JSON ({e.msg} at line {e.lineno}); "
                               f"{restore}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{key}={p}: config.json is unreadable ({e}); {restore}") from None
    if not weight_files(path):
        raise ModelConfigError(f"{key}={p} has no weights (model.safetensors or pytorch_model.bin); {fix}")
    return path


def weight_files(path: Path) -> list[str]:
    return sorted(f.name for pattern in WEIGHTS for f in path.glob(pattern))


def hub_id(spec: dict) -> str:
    if spec.get("id") in UNSET:
        if spec.get("source") == "hf":
            raise ModelConfigError("model.id is required for model=hf: add model.id=<org>/<name> (a hub id) or "
                                   "model.id=/path/to/checkpoint")
        raise ModelConfigError("model.id is required for model.source=hub: add model.id=<org>/<name> (a Hugging Face "
                               "hub id), or use model=local model.path=...")
    return str(spec["id"])


def hub_label(spec: dict) -> str:
    rev = spec.get("revision")
    return f"{hub_id(spec)}@{rev}" if rev else hub_id(spec)


def read_config_json(path: Path) -> dict:
    """A checkpoint folder's config.json (local_checkpoint has checked that it parses)."""
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


def pruned_structure(path: Path) -> dict | None:
    """The `icl_scale_pruning` block of a checkpoint's config.json (a physically pruned export), or None."""
    return read_config_json(path).get("icl_scale_pruning")


def check_architecture(model_type, where: str, attn: str | None = None) -> None:
    """A model_type (config.json's) without an adapter, or Gemma 2 under sdpa (transformers has none for
    it): one line naming the supported ones or the fix, before any weight loads."""
    from .adapters import FAMILY_NAMES, SUPPORTED_MODEL_TYPES

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(f"{where}: model_type={model_type!r} has no adapter; supported: "
                               f"{', '.join(SUPPORTED_MODEL_TYPES)} ({FAMILY_NAMES})")
    if model_type == "gemma2" and attn == "sdpa":
        raise ModelConfigError(f"{where}: transformers has no sdpa attention for Gemma 2 (its soft-capping); "
                               "use model.attn_implementation=eager")
