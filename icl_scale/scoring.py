"""Log-likelihood engine for multiple-choice tasks.

score(continuation | context) = sum over continuation tokens of log-softmax, with context and
continuation tokenised separately (no special tokens) and concatenated, as the paper's harness
(lm-eval 0.2.0) did; the model's document-start token (if any) goes first.

Two implementations that must agree (tests check <= 1e-4 nats per choice):

* `score_naive`: one full forward per (context, continuation) pair. The reference.
* `score_requests`: each document's shared context is run once (right-padded batches of
  contexts of similar length) and kept as a KV cache; all continuations of those documents are
  then scored on top of the cached prefix, in passes of similar continuation length. Passes are
  chosen by an exact dynamic programme over the length-sorted rows that minimises padded tokens
  plus a fixed per-pass cost (`pass_cost_tokens`): on a CPU a padded token costs as much as a real
  one, and each pass reads every weight once. The first continuation token is scored from the
  context pass, so single-token answers (" yes"/" no", " True"/...) need no second pass at all.
  The unembedding runs only at positions whose log-probs are needed, in one call per prefix pass
  (its first tokens and every continuation pass's positions together).

Shared prefixes (`score_requests`): contexts that share a token prefix share its KV. A request
with several contexts (winogrande's partial scoring: the two options' prompts differ only from the
blank on, after the demonstrations and the sentence start) runs the common token prefix of its
contexts once, in the batched context passes above; each context's remaining suffix then runs
with its continuation on top of that cache, only the continuation's positions scored (its first
token is predicted from the suffix's last position, or from the prefix's if the suffix is empty).
A request with one context is scored as above.

Several masks (`score_masks`): each work unit runs once per mask and a pass mixes the units of
several masks, every batch row gated by its own mask (models/gates.RowGates), so a short request
list under k masks costs fewer, fuller passes than k separate evaluations.

Truncation: a sequence longer than `max_length + 1` tokens (context + continuation) loses tokens
from the left of the context (the document-start token is kept); pairs that need it are scored
by the naive path, which handles it exactly, so both paths give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from .models.gates import Gates, RowGates
from .models.loading import LoadedModel
from .passes import (
    ChoiceScore,
    Lockstep,
    Tokenised,
    Work,
    cache_regroupable,
    length_groups,
    pad_right,
    pass_cost_tokens,
    plan_units,
    plan_work,
    rank_works,
    regroupable,
    request_cost,
    tail_groups,
    tail_rows,
)
from .tasks.base import Request

# (ChoiceScore, Tokenised, pad_right, ... are the passes' vocabulary: re-exported for the scorer's users)
__all__ = ["ChoiceScore", "Lockstep", "Tokenised", "Work", "cache_regroupable", "gates_for", "length_groups",
           "pad_right", "pass_cost_tokens", "plan_units", "plan_work", "rank_works", "regroupable", "request_cost",
           "score_masks", "score_naive", "score_requests", "score_units"]


def _cache_kwarg(base) -> str:
    """transformers 5.24 renamed the forward argument `past_key_values` to `cache`."""
    import inspect

    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def gates_for(lm: LoadedModel, head_mask, ffn_mask):
    """Gates for one (head, FFN) mask pair, or nothing when both are None."""
    if head_mask is None and ffn_mask is None:
        return nullcontext()
    return Gates(lm.adapter, head_mask=head_mask, ffn_mask=ffn_mask)


def _logprob_of(hidden: torch.Tensor, targets: torch.Tensor, logits_of) -> torch.Tensor:
    """log P(target) for each row of hidden [N, d] (unembedding applied only here: `logits_of`,
    Adapter.logits, also soft-caps where the model's own forward does)."""
    logits = logits_of(hidden).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _continuation_hidden(base, cache, rows, unit_idx, ctx_mask, ctx_len, pad, dev):
    """The hidden states that predict each row's continuation tokens, on top of its prefix's cache,
    given suffix + continuation[:-1] as inputs: (hidden [n, d], target tokens [n], row of each [n]).
    A row without a suffix has tokens 1..m-1 here (its token 0 comes from the prefix pass); one
    with a suffix all m, token 0 from the suffix's last position."""
    tails = [r[4] + r[3][:-1] for r in rows]
    cache.batch_select_indices(unit_idx)  # repeat each prefix per row
    x_ids, x_mask = pad_right(tails, pad)
    x_ids, x_mask = x_ids.to(dev), x_mask.to(dev)
    full_mask = torch.cat([ctx_mask.to(dev)[unit_idx], x_mask], dim=1)  # hides the prefixes' pads
    pos = ctx_len.to(dev)[unit_idx, None] + torch.arange(x_ids.shape[1], device=dev)[None]
    h = base(input_ids=x_ids, attention_mask=full_mask, position_ids=pos, use_cache=True,
             **{_cache_kwarg(base): cache}).last_hidden_state  # [N, Lx, d]
    targets = torch.zeros_like(x_ids)
    scored = torch.zeros_like(x_mask, dtype=torch.bool)
    for k, r in enumerate(rows):
        s, cont = len(r[4]), r[3]
        tgt = cont if s else cont[1:]
        o = s - 1 if s else 0  # the position that predicts tgt[0]
        if tgt:
            targets[k, o: o + len(tgt)] = torch.tensor(tgt, device=dev)
            scored[k, o: o + len(tgt)] = True
    return h[scored], targets[scored], scored.nonzero()[:, 0]


def _prefix_pass(base, rows_tok: list[list[int]], pad, dev):
    """One right-padded pass over prefixes: (hidden at each one's last token [B, d], cache, mask, lengths)."""
    ctx_len = torch.tensor([len(c) for c in rows_tok])
    ids, mask = pad_right(rows_tok, pad)
    # No attention mask: padding is on the right and attention is causal, so no real token ever
    # sees a pad, and the causal kernel skips the masked half of the score matrix.
    res = base(input_ids=ids.to(dev), use_cache=True)
    last = res.last_hidden_state[torch.arange(len(rows_tok)), (ctx_len - 1).to(dev)]
    cache = res.cache if "cache" in res else res.past_key_values
    return last, cache, mask, ctx_len


def score_units(base, logits_of, tk, requests, chunk, pad, dev, cost, lock=None,
                 select=None) -> list[tuple[int, int, ChoiceScore]]:
    """Score every row of a group of units: one prefix pass, then the tails in passes of similar length,
    then one unembedding of every scored position (on a CPU each unembedding call reads the whole
    [vocab, d] matrix and a GEMM of few rows is inefficient: one call instead of 1 + passes saves
    ~25 ms per call on SmolLM2 with 1 thread). `lock` (ZeRO-3 with data-parallel ranks): (Lockstep,
    continuation passes of this step in the schedule); placeholder passes make up the difference, before
    the unembedding. `select(request indices)` (several masks, `_mask_gates`): called with the request
    of every batch row before each pass. `logits_of`: hidden states -> logits (Adapter.logits)."""
    if select:
        select([ijs[0][0] for _, ijs in chunk])
    last, cache, mask, ctx_len = _prefix_pass(base, [u[0] for u in chunk], pad, dev)
    rows = tail_rows(tk, requests, chunk)
    unit_idx = torch.tensor([r[0] for r in rows], device=dev)
    hidden, targets, owner = [], [], []  # every scored position: its hidden state, target, row
    direct = [k for k, r in enumerate(rows) if not r[4]]  # token 0 predicted by the prefix's last position
    if direct:
        d_idx = torch.tensor(direct, device=dev)
        hidden.append(last[unit_idx[d_idx]])
        targets.append(torch.tensor([rows[k][3][0] for k in direct], device=dev))
        owner.append(d_idx)
    groups = tail_groups(rows, cost, lock[0].regroup if lock else regroupable(cache))
    if len(groups) > 1 and not regroupable(cache):
        raise RuntimeError(f"{type(cache).__name__} cannot be split into continuation passes (the pass "
                           "schedule assumed it could): a model whose cache layers are not plain DynamicLayers")
    saved = [(layer.keys, layer.values) for layer in cache.layers] if len(groups) > 1 else None
    for g in groups:
        if saved:  # every group starts from the prefix-only cache
            for layer, (k, v) in zip(cache.layers, saved):
                layer.keys, layer.values = k, v
        g_idx = torch.tensor(g, device=dev)
        if select:
            select([rows[k][1] for k in g])
        h, tgt, row = _continuation_hidden(base, cache, [rows[k] for k in g], unit_idx[g_idx], mask, ctx_len, pad, dev)
        hidden.append(h)
        targets.append(tgt)
        owner.append(g_idx[row])
    if lock:
        lock[0].idle_base(lock[1] - len(groups))
    lp = _logprob_of(torch.cat(hidden), torch.cat(targets), logits_of)
    total = torch.zeros(len(rows), device=dev, dtype=lp.dtype).index_add_(0, torch.cat(owner), lp)
    return [(i, j, ChoiceScore(t, len(toks))) for (_, i, j, toks, _), t in zip(rows, total.tolist())]


@torch.inference_mode()
def score_naive(lm: LoadedModel, requests: Sequence[Request], head_mask=None, ffn_mask=None,
                batch_size: int = 1, progress: bool = False) -> list[list[ChoiceScore]]:
    """Reference scorer: one full forward per (context, continuation) pair."""
    tk = Tokenised(lm, requests)
    pairs = [(i, j, *tk.pair(*r.pair(j))) for i, r in enumerate(requests) for j in range(r.n_choices)]
    out: list[list[ChoiceScore | None]] = [[None] * r.n_choices for r in requests]
    pad = lm.tokenizer.pad_token_id
    with gates_for(lm, head_mask, ffn_mask):
        for s in tqdm(range(0, len(pairs), batch_size), disable=not progress, desc="naive", leave=False):
            chunk = pairs[s: s + batch_size]
            ids, mask = pad_right([p[2] for p in chunk], pad)
            logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for row, (i, j, inp, cont) in enumerate(chunk):
                n = len(inp)
                pos = torch.arange(n - len(cont), n, device=logp.device)
                tgt = torch.tensor(cont, device=logp.device)
                out[i][j] = ChoiceScore(float(logp[row, pos, tgt].sum()), len(cont))
    return out  # type: ignore[return-value]


@torch.inference_mode()
def score_requests(lm: LoadedModel, requests: Sequence[Request], head_mask=None, ffn_mask=None,
                   batch_size: int = 8, progress: bool = False, desc: str = "scoring") -> list[list[ChoiceScore]]:
    """Prefix-cached scorer (see module docstring). `batch_size` = distinct prefixes per pass.

    With data-parallel ranks (icl_scale.distributed) each rank scores a token-balanced slice of the
    requests and every rank returns all of them; under ZeRO-3 the ranks run in call-lockstep, each
    with its share of every pass (passes.rank_works)."""
    return score_masks(lm, requests, [(head_mask, ffn_mask)], batch_size, progress, desc)[0]


@torch.inference_mode()
def score_masks(lm: LoadedModel, requests: Sequence[Request], masks: Sequence[tuple], batch_size: int = 8,
                progress: bool = False, desc: str = "scoring") -> list[list[list[ChoiceScore]]]:
    """score_requests under each (head_mask, ffn_mask) of `masks`, all in shared passes: every work
    unit runs once per mask, and a pass mixes the units of several masks, each batch row under its
    own mask (models/gates.RowGates). Fewer, fuller passes when one mask's request list does not
    fill a pass (shard.masks_per_pass decides); the numbers equal one score_requests per mask up to
    float rounding (a GEMM's rounding depends on its row count). Under ZeRO-3 every mask keeps its
    `batch_size` prefixes per pass: the masks share the pass's one gather of the model, not its rows."""
    from .distributed import balanced_slices, dp_world, gather_objects

    rank, world = dp_world()
    tk = Tokenised(lm, requests)
    packed = False
    if lm.engine is not None:  # ZeRO-3: each pass gathers the model; fewer, fuller passes
        from .models.zero import least_free_memory
        from .packed import packable

        batch_size *= len(masks)
        packed = packable(lm, tk, requests, batch_size, least_free_memory())
    if world == 1:
        return _score_local(lm, requests, masks, batch_size, progress, desc, tk=tk, packed=packed)
    if lm.engine is not None:  # ZeRO-3: every rank's share of every pass, scheduled before any work
        cost, regroup = pass_cost_tokens(lm.device), cache_regroupable(lm)
        works = rank_works(tk, requests, len(masks), batch_size, cost, regroup, packed, world)
        local = _score_local(lm, requests, masks, batch_size, progress, desc, Lockstep(lm, works, regroup, packed),
                             tk, packed, works[rank])
        idx = range(len(requests))
    else:  # each rank its own token-balanced slice of the requests, planned alone
        idx = balanced_slices([request_cost(tk, r) for r in requests], world)[rank]
        local = _score_local(lm, [requests[i] for i in idx], masks, batch_size, progress, desc, tk=tk, packed=packed)
    # the choices this rank scored (under ZeRO-3 a request's choices may be in units of several ranks)
    mine = [(k, i, j, c.logprob, c.n_tokens) for k, res in enumerate(local) for i, row in zip(idx, res)
            for j, c in enumerate(row) if c is not None]
    out: list = [[[None] * r.n_choices for r in requests] for _ in masks]
    for part in gather_objects(mine):
        for k, i, j, lp, n in part:
            out[k][i][j] = ChoiceScore(lp, n)
    return out


def _maskgates_for(lm: LoadedModel, masks: Sequence[tuple], n: int):
    """(gates context, select) for `masks` over `n` requests: one mask, its plain Gates and no
    select; several, RowGates with request k * n + i run under mask k."""
    if len(masks) == 1:
        return gates_for(lm, *masks[0]), None
    g = lm.adapter.geometry

    def stack(ms, shape):
        return None if all(m is None for m in ms) else torch.stack(
            [torch.ones(shape) if m is None else m.detach().float().cpu() for m in ms])

    heads = stack([h for h, _ in masks], (g.n_layers, g.n_heads))
    ffns = stack([f for _, f in masks], (g.n_layers,))
    if heads is None and ffns is None:
        return nullcontext(), None
    gates = RowGates(lm.adapter, heads, ffns)
    # (a rank with no requests, n = 0, runs its placeholder rows under mask 0)
    return gates, lambda idx: gates.select(torch.tensor(idx, dtype=torch.long) // max(n, 1))


def _score_local(lm: LoadedModel, requests: Sequence[Request], masks: Sequence[tuple], batch_size: int,
                 progress: bool, desc: str, sync: Lockstep | None = None,
                 tk: Tokenised | None = None, packed: bool = False,
                 work: Work | None = None) -> list[list[list[ChoiceScore]]]:
    """score_masks on this process's requests (`sync`: ZeRO-3 call-lockstep with the other ranks, on
    its schedule; `tk`: the tokens of a superset of `requests`, when the caller has them; `packed`:
    each step is one call of the whole model, icl_scale/packed.py; `work`: this rank's share of the
    passes over all of `requests`, passes.rank_works, whose other rows stay None)."""
    from .packed import score_packed

    tk = tk or Tokenised(lm, requests)
    n = len(requests)
    dev = lm.device
    cost = pass_cost_tokens(dev)
    regroup = sync.regroup if sync else cache_regroupable(lm)
    work = work or plan_work(tk, requests, len(masks), batch_size, cost, regroup, packed)
    out: list = [[[None] * r.n_choices for r in requests] for _ in masks]
    copies = list(requests) * len(masks)
    base, logits_of, pad = lm.model.base_model, lm.adapter.logits, lm.tokenizer.pad_token_id
    gates, select = _maskgates_for(lm, masks, n)
    if sync:
        sync.select = select
    with gates:
        bar = tqdm(total=sum(map(len, work.prefixes)), disable=not progress, desc=desc, unit="ctx", leave=False)
        for step in range(len(sync.tails) if sync else len(work.prefixes)):
            g = work.prefixes[step] if step < len(work.prefixes) else []
            if not g:  # nothing of this rank's in this step: the others' calls, on one pad token
                sync.idle_units(step)
                continue
            lock = (sync, sync.tails[step]) if sync else None
            chunk = [work.units[k] for k in g]
            for i, j, sc in score_packed(lm, tk, copies, chunk, select) if packed else score_units(
                    base, logits_of, tk, copies, chunk, pad, dev, cost, lock, select):
                out[i // n][i % n][j] = sc
            bar.update(len(g))
        bar.close()
    _score_overflow(lm, requests, masks, work, out)
    if sync:
        sync.idle_model(sync.naive - work.naive)
    return out


def _score_overflow(lm: LoadedModel, requests, masks, work: Work, out) -> None:
    """Left-truncated pairs: the exact naive path (one pair per forward), per mask, into `out`."""
    idx = sorted({i for i, _ in work.overflow})
    for res, (head_mask, ffn_mask) in zip(out, masks) if idx else ():
        nv = dict(zip(idx, score_naive(lm, [requests[i] for i in idx], head_mask, ffn_mask, batch_size=1)))
        for i, j in work.overflow:
            res[i][j] = nv[i][j]
