"""Drawing the paper's figures from the data icl_scale.paper computes (headless PNGs through
icl_scale.figures). Each function returns the path written, or None when there is nothing to draw."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .figures import pyplot, save_png


def _save(fig, path: Path) -> Path:
    return save_png(fig, path, dpi=110, bbox_inches="tight")


def panels(n: int, max_cols: int = 4, size: tuple[float, float] = (3.6, 2.9)):
    """A grid of n panels (at most `max_cols` per row); the unused cells are hidden."""
    ncol = max(1, min(max_cols, n))
    nrow = max(1, math.ceil(n / ncol))
    fig, axes = pyplot().subplots(nrow, ncol, figsize=(size[0] * ncol, size[1] * nrow), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def _heatmap(ax, m, title: str, xlabel: str = "head", ylabel: str = "layer", **kw):
    """A layers x heads (or levels) heatmap: layer 0 at the bottom, integer ticks, no grid lines."""
    from matplotlib.ticker import MaxNLocator

    a = np.asarray(m, dtype=float)
    im = ax.imshow(a, aspect="auto", origin="lower", interpolation="nearest", **kw)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(False)
    return im


def fig3_importance(data: dict, path: Path) -> Path | None:
    """Head importance heatmaps (layers x heads), each scaled to its max: every (task, shot) and the
    aggregate of each shot."""
    items = [(f"{c['task']} {c['shot']}-shot", c["heads"]) for c in data["cells"]]
    items += [(f"aggregate {a['shot']}-shot", a["heads"]) for a in data["aggregate"]]
    if not items:
        return None
    fig, axes = panels(len(items), max_cols=6, size=(2.4, 3.2))
    for ax, (title, m) in zip(axes, items):
        a = np.asarray(m, dtype=float)
        im = _heatmap(ax, a / max(float(a.max()), 1e-20), title, cmap="magma", vmin=0, vmax=1)
        fig.colorbar(im, ax=ax, shrink=0.8, label="importance / max")
    fig.suptitle("Head importance (Fig. 3; each panel scaled to its max)")
    fig.tight_layout()
    return _save(fig, path)


def fig4_knockout(rows: list[dict], path: Path) -> Path | None:
    """Accuracy drop when FFN l alone is knocked out: one panel per task, a line per shot."""
    tasks = sorted({r["task"] for r in rows})
    if not tasks:
        return None
    fig, axes = panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for r in (r for r in rows if r["task"] == task):
            ax.plot(range(len(r["drop"])), r["drop"], marker=".", label=f"{r['shot']}-shot")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("layer of the knocked-out FFN")
        ax.set_ylabel(f"drop in {next(r['metric'] for r in rows if r['task'] == task)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("FFN knock-out importance (Fig. 4)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _random_band(ax, cell: dict) -> None:
    """The random-pruning baseline of a cell: its mean dashed, min-max over the random curves shaded."""
    band = cell.get("random") or []
    if band:
        x = [b["level"] for b in band]
        ax.fill_between(x, [b["min"] for b in band], [b["max"] for b in band], color="0.5", alpha=0.2, lw=0)
        ax.plot(x, [b["mean"] for b in band], "--", color="0.4", lw=0.9,
                label=f"random, {cell['shot']}-shot (n={band[0]['n_curves']})")


def fig56_curves(data: dict, path: Path) -> Path | None:
    """Pruning curves: one panel per task (a line per shot, the 95% doc interval shaded, seed
    intervals as error bars when there are several seeds), then one panel of the mean over tasks."""
    tasks = sorted({c["task"] for c in data["cells"]})
    if not tasks:
        return None
    fig, axes = panels(len(tasks) + 1)
    what = "heads" if data["kind"] == "heads" else "FFNs"
    for ax, task in zip(axes, tasks):
        mine = [c for c in data["cells"] if c["task"] == task]
        for c in mine:
            _random_band(ax, c)
            x = [p["level"] for p in c["points"]]
            y = [p["value"] for p in c["points"]]
            line, = ax.plot(x, y, marker="o", ms=3, label=f"{c['shot']}-shot")
            ax.fill_between(x, [p["doc_ci"][0] for p in c["points"]], [p["doc_ci"][1] for p in c["points"]],
                            color=line.get_color(), alpha=0.12)
            if any(p["n_seeds"] > 1 for p in c["points"]):
                err = [[p["value"] - p["seed_ci"][0] for p in c["points"]], [p["seed_ci"][1] - p["value"]
                                                                             for p in c["points"]]]
                ax.errorbar(x, y, yerr=err, fmt="none", ecolor=line.get_color(), capsize=2, lw=0.8)
        ax.set_title(task)
        ax.set_xlabel(f"% {what} pruned")
        ax.set_ylabel(mine[0]["metric"])  # each task's own metric (ReCoRD: em)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for m in data["mean"]:
        x = [p["level"] for p in m["points"]]
        line, = ax.plot(x, [p["value"] for p in m["points"]], marker="o", ms=3, label=f"{m['shot']}-shot")
        ax.fill_between(x, [p["min"] for p in m["points"]], [p["max"] for p in m["points"]],
                        color=line.get_color(), alpha=0.12)
    ax.set_title("mean over tasks (band: min-max)")
    ax.set_xlabel(f"% {what} pruned")
    ax.set_ylabel("mean of the tasks' metrics")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"Pruning {what}, least important first ({'Fig. 5' if what == 'heads' else 'Fig. 6'})",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def fig7_grid(data: dict, path: Path) -> Path | None:
    """The heads x FFN grid as heatmaps: every (task, shot) and the mean over tasks per shot."""
    items = [(f"{c['task']} {c['shot']}-shot", c) for c in data["cells"]]
    items += [(f"mean {m['shot']}-shot ({len(m['tasks'])} tasks)", m) for m in data["mean"]]
    if not items:
        return None
    fig, axes = panels(len(items), max_cols=4, size=(3.2, 2.8))
    for ax, (title, c) in zip(axes, items):
        im = _heatmap(ax, c["value"], title, "% heads pruned", "% FFNs pruned", cmap="viridis")
        ax.set_xticks(range(len(c["head_levels"])), [f"{p:g}" for p in c["head_levels"]], fontsize=6)
        ax.set_yticks(range(len(c["ffn_levels"])), [f"{p:g}" for p in c["ffn_levels"]], fontsize=6)
        for i, row in enumerate(c["value"]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="w")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Heads and FFNs pruned together (Fig. 7)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


TITLES = {"argsort_spearman": "Spearman of argsort orders (the paper's statistic)", "spearman": "Spearman",
          "top20_overlap": "top-20% overlap"}


def fig8_matrix(cmp: dict, which: str, path: Path) -> Path | None:
    """One statistic's task x task matrix at one shot, with the aggregate and random rows."""
    names = cmp["rows"]
    if len(names) < 2:
        return None
    n = len(names)
    fig, ax = pyplot().subplots(figsize=(1.2 + 0.55 * n, 0.9 + 0.5 * n))
    m = np.array(cmp[which], dtype=float)
    signed = which != "top20_overlap"
    im = ax.imshow(m, vmin=-1 if signed else 0, vmax=1, cmap="coolwarm" if signed else "viridis")
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="k" if signed else "w")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"{TITLES[which]}, {cmp['shot']}-shot (Fig. 8)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _transfer_style(name: str) -> str:
    if name == "own":
        return "o-"
    if name.startswith("aggregate"):
        return "s--"
    return "^-" if name.startswith("high_") else "v-" if name.startswith("low_") else ".:"


