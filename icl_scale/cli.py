"""Shared glue for the Hydra entry points in jobs/: config -> plain dict, one-line errors."""

from __future__ import annotations

import functools
import logging
import os
import sys

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def _user_errors() -> tuple:
    """User-facing errors: printed as one line naming the field and the fix, exit code 2."""
    from .store import StoreError
    from .sweep import SweepError
    from .tracking import TrackingError

    return (ValueError, FileNotFoundError, PermissionError, StoreError, SweepError, TrackingError)


def to_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def one_line_errors(fn):
    """Turn known user errors into `error: ...` on stderr (exit 2) instead of a traceback.
    Set ICL_SCALE_DEBUG=1 to see the traceback."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except _user_errors() as e:
            if os.environ.get("ICL_SCALE_DEBUG"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)

    return wrapper
