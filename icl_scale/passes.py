"""Which forward passes score a request list, from the tokens alone (icl_scale/scoring.py runs them).

* `Tokenised`: token ids of every (context, continuation) pair, tokenised once per string;
* `plan_units`: work units (a token prefix run once as a cache, every choice scored on top of it)
  and the over-length pairs left to the naive path;
* `length_groups`: rows of similar length in passes, by an exact dynamic programme over padded
  tokens plus a fixed cost per pass (`pass_cost_tokens`);
* `plan_work`, `rank_works` and `Lockstep`: the pass schedule of ZeRO-3 ranks, computed from the
  shard's inputs before any work, identical on every rank, with placeholder calls where a rank has
  nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models.loading import LoadedModel
from .tasks.base import Request


@dataclass
class ChoiceScore:
    logprob: float  # summed log P(continuation tokens | context)
    n_tokens: int  # continuation tokens scored


class Tokenised:
    """Token ids for every (context, continuation) pair, tokenised once per unique string."""

    def __init__(self, lm: LoadedModel, requests: Sequence[Request]):
        tok = lm.tokenizer
        strings = sorted({s for r in requests for s in (*r.contexts, *r.continuations, r.importance_continuation)
                          if s is not None})
        enc = tok(strings, add_special_tokens=False)["input_ids"] if strings else []
        self.ids = dict(zip(strings, enc))
        self.start = list(lm.doc_start_ids)
        self.max_len = lm.max_length

    def context(self, s: str) -> list[int]:
        return self.start + self.ids[s]

    def continuation(self, s: str) -> list[int]:
        ids = self.ids[s]
        if not ids:
            raise ValueError(f"continuation {s!r} tokenises to nothing; every choice needs at least one token")
        return ids

    def pair(self, ctx: str, cont: str) -> tuple[list[int], list[int]]:
        """(input ids, continuation ids) with left truncation to max_length inputs."""
        c, x = self.context(ctx), self.continuation(cont)
        full = c + x
        budget = self.max_len + 1  # the last token is only a target, never an input
        if len(full) > budget:
            keep = budget - len(self.start)
            if len(x) >= keep:
                raise ValueError(f"a continuation of {len(x)} tokens does not fit model.max_length={self.max_len}: set "
                                 f"model.max_length={len(x) + len(self.start)} or more")
            full = self.start + full[len(full) - keep:]
        return full[:-1], x

    def fits(self, ctx: str, cont: str) -> bool:
        return len(self.context(ctx)) + len(self.ids[cont]) <= self.max_len + 1


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the right to one length: (ids, attention mask), both [rows, length]."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def regroupable(cache) -> bool:
    """Continuation rows can be split into several passes over one context cache only when every
    layer is a plain growing cache whose key/value tensors are all its state."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def length_groups(lengths: list[int], pass_cost: float, max_size: int | None = None) -> list[list[int]]:
    """Indices of rows (length 0 = nothing to run, left out) in passes, longest first, chosen to
    minimise the padded tokens plus `pass_cost` token-equivalents per pass (a pass has a fixed
    cost: every weight is read once, whatever the batch), with at most `max_size` rows per pass.
    Exact dynamic programme over the length-sorted rows (an optimal grouping is contiguous)."""
    order = sorted((k for k, n in enumerate(lengths) if n > 0), key=lambda k: -lengths[k])
    n = len(order)
    if n == 0:
        return []
    m = n if max_size is None else max(1, int(max_size))
    pass_cost = min(float(pass_cost), 1e12)  # "never split" must still respect max_size
    rows = [lengths[k] for k in order]
    runs = len(set(rows))
    cut = (_cuts_by_runs if pass_cost.is_integer() and pass_cost <= 2**20 and n >= 4 * runs and n * m > 10**5
           else _cuts)(rows, pass_cost, m)
    groups, i = [], n
    while i > 0:
        groups.append(order[cut[i]: i])
        i = cut[i]
    return groups[::-1]


