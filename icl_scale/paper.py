"""The numbers behind each of the paper's figures, from the collected shards of one model.

Every function takes `icl_scale.collect.Collected` and returns plain JSON-able data (what
`icl_scale.plots` draws, what report.md tabulates, what tests check). Demonstration seeds of one
(task, shot) are averaged: curves point by point (with the 95% doc interval averaged over seeds and a
95% t-interval over seeds), importance element-wise. Whatever a figure needs and the store lacks
(a second shot, induction scores, transfer results) gives empty data, which the report names.

  fig3_importance   head importance [L, H] per (task, shot) and the aggregate per shot
  fig4_knockout     FFN knock-out drop per layer per (task, shot)
  fig56_curves      head / FFN pruning curves per (task, shot) and their mean over tasks per shot
  fig7_grid         the heads x FFN grid per (task, shot) and its mean over tasks per shot
  fig8_correlation  cross-task rank correlation (both statistics) with aggregate and random rows
  table1_cross_shot cross-shot correlation per task and its mean over tasks
  fig11_retained    induction capacity retained under task, aggregate and random rankings
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import t as student_t

from .collect import Collected, ShardData
from .pruning import random_ranking
from .rankings import aggregate, argsort_spearman, spearman, top_overlap

N_RANDOM = 5  # random rankings for the random rows of Figs. 8 and 11


def cells(col: Collected) -> dict[tuple[str, int], list[ShardData]]:
    """{(task, shot): the shards of its seeds}, sorted."""
    out: dict[tuple[str, int], list[ShardData]] = {}
    for d in sorted(col.ok, key=lambda d: (d.shard.task, d.shard.shot, d.shard.seed)):
        out.setdefault((d.shard.task, d.shard.shot), []).append(d)
    return out


def shots(col: Collected) -> list[int]:
    return sorted({d.shard.shot for d in col.ok})


def seed_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lo, hi): the 95% t-interval over seeds (NaN bounds with one seed)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan"), float("nan")
    half = float(student_t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return float(v.mean()), float(v.mean()) - half, float(v.mean()) + half


def mean_importance(ds: list[ShardData], key: str = "heads") -> torch.Tensor:
    return torch.stack([d.importance[key].double() for d in ds]).mean(0).float()


def task_importance(col: Collected, shot: int, key: str = "heads") -> dict[str, torch.Tensor]:
    """{task: seed-mean importance at `shot`} over the tasks whose shapes agree with the first."""
    out = {t: mean_importance(ds, key) for (t, s), ds in cells(col).items() if s == shot}
    shape = next((v.shape for v in out.values()), None)
    return {t: v for t, v in out.items() if v.shape == shape}


def fig3_importance(col: Collected) -> dict:
    """{"cells": [{task, shot, heads}], "aggregate": [{shot, tasks, heads}]} (heads as nested lists)."""
    out: dict = {"cells": [], "aggregate": []}
    for shot in shots(col):
        imp = task_importance(col, shot)
        out["cells"] += [{"task": t, "shot": shot, "heads": v.tolist()} for t, v in imp.items()]
        if imp:
            out["aggregate"].append({"shot": shot, "tasks": list(imp), "heads": aggregate(imp).tolist()})
    return out


def fig4_knockout(col: Collected) -> list[dict]:
    """Per (task, shot): the accuracy drop per knocked-out FFN layer (seed mean) and the baseline."""
    rows = []
    for (task, shot), ds in cells(col).items():
        drop = mean_importance(ds, "ffn_knockout")
        base = float(np.mean([d.curves.get("knockout_baseline", float("nan")) for d in ds]))
        rows.append({"task": task, "shot": shot, "metric": ds[0].curves["metric"], "baseline": base,
                     "drop": drop.tolist(), "n_seeds": len(ds)})
    return rows


def curve_points(ds: list[ShardData], kind: str) -> list[dict]:
    """One curve (heads or ffn) of a (task, shot): per level the seed mean, the doc interval (averaged
    over seeds) and the seed interval; only levels every seed has."""
    metric = ds[0].curves["metric"]
    by = [{r["level"]: r for r in d.curves[kind]} for d in ds]
    levels = sorted(set.intersection(*(set(b) for b in by)))
    out = []
    for p in levels:
        rows = [b[p] for b in by]
        mean, lo, hi = seed_interval([r["value"] for r in rows])
        ci = [r["metrics"][metric]["ci95"] for r in rows]
        out.append({"level": p, "value": mean, "doc_ci": [float(np.mean([c[0] for c in ci])),
                                                          float(np.mean([c[1] for c in ci]))],
                    "seed_ci": [lo, hi], "n_seeds": len(ds)})
    return out


def random_band(ds: list[ShardData], kind: str) -> list[dict]:
    """The random-pruning baseline of a (task, shot) (`pruning.compare=[random]`): per level the mean,
    min and max over every random seed's curve of every demonstration seed; [] without one."""
    curves = [rows for d in ds for name, rows in (d.curves.get(f"{kind}_by") or {}).items()
              if name.startswith(f"{kind}_random")]
    if not curves:
        return []
    levels = sorted(set.intersection(*({r["level"] for r in rows} for rows in curves)))
    out = []
    for p in levels:
        v = [next(r["value"] for r in rows if r["level"] == p) for rows in curves]
        out.append({"level": p, "mean": float(np.mean(v)), "min": float(min(v)), "max": float(max(v)),
                    "n_curves": len(v)})
    return out


