"""What every benchmark section shares: the task data folder, machine information and the
alternating timing loop (see bench/README.md, "Timing method")."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
ENV_DATA_DIR = "ICL_SCALE_DATA_DIR"


class BenchError(RuntimeError):
    """Bad benchmark input; the message is one line that names the fix."""


def data_dir(flag: str | os.PathLike | None = None) -> Path:
    """The task mirror `<dir>/<task>/<split>.jsonl`: `--data-dir`, else $ICL_SCALE_DATA_DIR."""
    value = flag if flag not in (None, "") else os.environ.get(ENV_DATA_DIR)
    source = "--data-dir" if flag not in (None, "") else ENV_DATA_DIR
    if not value:
        raise BenchError(f"no task data: pass --data-dir DIR or set {ENV_DATA_DIR} to a mirror "
                         f"<dir>/<task>/<split>.jsonl (tests/data/fixtures is a small slice for a smoke run)")
    p = Path(value)
    if not p.is_dir():
        raise BenchError(f"{source}={value} is not a folder: point it at a mirror <dir>/<task>/<split>.jsonl")
    return p


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version as _v

        return _v(pkg)
    except Exception:
        return None


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": now(), "cpu_count": os.cpu_count(), "cpu_model": cpu,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": version("transformers"),
        "lm_eval": version("lm_eval") or version("lm-eval"), "loadavg_start": loadavg(),
        "cuda": torch.cuda.is_available(),
    }


def stats(times: list[float]) -> dict:
    s = sorted(times)
    return {"best_s": s[0], "median_s": s[len(s) // 2], "worst_s": s[-1], "runs_s": [round(t, 4) for t in times],
            "spread": (s[-1] - s[0]) / s[0] if s[0] > 0 else 0.0}


def run_alternating(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run every fn once per round (order rotated each round) for `repeats` rounds."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    outs: dict[str, Any] = {}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            outs[n] = fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times, outs


def geomean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def double_copy(lm):
    """A float64 copy of a LoadedModel (the float64 checks: gaps that vanish there are rounding)."""
    import copy
    import dataclasses

    from icl_scale.models.adapters import Adapter

    model = copy.deepcopy(lm.model).double()
    return dataclasses.replace(lm, model=model, adapter=Adapter(model))
