"""The planner's pass schedule is the scorer's: one shard's module calls, counted with the functions
the scorer itself plans its passes with (icl_scale/passes.py), for icl_scale/plan.py.

* a scoring run of a request list under k masks (scoring.score_masks): `passes.plan_work` of the
  list, or with several ZeRO-3 ranks `passes.rank_works` (each rank's share of every pass), in
  call-lockstep as `passes.Lockstep` schedules them (each step: the most passes any rank makes);
* importance: ceil(examples / (batch x ranks)) steps, each one forward, one unembedding and one
  backward on every rank;
* knock-out: the knock-out list scored once unpruned and once per FFN removed (under ZeRO-3 a whole
  scoring run each; on one GPU a restarted run each, the same passes on fewer blocks);
* curves: every distinct mask the curves and the grid ask for that no earlier stage scored (the
  unpruned point when the knock-out ran on the eval list, an FFN level that removes one FFN), in the
  groups of `eval.masks_per_pass` that share passes (evaluator.Evaluator.prefetch).

The request lists are the shard's own when the data is at hand (rendered and tokenised as the shard
does); else documents of the table's mean lengths (conf/plan_tasks.yaml), every one the same, which
is the schedule's lower bound (no length spread, no over-length pairs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

from .distributed import balanced_slices
from .evaluator import mask_pass_bytes, masks_per_pass, pass_token_bytes, zero3_group_size
from .models.zero import live_beside
from .packed import packed_fits, packed_lengths
from .passes import (
    Tokenised,
    length_groups,
    naive_calls,
    naive_shares,
    pass_cost_tokens,
    plan_units,
    plan_work,
    rank_works,
    request_cost,
)
from .plan_data import TaskCounts
from .plan_machine import Arch, layer_params, n_params, planned_importance_batch
from .pruning import n_removed
from .tasks.base import Request


@dataclass
class Calls:
    """Module calls one rank makes: base-model forwards (the scorer's prefix, continuation and
    placeholder passes), unembedding calls, whole-model calls (the naive path, the importance
    forwards; each one also runs the unembedding), importance backwards."""

    base: int = 0
    unembed: int = 0
    model: int = 0
    backward: int = 0

    @property
    def forwards(self) -> int:
        """Forward passes through every block: base-model and whole-model calls."""
        return self.base + self.model

    def __add__(self, o: Calls) -> Calls:
        return Calls(self.base + o.base, self.unembed + o.unembed, self.model + o.model, self.backward + o.backward)

    def __mul__(self, k: int) -> Calls:
        return Calls(self.base * k, self.unembed * k, self.model * k, self.backward * k)


@dataclass
class Zero3:
    """What sizes a ZeRO-3 shard's passes, from the plan's numbers as the scorer has them from the
    device: free memory per rank (models/zero.least_free_memory), the live-parameter budget beside the
    running module in bytes (models/zero.live_beside), and the pass's bytes per token."""

    free_bytes: int
    live_bytes: int
    per_token: int
    vocab: int
    heads: int

    @classmethod
    def of(cls, a: Arch, free_bytes: int, width: int, max_live_parameters="auto") -> Zero3:
        tensor = max(a.vocab * (a.embed_dim or a.hidden), a.ffn * a.hidden)
        live = live_beside(max_live_parameters, n_params(a), layer_params(a), tensor, free_bytes, width)
        per_token = pass_token_bytes(a.layers, a.kv_heads, a.head_dim, a.hidden, width)
        return cls(int(free_bytes), live * width, per_token, a.vocab, a.heads)

    def group_size(self, setting, tk: Tokenised, requests: list[Request], batch_size: int, n_masks: int) -> int:
        """Masks sharing a pass (eval.masks_per_pass; auto: evaluator.zero3_masks_per_pass's rule)."""
        if setting != "auto":
            return int(setting)
        per_mask = mask_pass_bytes(tk, requests, batch_size, self.per_token, self.vocab)
        return zero3_group_size(per_mask, n_masks, self.free_bytes - self.live_bytes)


