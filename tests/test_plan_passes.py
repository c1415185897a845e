"""The planner's pass schedule is the scorer's (icl_scale/plan_passes.py): its forward passes for a small
shard equal the base-model calls the shard makes, counted with forward hooks, in one process and for
every simulated ZeRO-3 rank of a scoring run; and the table's documents give the same schedule as
their tokens would."""

from __future__ import annotations

import pytest
import torch

from icl_scale import plan as P
from icl_scale.models.loading import document_start_ids
from icl_scale.packed import packable
from icl_scale.plan_passes import MeanTokens, Zero3, importance_calls, scoring_calls, shard_lists, shard_schedule
from icl_scale.scoring import (
    Lockstep,
    Tokenised,
    _score_local,
    cache_regroupable,
    pass_cost_tokens,
    rank_works,
)
from icl_scale.shard import run_shard
from icl_scale.tasks import build_requests
from icl_scale.tasks.base import Request

from conftest import data_dir, get_model, tiny_shard_cfg

SHARD = ["eval.limit=10", "importance.n_examples=5", "importance.batch_size=2", "eval.batch_size=3",
         "knockout.split=heldout", "knockout.limit=4", "pruning.levels=[0,25,50]", "pruning.combined_levels=[0,50]",
         "eval.physical_below=null"]


def _counting(lm):
    """Forward pre-hooks counting the calls of the base model, the unembedding and the whole model."""
    calls = {"base": 0, "unembed": 0, "model": 0}
    mods = {"model": lm.model, "base": lm.model.base_model, "unembed": lm.model.get_output_embeddings()}

    def count(name):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)

    return calls, [m.register_forward_pre_hook(count(name)) for name, m in mods.items()]


def _planned(lm, task, shot, extra):
    cfg = P.compose([f"model={lm.name}", f"data.dir={data_dir()}", f"sweep.tasks=[{task}]", f"sweep.shots=[{shot}]",
                     f"shot={shot}", *extra])
    a = P.Arch.from_spec(cfg["model"])
    lists = shard_lists(cfg, task, shot, lm.tokenizer, lm.doc_start_ids, lm.max_length)
    return shard_schedule(cfg, lists, a, ranks=1, device="cpu")


@pytest.mark.slow  # three small shards, ~30 s each on a busy 2-core machine
@pytest.mark.parametrize("task,shot,extra", [
    ("piqa", 0, ["eval.masks_per_pass=3"]),  # several masks per pass
    ("copa", 1, ["model.max_length=24"]),  # over-length pairs: the naive path
    ("rte", 1, ["knockout.split=paper", "pruning.compare=[random]", "pruning.random_seeds=1"]),
])
def test_the_planned_passes_are_the_forward_calls_the_shard_makes(tmp_path, task, shot, extra):
    lm = get_model("tiny-opt")
    cfg = tiny_shard_cfg(tmp_path, task, shot, "tiny-opt", *SHARD, *extra)
    if "model.max_length=24" in extra:  # the planner reads it from the config; the loaded model from lm
        lm = type(lm)(**{**lm.__dict__, "max_length": 24})
    calls, hooks = _counting(lm)
    try:
        run_shard(cfg, lm=lm)
    finally:
        for h in hooks:
            h.remove()
    sched = _planned(lm, task, shot, [*SHARD, *extra])
    planned = sched.total
    assert (planned.base, planned.unembed, planned.model) == (calls["base"], calls["unembed"], calls["model"])


@pytest.mark.parametrize("world,masks,packed", [(2, 1, False), (3, 2, False), (2, 1, True), (3, 3, True)])
def test_the_planned_calls_of_a_scoring_run_are_every_zero3_ranks(world, masks, packed):
    """Simulated ranks in one process (as tests/test_lockstep.py): each makes the planned calls, the
    scorer's own ZeRO-3 schedule (score_masks: batch x masks per pass; packed: a whole-model call per step)."""
    lm = get_model("tiny-opt")
    reqs = build_requests("winogrande", shot=1, limit=7, data_dir=data_dir())
    tk = Tokenised(lm, reqs)
    cost, regroup = pass_cost_tokens(lm.device), cache_regroupable(lm)
    batch = 2 * masks
    g = lm.adapter.geometry
    free = 2**34 if packed else 1  # room to pack every step, or none
    zero = Zero3(free, 0, 1, lm.model.config.vocab_size, g.n_heads)
    assert packable(lm, tk, reqs, batch, free) == packed
    planned = scoring_calls(tk, reqs, world, 2, masks, device="cpu", regroup=regroup, zero=zero)
    mask_list = [(None, None)] + [(torch.ones(g.n_layers, g.n_heads), torch.ones(g.n_layers))] * (masks - 1)
    works = rank_works(tk, reqs, masks, batch, cost, regroup, packed, world)
    for work in works:
        calls, hooks = _counting(lm)
        try:
            _score_local(lm, reqs, mask_list, batch, False, "", Lockstep(lm, works, regroup, packed), tk, packed, work)
        finally:
            for h in hooks:
                h.remove()
        assert (calls["base"], calls["unembed"], calls["model"]) == (planned.base, planned.unembed, planned.model)
        assert calls["model"] > 0 if packed else calls["base"] > calls["model"]


def test_importance_steps_and_the_tables_mean_documents():
    assert importance_calls(9, 2, 2).model == 3  # ceil(9 / (2 x 2)) steps, each rank on every step
    # documents of equal length: ceil(n / batch) prefix passes, one continuation pass after each when
    # continuations have several tokens, none when they have one
    tk = MeanTokens(context_tokens=30, max_length=64)
    for cont, tails in (("x2", 1), ("x1", 0)):
        docs = [Request(i, [f"c{i}"], [cont], 0) for i in range(10)]
        assert scoring_calls(tk, docs, 1, 4, device="cuda").forwards == 3 * (1 + tails)
        assert scoring_calls(tk, docs, 2, 4, device="cuda").forwards == 2 * (1 + tails)  # 5 docs per rank


def test_document_start_ids_are_the_loaded_models():
    lm = get_model("tiny-opt")
    assert document_start_ids(lm.tokenizer, lm.spec["doc_start"]) == lm.doc_start_ids
