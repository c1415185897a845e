"""Induction section: icl_scale.induction against the original code's loops and the bare forward passes.

    python bench/induction.py [--parts loops forward] [--loop-seeds 0 10] [--threads 1]

(also the `induction` section of bench/run.py, `make bench`).

(a) ours vs a faithful re-implementation of the original per-layer/per-head/per-token Python loops
    (llm-interpret's prefix_matching_copying.py: eager attention with output_attentions, `.item()`
    accumulation, every head's output through the full-vocabulary unembedding + softmax, per-position
    loops; icl_scale/induction/reference.py) with the original definitions (CopyingOptions.paper()), on
    the first seeds only (the loops take minutes per seed); reported per measured seeds, not
    extrapolated:
    - scoring on identical inputs: the same captured attention probabilities and values go into the
      loops and into our vectorised reductions (the functions the probes call);
    - end to end: each side with its own forward passes.
    The loops run in float32 like the original; where the attendable probabilities are tiny and
    close, float32 softmax + centring loses precision (up to 1e-2 on SmolLM2 layer 27): the same
    loops in float64 agree with ours to < 1e-7.
(b) ours (default options, the model's own attention) vs the bare forward passes the scores need:
    one base-model forward per sequence (prefix: BOS + 4 repeats; copying: BOS + 4n tokens), no LM
    head, on identical sequences, seeds spread over the paper's lengths; interleaved, min of repeats.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/induction.py`: import bench.* and tests.* from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import contextlib
import io
import time
from collections.abc import Sequence

import torch

from icl_scale.induction import (
    CopyingOptions,
    copying_from,
    default_lengths,
    induction_scores,
    make_sequences,
    prefix_from_probs,
    prefix_targets,
    token_pool,
    unembedding_matrix,
)
from icl_scale.induction.reference import (
    copying_inputs,
    reference_copying_loops,
    reference_prefix_loops,
    reference_unembedding,
)
from icl_scale.models import Adapter, load_model
from icl_scale.models.loading import LoadedModel

FUNCTION = "bench.induction.run"
PARTS = ("loops", "forward")
QUICK = {"loop_seeds": (0,), "forward_seeds": (0,), "repeats": 1}  # --quick: first seed, one repeat


def ours_from_inputs(model, attentions, n: int, copy_ids: torch.Tensor, cinputs,
                     opts: CopyingOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Our vectorised reductions (the functions the probes call) on the same captured inputs (BOS = 1)."""
    ad = Adapter(model)
    g = ad.geometry
    rows, cols, count = prefix_targets(n, 1, original_indexing=True)
    pm = torch.stack([prefix_from_probs(a[0], rows, cols, count) for a in attentions])
    Uids = unembedding_matrix(ad, opts.final_norm == "fold", copy_ids[0])
    kv = ad.kv_head_of()
    cp = []
    for layer, (probs, values) in enumerate(cinputs):
        v = values.view(-1, g.n_kv_heads, g.head_dim).transpose(0, 1)[kv]  # [H, T, D]
        x = probs @ v if opts.source == "output" else v
        b_o = ad.o_proj(layer).bias if opts.o_bias else None
        cp.append(copying_from(probs.argmax(-1), x, Uids, ad.o_proj_weight(layer), b_o, opts.softmax, 1))
    return pm, torch.stack(cp)


# --- timings ---------------------------------------------------------------------------------------------

def _bare_forward(model, bos, seqs) -> None:
    base = model.base_model
    for s_pref, s_copy in seqs:
        base(input_ids=torch.cat([bos, s_pref.repeat(4)])[None], use_cache=False)
        base(input_ids=torch.cat([bos, s_copy])[None], use_cache=False)


class _Clock(dict):
    """`with clock("name"):` adds the block's wall time to clock["name"]."""

    def __call__(self, key: str):
        self._key = key
        return self

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        self[self._key] = self.get(self._key, 0.0) + time.perf_counter() - self._t0