def scoring_calls(tk: Tokenised, requests: list[Request], ranks: int, batch_size: int, n_masks: int = 1,
                  device: str = "cuda", regroup: bool = True, zero: Zero3 | None = None,
                  cache: dict | None = None) -> Calls:
    """The calls of one scoring run (scoring.score_masks) of `requests` under `n_masks` masks on one of
    `ranks` ranks (several: ZeRO-3 call-lockstep). `device` sets the pass cost the scorer groups
    continuations with (passes.pass_cost_tokens); `regroup`: the model's cache can be split
    (passes.cache_regroupable; plain caches can). `zero`: under ZeRO-3 every mask keeps its
    `batch_size` prefixes per pass, and a step is one call of the whole model when it fits (packed.py).
    `cache`: a dict kept across calls on the same lists (their work units)."""
    cost, packed, cache = pass_cost_tokens(device), False, {} if cache is None else cache
    if zero is not None:
        batch_size *= n_masks
        if (id(requests), "rows") not in cache:
            cache[(id(requests), "rows")] = packed_lengths(tk, requests)
        packed = packed_fits(cache[(id(requests), "rows")], batch_size, zero.heads, None, zero.free_bytes)
    if zero is not None and ranks > 1:  # every rank's share of every pass (passes.rank_works)
        steps, tails, naive = _zero3_passes(tk, requests, ranks, n_masks, batch_size, cost, regroup, packed, cache)
    else:  # one process, or data-parallel ranks on their own slices (the busiest rank's calls, per step)
        if (id(requests), "slices", ranks) not in cache:
            cache[(id(requests), "slices", ranks)] = [list(range(len(requests)))] if ranks == 1 else balanced_slices(
                [request_cost(tk, r) for r in requests], ranks)
        works = [_rank_passes(tk, requests, s, n_masks, batch_size, cost, regroup, packed, cache)
                 for s in cache[(id(requests), "slices", ranks)]]
        steps = max(len(t) for t, _ in works)
        tails = sum(max((t[s] for t, _ in works if s < len(t)), default=0) for s in range(steps))
        naive = max(n for _, n in works)
    if packed:  # one whole-model call per step (its unembedding inside), no continuation passes
        return Calls(unembed=steps + naive, model=steps + naive)
    return Calls(base=steps + tails, unembed=steps + naive, model=naive)


def _zero3_passes(tk, requests, ranks, n_masks, batch_size, cost, regroup, packed, cache) -> tuple[int, int, int]:
    """(steps, continuation passes, naive calls) of ZeRO-3 ranks in call-lockstep, each with its share
    of every pass (passes.rank_works). Packed, the steps are the prefix passes of the whole list with
    `ranks` times the batch and the pass cost: planned from the units' lengths without the mask copies
    (length_groups sorts them), and the naive calls from the over-length requests dealt by tokens."""
    if not packed:
        works = rank_works(tk, requests, n_masks, batch_size, cost, regroup, False, ranks)
        return (len(works[0].prefixes), sum(max(w.tails[s] for w in works) for s in range(len(works[0].prefixes))),
                max(w.naive for w in works))
    if (id(requests), "units") not in cache:
        units, overflow = plan_units(tk, requests)
        cache[(id(requests), "units")] = ([len(p) for p, _ in units], overflow)
    lengths, overflow = cache[(id(requests), "units")]
    steps = len(length_groups(lengths * n_masks, cost * ranks, max_size=batch_size * ranks))
    return steps, 0, max(naive_calls(requests, [(i, j) for i, j in overflow if i in mine], n_masks)
                         for mine in naive_shares(tk, requests, overflow, ranks))


def _rank_passes(tk, requests, idx, n_masks, batch_size, cost, regroup, packed, cache) -> tuple[list[int], int]:
    """(continuation passes after each prefix pass, naive calls) of one rank's slice, as plan_work
    plans them. Packed, only the prefix passes count: their number depends only on the prefixes'
    lengths (length_groups sorts them), so they are planned from the units without the mask copies."""
    reqs = [requests[i] for i in idx]
    if not packed:
        w = plan_work(tk, reqs, n_masks, batch_size, cost, regroup)
        return w.tails, w.naive
    key = (id(requests), tuple(idx))
    if key not in cache:
        units, overflow = plan_units(tk, reqs)
        cache[key] = ([len(p) for p, _ in units], naive_calls(reqs, overflow, 1))
    lengths, naive = cache[key]
    return [0] * len(length_groups(lengths * n_masks, cost, max_size=batch_size)), naive * n_masks


def importance_calls(n_examples: int, batch_size: int, ranks: int) -> Calls:
    """Each importance step is one whole-model forward (its unembedding keeps only the scored
    positions) and one backward, on every rank."""
    steps = math.ceil(n_examples / (batch_size * ranks))
    return Calls(model=steps, unembed=steps, backward=steps)


