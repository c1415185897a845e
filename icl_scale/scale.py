"""The role of scale: every model of a sweep (`sweep.models`) against its parameter count.

Per (task, shot) and model, from the collected shards (icl_scale.collect), demonstration seeds
pooled:

  prunable   the fraction of heads (and of FFNs) that can be pruned, least important first, while
             accuracy stays within `TOL` of unpruned (icl_scale.paired's tolerance, 1 point): the
             largest level up to which every level's mean paired difference (pruned - unpruned on the
             same docs, icl_scale.paired.paired_interval) is at least -TOL. Its interval runs from
             the largest level up to which a larger drop is ruled out at every level (the 95% paired
             interval's lower end >= -TOL) to the largest up to which none is established (its upper
             end >= -TOL). The intervals are pointwise, one per level, not simultaneous.
  depth      where the important heads sit: the relative depth (l + 0.5) / L of the top `TOP` of heads
             by seed-mean importance (layer l of L, so that heads spread evenly have mean 0.5 at any
             depth), their mean and its 95% t-interval over those heads.

The parameter count is the one the shards' manifests record (the loaded model's), else the
planner's from the model's architecture numbers (icl_scale.plan).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from scipy.stats import t as student_t

from .collect import Collected, ShardData, collect
from .paired import TOL, level_difference, paired_interval, sample_key
from .paper import cells, curve_points, mean_importance

TOP = 0.10  # the important heads: the top 10% by importance
KINDS = ("heads", "ffn")
SLACK = 1e-12  # 0.6 - 0.01 is not below 0.59


def planned_parameters(model: dict) -> int | None:
    """The planner's parameter count of a model section (None without architecture numbers, or for a
    random model whose `config` overrides make its preset's arch block stale: its shards count it)."""
    from .plan import Arch, PlanError, n_params

    if model.get("source") == "random" and model.get("config"):
        return None
    try:
        return n_params(Arch.from_spec(model))
    except (PlanError, TypeError, ValueError, OSError):
        return None


def model_parameters(col: Collected, model: dict) -> int | None:
    """The loaded model's count from a shard manifest, else the planner's."""
    recorded = [d.manifest["parameters"] for d in col.ok if d.manifest.get("parameters")]
    return int(recorded[0]) if recorded else planned_parameters(model)


def _level_interval(ds: list[ShardData], kind: str, level: float) -> dict | None:
    """The paired difference at `level` over the seeds' shards, or None when a seed has no samples."""
    diffs = [level_difference(d, sample_key(kind, level), sample_key(kind, 0)) for d in ds]
    return None if any(x is None for x in diffs) else paired_interval(diffs)


def prunable_fraction(ds: list[ShardData], kind: str, tol: float = TOL) -> dict:
    """{fraction, ci_lo, ci_hi, n_docs, paired} of one (task, shot, model) curve (`kind` heads or ffn);
    without per-doc samples the point comes from the seed-mean curve and the interval is NaN."""
    points = curve_points(ds, kind)
    if not points:
        return {"fraction": math.nan, "ci_lo": math.nan, "ci_hi": math.nan, "n_docs": 0, "paired": False}
    base = points[0]["value"]
    point = lo = hi = points[0]["level"]
    going = {"point": True, "lo": True, "hi": True}
    paired, n_docs = True, int(sum(d.curves.get("n_eval") or 0 for d in ds))
    for p in points[1:]:
        iv = _level_interval(ds, kind, p["level"]) if paired else None
        paired = iv is not None
        diff, (a, b) = (iv["value"], iv["ci95"]) if iv else (p["value"] - base, (math.nan, math.nan))
        n_docs = iv["n"] if iv else n_docs
        going["point"] &= diff >= -tol - SLACK
        going["lo"] &= not math.isnan(a) and a >= -tol - SLACK
        going["hi"] &= math.isnan(b) or b >= -tol - SLACK
        point = p["level"] if going["point"] else point
        lo = p["level"] if going["lo"] else lo
        hi = p["level"] if going["hi"] else hi
        if not going["hi"]:
            break  # the upper end is below -tol: so are the mean and the lower end from here on
    if not paired:
        lo = hi = math.nan
    return {"fraction": point / 100, "ci_lo": lo / 100, "ci_hi": hi / 100, "n_docs": n_docs, "paired": paired}