def _loop_seed(lm, i: int, seqs, bos, U, t: _Clock, diff: dict) -> None:
    """One seed of (a): the original loops and ours on the same captured inputs, then ours end to end."""
    m, paper = lm.model, CopyingOptions.paper()
    n, (s_pref, s_copy) = 2 * i + 25, seqs
    pids, cids = torch.cat([bos, s_pref.repeat(4)])[None], torch.cat([bos, s_copy])[None]
    orig_impl = m.config._attn_implementation
    m.set_attn_implementation("eager")  # the loops read output_attentions
    try:
        with t("fwd_prefix"):
            att = m(input_ids=pids, output_attentions=True, use_cache=False).attentions
        with t("loops_prefix"):
            ref_pm = reference_prefix_loops(att, n)
        with t("capture_copy"):
            cin = copying_inputs(m, cids, paper)
        with t("loops_copy"):
            ref_cp = reference_copying_loops(m, cids, cin, paper, U, dtype=torch.float32)
        with t("ours_inputs"):
            pm, cp = ours_from_inputs(m, att, n, cids, cin, paper)
    finally:
        m.set_attn_implementation(orig_impl)
    diff["inputs"] = max(diff["inputs"], float((pm - ref_pm).abs().max()), float((cp - ref_cp).abs().max()))
    del att, cin
    with t("ours_e2e"):
        r = induction_scores(lm, bos=bos.tolist(), lengths=[n], seed=0, copying=paper)
    if i == 0:  # induction_scores draws seed 0's sequences: comparable only there
        diff["e2e"] = max(float((r.prefix_matching - ref_pm).abs().max()),
                          float((r.copying - ref_cp).abs().max()))


def _loops(lm, pool, bos, loop_seeds: Sequence[int]) -> dict:
    """(a): the original loops vs ours, paper definitions, the seeds' own sequences."""
    t = _Clock()
    all_seqs = make_sequences(pool, default_lengths(max(loop_seeds) + 1), seed=0)
    diff = {"inputs": 0.0, "e2e": 0.0}
    with torch.no_grad():
        U = reference_unembedding(lm.model, fold_norm=False)
        for i in loop_seeds:
            _loop_seed(lm, i, all_seqs[i], bos, U, t, diff)
    return _loop_summary(t, loop_seeds, diff)


def run(out: dict | None = None, model: str = "smollm2-135m", loop_seeds: Sequence[int] = (0, 10),
        forward_seeds: Sequence[int] = (0, 20, 40, 60, 80), repeats: int = 2, threads: int | None = None,
        parts: Sequence[str] = PARTS, verbose: bool = True) -> dict:
    """Measure (a) "loops" and (b) "forward" (`parts`); print a small table; return (and store under
    out["induction"]) the numbers. Seed i has length 2*i+25 as in the paper's 100-seed run. The loops
    take ~9 min on one core for the default seeds; (b) ~4 min."""
    out = {} if out is None else out
    if threads:
        torch.set_num_threads(threads)
    lm = load_model(model)
    m = lm.model
    res: dict = {"model": lm.name, "threads": torch.get_num_threads()}
    bos = torch.tensor(lm.doc_start_ids or [lm.tokenizer.bos_token_id])
    if len(bos) != 1:
        raise ValueError("the original loops assume a single BOS token")
    pool, _ = token_pool(lm.tokenizer, m.get_output_embeddings().weight.shape[0], 0.04, exclude_ids=bos.tolist())
    loop_seeds = tuple(loop_seeds) if "loops" in parts else ()
    if loop_seeds:
        res["loops"] = _loops(lm, pool, bos, loop_seeds)
    if "forward" in parts:
        res["forward"] = _forward_ratio(lm, pool, bos, [2 * i + 25 for i in forward_seeds], forward_seeds, repeats)
    if verbose:
        _print(res)
    out["induction"] = res
    return res


def _loop_summary(t: dict, loop_seeds, diff) -> dict:
    loops_total = t["loops_prefix"] + t["loops_copy"]
    orig_e2e = t["fwd_prefix"] + t["loops_prefix"] + t["capture_copy"] + t["loops_copy"]
    return {
        "seeds": list(loop_seeds), "lengths": [2 * i + 25 for i in loop_seeds],
        "seconds": {k: round(v, 3) for k, v in t.items()},
        "speedup_scoring": round(loops_total / t["ours_inputs"], 1),
        "speedup_end_to_end": round(orig_e2e / t["ours_e2e"], 1),
        "max_abs_diff": diff, "loops_total_s": round(loops_total, 2), "original_end_to_end_s": round(orig_e2e, 2),
    }