# --- the masks the curves stage scores ----------------------------------------------------------------

def _counts(levels, n: int, count: str) -> list[int]:
    """Components removed at each level, in level order, each count once (equal counts: equal masks)."""
    out = []
    for p in sorted(levels):
        k = n_removed(p, n, count)
        if k not in out:
            out.append(k)
    return out


def curve_mask_runs(cfg: dict, a: Arch, knockout_on_eval: bool) -> list[int]:
    """The new masks of each run of prefetched curve calls, in the order the curves stage asks for
    them (heads, FFNs, the comparison rankings, the grid): how many masks each run scores that no
    earlier call did. Masks are told apart by what they remove (a ranking-independent count of what
    distinct rankings may make equal: then the real shard scores fewer)."""
    pr = cfg["pruning"]
    heads, ffns = _counts(pr["levels"], a.layers * a.heads, pr["count"]), _counts(pr["levels"], a.layers, pr["count"])
    unpruned_new = not knockout_on_eval  # knockout.split=paper scored the unpruned eval list already
    one_ffn_done = knockout_on_eval  # ... and every mask that removes one FFN
    runs = [int(unpruned_new and 0 in heads) + sum(k > 0 for k in heads),
            sum(k > 0 and not (one_ffn_done and k == 1) for k in ffns)]
    if "induction" in pr["compare"]:
        runs.append(sum(k > 0 for k in heads))
    if "random" in pr["compare"]:
        runs += [sum(k > 0 for k in heads)] * int(pr["random_seeds"])
        runs += [sum(k > 0 and not (one_ffn_done and k == 1) for k in ffns)] * int(pr["random_seeds"])
    grid_h = _counts(pr["combined_levels"], a.layers * a.heads, pr["count"])
    grid_f = _counts(pr["combined_levels"], a.layers, pr["count"])
    runs.append(sum(h > 0 for h in grid_h) * sum(f > 0 for f in grid_f))
    return runs


def mask_groups(runs: list[int], per_pass: int) -> list[int]:
    """Sizes of the scoring runs: each run of new masks in consecutive groups of `per_pass`."""
    return [min(per_pass, n - s) for n in runs for s in range(0, n, per_pass)]


# --- the shard's request lists ------------------------------------------------------------------------

@dataclass
class ShardLists:
    tk: Tokenised
    eval: list[Request]
    importance: list[Request]
    knockout: list[Request]
    knockout_on_eval: bool


def shard_lists(cfg: dict, task: str, shot: int, tokenizer, doc_start: list[int], max_length: int) -> ShardLists:
    """The shard's eval, importance and knock-out lists as ShardRun.render cuts them, tokenised."""
    from .tasks import build_requests, get_task, load_split
    from .tasks.fewshot import demo_pool

    data_dir, seed, ev = cfg["data"]["dir"], int(cfg["seed"]), cfg["eval"]
    eval_reqs = build_requests(task, split=ev["split"], shot=shot, seed=seed, limit=ev["limit"], data_dir=data_dir)
    train = build_requests(task, split="train", shot=shot, seed=seed, data_dir=data_dir)
    on_eval = cfg["knockout"]["split"] == "paper"
    if on_eval:  # knockout.limit is for the held-out split only (the paper preset leaves it null)
        ko, pool = eval_reqs, train
    else:
        k = int(cfg["knockout"]["limit"])
        ko, pool = train[-k:], train[:-k]
    if cfg["importance"]["docs"] == "training_docs":
        keep = set(demo_pool(task, load_split(get_task(task), "train", data_dir)))
        pool = [r for r in pool if r.doc_id in keep]
    imp = pool[: int(cfg["importance"]["n_examples"])]
    lm = SimpleNamespace(tokenizer=tokenizer, doc_start_ids=doc_start, max_length=max_length)
    return ShardLists(Tokenised(lm, [*eval_reqs, *imp, *ko]), eval_reqs, imp, ko, on_eval)


class MeanTokens(Tokenised):
    """Tokens of documents known only by their mean lengths: string "c<i>" is document i's context
    (its own first token, so no two documents share a prefix), "x<n>" a continuation of n tokens."""

    def __init__(self, context_tokens: int, max_length: int):
        self.n_ctx, self.start, self.max_len = context_tokens, [], max_length
        self.ids = _Lengths(context_tokens)


