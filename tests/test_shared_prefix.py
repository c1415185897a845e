"""Contexts that share a token prefix share its KV (winogrande's partial scoring): the scorer still
equals naive per-choice scoring (<= 1e-4 nats per choice) and predicts the same choices."""

import dataclasses

import pytest
import torch

from icl_scale.scoring import Tokenised, plan_units, score_naive, score_requests
from icl_scale.tasks import build_requests
from icl_scale.tasks.base import Request

from conftest import data_dir, get_model

TOL = 1e-4
MODELS = ["tiny-opt", "tiny-llama"]  # with and without a document-start token


def _wino(shot: int, limit: int = 8) -> list[Request]:
    return build_requests("winogrande", shot=shot, limit=limit, data_dir=data_dir())


def _preds(scores) -> list[int]:
    return [max(range(len(row)), key=lambda j, row=row: row[j].logprob) for row in scores]


def _compare(lm, reqs, hm=None, fm=None, batch_sizes=(1, 3, 8)):
    ref = score_naive(lm, reqs, hm, fm, batch_size=4)
    for bs in batch_sizes:
        got = score_requests(lm, reqs, hm, fm, batch_size=bs)
        for r, a, b in zip(reqs, ref, got):
            assert [x.n_tokens for x in a] == [y.n_tokens for y in b]
            diff = max(abs(x.logprob - y.logprob) for x, y in zip(a, b))
            assert diff <= TOL, (r.task, r.doc_id, bs, diff)
        assert _preds(got) == _preds(ref), bs
    return ref


def _positions(lm, reqs, **kw) -> list[int]:
    """Input positions (rows x length) of every forward pass score_requests runs."""
    seen: list[int] = []
    handle = lm.model.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(int(kwargs["input_ids"].numel())), with_kwargs=True)
    try:
        score_requests(lm, reqs, **kw)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("shot", [0, 1, 5])
def test_winogrande_equals_naive(model, shot):
    lm = get_model(model)
    reqs = _wino(shot)
    tk = Tokenised(lm, reqs)
    units, overflow = plan_units(tk, reqs)
    assert not overflow
    # every option's context runs on a shared prefix: one suffix per choice, none the whole context
    assert sum(len(v) for _, v in units) == sum(r.n_choices for r in reqs)
    assert all(0 < len(p) and all(0 < len(s) < 4 for _, _, s in v) for p, v in units)
    assert len(units) <= len(reqs)  # at most one prefix per document (twin sentences can share one)
    if shot == 5:
        assert len({len(p) for p, _ in units}) > 1  # the batched prefix passes pad shorter prompts
    _compare(lm, reqs)


@pytest.mark.parametrize("model", MODELS)
def test_winogrande_runs_the_shared_prefix_once(model):
    lm = get_model(model)
    reqs = _wino(5)
    tk = Tokenised(lm, reqs)
    naive = sum(len(tk.pair(*r.pair(j))[0]) for r in reqs for j in range(r.n_choices))
    ours = sum(_positions(lm, reqs, batch_size=8))  # padding included
    assert ours < 0.6 * naive, (ours, naive)


@pytest.mark.parametrize("model", MODELS)
def test_winogrande_with_gates(model):
    lm = get_model(model)
    reqs = _wino(5) + _wino(1, limit=4) + _wino(0, limit=4)
    g = lm.adapter.geometry
    hm = (torch.rand(g.n_layers, g.n_heads, generator=torch.Generator().manual_seed(1)) > 0.4).float()
    fm = torch.ones(g.n_layers)
    fm[0] = 0
    ref = score_naive(lm, reqs, batch_size=8)
    gated = _compare(lm, reqs, hm, fm, batch_sizes=(8,))
    assert max(abs(a[0].logprob - b[0].logprob) for a, b in zip(ref, gated)) > 1e-2  # the masks do something


@pytest.mark.parametrize("model", MODELS)
def test_winogrande_truncation_goes_naive(model):
    base = get_model(model)
    reqs = _wino(5) + _wino(1, limit=4)  # long and short prompts
    tk = Tokenised(base, reqs)
    full = [[len(tk.context(c)) + len(tk.continuation(r.continuations[0])) for c in r.contexts] for r in reqs]
    # a 5-shot document whose options differ in length: at max_length = its shorter pair - 1 its
    # long option is truncated and its short one is not; the 1-shot documents fit
    mixed = next(n for n in full if n[0] != n[1])
    lm = dataclasses.replace(base, max_length=min(mixed) - 1)
    tk = Tokenised(lm, reqs)
    fits = [[tk.fits(*r.pair(j)) for j in range(r.n_choices)] for r in reqs]
    assert any(all(f) for f in fits) and any(not any(f) for f in fits) and any(f[0] != f[1] for f in fits)
    units, overflow = plan_units(tk, reqs)
    assert len(overflow) == sum(not x for f in fits for x in f)
    _compare(lm, reqs, batch_sizes=(1, 8))


@pytest.mark.parametrize("model", MODELS)
def test_edge_cases_of_shared_prefixes(model):
    """A context that is a token prefix of another (empty suffix: its first token comes from the
    prefix pass), identical contexts, contexts with nothing in common (no document-start token:
    each its own prefix), a single-token continuation after a suffix, three options, and
    single-context requests mixed in (one of them is another request's shared prefix)."""
    lm = get_model(model)
    reqs = [
        Request(doc_id=0, contexts=["The cat sat", "The cat sat on"], continuations=[" the mat."], gold=0),
        Request(doc_id=1, contexts=["The dog ran", "The dog ran"], continuations=[" home quickly."], gold=0),
        Request(doc_id=2, contexts=["Alpha went out", "Bravo went out"], continuations=[" today."], gold=0),
        Request(doc_id=3, contexts=["She said yes to Tom", "She said yes to Anna"], continuations=["."], gold=1),
        Request(doc_id=4, contexts=["We met Bob", "We met Alice", "We met Carol and"], continuations=[" there"],
                gold=2),
        Request(doc_id=5, contexts=["The cat sat"], continuations=[" down.", " up and left."], gold=0),
        Request(doc_id=6, contexts=["We met"], continuations=[" Bob", " nobody at all"], gold=0),
    ]
    tk = Tokenised(lm, reqs)
    units, _ = plan_units(tk, reqs)
    suffixes = {(i, j): s for _, v in units for i, j, s in v}
    assert suffixes[0, 0] == [] and suffixes[0, 1] != []
    assert suffixes[1, 0] == suffixes[1, 1] == []
    assert all(s == [] for (i, _), s in suffixes.items() if i in (5, 6))
    assert all(suffixes[4, j] for j in range(3))
    if not lm.doc_start_ids:
        assert suffixes[2, 0] == suffixes[2, 1] == []  # nothing shared: each context whole
    _compare(lm, reqs, batch_sizes=(1, 8))


def test_single_context_requests_are_planned_as_before():
    """One unit per distinct context, the whole context as its prefix, no suffixes."""
    lm = get_model("tiny-opt")
    reqs = build_requests("multirc", shot=0, limit=4, data_dir=data_dir())
    reqs += build_requests("hellaswag", shot=1, limit=3, data_dir=data_dir())
    tk = Tokenised(lm, reqs)
    units, overflow = plan_units(tk, reqs)
    assert not overflow
    assert sorted(tuple(p) for p, _ in units) == sorted({tuple(tk.context(r.contexts[0])) for r in reqs})
    assert all(s == [] for _, v in units for _, _, s in v)
