"""Scoring section: multiple-choice docs/s of `score_naive` (one forward per choice), ours
(`score_requests`, prefix-cached) and lm-eval 0.4.13's HFLM on the same model object, prompts,
docs and batch size; prediction agreement, |delta logprob| and token counts (bench/README.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import data_dir, geomean, run_alternating, stats
from icl_scale.models.loading import LoadedModel
from icl_scale.scoring import Tokenised, plan_units, score_naive, score_requests
from icl_scale.tasks import build_requests

LMEVAL_VERSION = "0.4.13"
METHODS = ("naive", "ours", "lmeval")


# --- lm-eval --------------------------------------------------------------------------------------

def lmeval_available() -> str | None:
    """None if lm-eval's HFLM can be imported, else the reason."""
    try:
        import lm_eval
    except ImportError:
        return (f"lm-eval is not installed: `.venv/bin/pip install -r bench/requirements-lmeval.txt` "
                f"(lm-eval=={LMEVAL_VERSION} with torch pinned)")
    try:
        import lm_eval.api.instance
        import lm_eval.models.huggingface  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the installed versions
        return f"lm-eval is installed but HFLM does not import: {type(e).__name__}: {e}"
    return None


def make_hflm(lm: LoadedModel, batch_size: int):
    """lm-eval's HFLM around the already loaded model object: no BOS added (we add none for a
    model whose tokenizer adds none; for one that does, lm-eval 0.4 adds it itself), same max length."""
    import logging

    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size, max_length=lm.max_length,
                add_bos_token=bool(lm.doc_start_ids))


def lmeval_loglikelihood(hflm, requests) -> list[list[float]]:
    from lm_eval.api.instance import Instance

    inst, shape = [], []
    for r in requests:
        shape.append(r.n_choices)
        for j in range(r.n_choices):
            inst.append(Instance(request_type="loglikelihood", doc={}, arguments=r.pair(j), idx=j))
    flat = [x[0] for x in hflm.loglikelihood(inst, disable_tqdm=True)]
    out, k = [], 0
    for n in shape:
        out.append(flat[k: k + n])
        k += n
    return out


def lmeval_tokens(hflm, requests) -> list[list[tuple[list[int], list[int]]]]:
    """lm-eval's own (context, continuation) token ids for every pair (joint tokenisation)."""
    return [[hflm._encode_pair(*r.pair(j)) for j in range(r.n_choices)] for r in requests]


# --- agreement and token counts ------------------------------------------------------------------

def _preds(scores: list[list[float]]) -> list[int]:
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


def _compare(a: list[list[float]], b: list[list[float]], same: list[list[bool]] | None = None) -> dict:
    pa, pb = _preds(a), _preds(b)
    d = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    out = {"docs": len(a), "pred_agreement": sum(x == y for x, y in zip(pa, pb)) / max(1, len(a)),
           "max_abs_dlogprob": max(d) if d else 0.0, "mean_abs_dlogprob": sum(d) / max(1, len(d))}
    if same is not None:
        flat_same = [s for row in same for s in row]
        ds = [x for x, s in zip(d, flat_same) if s]
        dd = [x for x, s in zip(d, flat_same) if not s]
        out.update(same_tokens_frac=sum(flat_same) / max(1, len(flat_same)),
                   max_abs_dlogprob_same_tokens=max(ds) if ds else None,
                   max_abs_dlogprob_diff_tokens=max(dd) if dd else None)
    return out


def model_tokens(lm: LoadedModel, requests, hflm=None) -> dict[str, int]:
    """Token positions each method runs through the model, without padding: naive = every pair's
    input; lm-eval = every distinct input (it runs pairs with the same context + continuation[:-1]
    once); ours = every distinct prefix once (a request's context, or the common token prefix of
    its contexts: winogrande) + every choice's suffix and continuation tokens but the last, plus
    the naive inputs of pairs too long for max_length."""
    tk = Tokenised(lm, requests)
    out = {"naive": sum(len(tk.pair(*r.pair(j))[0]) for r in requests for j in range(r.n_choices))}
    units, overflow = plan_units(tk, requests)
    ours = sum(len(prefix) for prefix, _ in units)
    ours += sum(len(suffix) + len(tk.continuation(requests[i].pair(j)[1])) - 1
                for _, rows in units for i, j, suffix in rows)
    out["ours"] = ours + sum(len(tk.pair(*requests[i].pair(j))[0]) for i, j in overflow)
    if hflm is not None:
        keys = {tuple((c + x)[:-1]) for row in lmeval_tokens(hflm, requests) for c, x in row}
        out["lmeval"] = sum(len(k) for k in keys)
    return out