def _cuts(rows: list[int], pass_cost: float, m: int) -> list[int]:
    """cut[i]: where the last pass of the best grouping of the first i rows starts (the first such j)."""
    n = len(rows)
    best = [0.0] + [float("inf")] * n  # best[i]: cost of the first i rows
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(max(0, i - m), i):
            c = best[j] + pass_cost + (i - j) * rows[j]  # the pass is padded to its longest row
            if c < best[i]:
                best[i], cut[i] = c, j
    return cut


def _cuts_by_runs(rows: list[int], pass_cost: float, m: int) -> list[int]:
    """`_cuts`, the same cuts in O(n x runs in a window) for rows in runs of equal lengths (a list
    under several masks: every length at least once per mask). Within a run of length L a pass
    from j costs best[j] - j L + (pass_cost + i L), so each run keeps its candidates' minimum of
    best[j] - j L in a sliding-window deque (the first on ties); across runs the first minimum wins,
    as in `_cuts`. Exact: every cost is an integer below 2**53 (an integral pass cost)."""
    from collections import deque

    n = len(rows)
    run_of = [0] * n  # the run (of equal lengths) each row is in
    for j in range(1, n):
        run_of[j] = run_of[j - 1] + (rows[j] != rows[j - 1])
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    cands: dict[int, deque] = {}
    active: deque = deque()  # runs with candidates, in order
    for i in range(1, n + 1):
        j, r = i - 1, run_of[i - 1]
        q = cands.get(r)
        if q is None:
            q = cands[r] = deque()
            active.append(r)
        key = best[j] - j * rows[j]
        while q and best[q[-1]] - q[-1] * rows[j] > key:
            q.pop()
        q.append(j)
        lo = max(0, i - m)
        for r in list(active):
            q = cands[r]
            while q and q[0] < lo:
                q.popleft()
            if not q:
                active.remove(r)
                del cands[r]
                continue
            c = best[q[0]] + pass_cost + (i - q[0]) * rows[q[0]]
            if c < best[i]:
                best[i], cut[i] = c, q[0]
    return cut


def pass_cost_tokens(device) -> float:
    """Fixed cost of one forward pass in padded-token equivalents: on a CPU a pass costs about as
    much as ~40 extra tokens of SmolLM2 (measured: 0.15 s per pass, 3.9 ms per token on 2 cores);
    on a GPU extra passes cost far more than padding."""
    return 40.0 if torch.device(device).type == "cpu" else 2048.0


def common_prefix_len(rows: list[list[int]]) -> int:
    """Length of the longest token prefix that all rows share."""
    n = min(len(r) for r in rows)
    for k in range(n):
        t = rows[0][k]
        if any(r[k] != t for r in rows[1:]):
            return k
    return n


def plan_units(tk: Tokenised, requests: Sequence[Request]):
    """Work units and the pairs left to the naive path.

    A unit is a token prefix run once as a cache, with every (request, choice, suffix) scored on
    top of it: suffix + continuation follow the prefix. A request with one context: its context,
    suffix empty (contexts shared across documents, e.g. MultiRC's answer rows, share one unit). A
    request with several contexts (winogrande's partial scoring: the option fills the blank after
    a long shared prompt): the common token prefix of its contexts, each context's rest as suffix.
    Pairs longer than max_length go to the naive path (`overflow`)."""
    by_prefix: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
    overflow = []
    for i, r in enumerate(requests):
        fit = []
        for j in range(r.n_choices):
            ctx, cont = r.pair(j)
            (fit if tk.fits(ctx, cont) else overflow).append((i, j))
        if not fit:
            continue
        ctxs = [tk.context(r.pair(j)[0]) for _, j in fit]
        n = common_prefix_len(ctxs) if len(r.contexts) > 1 else len(ctxs[0])
        for (_, j), c in zip(fit, ctxs):
            cut = n if n > 0 else len(c)  # nothing shared: the context is its own prefix
            by_prefix.setdefault(tuple(c[:cut]), []).append((i, j, c[cut:]))
    return [(list(k), v) for k, v in by_prefix.items()], overflow


