"""Paired statistics over documents: pruned minus unpruned accuracy on the same eval docs.

Every curve level scores the same eval docs as the unpruned model, and the shard keeps each level's
per-doc rows (`samples/<curve>_<level>.jsonl`, `pruning.save_samples`). The difference of two runs
is therefore a mean of per-doc differences (pruned - unpruned, each -1, 0 or +1; MultiRC per
question), and its 95% interval is a percentile bootstrap over docs (scipy.stats.bootstrap): the
pairing removes the between-doc variance that two separate intervals would double count. Over
several (task, shot) cells the statistic is the mean of the cells' mean differences, and each cell's
docs are resampled within the cell.

"Prunable within 1 point" (the level up to which the curve stays within `TOL` of unpruned) is a
point estimate; `prunable` gives it with its doc count and the paired interval at that level, or
says the sample is too small to tell (one doc is worth more than the tolerance).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import bootstrap

from .collect import ShardData
from .paper import prunable_within
from .tasks.metrics import BOOTSTRAP_ITERS, BOOTSTRAP_SEED, CONFIDENCE, unit_scores

TOL = 0.01  # "within 1 point"
CI_METHOD = "paired percentile bootstrap over docs"


def sample_key(kind: str, level: float, ffn_level: float | None = None) -> str:
    """The samples/ file stem of a curve level (`kind` heads, ffn, heads_random<k>) or, with
    `ffn_level`, of the heads x FFN grid point (head level, ffn level)."""
    if ffn_level is not None:
        return f"combined_h{level:g}_f{ffn_level:g}"
    return f"{kind}_{level:g}"


def read_units(d: ShardData, key: str) -> dict[str, float] | None:
    """{unit: 0/1 primary metric} of one saved level, or None when the shard has no such samples."""
    f = d.shard.file(f"samples/{key}.jsonl")
    if not f.is_file():
        return None
    rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return unit_scores(d.shard.task, rows, d.curves.get("metric"))  # a task file's folder is not its path


def differences(base: dict[str, float], pruned: dict[str, float]) -> np.ndarray:
    """Per-unit pruned - unpruned over the units both scored (the same eval docs in a shard)."""
    return np.array([pruned[k] - base[k] for k in sorted(set(base) & set(pruned))], dtype=float)


def paired_interval(cells: Sequence[np.ndarray]) -> dict:
    """Mean over cells of the mean per-doc difference, with its 95% bootstrap interval (docs resampled
    within each cell); `ci95` is [nan, nan] when a cell has fewer than 2 docs."""
    cells = [np.asarray(c, dtype=float) for c in cells if len(c)]
    if not cells:
        return {"value": math.nan, "n": 0, "cells": 0, "ci95": [math.nan, math.nan], "ci_method": CI_METHOD}
    value = float(np.mean([c.mean() for c in cells]))
    ci = [math.nan, math.nan]
    if all(len(c) >= 2 for c in cells):
        res = bootstrap(tuple(cells), _mean_of_means, vectorized=True, n_resamples=BOOTSTRAP_ITERS,
                        confidence_level=CONFIDENCE, method="percentile",
                        random_state=np.random.default_rng(BOOTSTRAP_SEED))
        ci = [float(res.confidence_interval.low), float(res.confidence_interval.high)]
    return {"value": value, "n": int(sum(len(c) for c in cells)), "cells": len(cells), "ci95": ci,
            "ci_method": CI_METHOD}


def _mean_of_means(*samples, axis=-1):
    return np.mean([s.mean(axis=axis) for s in samples], axis=0)


def level_difference(d: ShardData, key: str, base_key: str) -> np.ndarray | None:
    """Per-doc differences of one saved level against the shard's unpruned samples, or None."""
    base, pruned = read_units(d, base_key), read_units(d, key)
    return None if base is None or pruned is None else differences(base, pruned)


def prunable(d: ShardData, kind: str, tol: float = TOL) -> dict:
    """The shard's "prunable within `tol`" level for curve `kind` with its doc count, the paired
    difference and interval at that level, and the sentence to print."""
    level = prunable_within(d.curves[kind], tol)
    diff = level_difference(d, sample_key(kind, level), sample_key(kind, 0)) if not math.isnan(level) else None
    n = len(diff) if diff is not None else int(d.curves.get("n_eval") or 0)
    out = {"level": level, "n": n, "diff": math.nan, "ci95": [math.nan, math.nan]}
    if diff is not None:
        iv = paired_interval([diff])
        out.update(diff=iv["value"], ci95=iv["ci95"])
    out["text"] = prunable_text(out, tol)
    return out


def prunable_text(p: dict, tol: float = TOL) -> str:
    """"30% (n=400; pruned - unpruned there -0.5 points, 95% paired CI [-2.0, +1.0])", or why no
    level can be given."""
    n = p["n"]
    if n == 0 or math.isnan(p["level"]):
        return "no eval docs"
    if n * tol < 1:
        return (f"too few docs to tell (n={n}: one doc is {100 / n:.1f} points, more than the "
                f"{100 * tol:g}-point tolerance)")
    if math.isnan(p["diff"]):
        return f"{p['level']:g}% (point estimate, n={n}; no per-doc samples for a paired interval)"
    lo, hi = p["ci95"]
    drop = f"a drop of more than {100 * tol:g} point{'s' if tol != 0.01 else ''}"
    shown = f"{drop} is ruled out" if lo >= -tol - 1e-12 else f"{drop} is not ruled out"
    return (f"{p['level']:g}% (n={n}; pruned - unpruned there {100 * p['diff']:+.1f} points, 95% paired CI "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}]: {shown})")
