"""A prefix and all its continuations in one forward of the whole model (scoring under ZeRO-3).

Under ZeRO-3 every forward gathers the model's parameters, whatever its rows, so the scorer's usual
step (a prefix pass that keeps a KV cache, then continuation passes on top of it, then one
unembedding call: icl_scale/scoring.py) gathers the model once per pass. Here a step is one call:
each work unit is one row holding its prefix followed by every choice's block (suffix +
continuation[:-1]), and a 4D attention mask lets each block see the prefix and itself only, with the
positions a block would have on top of the prefix's cache. Every token is computed once, as in the
cached path; the numbers are the cached path's up to float rounding.

The call goes through the top-level model (`lm.model`), so DeepSpeed's forward hooks run: each call
is one traced step, and with the trace complete the next blocks' parameters are gathered while the
current one computes. The unembedding runs inside the same call on the scored positions only
(transformers' `logits_to_keep` with a boolean mask).

`packable` says when this path applies: the model honours a custom 4D mask (no sliding-window
layers shorter than the longest row) and the heaviest step's attention scores fit beside the
live-parameter budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .models.loading import LoadedModel
from .passes import ChoiceScore, Tokenised, plan_units, tail_rows
from .tasks.base import Request


def packed_rows(tk: Tokenised, requests, chunk) -> tuple[list[list[int]], list[list[int]], list[list[int]], list]:
    """Per unit of `chunk`: (tokens, positions, segment of each token: 0 the prefix, b > 0 block b),
    and per scored token (unit, position predicting it, target, row of `tail_rows`)."""
    tokens, positions, segments, scored = [], [], [], []
    for prefix, _ in chunk:
        tokens.append(list(prefix))
        positions.append(list(range(len(prefix))))
        segments.append([0] * len(prefix))
    for r, (u, _, _, cont, suf) in enumerate(tail_rows(tk, requests, chunk)):
        n, start = len(chunk[u][0]), len(tokens[u])
        block = suf + cont[:-1]
        tokens[u] += block
        positions[u] += range(n, n + len(block))
        segments[u] += [r + 1] * len(block)
        for k, target in enumerate(cont):  # the position that predicts continuation token k
            at = start + len(suf) - 1 + k if suf else (n - 1 if k == 0 else start + k - 1)
            scored.append((u, at, target, r))
    return tokens, positions, segments, scored


def tree_mask(segments: list[list[int]], dtype: torch.dtype, dev) -> torch.Tensor:
    """Additive [units, 1, T, T] mask: a prefix token sees the prefix before it, a block token the
    prefix and its own block up to itself; padding (segment -1) sees what precedes it and is never seen."""
    n = max(len(s) for s in segments)
    seg = torch.full((len(segments), n), -1, dtype=torch.long)
    for i, s in enumerate(segments):
        seg[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None]
    allowed = causal & ((k == 0) | (k == q) | (q < 0)) & ((k >= 0) | (q < 0))
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None].to(dev)


def score_packed(lm: LoadedModel, tk: Tokenised, requests, chunk, select=None) -> list[tuple[int, int, ChoiceScore]]:
    """Every row of a group of units in one call of the whole model (see the module docstring);
    `select(request indices)`: several masks (scoring._maskgates_for), one request per batch row."""
    dev, pad = lm.device, lm.tokenizer.pad_token_id
    tokens, positions, segments, scored = packed_rows(tk, requests, chunk)
    rows = tail_rows(tk, requests, chunk)
    n = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), n), pad, dtype=torch.long)
    pos = torch.zeros((len(tokens), n), dtype=torch.long)
    for u, (t, p) in enumerate(zip(tokens, positions)):
        ids[u, : len(t)], pos[u, : len(p)] = torch.tensor(t), torch.tensor(p)
    keep = torch.zeros((len(tokens), n), dtype=torch.bool)
    for u, at, _, _ in scored:
        keep[u, at] = True
    index = torch.full((len(tokens), n), -1, dtype=torch.long)
    index[keep] = torch.arange(int(keep.sum()))  # row-major: the order logits_to_keep returns them in
    if select:
        select([ijs[0][0] for _, ijs in chunk])
    logits = lm.model(input_ids=ids.to(dev), attention_mask=tree_mask(segments, lm.dtype, dev),
                      position_ids=pos.to(dev), use_cache=False, logits_to_keep=keep.to(dev)).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    at = torch.tensor([int(index[u, p]) for u, p, _, _ in scored], device=dev)
    lp = logp[at, torch.tensor([t for _, _, t, _ in scored], device=dev)]
    owner = torch.tensor([r for *_, r in scored], device=dev)
    total = torch.zeros(len(rows), device=dev, dtype=lp.dtype).index_add_(0, owner, lp)
    return [(i, j, ChoiceScore(t, len(toks))) for (_, i, j, toks, _), t in zip(rows, total.tolist())]


def packable(lm: LoadedModel, tk: Tokenised, requests: Sequence[Request], batch_size: int, free_bytes: int) -> bool:
    """Whether every step fits one packed call (`packed_fits` of the list's rows). From the whole
    request list, so every rank decides the same."""
    window = getattr(lm.model.config, "sliding_window", None)
    return packed_fits(packed_lengths(tk, requests), batch_size, lm.adapter.geometry.n_heads, window, free_bytes)


def packed_lengths(tk: Tokenised, requests: Sequence[Request]) -> list[int]:
    """Every work unit's packed row length (its prefix and every choice's block), longest first."""
    units, _ = plan_units(tk, requests)
    return sorted((len(p) + sum(len(suf) + len(tk.continuation(requests[i].pair(j)[1])) for i, j, suf in ijs)
                   for p, ijs in units), reverse=True)


def packed_fits(rows: list[int], batch_size: int, n_heads: int, window: int | None, free_bytes: int) -> bool:
    """No sliding-window layer shorter than the longest row (`rows`, longest first), and the heaviest
    step's attention scores (float32, every head) within half of `free_bytes`."""
    if not rows or (window and rows[0] > int(window)):
        return False
    return min(batch_size, len(rows)) * rows[0] ** 2 * n_heads * 4 <= free_bytes // 2
