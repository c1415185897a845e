"""Aggregation across shards: tables, rank comparisons and the paper's figures.

Reads only the store (never the model). Shards that are missing, failed, still running or
corrupt are named in the result and skipped; everything else is aggregated.

Shards are read and checked by icl_scale.collect: a shard whose files do not fit is reported as
corrupt with the file and the field; complete shards made with different settings are still
aggregated, but named in `warnings`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from .collect import Collected, collect, read_induction
from .figures import pyplot, save_png
from .store import write_bytes, write_json

# --- tables ---------------------------------------------------------------------------------------

def curve_table(col: Collected) -> list[dict]:
    """One row per (shard, curve, pruning level): heads-only rows have ffn_level 0 and vice versa."""
    rows = []
    for d in col.ok:
        c = d.curves
        levels = [("heads", r, r["level"], 0.0) for r in c["heads"]]
        levels += [("ffn", r, 0.0, r["level"]) for r in c["ffn"]]
        levels += [("combined", r, r["head_level"], r["ffn_level"]) for r in c.get("combined", [])]
        for kind, r, ph, pf in levels:
            m = r["metrics"][c["metric"]]
            rows.append({"model": d.shard.model, "task": d.shard.task, "shot": d.shard.shot, "kind": kind,
                         "head_level": float(ph), "ffn_level": float(pf), "metric": c["metric"],
                         "value": m["value"], "ci_lo": m["ci95"][0], "ci_hi": m["ci95"][1], "n": m["n"]})
    return rows


def summary_table(col: Collected) -> list[dict]:
    rows = []
    for d in col.ok:
        c = d.curves
        heads = {r["level"]: r["value"] for r in c["heads"]}
        ffn = {r["level"]: r["value"] for r in c["ffn"]}
        base = heads.get(0.0, float("nan"))
        row = {"model": d.shard.model, "task": d.shard.task, "shot": d.shard.shot, "metric": c["metric"],
               "unpruned": base, "n_eval": c["n_eval"], "n_importance": c["n_importance"],
               "seconds": d.manifest.get("timings", {}).get("total")}
        for p, v in sorted(heads.items()):
            row[f"heads_{p:g}"] = v
        for p, v in sorted(ffn.items()):
            row[f"ffn_{p:g}"] = v
        # Largest head-pruning level whose accuracy stays within 1 point of unpruned.
        row["heads_prunable_1pt"] = max([p for p, v in heads.items() if v >= base - 0.01], default=0.0)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["task"], r["shot"]))


def to_csv(rows: list[dict]) -> bytes:
    if not rows:
        return b""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


# --- rank comparisons -------------------------------------------------------------------------------

def top_overlap(a: torch.Tensor, b: torch.Tensor, frac: float = 0.2) -> float:
    """Fraction of a's top-`frac` heads that are also in b's top-`frac` heads (NaN for two shapes)."""
    if a.shape != b.shape:
        return float("nan")
    k = max(1, int(round(frac * a.numel())))
    ta = set(torch.topk(a.flatten(), k).indices.tolist())
    tb = set(torch.topk(b.flatten(), k).indices.tolist())
    return len(ta & tb) / k


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two same-shape tensors (NaN for two shapes: other models)."""
    if a.shape != b.shape:
        return float("nan")
    r = spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic
    return float(r) if not math.isnan(r) else float("nan")


def rank_comparison(col: Collected, shot: int, key: str = "heads") -> dict:
    """Spearman and top-20% overlap between every pair of tasks' importance rankings at one shot."""
    ds = sorted((d for d in col.ok if d.shard.shot == shot), key=lambda d: d.shard.task)
    tasks = [d.shard.task for d in ds]
    n = len(ds)
    sp = np.full((n, n), np.nan)
    ov = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            sp[i, j] = spearman(ds[i].importance[key], ds[j].importance[key])
            ov[i, j] = top_overlap(ds[i].importance[key], ds[j].importance[key])
    return {"shot": shot, "component": key, "tasks": tasks, "spearman": sp.tolist(), "top20_overlap": ov.tolist()}