def _transfer_label(name: str) -> str:
    """aggregate_without_X -> "aggregate w/o X"; high_X / low_X -> "X (high-correlated)"."""
    for role in ("high", "low"):
        if name.startswith(role + "_"):
            return f"{name[len(role) + 1:]} ({role}-correlated)"
    return name.replace("aggregate_without_", "aggregate w/o ").replace("from_", "")


def fig9_transfer(rows: list[dict], path: Path) -> Path | None:
    """Each target's accuracy as heads are pruned by its own ranking, the aggregate, the aggregate
    without it and other tasks' rankings (one panel per target shard)."""
    targets = sorted({(r["task"], r["shot"], r["seed"]) for r in rows})
    if not targets:
        return None
    fig, axes = panels(len(targets))
    for ax, (task, shot, seed) in zip(axes, targets):
        mine = [r for r in rows if (r["task"], r["shot"], r["seed"]) == (task, shot, seed)]
        for name in dict.fromkeys(r["ranking"] for r in mine):
            pts = sorted((r for r in mine if r["ranking"] == name), key=lambda r: r["level"])
            ax.plot([r["level"] for r in pts], [r["value"] for r in pts], _transfer_style(name), ms=3,
                    label=_transfer_label(name))
        ax.set_title(f"{task} {shot}-shot seed {seed}", fontsize=9)
        ax.set_xlabel("% heads pruned")
        ax.set_ylabel(mine[0]["metric"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Cross-task transfer: pruning heads by other rankings (Fig. 9)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def fig10_induction(induction: dict | None, path: Path) -> Path | None:
    """Prefix-matching and copying score heatmaps (layers x heads)."""
    if induction is None:
        return None
    fig, axes = panels(2, size=(4.2, 3.6))
    for ax, name in zip(axes, ("prefix_matching", "copying")):
        im = _heatmap(ax, induction[name].float().numpy(), name.replace("_", " "), cmap="viridis")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Induction-head scores (Fig. 10)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def fig11_retained(rows: list[dict], path: Path) -> Path | None:
    """Induction capacity retained as heads are pruned by each ranking: a row of panels per shot."""
    shots = sorted({r["shot"] for r in rows})
    if not shots:
        return None
    fig, axes = panels(2 * len(shots), max_cols=2, size=(5.0, 3.4))
    for k, shot in enumerate(shots):
        for ax, score in zip(axes[2 * k: 2 * k + 2], ("prefix_matching", "copying")):
            for r in (r for r in rows if r["shot"] == shot):
                ret = r[f"retained_{score}"]
                style = "k--" if r["ranking"] == "random" else "s-" if r["ranking"] == "aggregate" else ".-"
                ax.plot([float(p) for p in ret], list(ret.values()), style, ms=3, label=r["ranking"])
            ax.set_title(f"{score.replace('_', ' ')}, {shot}-shot", fontsize=9)
            ax.set_xlabel("% heads pruned (lowest-ranked first)")
            ax.set_ylabel("fraction of the total score retained")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Induction capacity retained (Fig. 11)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def rankings_compare(ds: list, path: Path) -> Path | None:
    """Head pruning by task importance vs by induction score vs random rankings (per shard)."""
    ds = sorted((d for d in ds if d.curves.get("heads_by")), key=lambda d: (d.shard.task, d.shard.shot, d.shard.seed))
    if not ds:
        return None
    fig, axes = panels(len(ds))
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
        ax.set_title(f"{d.shard.task} {d.shard.shot}-shot seed {d.shard.seed}", fontsize=9)
        ax.set_xlabel("% heads pruned")
        ax.set_ylabel(c["metric"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Pruning heads by task importance vs induction score vs random", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --- the role of scale (icl_scale.scale): a sweep's models against their parameter count -------------

def _by_size(ax, rows: list[dict], value: str, style: str, label: str) -> None:
    """One series against parameter count (log x) with its interval as error bars (none where NaN)."""
    rows = sorted((r for r in rows if r["parameters"] and not math.isnan(r[value])), key=lambda r: r["parameters"])
    if not rows:
        return
    y = np.array([r[value] for r in rows])
    lo = np.nan_to_num(y - np.array([r["ci_lo"] for r in rows], dtype=float), nan=0.0)
    hi = np.nan_to_num(np.array([r["ci_hi"] for r in rows], dtype=float) - y, nan=0.0)
    ax.errorbar([r["parameters"] for r in rows], y, yerr=[lo, hi], fmt=style, capsize=2, label=label)


def _size_panels(rows: list[dict]):
    cells = sorted({(r["task"], r["shot"]) for r in rows})
    if not cells:
        return None, []
    fig, axes = panels(len(cells))
    return fig, list(zip(axes, cells))


def _size_axes(ax, title: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel("parameters")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def scale_prunable(rows: list[dict], path: Path) -> Path | None:
    """The fraction of heads and of FFNs prunable within the tolerance against parameter count, with
    its paired interval: one panel per (task, shot)."""
    fig, cells = _size_panels(rows)
    if fig is None:
        return None
    for ax, (task, shot) in cells:
        mine = [r for r in rows if (r["task"], r["shot"]) == (task, shot)]
        for kind, style, label in (("heads", "o-", "heads"), ("ffn", "s--", "FFNs")):
            _by_size(ax, [r for r in mine if r["kind"] == kind], "fraction", style, label)
        ax.set_ylim(-0.03, 1.0)
        _size_axes(ax, f"{task} {shot}-shot", "fraction prunable")
    fig.suptitle("Prunable within the tolerance, against model size (95% paired intervals)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def scale_depth(rows: list[dict], path: Path) -> Path | None:
    """Mean relative depth of the most important heads against parameter count: one panel per (task, shot)."""
    fig, cells = _size_panels(rows)
    if fig is None:
        return None
    for ax, (task, shot) in cells:
        _by_size(ax, [r for r in rows if (r["task"], r["shot"]) == (task, shot)], "mean_depth", "o-", "top heads")
        ax.axhline(0.5, color="0.5", ls="--", lw=0.8, label="spread evenly")
        ax.set_ylim(0, 1)
        _size_axes(ax, f"{task} {shot}-shot", "relative depth (l + 0.5) / L")
    fig.suptitle("Where the important heads sit, against model size (95% t-intervals over heads)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
