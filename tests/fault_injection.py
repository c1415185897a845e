"""Faults at known points of a run, for the crash, preemption and resume tests.

In-process: `crash_after(monkeypatch, stage)` raises right after a stage finishes (a callback of the
run skeleton, icl_scale/runs.py). In another process: `hold_env(stage_point, file)` is the
environment that makes a fresh run wait at that point while `file` exists (tests/faults/sitecustomize.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from icl_scale import runs

FAULTS_DIR = Path(__file__).resolve().parent / "faults"
HOLD_ENV = "ICL_SCALE_HOLD_AFTER"


def crash_after(monkeypatch, stage: str, only_fresh: bool = False) -> None:
    """Make a run raise right after `stage` finishes (with only_fresh: not when it was resumed)."""

    def hook(run, name):
        if name == stage and not (only_fresh and run.resumed):
            raise RuntimeError(f"injected failure after stage {stage}")

    monkeypatch.setattr(runs, "STAGE_CALLBACKS", [*runs.STAGE_CALLBACKS, hook])


def hold_env(point: str, hold_file: Path, base: dict | None = None) -> dict[str, str]:
    """Environment for a job process that holds at `point` ("<stage>" or "importance@<n>") while
    `hold_file` exists."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAULTS_DIR), env.get("PYTHONPATH", "")) if p)
    env[HOLD_ENV] = f"{point}:{hold_file}"
    return env
