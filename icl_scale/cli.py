"""Shared glue for the Hydra entry points in jobs/: one decorator gives each job the package's
configs, a quiet environment, a plain-dict config and one-line errors."""

from __future__ import annotations

import functools
import os
import re
import sys

from .config import setup_environment, to_dict

__all__ = ["hydra_job", "one_line_errors", "print_problems", "print_warnings", "quiet_libraries", "to_dict"]


def _user_errors() -> tuple:
    """User-facing errors: printed as one line naming the field and the fix, exit code 2."""
    from .store import StoreError
    from .sweep import SweepError
    from .tracking import TrackingError

    # ValueError covers ConfigError, ModelConfigError, MaskError, UnsupportedArchitecture, TaskDataError...
    return (ValueError, FileNotFoundError, PermissionError, StoreError, SweepError, TrackingError)


class MissingSetting(ValueError):
    """A config key left `???` (mandatory) that the job needs."""


# What to write for a mandatory key, by key; others get the generic message.
REQUIRED = {
    "model.path": "model.path is required for model=local: add model.path=/path/to/checkpoint",
}


def missing_setting(key: str) -> MissingSetting:
    return MissingSetting(REQUIRED.get(key, f"{key} is required (it is ??? in the config): add {key}=... "
                                            "to the command"))


def resolve(cfg) -> dict:
    """The resolved plain-dict config; a mandatory value left unset (`???`, directly or through an
    interpolation) is one line naming the full key."""
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    try:
        return to_dict(cfg)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as e:
        # An interpolation names the key that refers to the missing one; the message names the missing one.
        m = re.search(r"Missing mandatory value: (\S+)", str(e))
        key = m.group(1) if m and isinstance(e, InterpolationToMissingValueError) else e.full_key
        raise missing_setting(str(key)) from None


def hydra_job(config_name: str):
    """`@hydra_job("config")` on `main(c: dict)`: a Hydra app over the package's conf/ (any key can
    be overridden on the command line), `c` the resolved config as a plain dict, known user errors
    as one `error:` line (exit 2)."""
    import hydra

    from .config import CONF_DIR
    from .schema import register

    register()  # the schemas the configs compose over, and the --help resolver

    def wrap(fn):
        @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
        @one_line_errors
        @functools.wraps(fn)
        def main(cfg):
            setup_environment()
            return on_ranks(fn, resolve(cfg))

        return main

    return wrap


def on_ranks(fn, c: dict):
    """fn(c); with several ranks, a failure here is announced to the other ranks, which stop at once
    (icl_scale.distributed.FailureWatch), and a finished rank waits for the others."""
    from .distributed import announce_failure, finish_ranks

    try:
        out = fn(c)
    except SystemExit as e:
        if e.code not in (None, 0):
            announce_failure(e)
        raise
    except BaseException as e:
        announce_failure(e)
        raise
    finish_ranks()
    return out


def quiet_libraries() -> None:
    setup_environment()


def print_problems(problems: list[dict]) -> None:
    """The reducer's list of missing, failed or corrupt shards, one line each."""
    for p in problems:
        print(f"  problem: {p['shard']}: {p['status']} ({p['reason']})")


def print_warnings(warnings: list[str]) -> None:
    """The reducer's warnings (shards aggregated together although made with different settings)."""
    for w in warnings:
        print(f"  warning: {w}")


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
