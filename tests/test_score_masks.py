"""Several masks in one batched forward (scoring.score_masks, models/gates.RowGates): every batch row
runs under its own mask, so the numbers equal one score_requests per mask, on every family, with
shared-prefix (winogrande) and left-truncated (naive) requests, and the passes really mix masks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from icl_scale.evaluator import masks_per_pass
from icl_scale.models.gates import MaskError, RowGates
from icl_scale.scoring import Tokenised, score_masks, score_requests
from icl_scale.shard import run_shard
from icl_scale.tasks import build_requests

from conftest import TINY, assert_same_store, data_dir, get_model, tiny_shard_cfg


def _masks(lm) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """No mask; a whole layer's heads (and one KV group under GQA); FFNs only; a random mix; everything
    removed. Masks this different give log-likelihoods far apart, so a row run under another row's
    mask cannot pass."""
    g = lm.adapter.geometry
    gen = torch.Generator().manual_seed(3)
    rand = (torch.rand(g.n_layers, g.n_heads, generator=gen) > 0.5).float()
    layer0 = torch.ones(g.n_layers, g.n_heads)
    layer0[0] = 0
    layer0[1, :2] = 0
    ffn = torch.ones(g.n_layers)
    ffn[-1] = 0
    return [(None, None), (layer0, None), (None, ffn), (rand, torch.tensor([0.0] + [1.0] * (g.n_layers - 1))),
            (torch.zeros(g.n_layers, g.n_heads), torch.zeros(g.n_layers))]


def _gap(a, b) -> float:
    return max(abs(x.logprob - y.logprob) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _preds(scores) -> list[int]:
    return [max(range(len(row)), key=lambda j: row[j].logprob) for row in scores]


def _check(lm, reqs, masks, batch_size):
    together = score_masks(lm, reqs, masks, batch_size=batch_size)
    assert len(together) == len(masks)
    singles = [score_requests(lm, reqs, hm, fm, batch_size=batch_size) for hm, fm in masks]
    for got, want in zip(together, singles):
        assert _gap(got, want) <= 1e-4
        assert _preds(got) == _preds(want)
        assert [[c.n_tokens for c in r] for r in got] == [[c.n_tokens for c in r] for r in want]
    assert max(_gap(singles[0], s) for s in singles[1:]) > 1e-2  # the masks do change the numbers
    return together


@pytest.fixture
def select_calls(monkeypatch):
    calls = []
    real = RowGates.select
    monkeypatch.setattr(RowGates, "select", lambda self, rows: calls.append(torch.as_tensor(rows).tolist())
                        or real(self, rows))
    return calls


@pytest.mark.parametrize("name", TINY)
def test_equals_one_evaluation_per_mask(name, select_calls):
    lm = get_model(name)
    reqs = build_requests("copa", shot=1, limit=5, data_dir=data_dir())
    _check(lm, reqs, _masks(lm), batch_size=16)
    assert any(len(set(c)) > 1 for c in select_calls)  # passes whose rows run under different masks


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_shared_prefixes_and_multi_token_answers(name, select_calls):
    lm = get_model(name)
    wino = build_requests("winogrande", shot=1, limit=3, data_dir=data_dir())  # suffix passes
    piqa = build_requests("piqa", shot=0, limit=3, data_dir=data_dir())  # continuations in several passes
    _check(lm, wino + piqa, _masks(lm)[:4], batch_size=8)
    assert any(len(set(c)) > 1 for c in select_calls)


def test_truncated_pairs_are_scored_per_mask():
    base = get_model("tiny-llama")
    reqs = build_requests("copa", shot=1, limit=4, data_dir=data_dir())
    tk = Tokenised(base, reqs)
    lengths = sorted(len(tk.context(r.contexts[0])) for r in reqs)
    lm = dataclasses.replace(base, max_length=lengths[1])  # the longest contexts overflow
    _check(lm, reqs, _masks(lm)[:3], batch_size=8)


def test_row_gates_refuse_a_batch_without_rows():
    lm = get_model("tiny-opt")
    g = lm.adapter.geometry
    gates = RowGates(lm.adapter, ffn_masks=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with gates, torch.no_grad():
        with pytest.raises(RuntimeError, match="call select"):
            lm.model(input_ids=ids)
        gates.select([0])  # one row selected, a batch of two
        with pytest.raises(RuntimeError, match="batch 2 with 1 rows"):
            lm.model(input_ids=ids)
        with pytest.raises(MaskError, match="0..1"):
            gates.select([0, 2])
    with pytest.raises(MaskError, match="shape"):
        RowGates(lm.adapter, head_masks=torch.ones(2, g.n_layers + 1, g.n_heads))
    with pytest.raises(MaskError, match="other than 0 and 1"):
        RowGates(lm.adapter, ffn_masks=torch.full((2, g.n_layers), 0.5))


def test_masks_per_pass_fills_one_pass():
    reqs = build_requests("copa", shot=1, limit=6, data_dir=data_dir())
    assert masks_per_pass("auto", 32, reqs) == 5  # 6 contexts: 5 copies fit a pass of 32
    assert masks_per_pass("auto", 8, reqs) == 1 and masks_per_pass("auto", 4, reqs) == 1
    assert masks_per_pass(3, 8, reqs) == 3
    multirc = build_requests("multirc", shot=0, limit=12, data_dir=data_dir())
    contexts = len({tuple(r.contexts) for r in multirc})
    assert contexts < len(multirc) and masks_per_pass("auto", 24, multirc) == 24 // contexts  # shared contexts


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_a_shard_with_shared_passes_equals_one_mask_per_pass(name, tmp_path):
    """Curves, grid: masks evaluated several per pass (eval.masks_per_pass) give the same store as one
    mask per pass; the manifest counts the shared evaluations."""
    lm = get_model(name)
    extra = ("eval.physical_below=null", "eval.batch_size=48", "pruning.levels=[0,30,60,90]")
    a = run_shard(tiny_shard_cfg(tmp_path / "shared", "copa", 1, name, *extra, "eval.masks_per_pass=auto"), lm=lm)
    b = run_shard(tiny_shard_cfg(tmp_path / "single", "copa", 1, name, *extra, "eval.masks_per_pass=1"), lm=lm)
    # the heads curve's 30/60/90% masks share passes (12 docs, 4 copies per pass of 48); every other
    # mask is memoised (FFN levels repeat on 2 layers, the grid's edges are the curves) or alone
    assert a["evaluations"] == b["evaluations"] and a["evaluations_shared_pass"] == 3
    assert b["evaluations_shared_pass"] == 0
    assert_same_store(Path(a["shard"]), Path(b["shard"]))


def test_lockstep_placeholder_calls_select_a_mask():
    """ZeRO-3 ranks with less work make placeholder calls of one pad token (scoring.Lockstep): under
    several masks they must select a row too, or the gates refuse the batch."""
    from icl_scale.scoring import Lockstep, Work

    lm = get_model("tiny-opt")
    gates = RowGates(lm.adapter, ffn_masks=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    sync = Lockstep(lm, [Work([], [], [[0]], [2], 0)], regroup=True)  # one step: a prefix and 2 tail passes
    with gates, torch.no_grad():
        gates.select([0, 1, 1])  # the rows of the last real pass
        sync.select = gates.select
        sync.idle_units(0)
        sync.idle_base()


def test_planned_groups_do_not_depend_on_how_far_a_run_got():
    """Evaluator.plan (ZeRO-3's curves stage): every mask of the stage, done or not, in fixed groups;
    a call scores its mask's whole group, so a resumed run (whose earlier masks are done and never
    asked again) scores each remaining mask beside the same others: the same numbers, bit for bit."""
    from icl_scale.evaluator import Evaluator

    lm = get_model("tiny-opt")
    reqs = build_requests("copa", shot=1, limit=4, data_dir=data_dir())
    g = lm.adapter.geometry
    gen = torch.Generator().manual_seed(3)
    masks = [((torch.rand(g.n_layers, g.n_heads, generator=gen) > 0.5).float(), None) for _ in range(5)]
    runs = []
    for first in (0, 3):  # an uninterrupted run, and one resumed after the first three masks
        ev = Evaluator(lm, "copa", batch_size=4, masks_per_pass=2)
        ev.plan(reqs, masks)
        runs.append({k: ev(reqs, hm, fm)[1] for k, (hm, fm) in enumerate(masks) if k >= first})
        assert ev.n_shared == (4 if first == 0 else 2)  # groups [0, 1], [2, 3], [4]: [2, 3] again on resume
    assert all(runs[1][k] == runs[0][k] for k in runs[1])
