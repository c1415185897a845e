"""Slow reference implementations of the induction scores: the original code's loops.

A faithful re-implementation of llm-interpret's lm_eval/prefix_matching_copying.py (the paper's
code): eager attention with `output_attentions`, `.item()` accumulation, every head's output
through the full-vocabulary unembedding (+ softmax), per-layer / per-head / per-token Python loops,
generic over the supported families. The pipeline never runs them: they are the definition the
vectorised scores are checked against, by the tests (tests/test_induction.py) and by `make bench`
(bench/induction.py, whose baseline they are). This file is their one home.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import Adapter
from .options import CopyingOptions


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