def _forward_ratio(lm, pool, bos, flen, forward_seeds, repeats) -> dict:
    """(b): ours (default options, the model's own attention) vs the bare forward passes."""
    m = lm.model
    seqs_b = make_sequences(pool, flen, seed=0)  # what induction_scores(lengths=flen, seed=0) scores
    t_bare, t_ours = [], []
    with torch.no_grad():
        _bare_forward(m, bos, seqs_b[:1])  # warm-up
        for _ in range(repeats):  # interleaved, min of repeats: the machine may be shared
            t0 = time.perf_counter()
            _bare_forward(m, bos, seqs_b)
            t_bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            induction_scores(lm, bos=bos.tolist(), lengths=flen, seed=0)
            t_ours.append(time.perf_counter() - t0)
    return {"seeds": list(forward_seeds), "lengths": flen, "attn": m.config._attn_implementation,
            "bare_s": round(min(t_bare), 2), "ours_s": round(min(t_ours), 2),
            "ratio": round(min(t_ours) / min(t_bare), 3),
            "all_bare_s": [round(x, 2) for x in t_bare], "all_ours_s": [round(x, 2) for x in t_ours]}


def _print(res: dict) -> None:
    print(f"induction scores, {res['model']}, {res['threads']} threads")
    print(f"{'measure':58s} {'ours [s]':>9s} {'other [s]':>10s} {'ratio':>8s}")
    if "loops" in res:
        a, sec = res["loops"], res["loops"]["seconds"]
        print(f"{'(a) scoring on identical inputs vs original loops':58s} {sec['ours_inputs']:9.3f} "
              f"{a['loops_total_s']:10.2f} {a['speedup_scoring']:7.1f}x")
        print(f"    loops: prefix matching {sec['loops_prefix']:.1f} s, copying {sec['loops_copy']:.1f} s")
        print(f"{'(a) end to end (forwards included) vs original':58s} {sec['ours_e2e']:9.2f} "
              f"{a['original_end_to_end_s']:10.2f} {a['speedup_end_to_end']:7.1f}x")
        print(f"    seeds {a['seeds']} (n = {a['lengths']}); "
              f"max |ours - float32 loops| {a['max_abs_diff']['inputs']:.1e} "
              f"(float32 rounding of the original; float64 loops agree to < 1e-7)")
    if "forward" in res:
        b = res["forward"]
        print(f"{'(b) ours vs bare forward passes (target <= 1.3x)':58s} {b['ours_s']:9.2f} "
              f"{b['bare_s']:10.2f} {b['ratio']:7.3f}x")
        print(f"    seeds {b['seeds']} (n = {b['lengths']}), {b['attn']}")


# --- the section of bench/run.py ------------------------------------------------------------------------

class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, x):
        for st in self.streams:
            st.write(x)
        return len(x)

    def flush(self):
        for st in self.streams:
            st.flush()


def section(lm: LoadedModel, quick: bool, parts: Sequence[str] | None = None) -> dict:
    """run() for bench/run.py: the model by preset name (run loads its own), the current torch
    threads, --quick's smallest sizes (QUICK). Keeps run()'s printed table (`printed`) next to what
    it returns; an exception is recorded (`error`) so the other sections' results are not lost."""
    kwargs: dict = {"model": lm.name, "threads": torch.get_num_threads(), "verbose": True}
    if quick:
        kwargs.update(QUICK)
    if parts:
        kwargs["parts"] = tuple(parts)
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(_Tee(sys.stdout, buf)):
            res = run(**kwargs)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "function": FUNCTION, "kwargs": kwargs,
                "printed": buf.getvalue()}
    finally:
        torch.set_num_threads(threads)
    res = dict(res)
    res.setdefault("function", FUNCTION)
    res["kwargs"] = kwargs
    res["printed"] = buf.getvalue()
    return res


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python bench/induction.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--loop-seeds", type=int, nargs="+", default=[0, 10])
    p.add_argument("--forward-seeds", type=int, nargs="+", default=[0, 20, 40, 60, 80])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    args = p.parse_args(argv)
    run(model=args.model, loop_seeds=args.loop_seeds, forward_seeds=args.forward_seeds, repeats=args.repeats,
        threads=args.threads, parts=args.parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