def induction_relation(col: Collected, induction: dict[str, torch.Tensor]) -> list[dict]:
    """Per shard: Spearman and top-20% overlap of head importance with prefix matching and copying,
    and the retained induction capacity as heads are pruned by the task ranking (paper Fig. 11)."""
    from .induction import retained_capacity

    levels = list(range(0, 100, 10))
    rows = []
    for d in col.ok:
        imp = d.importance["heads"]
        if imp.shape != induction["prefix_matching"].shape:
            continue
        row = {"task": d.shard.task, "shot": d.shard.shot}
        for name in ("prefix_matching", "copying"):
            s = induction[name].float()
            row[f"spearman_{name}"] = spearman(imp, s)
            row[f"overlap_{name}"] = top_overlap(imp, s)
            row[f"retained_{name}"] = dict(zip((f"{p:g}" for p in levels), retained_capacity(s, imp, levels)))
        rows.append(row)
    return rows


# --- figures ------------------------------------------------------------------------------------------

def _save(fig, path: Path) -> Path:
    return save_png(fig, path, dpi=110, bbox_inches="tight")


def _panels(n: int, max_cols: int = 4, size: tuple[float, float] = (3.6, 2.9)):
    """A grid of n panels (at most `max_cols` per row); the unused cells are hidden."""
    ncol = min(max_cols, n)
    nrow = math.ceil(n / ncol)
    fig, axes = pyplot().subplots(nrow, ncol, figsize=(size[0] * ncol, size[1] * nrow), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def plot_curves(col: Collected, kind: str, path: Path) -> Path | None:
    """Accuracy vs % of heads (or FFNs) pruned: one panel per task, one line per shot."""
    tasks = sorted({d.shard.task for d in col.ok})
    if not tasks:
        return None
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for d in sorted((d for d in col.ok if d.shard.task == task), key=lambda d: d.shard.shot):
            rows = d.curves[kind]
            x = [r["level"] for r in rows]
            y = [r["value"] for r in rows]
            lo = [r["metrics"][d.curves["metric"]]["ci95"][0] for r in rows]
            hi = [r["metrics"][d.curves["metric"]]["ci95"][1] for r in rows]
            line, = ax.plot(x, y, marker="o", ms=3, label=f"{d.shard.shot}-shot")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12)
        ax.set_title(task)
        ax.set_xlabel(f"% {'heads' if kind == 'heads' else 'FFNs'} pruned")
        ax.set_ylabel(col.ok[0].curves["metric"] if col.ok else "")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    model = col.ok[0].shard.model
    fig.suptitle(f"{model}: pruning {kind}, least important first (95% CI)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_rankings(col: Collected, path: Path) -> Path | None:
    """Head pruning by task importance vs by induction score vs random rankings (mean +- range)."""
    ds = sorted((d for d in col.ok if d.curves.get("heads_by")), key=lambda d: (d.shard.task, d.shard.shot))
    if not ds:
        return None
    fig, axes = _panels(len(ds))
    for ax, d in zip(axes, ds):
        c = d.curves
        ax.plot([r["level"] for r in c["heads"]], [r["value"] for r in c["heads"]], "o-", ms=3, label="task importance")
        if "heads_by_induction" in c["heads_by"]:
            rows = c["heads_by"]["heads_by_induction"]
            ax.plot([r["level"] for r in rows], [r["value"] for r in rows], "s-", ms=3, label="prefix matching")
        rnd = [v for k, v in c["heads_by"].items() if k.startswith("heads_random")]
        if rnd:
            x = [r["level"] for r in rnd[0]]
            ys = np.array([[r["value"] for r in rows] for rows in rnd])
            ax.plot(x, ys.mean(0), "k--", lw=1, label=f"random (n={len(rnd)})")
            ax.fill_between(x, ys.min(0), ys.max(0), color="k", alpha=0.1)
        ax.set_title(f"{d.shard.task} {d.shard.shot}-shot", fontsize=9)
        ax.set_xlabel("% heads pruned")
        ax.set_ylabel(c["metric"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Pruning heads by task importance vs induction score vs random", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_importance(col: Collected, path: Path) -> Path | None:
    """Head importance heatmaps (layers x heads), one per shard."""
    ds = sorted(col.ok, key=lambda d: (d.shard.task, d.shard.shot))
    if not ds:
        return None
    fig, axes = _panels(len(ds), max_cols=6, size=(2.4, 3.2))
    for ax, d in zip(axes, ds):
        im = d.importance["heads"]
        ax.imshow((im / im.max().clamp_min(1e-20)).numpy(), aspect="auto", cmap="magma", origin="lower")
        ax.set_title(f"{d.shard.task} {d.shard.shot}-shot", fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
    fig.suptitle("Head importance (each panel scaled to its max)")
    fig.tight_layout()
    return _save(fig, path)


def plot_matrix(cmp: dict, which: str, path: Path) -> Path | None:
    if len(cmp["tasks"]) < 2:
        return None
    plt = pyplot()
    n = len(cmp["tasks"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    m = np.array(cmp[which])
    signed = which == "spearman"
    im = ax.imshow(m, vmin=-1 if signed else 0, vmax=1, cmap="coolwarm" if signed else "viridis")
    ax.set_xticks(range(n), cmp["tasks"], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), cmp["tasks"], fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"{'Spearman' if which == 'spearman' else 'top-20% overlap'} of head importance, {cmp['shot']}-shot")
    fig.tight_layout()
    return _save(fig, path)


def plot_retained(rows: list[dict], path: Path) -> Path | None:
    """Paper Fig. 11: induction capacity retained as heads are pruned by each task's ranking."""
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, name in zip(axes, ("prefix_matching", "copying")):
        for r in rows:
            ret = r[f"retained_{name}"]
            ax.plot([float(k) for k in ret], list(ret.values()), marker=".", label=f"{r['task']} {r['shot']}s")
        ax.plot([0, 90], [1, 0.1], "k--", lw=0.8, label="uniform")
        ax.set_xlabel("% heads pruned (task importance, lowest first)")
        ax.set_ylabel(f"fraction of total {name.replace('_', ' ')} retained")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


# --- the whole reduction -------------------------------------------------------------------------------

def reduce_store(root: Path | str, model: str, expected: list[tuple[str, int]] | None = None,
                 out_dir: Path | None = None) -> dict:
    """Aggregate one model's shards into <root>/<model>/summary/ and return what was written."""
    root = Path(root)
    out = Path(out_dir) if out_dir else root / model / "summary"
    col = collect(root, model, expected)
    files: dict[str, str] = {}
    summary = summary_table(col)
    curves = curve_table(col)
    write_bytes(out / "summary.csv", to_csv(summary))
    write_bytes(out / "curves.csv", to_csv(curves))
    files["summary.csv"] = str(out / "summary.csv")
    files["curves.csv"] = str(out / "curves.csv")
    shots = sorted({d.shard.shot for d in col.ok})
    comparisons = [rank_comparison(col, s) for s in shots]
    induction, problem = read_induction(root, model)
    if problem:
        col.problems.append(problem)
    relation = induction_relation(col, induction) if induction is not None else []
    figures = {}
    for name, fn in (("curves_heads.png", lambda p: plot_curves(col, "heads", p)),
                     ("curves_ffn.png", lambda p: plot_curves(col, "ffn", p)),
                     ("importance_heads.png", lambda p: plot_importance(col, p)),
                     ("curves_heads_rankings.png", lambda p: plot_rankings(col, p)),
                     ("induction_retained.png", lambda p: plot_retained(relation, p))):
        if fn(out / name) is not None:
            figures[name] = str(out / name)
    for cmp in comparisons:
        for which in ("spearman", "top20_overlap"):
            name = f"rank_{which}_{cmp['shot']}shot.png"
            if plot_matrix(cmp, which, out / name) is not None:
                figures[name] = str(out / name)
    result = {
        "model": model, "n_complete": len(col.ok), "problems": col.problems, "warnings": col.warnings,
        "mixed_settings": col.mixed, "summary": summary,
        "rank_comparisons": comparisons, "induction_relation": relation,
        "has_induction": induction is not None, "files": files, "figures": figures,
    }
    write_json(out / "summary.json", result)
    files["summary.json"] = str(out / "summary.json")
    return {**result, "collected": col, "curves_rows": curves}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
