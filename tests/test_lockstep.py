"""ZeRO-3 ranks make the same sequence of module calls by construction (scoring.Lockstep): the pass
schedule is computed from the shard's inputs before any work, so no rank can wait in a parameter
gather while another waits in an all-reduce (the hangs of `task=copa shot=0 eval.limit=16` and
`task=copa shot=1 model.max_length=28` on 2 ranks).

Checked here in one process: every simulated rank of a random draw (task, shot, limit, max_length,
batch size, masks, ranks) records the same calls of the base model, the unembedding and the whole
model as every other rank, and the ranks' shares together give the one-process scores, each choice
scored by exactly one rank. The torchrun runs under real ZeRO-3 are in test_data_parallel.py."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from icl_scale.scoring import (
    Lockstep,
    Tokenised,
    _score_local,
    cache_regroupable,
    pass_cost_tokens,
    rank_works,
    score_masks,
)
from icl_scale.tasks import build_requests

from conftest import data_dir, get_model

TASKS = [("copa", 2), ("piqa", 2), ("winogrande", 2), ("boolq", 2), ("multirc", 8), ("hellaswag", 4)]


def _draw(rng: random.Random) -> dict:
    task, n_max = rng.choice(TASKS)
    return {"model": rng.choice(["tiny-opt", "tiny-llama"]), "task": task, "shot": rng.choice([0, 1]),
            "limit": rng.randint(1, n_max * 2), "max_length": rng.choice([None, 24, 40, 64]),
            "batch_size": rng.randint(1, 4), "masks": rng.randint(1, 3), "world": rng.choice([2, 3])}


def _masks(lm, k: int, rng: random.Random):
    g = lm.adapter.geometry
    gen = torch.Generator().manual_seed(rng.randint(0, 10**6))
    return [(None, None)] + [((torch.rand(g.n_layers, g.n_heads, generator=gen) > 0.4).float(),
                              (torch.rand(g.n_layers, generator=gen) > 0.3).float()) for _ in range(k - 1)]


def _recorded(lm):
    """Forward hooks that append the name of each called module (base model, unembedding, whole model)."""
    calls: list[str] = []
    mods = {"model": lm.model, "base": lm.model.base_model, "unembed": lm.model.get_output_embeddings()}
    hooks = [m.register_forward_pre_hook(lambda _m, _a, name=name: calls.append(name)) for name, m in mods.items()]
    return calls, hooks


def _run_ranks(lm, reqs, masks, batch_size, world, packed=False):
    """Each simulated rank's (call sequence, scores of its share: None elsewhere), on the schedule of all
    ranks (`packed`: ZeRO-3's one call of the whole model per step)."""
    tk = Tokenised(lm, reqs)
    cost, regroup = pass_cost_tokens(lm.device), cache_regroupable(lm)
    works = rank_works(tk, reqs, len(masks), batch_size, cost, regroup, packed, world)
    out = []
    for work in works:
        calls, hooks = _recorded(lm)
        try:
            res = _score_local(lm, reqs, masks, batch_size, False, "", Lockstep(lm, works, regroup, packed), tk,
                               packed, work)
        finally:
            for h in hooks:
                h.remove()
        out.append((calls, res))
    return out


def _assert_shares_give(ranks, whole, d):
    """Every choice under every mask scored by exactly one rank, as the one process scores it."""
    for k, per_mask in enumerate(whole):
        for i, row in enumerate(per_mask):
            for j, want in enumerate(row):
                got = [res[k][i][j] for _, res in ranks if res[k][i][j] is not None]
                assert len(got) == 1, (d, k, i, j)
                assert got[0].n_tokens == want.n_tokens and abs(got[0].logprob - want.logprob) <= 1e-4, d


@pytest.mark.parametrize("seed", range(6))
def test_every_rank_makes_the_same_calls_and_the_shares_give_the_one_process_scores(seed):
    rng = random.Random(seed)
    d = _draw(rng)
    base = get_model(d["model"])
    lm = dataclasses.replace(base, max_length=d["max_length"] or base.max_length)
    reqs = build_requests(d["task"], shot=d["shot"], limit=d["limit"], data_dir=data_dir(), seed=seed)
    masks = _masks(lm, d["masks"], rng)
    ranks = _run_ranks(lm, reqs, masks, d["batch_size"], d["world"])
    assert all(calls == ranks[0][0] for calls, _ in ranks), d  # the same sequence of module calls
    assert ranks[0][0], d  # the draw does some work
    _assert_shares_give(ranks, score_masks(lm, reqs, masks, batch_size=d["batch_size"]), d)


def test_ranks_with_unequal_continuation_and_naive_passes_still_match():
    """The two hangs' shapes: copa 0-shot 16 docs (one rank makes 2 continuation passes, the other 1)
    and copa 1-shot 12 docs with max_length=28 (10 naive calls on one rank, 12 on the other): the
    ranks' plans differ, and the schedule still gives each the same calls."""
    base = get_model("tiny-opt")
    for shot, limit, max_length in [(0, 16, base.max_length), (1, 12, 28)]:
        lm = dataclasses.replace(base, max_length=max_length)
        reqs = build_requests("copa", shot=shot, limit=limit, data_dir=data_dir())
        works = rank_works(Tokenised(lm, reqs), reqs, 1, 8, pass_cost_tokens(lm.device), cache_regroupable(lm),
                           False, 2)
        assert works[0].tails != works[1].tails or works[0].naive != works[1].naive  # the plans differ
        ranks = _run_ranks(lm, reqs, [(None, None)], 8, 2)
        assert ranks[0][0] == ranks[1][0]


@pytest.mark.parametrize("seed", range(3))
def test_packed_steps_make_the_same_calls_on_every_rank_and_give_the_cached_scores(seed):
    """ZeRO-3's packed steps (icl_scale/packed.py: a prefix and its continuations in one call of the
    whole model): every simulated rank makes the same calls, and the scores are the cached path's."""
    rng = random.Random(100 + seed)
    d = _draw(rng)
    base = get_model(d["model"])
    lm = dataclasses.replace(base, max_length=d["max_length"] or base.max_length)
    reqs = build_requests(d["task"], shot=d["shot"], limit=d["limit"], data_dir=data_dir(), seed=seed)
    masks = _masks(lm, d["masks"], rng)
    ranks = _run_ranks(lm, reqs, masks, d["batch_size"], d["world"], packed=True)
    assert all(calls == ranks[0][0] for calls, _ in ranks), d
    # every call goes through the whole model (DeepSpeed's hooks run), nothing beside it (OPT's causal
    # LM calls its decoder, not the base model: no "base" there)
    calls = ranks[0][0]
    assert calls[0] == "model" and all(c.split() in (["base", "unembed"], ["unembed"])
                                       for c in " ".join(calls).split("model")[1:]), d
    _assert_shares_give(ranks, score_masks(lm, reqs, masks, batch_size=d["batch_size"]), d)


def test_every_pass_is_shared_out_by_tokens_each_unit_once():
    """passes.rank_works: the ranks' shares of each step are the one-process pass of r x the batch, each
    unit in one share, at most `batch_size` units each, the shares' tokens within one unit's of each
    other (the rule that keeps a rank from waiting on a busier one); over-length requests go to one rank."""
    from icl_scale.passes import plan_work, unit_tokens

    lm = dataclasses.replace(get_model("tiny-opt"), max_length=40)
    reqs = build_requests("hellaswag", shot=1, limit=23, data_dir=data_dir())
    tk, cost, regroup = Tokenised(lm, reqs), pass_cost_tokens(lm.device), cache_regroupable(lm)
    for world, batch, masks in [(2, 3, 1), (3, 2, 2), (4, 4, 3)]:
        works = rank_works(tk, reqs, masks, batch, cost, regroup, True, world)
        whole = plan_work(tk, reqs, masks, batch * world, cost * world, regroup, True)
        copies = reqs * masks
        assert all(len(w.prefixes) == len(whole.prefixes) for w in works)
        for step, g in enumerate(whole.prefixes):
            shares = [w.prefixes[step] for w in works]
            assert sorted(k for s in shares for k in s) == sorted(g)
            assert max(map(len, shares)) <= batch
            loads = [sum(unit_tokens(tk, copies, whole.units[k]) for k in s) for s in shares]
            assert max(loads) - min(loads) <= max(unit_tokens(tk, copies, whole.units[k]) for k in g)
        owners = [{i for i, _ in w.overflow} for w in works]
        assert sorted(i for o in owners for i in o) == sorted({i for i, _ in whole.overflow})
        assert whole.overflow and sum(w.naive for w in works) == whole.naive
