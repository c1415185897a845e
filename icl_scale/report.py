"""The reduction: one model's shards -> tables, the paper's figures and report.md.

Reads only the store (never the model). Shards that are missing, failed, still running or corrupt
are named in the result (and in report.md) and skipped; everything else is aggregated. What each
figure needs and the store lacks (a second shot, induction scores, transfer results) is named too.

Shards are read and checked by icl_scale.collect; the numbers behind each figure come from
icl_scale.paper and are drawn by icl_scale.plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from . import claims as C
from . import paired, paper
from . import plots as P
from .collect import Collected, collect, read_induction
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
        # Highest level up to which every pruning level stays within 1 point of unpruned (a point
        # estimate), with its doc count and the paired interval there (icl_scale.paired).
        for kind in ("heads", "ffn"):
            p = paired.prunable(d, kind)
            row[f"{kind}_prunable_1pt"] = p["level"]
            row.update({f"{kind}_prunable_n": p["n"], f"{kind}_prunable_diff": p["diff"],
                        f"{kind}_prunable_ci_lo": p["ci95"][0], f"{kind}_prunable_ci_hi": p["ci95"][1],
                        f"{kind}_prunable": p["text"]})
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
        v = [r["value"] for r in rows]
        mean, lo, hi = paper.seed_interval(v)
        sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else float("nan")
        out.append({"task": task, "shot": shot, "kind": kind, "head_level": ph, "ffn_level": pf,
                    "metric": rows[0]["metric"], "n_seeds": len(v), "seeds": sorted(r["seed"] for r in rows),
                    "mean": mean, "seed_ci_lo": lo, "seed_ci_hi": hi, "seed_std": sd})
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


# --- the whole reduction -------------------------------------------------------------------------------

def pruning_count(col: Collected) -> str:
    """The shards' pruning.count (floor, the paper's, when unrecorded or mixed)."""
    counts = {((d.manifest.get("config") or {}).get("pruning") or {}).get("count") or "floor" for d in col.ok}
    return counts.pop() if len(counts) == 1 else "floor"


def figure_data(col: Collected, induction) -> dict:
    """The numbers behind every figure (icl_scale.paper), JSON-able."""
    return {"fig3_importance": paper.fig3_importance(col), "fig4_knockout": paper.fig4_knockout(col),
            "fig5_heads": paper.fig56_curves(col, "heads"), "fig6_ffn": paper.fig56_curves(col, "ffn"),
            "fig7_grid": paper.fig7_grid(col), "fig8_correlation": paper.fig8_correlation(col),
            "table1_cross_shot": paper.table1_cross_shot(col),
            "fig11_retained": paper.fig11_retained(col, induction, pruning_count(col))}


def draw(col: Collected, data: dict, transfer: list[dict], induction, out: Path) -> dict[str, str]:
    """Every figure the data allows -> {file name: path}."""
    todo = [("fig3_importance.png", lambda p: P.fig3_importance(data["fig3_importance"], p)),
            ("fig4_ffn_knockout.png", lambda p: P.fig4_knockout(data["fig4_knockout"], p)),
            ("fig5_curves_heads.png", lambda p: P.fig56_curves(data["fig5_heads"], p)),
            ("fig6_curves_ffn.png", lambda p: P.fig56_curves(data["fig6_ffn"], p)),
            ("fig7_grid.png", lambda p: P.fig7_grid(data["fig7_grid"], p)),
            ("fig9_transfer.png", lambda p: P.fig9_transfer(transfer, p)),
            ("fig10_induction.png", lambda p: P.fig10_induction(induction, p)),
            ("fig11_retained.png", lambda p: P.fig11_retained(data["fig11_retained"], p)),
            ("curves_heads_rankings.png", lambda p: P.rankings_compare(col.ok, p))]
    for cmp in data["fig8_correlation"]:
        for which in P.TITLES:
            todo.append((f"fig8_{which}_{cmp['shot']}shot.png", lambda p, c=cmp, w=which: P.fig8_matrix(c, w, p)))
    figures = {}
    for name, fn in todo:
        if fn(out / name) is not None:
            figures[name] = str(out / name)
    return figures


def not_drawn(result: dict, col: Collected, transfer: list[dict]) -> list[str]:
    """Why a figure is missing: one line each."""
    why = []
    if not col.ok:
        why.append("no complete shard: nothing to draw")
    if len(paper.shots(col)) < 2:
        why.append("Table 1 (cross-shot correlation) needs shards at two or more shots")
    if not result["has_induction"]:
        why.append("Figs. 10-11 need the model's induction scores (python jobs/induction.py)")
    if not transfer:
        why.append("Fig. 9 needs transfer results (python jobs/transfer.py, or sweep.transfer=true)")
    if not any(d.curves.get("combined") for d in col.ok):
        why.append("Fig. 7 needs the heads x FFN grid (pruning.combined_levels)")
    return why


def reduce_store(root: Path | str, model: str, expected: list[tuple] | None = None,
                 out_dir: Path | None = None, figures: bool = True) -> dict:
    """Aggregate one model's shards into <root>/<model>/summary/ and return what was written
    (`figures=False`: tables, figures.json and report.md only, no PNGs)."""
    root = Path(root)
    out = Path(out_dir) if out_dir else root / model / "summary"
    col = collect(root, model, expected)
    induction, problem = read_induction(root, model)
    if problem:
        col.problems.append(problem)
    summary, curves = summary_table(col), curve_table(col)
    seeds, transfer = seed_table(curves), transfer_table(col)
    files: dict[str, str] = {}
    for name, rows in (("summary.csv", summary), ("curves.csv", curves), ("seeds.csv", seeds),
                       ("transfer.csv", transfer)):
        write_bytes(out / name, to_csv(rows))
        files[name] = str(out / name)
    data = figure_data(col, induction)
    result = {
        "model": model, "n_complete": len(col.ok), "problems": col.problems, "warnings": col.warnings,
        "mixed_settings": col.mixed, "summary": summary, "seeds": unpruned_over_seeds(seeds),
        "cross_shot": data["table1_cross_shot"], "rank_comparisons": data["fig8_correlation"],
        "induction_relation": data["fig11_retained"], "has_induction": induction is not None,
        "figures": draw(col, data, transfer, induction, out) if figures else {}, "files": files,
    }
    result["not_drawn"] = not_drawn(result, col, transfer)
    result["claims"] = C.claims_table(col, data, induction, transfer)
    claims_text = "\n".join(C.claims_md(result["claims"])) + "\n"
    for name, text in (("figures.json", dumps(data)), ("report.md", report_md(result, data, transfer)),
                       ("claims.json", dumps(result["claims"])), ("claims.md", claims_text)):
        write_bytes(out / name, text.encode())
        files[name] = str(out / name)
    write_json(out / "summary.json", result)
    files["summary.json"] = str(out / "summary.json")
    return {**result, "collected": col, "curves_rows": curves, "figure_data": data, "transfer_rows": transfer}


# --- report.md: the numbers behind each figure ---------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _table(cols: list[str], rows: list[list]) -> list[str]:
    if not rows:
        return ["(none)", ""]
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
            *("| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows), ""]


def _at(points: list[dict], level: float) -> float:
    return next((p["value"] for p in points if p["level"] == level), float("nan"))


def _md_seeds(result: dict) -> list[str]:
    rows = [[r["task"], r["shot"], r["metric"], r["n_seeds"], r["mean"],
             f"{_fmt(r['seed_ci_lo'])}-{_fmt(r['seed_ci_hi'])}" if r["n_seeds"] > 1 else ""] for r in result["seeds"]]
    return ["## Unpruned accuracy over demonstration seeds", "",
            *_table(["task", "shot", "metric", "seeds", "mean", "95% CI over seeds"], rows)]


def _md_curves(title: str, fig: dict, png: str) -> list[str]:
    levels = sorted({p["level"] for c in fig["cells"] for p in c["points"]})
    rows = [[c["task"], c["shot"], c["metric"], *[_at(c["points"], x) for x in levels]] for c in fig["cells"]]
    rows += [["mean", m["shot"], f"{len(m['tasks'])} tasks", *[_at(m["points"], x) for x in levels]]
             for m in fig["mean"]]
    return [f"## {title}", "", f"![{title}]({png})", "",
            *_table(["task", "shot", "metric", *[f"{x:g}%" for x in levels]], rows)]


def _md_knockout(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        top = max(range(len(r["drop"])), key=lambda i: r["drop"][i])
        out.append([r["task"], r["shot"], r["baseline"], f"L{top}: {r['drop'][top]:.3f}",
                    sum(r["drop"]) / len(r["drop"])])
    return ["## Fig. 4: FFN knock-out", "", "![Fig. 4](fig4_ffn_knockout.png)", "",
            *_table(["task", "shot", "baseline", "largest drop", "mean drop"], out)]


def _md_grid(fig: dict) -> list[str]:
    out = []
    for m in fig["mean"]:
        out += [f"## Fig. 7: heads x FFNs pruned, mean over {len(m['tasks'])} tasks, {m['shot']}-shot", "",
                "![Fig. 7](fig7_grid.png)", "",
                *_table(["FFNs \\ heads", *[f"{h:g}%" for h in m["head_levels"]]],
                        [[f"{f:g}%", *row] for f, row in zip(m["ffn_levels"], m["value"])])]
    return out


def _md_correlation(figs: list[dict]) -> list[str]:
    out = []
    for c in figs:
        rows = [[a, *[f"{x:.2f} ({y:.2f})" for x, y in zip(ra, rb)]]
                for a, ra, rb in zip(c["rows"], c["argsort_spearman"], c["spearman"])]
        out += [f"## Fig. 8: rank correlation across tasks, {c['shot']}-shot", "",
                f"![Fig. 8](fig8_argsort_spearman_{c['shot']}shot.png)", "",
                "The paper's statistic (Spearman of argsort orders), true Spearman in parentheses.", "",
                *_table(["", *c["rows"]], rows)]
    return out


def _md_cross_shot(t1: dict) -> list[str]:
    keys = ("argsort_spearman", "spearman", "top20_overlap")
    rows = [[r["task"], r["shots"], *[r[k] for k in keys]] for r in t1["per_task"]]
    rows += [[f"mean ({r['n_tasks']} tasks)", r["shots"], *[r[k] for k in keys]] for r in t1["mean_over_tasks"]]
    return ["## Table 1: cross-shot rank correlation", "",
            *_table(["task", "shots", "argsort Spearman (paper)", "Spearman", "top-20% overlap"], rows)]


def _md_transfer(rows: list[dict]) -> list[str]:
    if not rows:  # no figure drawn: say why instead of linking one
        return ["## Fig. 9: cross-task transfer", "", "Not run: the transfer curves need jobs/transfer.py "
                "(sweep.transfer=true, two or more tasks).", ""]
    return ["## Fig. 9: cross-task transfer", "", "![Fig. 9](fig9_transfer.png)", "",
            *_table(["task", "shot", "seed", "ranking", "level", "value"],
                    [[r["task"], r["shot"], r["seed"], r["ranking"], r["level"], r["value"]] for r in rows])]


def _md_retained(rows: list[dict]) -> list[str]:
    def kept(r, score):
        ret = r[f"retained_{score}"]
        return f"{_fmt(ret.get('50'))} / {_fmt(ret.get('90'))}"

    def rho(r, score):
        return f"{_fmt(r.get(f'argsort_spearman_{score}'))} ({_fmt(r.get(f'spearman_{score}'))})"

    table = [[r["ranking"], r["shot"], kept(r, "prefix_matching"), kept(r, "copying"), rho(r, "prefix_matching"),
              rho(r, "copying")] for r in rows]
    return ["## Figs. 10-11: induction heads", "", "![Fig. 10](fig10_induction.png) ![Fig. 11](fig11_retained.png)",
            "", "Kept at 50% / 90% of heads pruned; correlation with the ranking: paper's statistic (Spearman).", "",
            *_table(["ranking", "shot", "prefix matching kept", "copying kept", "rho prefix", "rho copying"], table)]


def _md_claims(rows: list[dict]) -> list[str]:
    return ["## The paper's claims on this model (claims.json)", "",
            "Accuracy claims: pruned - unpruned on the same docs, mean over (task, shot, seed), 95% paired "
            "bootstrap interval over docs; supported = the interval lies inside the range that agrees with "
            "the paper, contradicted = outside it, not distinguishable = both.", "", *C.claims_md(rows), ""]


def _md_prunable(summary: list[dict]) -> list[str]:
    rows = [[r["task"], r["shot"], r["seed"], r["unpruned"], r["heads_prunable"], r["ffn_prunable"]] for r in summary]
    return ["## Prunable within 1 point (per shard)", "",
            *_table(["task", "shot", "seed", "unpruned", "heads", "FFNs"], rows)]


def report_md(result: dict, data: dict, transfer: list[dict]) -> str:
    """report.md: what was aggregated and what not, then one section per figure with its numbers."""
    lines = [f"# {result['model']}: the paper's figures from the store", "",
             f"{result['n_complete']} complete shards; demonstration seeds are averaged per (task, shot).", ""]
    if result["problems"]:
        lines += ["Not aggregated:", "", *(f"- {p['shard']}: {p['status']} ({p['reason']})"
                                          for p in result["problems"]), ""]
    if result["not_drawn"]:
        lines += [*(f"- not drawn: {w}" for w in result["not_drawn"]), ""]
    lines += _md_claims(result["claims"]) + _md_prunable(result["summary"]) + _md_seeds(result)
    lines += _md_curves("Fig. 5: pruning heads", data["fig5_heads"], "fig5_curves_heads.png")
    lines += _md_curves("Fig. 6: pruning FFNs", data["fig6_ffn"], "fig6_curves_ffn.png")
    lines += _md_knockout(data["fig4_knockout"]) + _md_grid(data["fig7_grid"])
    lines += _md_correlation(data["fig8_correlation"]) + _md_cross_shot(data["table1_cross_shot"])
    lines += _md_transfer(transfer) + _md_retained(data["fig11_retained"])
    return "\n".join(lines) + "\n"


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