def fig56_curves(col: Collected, kind: str) -> dict:
    """{"cells": [{task, shot, metric, points}], "mean": [{shot, tasks, points: [{level, value, min, max}]}]}:
    `kind` is heads (Fig. 5) or ffn (Fig. 6); the mean is over tasks at the levels all of them have."""
    out: dict = {"kind": kind, "cells": [], "mean": []}
    for (task, shot), ds in cells(col).items():
        out["cells"].append({"task": task, "shot": shot, "metric": ds[0].curves["metric"],
                             "points": curve_points(ds, kind), "random": random_band(ds, kind)})
    for shot in shots(col):
        mine = [c for c in out["cells"] if c["shot"] == shot and c["points"]]
        if not mine:
            continue
        common = sorted(set.intersection(*({p["level"] for p in c["points"]} for c in mine)))
        pts = []
        for p in common:
            v = [next(q["value"] for q in c["points"] if q["level"] == p) for c in mine]
            pts.append({"level": p, "value": float(np.mean(v)), "min": float(min(v)), "max": float(max(v))})
        out["mean"].append({"shot": shot, "tasks": [c["task"] for c in mine], "points": pts})
    return out


def fig7_grid(col: Collected) -> dict:
    """{"cells": [{task, shot, head_levels, ffn_levels, value[ffn][head]}], "mean": [...]}: seed means;
    missing grid points are NaN; the mean is over the tasks of a shot (NaN where any task lacks it)."""
    out: dict = {"cells": [], "mean": []}
    for (task, shot), ds in cells(col).items():
        pts: dict[tuple[float, float], list[float]] = {}
        for d in ds:
            for r in d.curves.get("combined", []):
                pts.setdefault((r["head_level"], r["ffn_level"]), []).append(r["value"])
        if not pts:
            continue
        hl, fl = sorted({h for h, _ in pts}), sorted({f for _, f in pts})
        grid = [[float(np.mean(pts[(h, f)])) if (h, f) in pts else float("nan") for h in hl] for f in fl]
        out["cells"].append({"task": task, "shot": shot, "head_levels": hl, "ffn_levels": fl, "value": grid})
    for shot in shots(col):
        mine = [c for c in out["cells"] if c["shot"] == shot]
        if mine and all(c["head_levels"] == mine[0]["head_levels"] and c["ffn_levels"] == mine[0]["ffn_levels"]
                        for c in mine):
            mean = np.mean(np.array([c["value"] for c in mine]), axis=0)
            out["mean"].append({"shot": shot, "tasks": [c["task"] for c in mine],
                                "head_levels": mine[0]["head_levels"], "ffn_levels": mine[0]["ffn_levels"],
                                "value": mean.tolist()})
    return out


def _random_rankings(shape, n: int = N_RANDOM) -> list[torch.Tensor]:
    return [random_ranking(shape, k) for k in range(n)]


