"""Knock-out section: the shard's FFN knock-out stage (the accuracy drop of every single-FFN knock-out
on one task) the old way, one full evaluation per knock-out (importance.ffn_knockout through the
shard's Evaluator), vs icl_scale.knockout, which restarts every knock-out at its layer; with the
per-doc log-likelihoods, predictions and drops of the two checked equal (bench/README.md,
"Knock-out section")."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import data_dir, run_alternating, stats
from icl_scale.evaluator import Evaluator, primary_metric
from icl_scale.knockout import knockout_drops, knockout_mask, knockout_scores, restart_mode
from icl_scale.models.loading import LoadedModel
from icl_scale.tasks import build_requests, compute_metrics

TIMED = ("per_layer", "restart")


def per_layer(lm: LoadedModel, task: str, reqs, batch_size: int) -> dict:
    """The old stage: one Evaluator call (a full score_requests) per knock-out."""
    ev, metric, docs, acc = Evaluator(lm, task, batch_size), primary_metric(task), {}, {}
    n = lm.adapter.geometry.n_layers
    for layer in range(-1, n):
        metrics, docs[layer] = ev(reqs, None, knockout_mask(n, layer))
        acc[layer] = metrics[metric]["value"]
    base, drops = knockout_drops(acc, n)
    return {"baseline": base, "drops": drops, "per_doc": docs}


def restarted(lm: LoadedModel, task: str, reqs, batch_size: int) -> dict:
    """The new stage: knockout_scores, then the metrics of every knock-out as the shard computes them."""
    n, metric = lm.adapter.geometry.n_layers, primary_metric(task)
    state = knockout_scores(lm, reqs, batch_size=batch_size)
    acc, docs = {}, {}
    for layer in range(-1, n):
        scores = state.scores(reqs, layer)
        metrics, per_doc = compute_metrics(task, reqs, [[c.logprob for c in row] for row in scores])
        for row, sc in zip(per_doc, scores):
            row["logprobs"] = [c.logprob for c in sc]
        acc[layer], docs[layer] = metrics[metric]["value"], per_doc
    base, drops = knockout_drops(acc, n)
    return {"baseline": base, "drops": drops, "per_doc": docs}


def agreement(a: dict, b: dict) -> dict:
    """Largest per-choice log-likelihood difference (nats) and whether predictions and drops agree."""
    diff, same_pred = 0.0, True
    for layer, docs in a["per_doc"].items():
        for x, y in zip(docs, b["per_doc"][layer]):
            diff = max(diff, max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"])))
            same_pred &= x["pred"] == y["pred"]
    return {"max_abs_dlogprob": diff, "same_predictions": same_pred,
            "same_drops": a["drops"].tolist() == b["drops"].tolist() and a["baseline"] == b["baseline"]}


def block_passes(n_layers: int, mode: str) -> dict:
    """Decoder blocks run per base-model pass by the whole stage: L per knock-out and the baseline
    the old way; L for the unpruned run plus L - l - 1 (block mode: L - l) per knock-out l now."""
    old = n_layers * (n_layers + 1)
    skip = 1 if mode == "post_attention" else 0
    new = old if mode == "full" else n_layers + sum(n_layers - l - skip for l in range(n_layers))
    return {"per_layer": old, "restart": new, "ratio": old / new}


def bench_knockout(lm: LoadedModel, task: str = "copa", shot: int = 1, n_docs: int = 16, batch_size: int = 8,
                   repeats: int = 2, data: Path | str | None = None, log=print) -> dict:
    """The knock-out section: both stages timed alternately, their results compared, the target.
    `data`: the task mirror (default: bench.common.data_dir(), i.e. $ICL_SCALE_DATA_DIR)."""
    data = data if data is not None else data_dir()
    reqs = build_requests(task, shot=shot, limit=n_docs, data_dir=data)
    restarted(lm, task, reqs[:1], batch_size)  # warm-up, untimed
    cpu: dict[str, list[float]] = {m: [] for m in TIMED}

    def cpu_timed(name, fn):  # process CPU time too: with 1 thread, less sensitive to other processes
        def run():
            t0 = time.process_time()
            out = fn()
            cpu[name].append(time.process_time() - t0)
            return out
        return run

    fns = {"per_layer": cpu_timed("per_layer", lambda: per_layer(lm, task, reqs, batch_size)),
           "restart": cpu_timed("restart", lambda: restarted(lm, task, reqs, batch_size))}
    times, outs = run_alternating(fns, repeats)
    st = {m: stats(ts) for m, ts in times.items()}
    speedup = st["per_layer"]["best_s"] / st["restart"]["best_s"]
    cpu_speedup = min(cpu["per_layer"]) / min(cpu["restart"])
    agree = agreement(outs["per_layer"], outs["restart"])
    mode = restart_mode(lm)
    log(f"[knockout] {task} {shot}-shot {len(reqs)} docs, {lm.adapter.geometry.n_layers} layers ({mode}): "
        f"{speedup:.2f}x over one evaluation per knock-out (CPU time {cpu_speedup:.2f}x), "
        f"max |dlogprob| {agree['max_abs_dlogprob']:.1e}")
    return {"settings": {"task": task, "shot": shot, "docs": len(reqs), "batch_size": batch_size, "repeats": repeats,
                         "model": lm.name, "mode": mode},
            "time": st, "speedup": speedup,
            "speedup_per_round": [round(a / b, 3) for a, b in zip(times["per_layer"], times["restart"])],
            "cpu_s": {m: [round(t, 3) for t in ts] for m, ts in cpu.items()}, "cpu_speedup": cpu_speedup,
            "block_passes": block_passes(lm.adapter.geometry.n_layers, mode),
            "baseline": outs["restart"]["baseline"], "drops": outs["restart"]["drops"].tolist(),
            "agreement": agree,
            "targets": {"speedup>=1.8": speedup >= 1.8, "agree<=1e-4": agree["max_abs_dlogprob"] <= 1e-4,
                        "same_predictions": agree["same_predictions"], "same_drops": agree["same_drops"]}}


def markdown(sec: dict) -> list[str]:
    """The section's lines in results.md."""
    s, t, bp = sec["settings"], sec["time"], sec["block_passes"]
    return ["## FFN knock-out", "",
            f"{s['model']}, {s['task']} {s['shot']}-shot, {s['docs']} docs, batch {s['batch_size']}, mode {s['mode']}, "
            f"best of {s['repeats']}.", "",
            "| per-layer full evaluations (s) | restarted (s) | speed-up | per round | CPU-time speed-up "
            "| block passes old / new (ratio) | max abs dlogprob | same predictions | same drops |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {t['per_layer']['best_s']:.2f} | {t['restart']['best_s']:.2f} | **{sec['speedup']:.2f}x** | "
            f"{sec['speedup_per_round']} | {sec['cpu_speedup']:.2f}x | {bp['per_layer']} / {bp['restart']} "
            f"({bp['ratio']:.2f}) | "
            f"{sec['agreement']['max_abs_dlogprob']:.1e} | {sec['agreement']['same_predictions']} | "
            f"{sec['agreement']['same_drops']} |", "",
            f"Targets: {', '.join(f'{k}: {v}' for k, v in sec['targets'].items())}.", ""]