def padded_tokens(lm: LoadedModel, requests, batch_size: int, hflm=None) -> dict[str, int]:
    """Token positions each method computes including right padding (rows x longest row per
    forward pass). naive and lm-eval replay their batching: naive = pairs in request order; lm-eval
    = distinct inputs sorted longest first. Ours is measured: the scorer runs once with the model's
    forward wrapped to count its input positions and passes (`ours_passes`)."""
    tk = Tokenised(lm, requests)

    def pad(lengths):
        return sum(max(c) * len(c) for c in (lengths[i: i + batch_size] for i in range(0, len(lengths), batch_size)))

    out = {"naive": pad([len(tk.pair(*r.pair(j))[0]) for r in requests for j in range(r.n_choices)])}
    base = lm.model.base_model
    seen: list[int] = []
    handle = base.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(int(kwargs["input_ids"].numel())), with_kwargs=True)
    try:
        score_requests(lm, requests, batch_size=batch_size)
    finally:
        handle.remove()
    out["ours"], out["ours_passes"] = sum(seen), len(seen)
    if hflm is not None:
        keys = sorted({tuple((c + x)[:-1]) for row in lmeval_tokens(hflm, requests) for c, x in row},
                      key=lambda k: -len(k))
        out["lmeval"] = pad([len(k) for k in keys])
    return out


# --- the section ------------------------------------------------------------------------------------

def _methods(lm: LoadedModel, methods: Sequence[str], batch_size: int, log) -> tuple[list[str], dict, Any]:
    """(methods that can run, {method: why skipped}, HFLM or None)."""
    methods, skip, hflm = list(methods), {}, None
    if "lmeval" in methods:
        why = lmeval_available()
        if why is None:
            hflm = make_hflm(lm, batch_size)
        else:
            skip["lmeval"] = why
            methods.remove("lmeval")
            log(f"[scoring] lm-eval skipped: {why}")
    return methods, skip, hflm


def _warm_up(lm: LoadedModel, reqs, batch_size: int, hflm) -> None:
    """The first forward passes in a process are slow (allocator, kernels): run them untimed."""
    score_naive(lm, reqs[:1], batch_size=batch_size)
    score_requests(lm, reqs[:1], batch_size=batch_size)
    if hflm is not None:
        lmeval_loglikelihood(hflm, reqs[:1])


def _timed_fns(lm: LoadedModel, reqs, methods: Sequence[str], batch_size: int, hflm) -> dict:
    fns = {}
    if "naive" in methods:
        fns["naive"] = lambda: [[c.logprob for c in row] for row in score_naive(lm, reqs, batch_size=batch_size)]
    if "ours" in methods:
        fns["ours"] = lambda: [[c.logprob for c in row] for row in score_requests(lm, reqs, batch_size=batch_size)]
    if "lmeval" in methods:
        fns["lmeval"] = lambda: lmeval_loglikelihood(hflm, reqs)
    return fns


def _speedups(row: dict) -> dict:
    sp = {}
    if "ours" in row["time"]:
        for m in ("naive", "lmeval"):
            if m in row["time"]:
                sp[f"ours_vs_{m}"] = row["time"][m]["best_s"] / row["time"]["ours"]["best_s"]
                runs_o, runs_m = row["time"]["ours"]["runs_s"], row["time"][m]["runs_s"]
                ratios = [tm / to for tm, to in zip(runs_m, runs_o)]  # same round
                sp[f"ours_vs_{m}_per_round"] = [round(x, 3) for x in ratios]
    return sp


def _row(lm: LoadedModel, task: str, shot: int, reqs, methods, batch_size: int, repeats: int, hflm) -> dict:
    """Time every method on one (task, shot) and compare their numbers."""
    tk = Tokenised(lm, reqs)
    ctx_tok = sum(len(tk.context(c)) for r in reqs for c in set(r.contexts))
    pair_tok = sum(len(tk.pair(*r.pair(j))[0]) + 1 for r in reqs for j in range(r.n_choices))
    times, outs = run_alternating(_timed_fns(lm, reqs, methods, batch_size, hflm), repeats)
    row: dict[str, Any] = {"task": task, "shot": shot, "docs": len(reqs),
                           "pairs": sum(r.n_choices for r in reqs), "choices": reqs[0].n_choices if reqs else 0,
                           "context_tokens": ctx_tok, "pair_tokens": pair_tok,
                           "model_tokens": model_tokens(lm, reqs, hflm),
                           "padded_tokens": padded_tokens(lm, reqs, batch_size, hflm), "time": {}, "docs_per_s": {}}
    for m, ts in times.items():
        row["time"][m] = stats(ts)
        row["docs_per_s"][m] = len(reqs) / row["time"][m]["best_s"]
    if "ours" in outs and "naive" in outs:
        row["naive_vs_ours"] = _compare(outs["naive"], outs["ours"])
    if "ours" in outs and "lmeval" in outs:
        ours_tok = [[tk.pair(*r.pair(j)) for j in range(r.n_choices)] for r in reqs]
        lme_tok = lmeval_tokens(hflm, reqs)
        # identical model input and identical scored tokens (ours: inputs = ctx+cont[:-1])
        same = [[list(o[0]) + [o[1][-1]] == list(le[0]) + list(le[1]) and list(o[1]) == list(le[1])
                 for o, le in zip(orow, lrow)] for orow, lrow in zip(ours_tok, lme_tok)]
        row["lmeval_vs_ours"] = _compare(outs["lmeval"], outs["ours"], same)
    row["speedup"] = _speedups(row)
    return row