def fig8_correlation(col: Collected) -> list[dict]:
    """Per shot: task x task matrices of the paper's argsort statistic, true Spearman and the top-20%
    overlap, with an aggregate row (mean importance over the tasks) and a random row (seed 0)."""
    out = []
    for shot in shots(col):
        imp = task_importance(col, shot)
        if not imp:
            continue
        rows = dict(imp)
        if len(imp) > 1:
            rows["aggregate"] = aggregate(imp)
        rows["random"] = _random_rankings(next(iter(imp.values())).shape, 1)[0]
        names = list(rows)
        mats = {name: [[fn(rows[a], rows[b]) for b in names] for a in names]
                for name, fn in (("argsort_spearman", argsort_spearman), ("spearman", spearman),
                                 ("top20_overlap", top_overlap))}
        out.append({"shot": shot, "rows": names, **mats})
    return out


def table1_cross_shot(col: Collected) -> dict:
    """Per task and pair of shots: both statistics between its (seed-mean) rankings; the mean over
    tasks per pair (the paper reports 0.37-0.41 with its statistic)."""
    ss = shots(col)
    by = {s: task_importance(col, s) for s in ss}
    pairs = [(a, b) for i, a in enumerate(ss) for b in ss[i + 1:]]
    rows = []
    for task in sorted({t for v in by.values() for t in v}):
        for a, b in pairs:
            if task in by[a] and task in by[b]:
                x, y = by[a][task], by[b][task]
                rows.append({"task": task, "shots": f"{a}-{b}", "argsort_spearman": argsort_spearman(x, y),
                             "spearman": spearman(x, y), "top20_overlap": top_overlap(x, y)})
    mean = []
    for a, b in pairs:
        sel = [r for r in rows if r["shots"] == f"{a}-{b}"]
        if sel:
            mean.append({"shots": f"{a}-{b}", "n_tasks": len(sel),
                         **{k: float(np.mean([r[k] for r in sel])) for k in ("argsort_spearman", "spearman",
                                                                              "top20_overlap")}})
    return {"per_task": rows, "mean_over_tasks": mean}


def fig11_retained(col: Collected, induction: dict[str, torch.Tensor] | None, count: str = "floor",
                   levels: Sequence[float] = tuple(range(0, 100, 10))) -> list[dict]:
    """Per shot and ranking (each task's, the aggregate, random = mean of N_RANDOM random rankings):
    the fraction of total prefix-matching / copying score kept as heads are pruned, and both rank
    statistics and the top-20% overlap of the ranking with each score."""
    from .induction import retained_capacity

    if induction is None:
        return []
    shape = induction["prefix_matching"].shape
    rows = []
    for shot in shots(col):
        imp = {t: v for t, v in task_importance(col, shot).items() if v.shape == shape}
        if not imp:
            continue
        if len(imp) > 1:
            imp["aggregate"] = aggregate(imp)
        rand = _random_rankings(shape)
        for name, ranking in [*imp.items(), ("random", None)]:
            row: dict = {"ranking": name, "shot": shot}
            for score in ("prefix_matching", "copying"):
                s = induction[score].float()
                if ranking is None:
                    ret = np.mean([retained_capacity(s, r, levels, count) for r in rand], axis=0).tolist()
                else:
                    ret = retained_capacity(s, ranking, levels, count)
                    row[f"argsort_spearman_{score}"] = argsort_spearman(ranking, s)
                    row[f"spearman_{score}"] = spearman(ranking, s)
                    row[f"overlap_{score}"] = top_overlap(ranking, s)
                row[f"retained_{score}"] = dict(zip((f"{p:g}" for p in levels), ret))
            rows.append(row)
    return rows


def prunable_within(points: Sequence[dict], tol: float = 0.01) -> float:
    """The highest level p such that every level up to p stays within `tol` of the unpruned value
    (the first point); a curve that dips below and comes back counts only up to the dip."""
    pts = sorted(points, key=lambda r: r["level"])
    if not pts:
        return float("nan")
    base, best = pts[0]["value"], pts[0]["level"]
    for r in pts[1:]:
        if r["value"] < base - tol - 1e-12:  # 1e-12: 0.6 - 0.01 is not below 0.59
            break
        best = r["level"]
    return float(best)
