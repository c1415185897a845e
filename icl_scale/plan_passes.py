"""The planner's pass schedule is the scorer's: one shard's module calls, counted with the functions
the scorer itself plans its passes with (icl_scale/passes.py), for icl_scale/plan.py.

* a scoring run of a request list under k masks (scoring.score_masks): `passes.plan_work` of the
  list, or with several ranks of each rank's token-balanced slice, in call-lockstep as
  `passes.Lockstep` schedules them (each step: the most passes any rank makes);
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
from .evaluator import masks_per_pass
from .passes import Tokenised, pass_cost_tokens, plan_work, request_cost
from .plan_data import TaskCounts
from .plan_machine import Arch, planned_importance_batch
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


def scoring_calls(tk: Tokenised, requests: list[Request], ranks: int, batch_size: int, n_masks: int = 1,
                  device: str = "cuda", regroup: bool = True) -> Calls:
    """The calls of one scoring run (scoring.score_masks) of `requests` under `n_masks` masks on one of
    `ranks` ranks (several: ZeRO-3 call-lockstep). `device` sets the pass cost the scorer groups
    continuations with (passes.pass_cost_tokens); `regroup`: the model's cache can be split
    (passes.cache_regroupable; plain caches can)."""
    cost = pass_cost_tokens(device)
    if ranks == 1:
        w = plan_work(tk, requests, n_masks, batch_size, cost, regroup)
        steps, tails, naive = len(w.prefixes), sum(w.tails), w.naive
    else:
        slices = balanced_slices([request_cost(tk, r) for r in requests], ranks)
        works = [plan_work(tk, [requests[i] for i in s], n_masks, batch_size, cost, regroup) for s in slices]
        steps = max(len(w.prefixes) for w in works)
        tails = sum(max((w.tails[s] for w in works if s < len(w.tails)), default=0) for s in range(steps))
        naive = max(w.naive for w in works)
    return Calls(base=steps + tails, unembed=steps + naive, model=naive)


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
    knockout_runs: int  # the knock-out list's scorings: unpruned + one per FFN

    @property
    def total(self) -> Calls:
        return self.importance + self.knockout + self.curves


def shard_schedule(cfg: dict, lists: ShardLists, a: Arch, ranks: int, device: str = "cuda") -> Schedule:
    """Every call one rank makes in the shard (see the module docstring)."""
    b_eval = int(cfg["eval"]["batch_size"])
    imp = importance_calls(len(lists.importance), planned_importance_batch(cfg, a, ranks), ranks)
    one = scoring_calls(lists.tk, lists.knockout, ranks, b_eval, 1, device)
    ko = one * (a.layers + 1)
    runs = curve_mask_runs(cfg, a, lists.knockout_on_eval)
    per_pass = masks_per_pass(cfg["eval"]["masks_per_pass"], b_eval, lists.eval)
    curves, memo = Calls(), ({1: one} if lists.knockout is lists.eval else {})
    groups = mask_groups(runs, per_pass)
    for k in groups:
        if k not in memo:
            memo[k] = scoring_calls(lists.tk, lists.eval, ranks, b_eval, k, device)
        curves = curves + memo[k]
    return Schedule(imp, ko, curves, sum(runs), len(groups), a.layers + 1)