def _summary(rows: list[dict], shots: Sequence[int]) -> dict:
    summary = {}
    for shot in shots:
        rs = [r for r in rows if r["shot"] == shot]
        s: dict[str, Any] = {}
        for m in METHODS:
            if all(m in r["time"] for r in rs) and rs:
                tot = sum(r["time"][m]["best_s"] for r in rs)
                s[f"{m}_docs_per_s"] = sum(r["docs"] for r in rs) / tot
        for m in ("naive", "lmeval"):
            if f"{m}_docs_per_s" in s and "ours_docs_per_s" in s:
                s[f"ours_vs_{m}_total"] = s["ours_docs_per_s"] / s[f"{m}_docs_per_s"]
                s[f"ours_vs_{m}_geomean"] = geomean([r["speedup"].get(f"ours_vs_{m}") for r in rs])
                s[f"ours_vs_{m}_min"] = min(r["speedup"][f"ours_vs_{m}"] for r in rs)
        summary[f"{shot}-shot"] = s
    return summary


def bench_scoring(lm: LoadedModel, tasks: Sequence[str], shots: Sequence[int], limits: dict[int, int],
                  batch_size: int = 8, repeats: int = 3, data: Path | str | None = None,
                  methods: Sequence[str] = METHODS, log=print) -> dict:
    """The scoring section: one row per (shot, task), a summary per shot count, the 5-shot target.
    `data`: the task mirror (default: bench.common.data_dir(), i.e. $ICL_SCALE_DATA_DIR)."""
    data = data if data is not None else data_dir()
    methods, skip, hflm = _methods(lm, methods, batch_size, log)
    rows = []
    for shot in shots:
        for task in tasks:
            reqs = build_requests(task, shot=shot, limit=limits[shot], data_dir=data)
            if not rows:
                _warm_up(lm, reqs, batch_size, hflm)
            row = _row(lm, task, shot, reqs, methods, batch_size, repeats, hflm)
            rows.append(row)
            sp = row["speedup"]
            log(f"[scoring] {task} {shot}-shot {len(reqs)} docs: "
                + ", ".join(f"{m} {row['docs_per_s'][m]:.2f} docs/s" for m in row["docs_per_s"])
                + (f"; ours/lm-eval {sp['ours_vs_lmeval']:.2f}x" if "ours_vs_lmeval" in sp else ""))
    summary = _summary(rows, shots)
    target = None
    if "5-shot" in summary and "ours_vs_lmeval_total" in summary["5-shot"]:
        v = summary["5-shot"]["ours_vs_lmeval_total"]
        target = {"what": "ours >= 2.5x lm-eval docs/s at 5 shots (all tasks' docs / all tasks' best time)",
                  "value": v, "met": v >= 2.5}
    naive_ok = all(r["naive_vs_ours"]["pred_agreement"] == 1.0 for r in rows if "naive_vs_ours" in r)
    return {"settings": {"tasks": list(tasks), "shots": list(shots), "limits": {str(k): v for k, v in limits.items()},
                         "batch_size": batch_size, "repeats": repeats, "model": lm.name,
                         "lmeval_add_bos_token": bool(lm.doc_start_ids)},
            "skipped": skip, "rows": rows, "summary": summary, "target_5shot": target,
            "naive_vs_ours_all_agree": naive_ok}


def profile_scoring(lm: LoadedModel, task: str, shot: int, limit: int, batch_size: int,
                    data: Path | str | None = None, top: int = 15) -> dict:
    """Where ours spends its time (torch profiler, op-level self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    reqs = build_requests(task, shot=shot, limit=limit, data_dir=data if data is not None else data_dir())
    score_requests(lm, reqs[:2], batch_size=batch_size)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        score_requests(lm, reqs, batch_size=batch_size)
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    tot = sum(e.self_cpu_time_total for e in ev) or 1
    return {"task": task, "shot": shot, "docs": len(reqs), "total_self_cpu_s": tot / 1e6,
            "ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6,
                     "frac": e.self_cpu_time_total / tot, "calls": e.count} for e in ev[:top]]}
