"""Pruned section: scoring under a mask on a physically pruned copy (icl_scale.models.physical) vs with
gates on the full model, at the curves' levels (heads 50/70/90%, FFNs 20/50%), on SmolLM2-135M and on
a random model of OPT-1.3B's shape; the per-doc log-likelihoods and predictions of the two checked
equal (bench/README.md, "Pruned section").

The masks prune by a random ranking (seed 0, the shard's floor count): what matters for speed is how
many heads and FFNs go and, with GQA, how the kept heads fall into KV groups, not which they are.
The pruned time includes building the copy, as the shard's Evaluator builds one per mask. The
`compute_fraction` column is the cost model the shard decides with (eval.physical_below).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import data_dir, double_copy, run_alternating, stats
from icl_scale import pruning as P
from icl_scale.models.loading import LoadedModel, load_model
from icl_scale.models.physical import compute_fraction, plan, prune_physically
from icl_scale.scoring import score_requests
from icl_scale.tasks import build_requests

SETTINGS = (("heads", 50), ("heads", 70), ("heads", 90), ("ffn", 20), ("ffn", 50))
# facebook/opt-1.3b's numbers (conf/model/opt-1.3b.yaml arch), random weights, the project's tokenizer
OPT_1_3B = {"name": "random-opt-1.3b-shape", "source": "random", "family": "opt", "seed": 0,
            "tokenizer": "smollm2-135m", "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa",
            "doc_start": "none", "max_length": 2048,
            "config": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "ffn_dim": 8192,
                       "word_embed_proj_dim": 2048, "max_position_embeddings": 2048}}


def masks(lm: LoadedModel, kind: str, level: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    g = lm.adapter.geometry
    shape = (g.n_layers, g.n_heads) if kind == "heads" else (g.n_layers,)
    m = P.prune_mask(P.random_ranking(shape, 0), level, count="floor")
    return (m, None) if kind == "heads" else (None, m)


def _gap(a, b) -> tuple[float, float, float]:
    """Largest |dlogprob| (nats), largest |dlogprob| / |logprob|, the fraction of docs with the same prediction."""
    pairs = [(x.logprob, y.logprob) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    gap = max(abs(x - y) for x, y in pairs)
    rel = max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs)
    pred = [max(range(len(r)), key=lambda j: r[j].logprob) for r in a]
    same = sum(p == max(range(len(r)), key=lambda j: r[j].logprob) for p, r in zip(pred, b))
    return gap, rel, same / len(a)


def float64_gap(lm: LoadedModel, reqs, kind: str = "heads", level: float = 90) -> dict:
    """Pruned vs gated in float64 on a double copy: 0 (or ~1e-12) shows that the float32 gaps are
    rounding (a sum over fewer head columns in another order), not a different computation."""
    lm64 = double_copy(lm)
    hm, fm = masks(lm64, kind, level)
    gap, rel, same = _gap(score_requests(lm64, reqs, hm, fm), score_requests(prune_physically(lm64, hm, fm), reqs))
    return {"kind": kind, "level": level, "docs": len(reqs), "max_abs_dlogprob": gap, "same_predictions": same}


def one_model(lm: LoadedModel, reqs, batch_size: int, repeats: int, log) -> dict:
    rows = []
    full = run_alternating({"full": lambda: score_requests(lm, reqs, batch_size=batch_size)}, repeats)[0]["full"]
    t_full = stats(full)
    for kind, level in SETTINGS:
        hm, fm = masks(lm, kind, level)
        build: list[float] = []
        forward: list[float] = []

        def pruned(hm=hm, fm=fm, build=build, forward=forward):
            t0 = time.perf_counter()
            copy = prune_physically(lm, hm, fm)
            t1 = time.perf_counter()
            out = score_requests(copy, reqs, batch_size=batch_size)
            build.append(t1 - t0)
            forward.append(time.perf_counter() - t1)
            return out

        def gated(hm=hm, fm=fm):
            return score_requests(lm, reqs, hm, fm, batch_size=batch_size)

        times, outs = run_alternating({"gated": gated, "pruned": pruned}, repeats)
        st = {m: stats(ts) for m, ts in times.items()}
        gap, rel, same = _gap(outs["gated"], outs["pruned"])
        frac = compute_fraction(lm.adapter, plan(lm.adapter.geometry, hm, fm))
        row = {"kind": kind, "level": level, "compute_fraction": round(frac, 4), "time": st,
               "build_s": round(min(build), 4), "speedup": st["gated"]["best_s"] / st["pruned"]["best_s"],
               "forward_s": stats(forward), "speedup_forward": st["gated"]["best_s"] / min(forward),
               "max_abs_dlogprob": gap, "max_rel_dlogprob": rel, "same_predictions": same}
        log(f"[pruned] {lm.name} {kind} {level}%: compute {frac:.2f} of full, gated {st['gated']['best_s']:.2f} s, "
            f"pruned {st['pruned']['best_s']:.2f} s ({row['speedup']:.2f}x; forward alone "
            f"{row['speedup_forward']:.2f}x), max |dlogprob| {gap:.1e}")
        rows.append(row)
    return {"model": lm.name, "docs": len(reqs), "batch_size": batch_size, "full": t_full, "rows": rows}


def section(lm: LoadedModel, task: str = "copa", shot: int = 1, n_docs: int = 16, opt_docs: int = 4,
            batch_size: int = 8, repeats: int = 2, data: Path | str | None = None, opt: bool = True, log=print) -> dict:
    """Both models' rows, and the targets (>= 1.25x at 70% heads on the OPT shape; <= 1e-4 nats)."""
    data = data if data is not None else data_dir()
    reqs = build_requests(task, shot=shot, limit=n_docs, data_dir=data)
    score_requests(lm, reqs[:1])  # warm-up, untimed
    out = {"settings": {"task": task, "shot": shot, "repeats": repeats, "levels": [list(s) for s in SETTINGS]},
           "models": [one_model(lm, reqs, batch_size, repeats, log)], "float64": float64_gap(lm, reqs[:4])}
    log(f"[pruned] {lm.name} float64, heads 90%: max |dlogprob| {out['float64']['max_abs_dlogprob']:.1e}")
    if opt:
        big = load_model(OPT_1_3B)
        out["models"].append(one_model(big, reqs[:opt_docs], min(batch_size, opt_docs), repeats, log))
        del big
    rows = [r for m in out["models"] for r in m["rows"]]
    opt70 = next((r for r in out["models"][-1]["rows"] if (r["kind"], r["level"]) == ("heads", 70)), None)
    # the target is on the forward; the copy is built once per mask, ~0.4 s for OPT-1.3B's heads,
    # which 4 docs do not amortise but a shard's eval list does
    out["targets"] = {"opt_heads70_forward>=1.25x": bool(opt and opt70 and opt70["speedup_forward"] >= 1.25),
                      "agree<=1e-4": all(r["max_abs_dlogprob"] <= 1e-4 for r in rows),
                      "agree_rel<=2e-5": all(r["max_rel_dlogprob"] <= 2e-5 for r in rows),
                      "float64_agree<=1e-9": out["float64"]["max_abs_dlogprob"] <= 1e-9,
                      "same_predictions": all(r["same_predictions"] == 1.0 for r in rows)}
    return out


