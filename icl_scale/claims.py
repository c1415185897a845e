"""The paper's claims against this model's numbers: the claims table the reducer writes
(summary/claims.json and claims.md, and a section of report.md).

Each row: the claim, the paper's number, this model's number, its 95% interval, the number of docs
behind it and a verdict. An accuracy claim is a range of the pruned - unpruned difference that
agrees with the paper (e.g. 70% of heads pruned: a drop of at most 1 point); this model's number is
the mean over (task, shot, seed) cells of the paired per-doc difference (icl_scale.paired). The
verdict is `supported` when the interval lies inside the range, `contradicted` when it lies outside
it, and `not distinguishable` when it overlaps both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .collect import Collected
from .paired import level_difference, paired_interval, read_units, sample_key
from .rankings import aggregate, spearman

SUPPORTED, CONTRADICTED, UNCLEAR = "supported", "contradicted", "not distinguishable"
N_NULL = 200  # random rankings in the induction claim's null


@dataclass(frozen=True)
class AccuracyClaim:
    name: str
    paper: str  # the paper's number, as it states it
    lo: float  # the range of pruned - unpruned that agrees with it
    hi: float
    kind: str  # heads | ffn | combined
    level: float
    ffn_level: float | None = None
    shots: str = "all"  # all | zero | few


ACCURACY_CLAIMS = (
    AccuracyClaim("heads 70% prunable", "~70% of heads removed with a minimal drop (taken as at most 1 point)",
                  -0.01, 1.0, "heads", 70),
    AccuracyClaim("FFN 20% prunable at 0 shots", "~20% of FFNs at 0 shots (at most 1 point)", -0.01, 1.0, "ffn", 20,
                  shots="zero"),
    AccuracyClaim("FFN 10% prunable at 1+ shots", "~10% of FFNs few-shot (at most 1 point)", -0.01, 1.0, "ffn", 10,
                  shots="few"),
    AccuracyClaim("70% heads + 20% FFN", "about -5 points (taken as -8 to -2)", -0.08, -0.02, "combined", 70, 20),
)


def verdict(ci: Sequence[float], lo: float, hi: float) -> str:
    a, b = ci
    if math.isnan(a) or math.isnan(b):
        return "no interval"
    if a >= lo and b <= hi:
        return SUPPORTED
    if b < lo or a > hi:
        return CONTRADICTED
    return UNCLEAR


def _shot_ok(shot: int, which: str) -> bool:
    return which == "all" or (which == "zero") == (shot == 0)


def accuracy_claim(col: Collected, c: AccuracyClaim) -> dict:
    """The claim over every complete shard of the right shots with per-doc samples at its level."""
    cells, missing = [], 0
    key = sample_key(c.kind, c.level, c.ffn_level)
    base = sample_key("ffn" if c.kind == "ffn" else "heads", 0)
    for d in col.ok:
        if _shot_ok(d.shard.shot, c.shots):
            diff = level_difference(d, key, base)
            cells.append(diff) if diff is not None else None
            missing += diff is None
    iv = paired_interval(cells)
    return {"claim": c.name, "paper": c.paper, "range": [c.lo, c.hi], "this_model": iv["value"],
            "ci95": iv["ci95"], "n_docs": iv["n"], "cells": iv["cells"], "cells_without_samples": missing,
            "statistic": "pruned - unpruned accuracy, mean over cells; " + iv["ci_method"],
            "verdict": verdict(iv["ci95"], c.lo, c.hi) if cells else "no data"}


def random_baseline_claim(col: Collected, level: float = 70) -> dict | None:
    """Heads pruned by importance against the same count pruned at random (pruning.compare=[random]):
    per doc, importance-pruned minus the mean over the random seeds. Positive: the ranking matters."""
    cells = []
    for d in col.ok:
        rand = [k for k in (d.curves.get("heads_by") or {}) if k.startswith("heads_random")]
        ours = read_units(d, sample_key("heads", level))
        runs = [u for u in (read_units(d, sample_key(k, level)) for k in rand) if u is not None]
        if ours and runs:
            keys = sorted(set(ours).intersection(*runs))
            cells.append(np.array([ours[k] - np.mean([u[k] for u in runs]) for k in keys]))
    if not cells:
        return None
    iv = paired_interval(cells)
    return {"claim": f"importance beats random at {level:g}% heads", "paper": "implied (pruning by importance)",
            "range": [1e-12, 1.0], "this_model": iv["value"], "ci95": iv["ci95"], "n_docs": iv["n"],
            "cells": iv["cells"], "cells_without_samples": 0,
            "statistic": "importance-pruned - random-pruned accuracy (mean over random seeds); " + iv["ci_method"],
            "verdict": verdict(iv["ci95"], 1e-12, 1.0)}


def cross_shot_claim(table1: dict) -> dict | None:
    rows = table1.get("mean_over_tasks") or []
    if not rows:
        return None
    vals = [r["argsort_spearman"] for r in rows]
    return {"claim": "cross-shot rank correlation", "paper": "0.37-0.41 (argsort statistic, OPT-66B's 4,608 heads)",
            "range": [0.37, 0.41], "this_model": float(np.mean(vals)), "ci95": [math.nan, math.nan],
            "n_docs": 0, "cells": len(rows), "cells_without_samples": 0,
            "statistic": "mean over shot pairs of the argsort statistic, " + ", ".join(
                f"{r['shots']}: {r['argsort_spearman']:.3f} (true Spearman {r['spearman']:.3f})" for r in rows),
            "verdict": "not comparable: the argsort statistic depends on the number of heads"}


def within_layer_null(pairs: list[tuple[torch.Tensor, torch.Tensor]], n: int = N_NULL, seed: int = 0) -> np.ndarray:
    """The mean true Spearman over `pairs` of [L, H] rankings when the second of each pair has its
    heads shuffled within every layer: what agreement the depth trend (layer means) alone gives."""
    rng = np.random.default_rng(seed)
    out = np.empty(n)
    for k in range(n):
        vals = []
        for a, b in pairs:
            bb = b.detach().cpu().numpy().copy()
            for row in bb:
                rng.shuffle(row)
            vals.append(spearman(a, torch.from_numpy(bb)))
        out[k] = np.mean(vals)
    return out


def cross_shot_depth_claim(col: Collected) -> dict | None:
    """Do a task's rankings at two shots agree beyond the depth trend? True Spearman (it does not
    depend on the number of heads as the argsort statistic does), mean over (task, shot pair),
    against its within-layer permutation null (icl_scale.claims.within_layer_null)."""
    from .paper import shots, task_importance

    ss = shots(col)
    by = {s: task_importance(col, s) for s in ss}
    pairs = [(by[a][t], by[b][t]) for i, a in enumerate(ss) for b in ss[i + 1:] for t in sorted(by[a])
             if t in by[b] and by[a][t].dim() == 2]
    if not pairs:
        return None
    observed = float(np.mean([spearman(a, b) for a, b in pairs]))
    lo, hi = (float(x) for x in np.percentile(within_layer_null(pairs), [2.5, 97.5]))
    v = SUPPORTED if observed > hi else CONTRADICTED if observed < lo else UNCLEAR
    return {"claim": "cross-shot rankings agree beyond the depth trend", "paper": "0.37-0.41 (argsort statistic); "
            "the paper's rankings agree across shots", "range": [hi, 1.0], "this_model": observed, "ci95": [lo, hi],
            "n_docs": 0, "cells": len(pairs), "cells_without_samples": 0,
            "statistic": f"true Spearman, mean over {len(pairs)} (task, shot pair); the interval is its null with "
                         f"heads shuffled within each layer ({N_NULL} draws)", "verdict": v}


def induction_claim(col: Collected, induction: dict | None, shot: int, ranking: torch.Tensor,
                    name: str, level: float = 50) -> dict:
    """Prefix-matching capacity kept at `level`% of heads pruned by the task ranking, against its
    null: the same under N_NULL random rankings (2.5-97.5 percentiles). Above the null: the
    induction heads are among the important ones (the paper's Fig. 11); below: among the least."""
    from .induction import retained_capacity
    from .pruning import random_ranking

    score = induction["prefix_matching"].float()
    count = "floor"
    kept = retained_capacity(score, ranking, [level], count)[0]
    null = [retained_capacity(score, random_ranking(score.shape, 10_000 + k), [level], count)[0]
            for k in range(N_NULL)]
    lo, hi = (float(x) for x in np.percentile(null, [2.5, 97.5]))
    v = SUPPORTED if kept > hi else CONTRADICTED if kept < lo else UNCLEAR
    return {"claim": f"induction heads among the important ones ({shot}-shot, {name})",
            "paper": "pruning by task importance keeps more prefix matching than random (Fig. 11)",
            "range": [hi, 1.0], "this_model": float(kept), "ci95": [lo, hi], "n_docs": 0, "cells": 1,
            "cells_without_samples": 0,
            "statistic": f"share of prefix-matching score kept at {level:g}% heads pruned; the interval is "
                         f"the random rankings' 95% range ({N_NULL} rankings)", "verdict": v}


def induction_claims(col: Collected, induction: dict | None) -> list[dict]:
    from .paper import shots, task_importance

    if induction is None:
        return []
    out = []
    for shot in shots(col):
        imp = {t: v for t, v in task_importance(col, shot).items() if v.shape == induction["prefix_matching"].shape}
        if imp:
            name = "aggregate" if len(imp) > 1 else next(iter(imp))
            out.append(induction_claim(col, induction, shot, aggregate(imp), name))
    return out


def transfer_claim(transfer_rows: list[dict], level: float = 70) -> dict | None:
    """The aggregate without the task against the task's own ranking at `level`% heads (no interval:
    transfer curves keep no per-doc samples)."""
    by = {}
    for r in transfer_rows:
        if r["level"] == level:
            by.setdefault((r["task"], r["shot"], r["seed"]), {})[r["ranking"]] = r["value"]
    diffs = [v[k] - v["own"] for v in by.values() for k in v if k.startswith("aggregate_without_") and "own" in v]
    if not diffs:
        return None
    return {"claim": "transfer: the aggregate ranking prunes an unseen task", "paper": "close to its own ranking "
            "(Fig. 9)", "range": [-0.01, 1.0], "this_model": float(np.mean(diffs)), "ci95": [math.nan, math.nan],
            "n_docs": 0, "cells": len(diffs), "cells_without_samples": len(diffs),
            "statistic": f"accuracy pruned by the aggregate without the task - by its own ranking at {level:g}% "
                         "heads, mean over targets",
            "verdict": "no interval (transfer curves keep no per-doc samples)"}


def claims_table(col: Collected, data: dict, induction, transfer_rows: list[dict]) -> list[dict]:
    rows = [accuracy_claim(col, c) for c in ACCURACY_CLAIMS]
    rows += [r for r in (random_baseline_claim(col), cross_shot_claim(data["table1_cross_shot"]),
                         cross_shot_depth_claim(col)) if r]
    rows += induction_claims(col, induction)
    rows += [r for r in (transfer_claim(transfer_rows),) if r]
    return rows


def _pts(v: float, scale: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{scale * v:+.1f}" if scale == 100 \
        else f"{v:.3f}"


def claims_md(rows: list[dict]) -> list[str]:
    """The claims table in markdown: accuracy claims in points, the others as fractions."""
    out = ["| claim | paper | this model | 95% interval | docs | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        scale = 100 if "accuracy" in r["statistic"] else 1
        lo, hi = r["ci95"]
        ci = "-" if math.isnan(lo) else f"[{_pts(lo, scale)}, {_pts(hi, scale)}]"
        unit = " points" if scale == 100 else ""
        out.append(f"| {r['claim']} | {r['paper']} | {_pts(r['this_model'], scale)}{unit} | {ci} | "
                   f"{r['n_docs'] or '-'} | {r['verdict']} |")
    return out