class _Lengths(dict):
    def __init__(self, n_ctx: int):
        super().__init__()
        self.n_ctx = n_ctx

    def __missing__(self, s: str) -> list[int]:
        ids = [int(s[1:]) + 2] + [1] * (self.n_ctx - 1) if s.startswith("c") else [1] * int(s[1:])
        self[s] = ids
        return ids


def table_lists(cfg: dict, c: TaskCounts, max_length: int) -> ShardLists:
    """Lists of the table's documents, every one of its mean lengths (one choice: the passes depend on
    the lengths, not on the number of choices)."""
    n_eval, n_imp, n_ko = doc_counts(cfg, c)
    cont = 2 if c.multi_token else 1
    ctx = max(1, min(round(c.eval_tokens - c.eval_scored), max_length + 1 - cont))
    docs = [Request(i, [f"c{i}"], [f"x{cont}"], 0) for i in range(max(n_eval, n_ko))]
    on_eval = cfg["knockout"]["split"] == "paper"
    return ShardLists(MeanTokens(ctx, max_length), docs[:n_eval], docs[:n_imp], docs[:n_ko], on_eval)


def doc_counts(cfg: dict, c: TaskCounts) -> tuple[int, int, int]:
    """(eval docs, importance examples, knock-out docs) of a shard, as ShardRun cuts its lists."""
    n_eval = min(int(cfg["eval"]["limit"] or c.eval_docs), c.eval_docs)
    ko = cfg["knockout"]
    if ko["split"] == "paper":
        n_ko, pool = n_eval, c.train_docs
    else:
        n_ko, pool = int(ko["limit"]), c.train_docs - int(ko["limit"])
    return n_eval, min(int(cfg["importance"]["n_examples"]), max(pool, 0)), n_ko


# --- one shard ----------------------------------------------------------------------------------------

@dataclass
class Schedule:
    """One rank's calls per stage, and the evaluations (mask x list) they score."""

    importance: Calls
    knockout: Calls
    curves: Calls
    eval_runs: int  # masks scored over the eval list by the curves
    eval_scorings: int  # scoring runs over the eval list (groups of masks sharing passes)
    knockout_runs: int  # the knock-out list's evaluations: unpruned + one per FFN
    knockout_scorings: int  # scoring runs over the knock-out list (ZeRO-3: groups of knock-outs sharing passes)

    @property
    def total(self) -> Calls:
        return self.importance + self.knockout + self.curves


def shard_schedule(cfg: dict, lists: ShardLists, a: Arch, ranks: int, device: str = "cuda",
                   zero: Zero3 | None = None) -> Schedule:
    """Every call one rank makes in the shard (see the module docstring); `zero`: under ZeRO-3."""
    b_eval, setting = int(cfg["eval"]["batch_size"]), cfg["eval"]["masks_per_pass"]
    imp = importance_calls(len(lists.importance), planned_importance_batch(cfg, a, ranks), ranks)
    cache: dict = {}  # the lists' work units, planned once

    def calls(reqs, n_masks):  # memoised: groups of one size plan the same passes
        key = (id(reqs), "calls", n_masks)
        if key not in cache:
            cache[key] = scoring_calls(lists.tk, reqs, ranks, b_eval, n_masks, device, zero=zero, cache=cache)
        return cache[key]

    runs = curve_mask_runs(cfg, a, lists.knockout_on_eval)
    if zero is None:
        ko, ko_groups = calls(lists.knockout, 1) * (a.layers + 1), [1] * (a.layers + 1)
        groups = mask_groups(runs, masks_per_pass(setting, b_eval, lists.eval))
    else:  # fixed groups over the knock-outs (knockout._full) and over the curves stage's masks (Evaluator.plan)
        k = zero.group_size(setting, lists.tk, lists.knockout, b_eval, a.layers + 1)
        ko, ko_groups = Calls(), mask_groups([a.layers + 1], k)
        for g in ko_groups:
            ko = ko + calls(lists.knockout, g)
        groups = mask_groups([sum(runs)], zero.group_size(setting, lists.tk, lists.eval, b_eval, sum(runs)))
    curves = Calls()
    for k in groups:
        curves = curves + calls(lists.eval, k)
    return Schedule(imp, ko, curves, sum(runs), len(groups), a.layers + 1, len(ko_groups))
