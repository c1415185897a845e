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
from scipy.stats import t as student_t

from .collect import Collected, collect, read_induction
from .figures import pyplot, save_png
from .rankings import aggregate, argsort_spearman, spearman, top_overlap
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
            rows.append({"model": d.shard.model, "task": d.shard.task, "shot": d.shard.shot, "seed": d.shard.seed,
                         "kind": kind,
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
        row = {"model": d.shard.model, "task": d.shard.task, "shot": d.shard.shot, "seed": d.shard.seed,
               "metric": c["metric"],
               "unpruned": base, "n_eval": c["n_eval"], "n_importance": c["n_importance"],
               "seconds": d.manifest.get("timings", {}).get("total")}
        for p, v in sorted(heads.items()):
            row[f"heads_{p:g}"] = v
        for p, v in sorted(ffn.items()):
            row[f"ffn_{p:g}"] = v
        # Largest head-pruning level whose accuracy stays within 1 point of unpruned.
        row["heads_prunable_1pt"] = max([p for p, v in heads.items() if v >= base - 0.01], default=0.0)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["task"], r["shot"], r["seed"]))


def seed_table(curve_rows: list[dict]) -> list[dict]:
    """Per (task, shot, curve, level): the mean over demonstration seeds and its 95% t-interval
    (NaN with one seed), from curve_table's rows."""
    groups: dict[tuple, list[dict]] = {}
    for r in curve_rows:
        groups.setdefault((r["task"], r["shot"], r["kind"], r["head_level"], r["ffn_level"]), []).append(r)
    out = []
    for (task, shot, kind, ph, pf), rows in sorted(groups.items()):
        v = np.array([r["value"] for r in rows], dtype=float)
        lo = hi = float("nan")
        if len(v) > 1:
            half = float(student_t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
            lo, hi = float(v.mean()) - half, float(v.mean()) + half
        out.append({"task": task, "shot": shot, "kind": kind, "head_level": ph, "ffn_level": pf,
                    "metric": rows[0]["metric"], "n_seeds": len(v), "seeds": sorted(r["seed"] for r in rows),
                    "mean": float(v.mean()), "seed_ci_lo": lo, "seed_ci_hi": hi,
                    "seed_std": float(v.std(ddof=1)) if len(v) > 1 else float("nan")})
    return out


def unpruned_over_seeds(seed_rows: list[dict]) -> list[dict]:
    """The unpruned metric per (task, shot): seed mean, its interval and the seeds (seed_table rows)."""
    keep = ("task", "shot", "metric", "n_seeds", "seeds", "mean", "seed_ci_lo", "seed_ci_hi", "seed_std")
    return [{k: r[k] for k in keep} for r in seed_rows
            if r["kind"] == "heads" and r["head_level"] == 0 and r["ffn_level"] == 0]


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

def importance_by_task(col: Collected, shot: int, key: str = "heads") -> dict[str, torch.Tensor]:
    """{task: importance at `shot`}, the mean over the task's demonstration seeds (one seed: itself)."""
    by: dict[str, list[torch.Tensor]] = {}
    for d in col.ok:
        if d.shard.shot == shot:
            by.setdefault(d.shard.task, []).append(d.importance[key].double())
    return {t: torch.stack(v).mean(0).float() for t, v in sorted(by.items()) if len({x.shape for x in v}) == 1}


def _matrix(items: dict[str, torch.Tensor], fn) -> list[list[float]]:
    names = list(items)
    return [[fn(items[a], items[b]) for b in names] for a in names]


def rank_comparison(col: Collected, shot: int, key: str = "heads") -> dict:
    """Between every pair of tasks' importance rankings at one shot, plus the aggregate (mean over
    tasks): the paper's argsort statistic, true Spearman and the top-20% overlap."""
    imp = importance_by_task(col, shot, key)
    if len(imp) > 1 and len({tuple(v.shape) for v in imp.values()}) == 1:
        imp["aggregate"] = aggregate(imp)
    return {"shot": shot, "component": key, "tasks": list(imp),
            "argsort_spearman": _matrix(imp, argsort_spearman), "spearman": _matrix(imp, spearman),
            "top20_overlap": _matrix(imp, top_overlap)}


def cross_shot(col: Collected, key: str = "heads") -> dict:
    """Paper Table 1: per task, both statistics between its rankings at every pair of shots (seed
    means), and the mean over tasks per pair of shots."""
    shots = sorted({d.shard.shot for d in col.ok})
    by_shot = {s: importance_by_task(col, s, key) for s in shots}
    rows, pairs = [], [(a, b) for i, a in enumerate(shots) for b in shots[i + 1:]]
    for task in sorted({t for v in by_shot.values() for t in v}):
        for a, b in pairs:
            if task in by_shot[a] and task in by_shot[b]:
                x, y = by_shot[a][task], by_shot[b][task]
                rows.append({"task": task, "shots": f"{a}-{b}", "argsort_spearman": argsort_spearman(x, y),
                             "spearman": spearman(x, y), "top20_overlap": top_overlap(x, y)})
    mean = []
    for a, b in pairs:
        sel = [r for r in rows if r["shots"] == f"{a}-{b}"]
        if sel:
            mean.append({"shots": f"{a}-{b}", "n_tasks": len(sel),
                         **{k: float(np.nanmean([r[k] for r in sel])) for k in ("argsort_spearman", "spearman",
                                                                                 "top20_overlap")}})
    return {"component": key, "per_task": rows, "mean_over_tasks": mean}


def induction_relation(col: Collected, induction: dict[str, torch.Tensor]) -> list[dict]:
    """Per (task, shot), and for each shot's aggregate ranking (task "aggregate"): both rank
    statistics and the top-20% overlap of head importance with prefix matching and copying, and the
    retained induction capacity as heads are pruned by that ranking (paper Fig. 11)."""
    from .induction import retained_capacity

    levels = list(range(0, 100, 10))
    shape = induction["prefix_matching"].shape
    rows = []
    for shot in sorted({d.shard.shot for d in col.ok}):
        imp = {t: v for t, v in importance_by_task(col, shot).items() if v.shape == shape}
        if len(imp) > 1:
            imp["aggregate"] = aggregate(imp)
        for task, ranking in imp.items():
            row = {"task": task, "shot": shot}
            for name in ("prefix_matching", "copying"):
                sc = induction[name].float()
                row[f"argsort_spearman_{name}"] = argsort_spearman(ranking, sc)
                row[f"spearman_{name}"] = spearman(ranking, sc)
                row[f"overlap_{name}"] = top_overlap(ranking, sc)
                row[f"retained_{name}"] = dict(zip((f"{p:g}" for p in levels),
                                                   retained_capacity(sc, ranking, levels, count=col_count(col))))
            rows.append(row)
    return rows


def col_count(col: Collected) -> str:
    """The shards' pruning.count (floor, the paper's, when unrecorded)."""
    counts = {((d.manifest.get("config") or {}).get("pruning") or {}).get("count") or "floor" for d in col.ok}
    return counts.pop() if len(counts) == 1 else "floor"


# --- transfer (icl_scale.transfer's results beside each shard) ----------------------------------------

def transfer_table(col: Collected) -> list[dict]:
    """One row per (target shard, ranking, level) of the transfer results found beside the shards,
    with the target's own heads curve as ranking "own"."""
    rows = []
    for d in col.ok:
        f = d.shard.path / "transfer" / "curves.json"
        if not f.is_file():
            continue
        try:
            t = json.loads(f.read_text(encoding="utf-8"))
            curves = {"own": d.curves["heads"], **t["curves"]}
            for name, pts in curves.items():
                for r in pts:
                    rows.append({"task": d.shard.task, "shot": d.shard.shot, "seed": d.shard.seed, "ranking": name,
                                 "sources": ",".join(t["rankings"].get(name, {}).get("sources", [d.shard.task])),
                                 "level": float(r["level"]), "value": float(r["value"]), "metric": t["metric"]})
        except (OSError, ValueError, KeyError, TypeError) as e:
            col.problems.append({"shard": f"{d.name}/transfer", "status": "corrupt",
                                 "reason": f"transfer/curves.json: {e}; rerun jobs/transfer.py for this shard"})
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
        for d in sorted((d for d in col.ok if d.shard.task == task), key=lambda d: (d.shard.shot, d.shard.seed)):
            rows = d.curves[kind]
            x = [r["level"] for r in rows]
            y = [r["value"] for r in rows]
            lo = [r["metrics"][d.curves["metric"]]["ci95"][0] for r in rows]
            hi = [r["metrics"][d.curves["metric"]]["ci95"][1] for r in rows]
            label = f"{d.shard.shot}-shot" + (f" seed {d.shard.seed}" if d.shard.seed else "")
            line, = ax.plot(x, y, marker="o", ms=3, label=label)
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
    signed = which != "top20_overlap"
    im = ax.imshow(m, vmin=-1 if signed else 0, vmax=1, cmap="coolwarm" if signed else "viridis")
    ax.set_xticks(range(n), cmp["tasks"], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), cmp["tasks"], fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, shrink=0.8)
    title = {"argsort_spearman": "Spearman of argsort orders (paper)", "spearman": "Spearman",
             "top20_overlap": "top-20% overlap"}[which]
    ax.set_title(f"{title} of head importance, {cmp['shot']}-shot", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_transfer(rows: list[dict], path: Path) -> Path | None:
    """Paper Fig. 9: each target's accuracy as heads are pruned by its own ranking, the aggregate,
    the aggregate without it, and other tasks' rankings (one panel per target shard)."""
    targets = sorted({(r["task"], r["shot"], r["seed"]) for r in rows})
    if not targets:
        return None
    fig, axes = _panels(len(targets))
    for ax, (task, shot, seed) in zip(axes, targets):
        mine = [r for r in rows if (r["task"], r["shot"], r["seed"]) == (task, shot, seed)]
        for name in dict.fromkeys(r["ranking"] for r in mine):
            pts = sorted((r for r in mine if r["ranking"] == name), key=lambda r: r["level"])
            style = "o-" if name == "own" else "s--" if name.startswith("aggregate") else ".:"
            ax.plot([r["level"] for r in pts], [r["value"] for r in pts], style, ms=3,
                    label=name.replace("aggregate_without_", "aggregate w/o "))
        ax.set_title(f"{task} {shot}-shot seed {seed}", fontsize=9)
        ax.set_xlabel("% heads pruned")
        ax.set_ylabel(mine[0]["metric"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Cross-task transfer: pruning heads by other rankings", fontsize=10)
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

def reduce_store(root: Path | str, model: str, expected: list[tuple] | None = None,
                 out_dir: Path | None = None) -> dict:
    """Aggregate one model's shards into <root>/<model>/summary/ and return what was written.

    Long: one list of outputs (tables, comparisons, figures) read top to bottom."""
    root = Path(root)
    out = Path(out_dir) if out_dir else root / model / "summary"
    col = collect(root, model, expected)
    files: dict[str, str] = {}
    summary = summary_table(col)
    curves = curve_table(col)
    seeds = seed_table(curves)
    transfer = transfer_table(col)
    for name, rows in (("summary.csv", summary), ("curves.csv", curves), ("seeds.csv", seeds),
                       ("transfer.csv", transfer)):
        write_bytes(out / name, to_csv(rows))
        files[name] = str(out / name)
    shots = sorted({d.shard.shot for d in col.ok})
    comparisons = [rank_comparison(col, s) for s in shots]
    shots_cmp = cross_shot(col)
    induction, problem = read_induction(root, model)
    if problem:
        col.problems.append(problem)
    relation = induction_relation(col, induction) if induction is not None else []
    figures = {}
    for name, fn in (("curves_heads.png", lambda p: plot_curves(col, "heads", p)),
                     ("curves_ffn.png", lambda p: plot_curves(col, "ffn", p)),
                     ("importance_heads.png", lambda p: plot_importance(col, p)),
                     ("curves_heads_rankings.png", lambda p: plot_rankings(col, p)),
                     ("transfer_heads.png", lambda p: plot_transfer(transfer, p)),
                     ("induction_retained.png", lambda p: plot_retained(relation, p))):
        if fn(out / name) is not None:
            figures[name] = str(out / name)
    for cmp in comparisons:
        for which in ("argsort_spearman", "spearman", "top20_overlap"):
            name = f"rank_{which}_{cmp['shot']}shot.png"
            if plot_matrix(cmp, which, out / name) is not None:
                figures[name] = str(out / name)
    result = {
        "model": model, "n_complete": len(col.ok), "problems": col.problems, "warnings": col.warnings,
        "mixed_settings": col.mixed, "summary": summary, "seeds": unpruned_over_seeds(seeds),
        "rank_comparisons": comparisons, "cross_shot": shots_cmp, "induction_relation": relation,
        "has_induction": induction is not None, "files": files, "figures": figures,
    }
    write_json(out / "summary.json", result)
    files["summary.json"] = str(out / "summary.json")
    return {**result, "collected": col, "curves_rows": curves}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