def tail_rows(tk: Tokenised, requests, chunk) -> list[tuple]:
    """One row per choice of a group of units: (unit, request, choice, continuation tokens, suffix tokens)."""
    return [(u, i, j, tk.continuation(requests[i].pair(j)[1]), suf)
            for u, (_, ijs) in enumerate(chunk) for i, j, suf in ijs]


def tail_groups(rows: list[tuple], cost: float, regroup: bool) -> list[list[int]]:
    """The continuation passes of a group of units' rows (`regroup`: the cache can be split, see
    `regroupable`; else one pass), from the tokens alone."""
    return length_groups([len(r[4]) + len(r[3]) - 1 for r in rows], cost if regroup else float("inf"))


@dataclass
class Work:
    """One process's forward passes over its requests under `n_masks` masks, from the tokens alone:
    the work units, the pairs left to the naive path, the prefix passes (unit indices) and the
    continuation passes after each. Request k * n + i of the units is request i under mask k."""

    units: list
    overflow: list[tuple[int, int]]
    prefixes: list[list[int]]
    tails: list[int]
    naive: int  # full-model calls of the naive path (one per choice of an over-length request, per mask)


def plan_work(tk: Tokenised, requests: Sequence[Request], n_masks: int, batch_size: int, cost: float,
              regroup: bool, packed: bool = False) -> Work:
    """The passes `_score_local` makes for `requests` (`regroup`: see `regroupable`; `packed`: a step is
    one call with its continuations inside, icl_scale/packed.py, so no continuation passes are planned)."""
    n = len(requests)
    units, overflow = plan_units(tk, requests)
    units = [(p, [(k * n + i, j, suf) for i, j, suf in ijs]) for k in range(n_masks) for p, ijs in units]
    copies = list(requests) * n_masks
    # Prefix passes of at most `batch_size` prefixes of similar length, longest first (memory
    # peaks early); padding costs as much as real tokens on a CPU.
    prefixes = length_groups([len(u[0]) for u in units], cost, max_size=batch_size)
    tails = [0 if packed else len(tail_groups(tail_rows(tk, copies, [units[k] for k in g]), cost, regroup))
             for g in prefixes]
    return Work(units, overflow, prefixes, tails, naive_calls(requests, overflow, n_masks))


