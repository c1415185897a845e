"""Masks section: several masks in one batched forward (icl_scale.scoring.score_masks, each batch row
under its own mask) vs one gated score_requests per mask, on the same requests; the per-doc
log-likelihoods and predictions of the two checked equal (bench/README.md, "Masks section").

The masks are a heads curve's levels by a random ranking (seed 0), all gated (no pruned copies), as
the shard's Evaluator.prefetch scores them. Settings: an eval list that fills a pass only with
several masks (the case eval.masks_per_pass=auto combines them), and one that fills a pass by itself
(auto keeps 1 there; forced sharing shows what it would gain: about nothing on a CPU).
"""

from __future__ import annotations

from pathlib import Path

from bench.common import data_dir, double_copy, run_alternating, stats
from icl_scale import pruning as P
from icl_scale.evaluator import masks_per_pass
from icl_scale.models.loading import LoadedModel
from icl_scale.scoring import score_masks, score_requests
from icl_scale.tasks import build_requests

LEVELS = (10, 20, 30, 40, 50, 60, 70, 80)
# (docs, batch_size, masks per pass): auto gives 2 and 4 for the first two, 1 for the third
SETTINGS = ((4, 8, 2), (4, 16, 4), (16, 8, 2))


def _masks(lm: LoadedModel) -> list[tuple]:
    g = lm.adapter.geometry
    ranking = P.random_ranking((g.n_layers, g.n_heads), 0)
    return [(P.prune_mask(ranking, p), None) for p in LEVELS]


def _agreement(a, b) -> tuple[float, float, float]:
    """Largest |dlogprob| over every mask's choices, the largest |dlogprob| / |logprob|, and the share
    of (mask, doc) predictions equal."""
    gap, rel, same, n = 0.0, 0.0, 0, 0
    for ma, mb in zip(a, b):
        for ra, rb in zip(ma, mb):
            for x, y in zip(ra, rb):
                gap = max(gap, abs(x.logprob - y.logprob))
                rel = max(rel, abs(x.logprob - y.logprob) / max(abs(x.logprob), 1e-12))
            same += max(range(len(ra)), key=lambda j: ra[j].logprob) == max(range(len(rb)), key=lambda j: rb[j].logprob)
            n += 1
    return gap, rel, same / n


def float64_gap(lm: LoadedModel, reqs, batch_size: int, k: int) -> dict:
    """Shared vs one pass set per mask in float64 on a double copy: ~0 shows that the float32 gaps are
    rounding (GEMMs over more rows block their sums differently), not rows under the wrong mask."""
    lm64 = double_copy(lm)
    masks = _masks(lm64)[:k]
    single = [score_requests(lm64, reqs, hm, fm, batch_size=batch_size) for hm, fm in masks]
    gap, _, same = _agreement(single, score_masks(lm64, reqs, masks, batch_size=batch_size))
    return {"docs": len(reqs), "batch_size": batch_size, "masks_per_pass": k, "max_abs_dlogprob": gap,
            "same_predictions": same}


def one_setting(lm: LoadedModel, reqs, batch_size: int, k: int, repeats: int) -> dict:
    masks = _masks(lm)

    def single():
        return [score_requests(lm, reqs, hm, fm, batch_size=batch_size) for hm, fm in masks]

    def shared():
        out = []
        for s in range(0, len(masks), k):
            out += score_masks(lm, reqs, masks[s: s + k], batch_size=batch_size)
        return out

    times, outs = run_alternating({"single": single, "shared": shared}, repeats)
    st = {m: stats(ts) for m, ts in times.items()}
    gap, rel, same = _agreement(outs["single"], outs["shared"])
    return {"docs": len(reqs), "batch_size": batch_size, "masks_per_pass": k,
            "auto": masks_per_pass("auto", batch_size, reqs), "time": st,
            "speedup": st["single"]["best_s"] / st["shared"]["best_s"], "max_abs_dlogprob": gap,
            "max_rel_dlogprob": rel, "same_predictions": same}


def section(lm: LoadedModel, task: str = "copa", shot: int = 1, settings=SETTINGS, repeats: int = 2,
            data: Path | str | None = None, log=print) -> dict:
    data = data if data is not None else data_dir()
    rows = []
    for n_docs, batch_size, k in settings:
        reqs = build_requests(task, shot=shot, limit=n_docs, data_dir=data)
        score_requests(lm, reqs[:1])  # warm-up, untimed
        row = one_setting(lm, reqs, batch_size, k, repeats)
        rows.append(row)
        log(f"[masks] {len(LEVELS)} masks, {row['docs']} docs, batch {batch_size}, {k} per pass (auto {row['auto']}): "
            f"{row['speedup']:.2f}x, max |dlogprob| {row['max_abs_dlogprob']:.1e}")
    short = [r for r in rows if r["auto"] > 1]
    n_docs, batch_size, k = settings[0]
    f64 = float64_gap(lm, build_requests(task, shot=shot, limit=n_docs, data_dir=data), batch_size, k)
    log(f"[masks] float64: max |dlogprob| {f64['max_abs_dlogprob']:.1e}")
    return {"settings": {"model": lm.name, "task": task, "shot": shot, "levels": list(LEVELS), "repeats": repeats},
            "rows": rows, "float64": f64,
            "targets": {"agree<=1e-4": all(r["max_abs_dlogprob"] <= 1e-4 for r in rows),
                        "agree_rel<=5e-5": all(r["max_rel_dlogprob"] <= 5e-5 for r in rows),
                        "float64_agree<=1e-9": f64["max_abs_dlogprob"] <= 1e-9,
                        "same_predictions": all(r["same_predictions"] == 1.0 for r in rows),
                        "auto_faster": bool(short) and all(r["speedup"] > 1 for r in short)}}


def markdown(sec: dict) -> list[str]:
    s = sec["settings"]
    lines = ["## Several masks per pass", "",
             f"{s['model']}, {s['task']} {s['shot']}-shot, the heads masks of levels {s['levels']} (random ranking), "
             f"gated; one score_requests per mask vs score_masks, best of {s['repeats']}.", "",
             "| docs | batch | masks per pass (auto) | one per mask (s) | shared (s) | speed-up | max abs dlogprob "
             "| max rel dlogprob | same predictions |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sec["rows"]:
        lines.append(f"| {r['docs']} | {r['batch_size']} | {r['masks_per_pass']} ({r['auto']}) | "
                     f"{r['time']['single']['best_s']:.2f} | {r['time']['shared']['best_s']:.2f} | "
                     f"**{r['speedup']:.2f}x** | {r['max_abs_dlogprob']:.1e} | {r['max_rel_dlogprob']:.1e} | "
                     f"{r['same_predictions']:.3f} |")
    f = sec["float64"]
    lines += ["", f"float64 (a double copy, {f['docs']} docs, batch {f['batch_size']}, {f['masks_per_pass']} masks "
              f"per pass): max abs dlogprob {f['max_abs_dlogprob']:.1e}, same predictions {f['same_predictions']:.3f}."]
    return lines + ["", f"Targets: {', '.join(f'{k}: {v}' for k, v in sec['targets'].items())}.", ""]