def important_depth(importance: torch.Tensor, top: float = TOP) -> dict:
    """Mean relative depth (l + 0.5) / L of the top `top` of heads of an [L, H] importance, with its
    95% t-interval over those heads (ties by index)."""
    n_layers, n_heads = importance.shape
    k = max(1, math.ceil(top * n_layers * n_heads))
    order = torch.argsort(importance.flatten().double(), descending=True, stable=True)[:k]
    depth = ((order // n_heads).double() + 0.5) / n_layers
    mean = float(depth.mean())
    lo = hi = math.nan
    if k > 1:
        half = float(student_t.ppf(0.975, k - 1) * depth.std(unbiased=True) / math.sqrt(k))
        lo, hi = mean - half, mean + half
    return {"mean_depth": mean, "ci_lo": lo, "ci_hi": hi, "top_heads": k, "n_layers": n_layers}


def scale_data(cols: dict[str, Collected], params: dict[str, int | None]) -> dict:
    """The numbers behind the cross-model figures: {"models", "prunable", "depth"} rows, JSON-able."""
    prunable, depth, models = [], [], []
    for name, col in cols.items():
        layers = next((int(d.importance["heads"].shape[0]) for d in col.ok), None)
        models.append({"model": name, "parameters": params.get(name), "n_layers": layers, "complete": len(col.ok),
                       "problems": len(col.problems)})
        for (task, shot), ds in cells(col).items():
            key = {"model": name, "parameters": params.get(name), "task": task, "shot": shot, "n_seeds": len(ds),
                   "metric": ds[0].curves["metric"]}
            prunable += [{**key, "kind": kind, **prunable_fraction(ds, kind)} for kind in KINDS]
            depth.append({**key, **important_depth(mean_importance(ds, "heads"))})
    def by_size(r):
        return r.get("task", ""), r.get("shot", 0), r["parameters"] or 0, r["model"]

    return {"tolerance": TOL, "top": TOP, "models": sorted(models, key=by_size),
            "prunable": sorted(prunable, key=by_size), "depth": sorted(depth, key=by_size)}


def sized(data: dict) -> list[dict]:
    """The models with complete shards and a parameter count: the points of the cross-model figures."""
    return [m for m in data["models"] if m["complete"] and m["parameters"]]


def not_drawn(data: dict) -> list[str]:
    why = []
    if len(sized(data)) < 2:
        why.append(f"the cross-model figures need complete shards of two or more models of known size "
                   f"({len(sized(data))} here)")
    why += [f"{m['model']}: no parameter count (no shard manifest records it and the preset has no arch block)"
            for m in data["models"] if m["complete"] and not m["parameters"]]
    return why


# --- report.md ------------------------------------------------------------------------------------

def _num(v, fmt: str = "{:.2f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _interval(r: dict, key: str) -> str:
    return f"{_num(r[key])} [{_num(r['ci_lo'])}, {_num(r['ci_hi'])}]"


def report_md(name: str, data: dict, problems: list[dict], why: list[str]) -> str:
    """The cross-model report: the models, then each figure's numbers."""
    lines = [f"# {name}: the role of scale over {len(data['models'])} models", "",
             "| model | parameters | layers | complete shards | problems |", "|---|---|---|---|---|",
             *(f"| {m['model']} | {_num(m['parameters'], '{:,}')} | {_num(m['n_layers'], '{}')} | {m['complete']} | "
               f"{m['problems']} |" for m in data["models"]), ""]
    lines += [f"- not aggregated: {p['shard']}: {p['status']} ({p['reason']})" for p in problems]
    lines += [f"- not drawn: {w}" for w in why] + ([""] if problems or why else [])
    lines += ["## Prunable fraction against size", "", "![prunable](scale_prunable.png)", "",
              f"The largest fraction pruned (least important first) with accuracy within {100 * data['tolerance']:g} "
              "point of unpruned at every level up to it; in brackets, from the fraction at which a larger drop is "
              "ruled out to the one at which it is established (95% paired intervals over docs, pointwise). The "
              f"highest pruning level tried caps all three; under {1 / data['tolerance']:.0f} docs one doc is worth "
              "more than the tolerance.", "",
              "| task | shot | model | parameters | heads | FFNs | docs |", "|---|---|---|---|---|---|---|"]
    by = {(r["task"], r["shot"], r["model"], r["kind"]): r for r in data["prunable"]}
    for r in (r for r in data["prunable"] if r["kind"] == "heads"):
        ffn = by.get((r["task"], r["shot"], r["model"], "ffn"))
        lines.append(f"| {r['task']} | {r['shot']} | {r['model']} | {_num(r['parameters'], '{:,}')} | "
                     f"{_interval(r, 'fraction')} | {_interval(ffn, 'fraction') if ffn else '-'} | {r['n_docs']} |")
    lines += ["", "## Depth of the important heads against size", "", "![depth](scale_depth.png)", "",
              f"Mean relative depth (l + 0.5) / L of the top {100 * data['top']:g}% of heads by importance "
              "(0: first layer, 1: last; 0.5 if spread evenly), 95% t-interval over those heads.", "",
              "| task | shot | model | parameters | layers | top heads | mean depth |", "|---|---|---|---|---|---|---|",
              *(f"| {r['task']} | {r['shot']} | {r['model']} | {_num(r['parameters'], '{:,}')} | {r['n_layers']} | "
                f"{r['top_heads']} | {_interval(r, 'mean_depth')} |" for r in data["depth"]), ""]
    return "\n".join(lines)


# --- the reduction --------------------------------------------------------------------------------

def reduce_scale(root: Path | str, name: str, models: list[dict], expected: list[tuple] | None,
                 out: Path) -> dict:
    """Collect every model's shards, write the cross-model tables, figures and report.md into `out`,
    and return what was written (and the problems: a model's missing, failed or corrupt shards)."""
    from . import plots
    from .report import to_csv
    from .store import write_bytes, write_json

    cols = {m["name"]: collect(root, m["name"], expected) for m in models}
    params = {m["name"]: model_parameters(cols[m["name"]], m) for m in models}
    data = scale_data(cols, params)
    problems = [p for col in cols.values() for p in col.problems]  # shard names begin with the model's
    why = not_drawn(data)
    figures = {}
    if len(sized(data)) >= 2:
        for file, draw, rows in (("scale_prunable.png", plots.scale_prunable, data["prunable"]),
                                 ("scale_depth.png", plots.scale_depth, data["depth"])):
            if draw(rows, out / file) is not None:
                figures[file] = str(out / file)
    write_bytes(out / "scale_prunable.csv", to_csv(data["prunable"]))
    write_bytes(out / "scale_depth.csv", to_csv(data["depth"]))
    write_bytes(out / "report.md", report_md(name, data, problems, why).encode())
    result = {"name": name, "summary_dir": str(out), "n_complete": sum(len(c.ok) for c in cols.values()),
              "problems": problems,
              "warnings": [w for c in cols.values() for w in c.warnings], "not_drawn": why, "figures": figures,
              **data}
    write_json(out / "scale.json", result)
    return result
