"""Benchmarks for icl_scale.induction (called by `make bench`; also `python -m icl_scale.bench_induction`).

(a) ours vs a faithful re-implementation of the original per-layer/per-head/per-token Python loops
    (llm-interpret's prefix_matching_copying.py: eager attention with output_attentions, `.item()`
    accumulation, every head's output through the full-vocabulary unembedding + softmax, per-position
    loops) with the original definitions (CopyingOptions.paper()), on the first seeds only (the
    loops take minutes per seed); reported per measured seeds, not extrapolated:
    - scoring on identical inputs: the same captured attention probabilities and values go into the
      loops and into our vectorised reductions (the functions the probes call);
    - end to end: each side with its own forward passes.
    The loops run in float32 like the original; where the attendable probabilities are tiny and
    close, float32 softmax + centring loses precision (up to 1e-2 on SmolLM2 layer 27): the same
    loops in float64 agree with ours to < 1e-7.
(b) ours (default options, the model's own attention) vs the bare forward passes the scores need:
    one base-model forward per sequence (prefix: BOS + 4 repeats; copying: BOS + 4n tokens), no LM
    head, on identical sequences, seeds spread over the paper's lengths; interleaved, min of repeats.

The reference loops are also the tests' slow ground truth (tests/test_induction.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .induction import (
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
from .models import Adapter, load_model

# --- the original code's loops (generic over the supported families) --------------------------------------

def reference_prefix_loops(attentions, n: int) -> torch.Tensor:
    """llm-interpret's loop over per-layer attention probabilities [1, H, T, T] (BOS = 1 token):
    from each j in repeats 2-4 to num*n + j%n + 1 for num < j//n, summed with .item(), / 3n."""
    L, H = len(attentions), attentions[0].shape[1]
    m = torch.zeros(L, H)
    for layer in range(L):
        for head in range(H):
            a = attentions[layer][0, head]
            c = 0
            for j in range(n + 1, 4 * n + 1):
                for num in range(j // n):
                    m[layer][head] += a[j][num * n + (j % n) + 1].item()
                c += 1
            m[layer][head] = m[layer][head] / c
    return m


def reference_prefix_matching(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The original prefix-matching computation: one eager forward with output_attentions, then loops."""
    out = model(input_ids=ids, output_attentions=True, use_cache=False)
    return reference_prefix_loops(out.attentions, n)


def _layer_attention(model, adapter: Adapter, l: int, x: torch.Tensor):
    """Layer l's attention module called directly on hidden states x (eager, causal):
    (probs [H, T, T], pre-attention-normed input [T, hidden])."""
    T = x.shape[1]
    h = adapter.pre_attn_norm(l)(x)
    mask = torch.zeros(T, T, dtype=x.dtype).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                         torch.finfo(x.dtype).min)[None, None]
    kw = {"attention_mask": mask}
    if adapter.family.rotary:
        kw["position_embeddings"] = model.base_model.rotary_emb(h, torch.arange(T)[None])
    _, probs = adapter.attn(l)(h, **kw)
    return probs[0], h[0]


def reference_unembedding(model, fold_norm: bool) -> torch.Tensor:
    """[V, hidden], the final norm's weight (and LayerNorm centring) folded in by hand."""
    ad = Adapter(model)
    U = model.get_output_embeddings().weight.float()
    if fold_norm:
        norm = ad.final_norm()
        U = U * norm.weight
        if isinstance(norm, torch.nn.LayerNorm):
            U = U - U.mean(-1, keepdim=True)
    return U


def copying_inputs(model, ids: torch.Tensor, opts: CopyingOptions) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (attention probs [H, T, T], values [T, n_kv*D]) as the original code gets them: each
    layer's attention module called on its input (the embeddings, or the real residual stream)."""
    ad = Adapter(model)
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    res = []
    for layer in range(ad.geometry.n_layers):
        x = out.hidden_states[0 if opts.input == "embeddings" else layer]
        probs, h = _layer_attention(model, ad, layer, x)
        W_v, b_v = ad.v_weight(layer)
        res.append((probs, h @ W_v.t() + (b_v if b_v is not None else 0)))
    return res


def reference_copying_loops(model, ids: torch.Tensor, inputs, opts: CopyingOptions, U: torch.Tensor,
                            dtype=torch.float64) -> torch.Tensor:
    """The original copying loop from per-layer (probs, values): every head's output through the whole
    unembedding (softmax over the vocabulary if opts.softmax), then per head and per position j >= 1
    the ReLU ratio of the mean-centred attendable logits at the most-attended token (BOS = 1 token).
    `dtype` is the precision of the logits (float64 for tests, float32 as in the original)."""
    ad = Adapter(model)
    g = ad.geometry
    D, H = g.head_dim, g.n_heads
    m = torch.zeros(g.n_layers, H)
    T = ids.shape[1]
    for layer, (probs, values) in enumerate(inputs):
        W_o, b_o = ad.o_proj_weight(layer), ad.o_proj(layer).bias
        for head in range(H):
            kv = head // g.group_size
            v = values[:, kv * D:(kv + 1) * D]
            src = probs[head] @ v if opts.source == "output" else v
            o = src @ W_o[:, head * D:(head + 1) * D].t()
            if opts.o_bias and b_o is not None:
                o = o + b_o
            logits = (o @ U.t()).to(dtype)  # [T, vocab]
            if opts.softmax:
                logits = F.softmax(logits, dim=-1)
            _, ind = torch.sort(probs[head], dim=1)
            max_ind = ind[:, -1]
            c = 0
            for j in range(1, T):
                c += 1
                attendable = logits[j][ids[0][:j + 1]]
                relu = F.relu(attendable - attendable.mean())
                tot = relu.sum().item()
                m[layer][head] += relu[max_ind[j]].item() / tot if tot != 0 else 0
            m[layer][head] = m[layer][head] / c
    return m


def reference_copying(model, ids: torch.Tensor, opts: CopyingOptions, dtype=torch.float64) -> torch.Tensor:
    """The original copying computation end to end (capture, then loops)."""
    U = reference_unembedding(model, opts.final_norm == "fold")
    return reference_copying_loops(model, ids, copying_inputs(model, ids, opts), opts, U, dtype)


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


def run(out: dict | None = None, model: str = "smollm2-135m", loop_seeds: Sequence[int] = (0, 10),
        forward_seeds: Sequence[int] = (0, 20, 40, 60, 80), repeats: int = 2, threads: int | None = None,
        parts: Sequence[str] = ("loops", "forward"), verbose: bool = True) -> dict:
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
    paper = CopyingOptions.paper()

    # (a) the original loops vs ours, paper definitions, the seeds' own sequences.
    t = _Clock()
    loop_seeds = tuple(loop_seeds) if "loops" in parts else ()
    all_seqs = make_sequences(pool, default_lengths(max(loop_seeds) + 1), seed=0) if loop_seeds else []
    diff = {"inputs": 0.0, "e2e": 0.0}
    orig_impl = m.config._attn_implementation
    with torch.no_grad():
        U = reference_unembedding(m, fold_norm=False) if loop_seeds else None
        for i in loop_seeds:
            n, (s_pref, s_copy) = 2 * i + 25, all_seqs[i]
            pids, cids = torch.cat([bos, s_pref.repeat(4)])[None], torch.cat([bos, s_copy])[None]
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
    if loop_seeds:
        res["loops"] = _loop_summary(t, loop_seeds, diff)
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
        print(f"    seeds {a['seeds']} (n = {a['lengths']}); max |ours - float32 loops| {a['max_abs_diff']['inputs']:.1e} "
              f"(float32 rounding of the original; float64 loops agree to < 1e-7)")
    if "forward" in res:
        b = res["forward"]
        print(f"{'(b) ours vs bare forward passes (target <= 1.3x)':58s} {b['ours_s']:9.2f} "
              f"{b['bare_s']:10.2f} {b['ratio']:7.3f}x")
        print(f"    seeds {b['seeds']} (n = {b['lengths']}), {b['attn']}")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--loop-seeds", type=int, nargs="+", default=[0, 10])
    p.add_argument("--forward-seeds", type=int, nargs="+", default=[0, 20, 40, 60, 80])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parts", nargs="+", default=["loops", "forward"], choices=["loops", "forward"])
    args = p.parse_args()
    run(model=args.model, loop_seeds=args.loop_seeds, forward_seeds=args.forward_seeds, repeats=args.repeats,
        threads=args.threads, parts=args.parts)