def rank_works(tk: Tokenised, requests: Sequence[Request], n_masks: int, batch_size: int, cost: float,
               regroup: bool, packed: bool, world: int) -> list[Work]:
    """Each ZeRO-3 rank's passes over its share of `requests`: the prefix passes one process would make
    over all of them with `world` times the batch (and the pass cost: each pass's fixed cost is paid on
    every rank at once, its tokens are shared), each pass's units then dealt to the ranks by tokens, at
    most `batch_size` each. So every rank's share of a step takes about as long as the others', and a
    rank waits little in the next step's parameter gather (slicing the requests first and planning
    each slice alone gave steps of 13 units on one rank beside 39 on the other). The over-length
    requests (the naive path) are dealt by tokens too. Units, and requests k * n + i, are the whole
    list's; each Work holds its rank's passes (a step where it has nothing: an empty pass)."""
    from .distributed import balanced_slices

    whole = plan_work(tk, requests, n_masks, batch_size * world, cost * world, regroup, packed)
    if world == 1:
        return [whole]
    copies = list(requests) * n_masks
    shares: list[list[list[int]]] = [[] for _ in range(world)]
    for g in whole.prefixes:
        cap = -(-len(g) // world)  # <= batch_size: the pass held at most batch_size x world units
        for r, part in enumerate(balanced_slices([unit_tokens(tk, copies, whole.units[k]) for k in g], world, cap)):
            shares[r].append([g[x] for x in part])  # ascending positions: longest prefix first, as in g
    works = []
    for r, mine in enumerate(naive_shares(tk, requests, whole.overflow, world)):
        overflow = [(i, j) for i, j in whole.overflow if i in mine]
        tails = [0 if packed or not g else len(tail_groups(tail_rows(tk, copies, [whole.units[k] for k in g]), cost,
                                                           regroup)) for g in shares[r]]
        works.append(Work(whole.units, overflow, shares[r], tails, naive_calls(requests, overflow, n_masks)))
    return works


def naive_shares(tk: Tokenised, requests: Sequence[Request], overflow, world: int) -> list[set[int]]:
    """The over-length requests (those with a pair in `overflow`: the naive path) dealt to `world` ranks
    by tokens: each rank's request indices."""
    from .distributed import balanced_slices

    naive = sorted({i for i, _ in overflow})
    return [{naive[x] for x in part} for part in balanced_slices([request_cost(tk, requests[i]) for i in naive], world)]


def unit_tokens(tk: Tokenised, copies: Sequence[Request], unit) -> int:
    """Tokens one work unit runs: its prefix, then every row's suffix and continuation."""
    prefix, ijs = unit
    return len(prefix) + sum(len(suf) + len(tk.continuation(copies[i].pair(j)[1])) for i, j, suf in ijs)


def naive_calls(requests: Sequence[Request], overflow, n_masks: int) -> int:
    """Full-model calls of the naive path: one per choice of an over-length request, per mask."""
    return sum(requests[i].n_choices for i in {i for i, _ in overflow}) * n_masks


class Lockstep:
    """ZeRO-3 with data-parallel ranks: every rank must make the same sequence of module calls,
    whatever its share of the work. The sequence is a schedule every rank computes from the shard's
    inputs before any work (every rank's Work, `rank_works`; each step the most continuation passes
    any rank makes); a rank with fewer runs placeholder calls on one pad token (`idle_*`) where it has
    nothing.
    Nothing is agreed while the ranks work, so no rank can wait in an all-reduce while another is in a
    parameter gather. None of this is needed (or used) without ZeRO-3: each rank runs its own work."""

    def __init__(self, lm: LoadedModel, works: Sequence[Work], regroup: bool, packed: bool = False):
        self.lm, self.base, self.unembed = lm, lm.model.base_model, lm.model.get_output_embeddings()
        self.pad = torch.tensor([[lm.tokenizer.pad_token_id]], device=lm.device)
        self.regroup, self.packed = regroup, packed
        steps = max(len(w.prefixes) for w in works)
        # packed (icl_scale/packed.py): a step is one call of the whole model, no continuation passes
        self.tails = [0 if packed else max((w.tails[s] for w in works if s < len(w.tails)), default=0)
                      for s in range(steps)]
        self.naive = max(w.naive for w in works)
        self.select = None  # several masks (RowGates): placeholder calls run under mask 0

    def idle_base(self, n: int = 1) -> None:
        for _ in range(n):
            if self.select:
                self.select([0])
            self.base(input_ids=self.pad)

    def idle_unembed(self) -> None:
        # The head alone: a placeholder's output is dropped and Adapter.logits' soft-cap gathers nothing
        w = self.unembed.weight  # its input width: OPT's word_embed_proj_dim can differ from hidden_size
        self.unembed(torch.zeros(1, getattr(w, "ds_shape", w.shape)[-1], device=self.lm.device, dtype=self.lm.dtype))

    def idle_model(self, n: int) -> None:
        for _ in range(n):
            self.lm.model(input_ids=self.pad)

    def idle_units(self, step: int) -> None:
        """The calls of `score_units` at schedule step `step` for a rank with no units there:
        prefix pass, the step's continuation passes, and the unembedding (packed: one model call)."""
        if self.packed:
            if self.select:
                self.select([0])
            self.idle_model(1)
            return
        self.idle_base(1 + self.tails[step])
        self.idle_unembed()


def cache_regroupable(lm: LoadedModel) -> bool:
    """`regroupable` for the cache this model builds, known before any forward (from its config)."""
    from transformers import DynamicCache

    return regroupable(DynamicCache(config=lm.model.config))


def request_cost(tk: Tokenised, r: Request) -> int:
    """Tokens the scorer runs for one request (its contexts once, every continuation): the load
    that data-parallel ranks balance."""
    return (sum(len(tk.context(c)) for c in set(r.contexts))
            + sum(len(tk.ids[r.pair(j)[1]]) for j in range(r.n_choices)))