def markdown(sec: dict) -> list[str]:
    s = sec["settings"]
    lines = ["## Pruned vs gated scoring", "",
             f"{s['task']} {s['shot']}-shot, score_requests under a random-ranking mask, best of {s['repeats']}; "
             "the pruned time includes building the copy.", "",
             "| model | docs | pruned | compute fraction | gated (s) | pruned incl. build (s) | build (s) | speed-up "
             "| forward alone | max abs dlogprob | max rel | same predictions |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in sec["models"]:
        lines.append(f"| {m['model']} | {m['docs']} | none | 1 | {m['full']['best_s']:.2f} | | | | | | | |")
        for r in m["rows"]:
            lines.append(f"| {m['model']} | {m['docs']} | {r['kind']} {r['level']}% | {r['compute_fraction']:.2f} | "
                         f"{r['time']['gated']['best_s']:.2f} | {r['time']['pruned']['best_s']:.2f} | "
                         f"{r['build_s']:.2f} | {r['speedup']:.2f}x | **{r['speedup_forward']:.2f}x** | "
                         f"{r['max_abs_dlogprob']:.1e} | "
                         f"{r['max_rel_dlogprob']:.1e} | {r['same_predictions']:.0%} |")
    f64 = sec["float64"]
    lines += ["", f"Float64 (a double copy of {sec['models'][0]['model']}, {f64['kind']} {f64['level']:g}%, "
              f"{f64['docs']} docs): max abs dlogprob {f64['max_abs_dlogprob']:.1e}.", "",
              f"Targets: {', '.join(f'{k}: {v}' for k, v in sec['targets'].items())}.", ""]
    return lines
