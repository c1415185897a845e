"""The prefix-cached scorer equals naive per-choice scoring (<= 1e-4 nats per choice)."""

import dataclasses

import pytest
import torch

import icl_scale.scoring as scoring
from icl_scale.scoring import Tokenised, length_groups, score_naive, score_requests
from icl_scale.tasks import build_requests

from conftest import get_model

TOL = 1e-4


def _requests(task_data):
    reqs = []
    # multi-token choices, shared context (hellaswag, 1-shot), per-option contexts (winogrande),
    # single-token answers that need no continuation pass (boolq), contexts shared across docs (multirc).
    reqs += build_requests("hellaswag", shot=1, limit=3, data_dir=task_data)
    reqs += build_requests("winogrande", shot=1, limit=2, data_dir=task_data)
    reqs += build_requests("boolq", shot=0, limit=2, data_dir=task_data)
    reqs += build_requests("copa", shot=2, limit=2, data_dir=task_data)
    reqs += build_requests("multirc", shot=0, limit=3, data_dir=task_data)  # answer rows share one prompt
    reqs += build_requests("piqa", shot=0, limit=3, data_dir=task_data)  # long, unequal continuations
    return reqs


def _compare(lm, reqs, hm=None, fm=None, batch_sizes=(1, 8)):
    ref = score_naive(lm, reqs, hm, fm, batch_size=4)
    for bs in batch_sizes:
        got = score_requests(lm, reqs, hm, fm, batch_size=bs)
        for r, a, b in zip(reqs, ref, got):
            assert [x.n_tokens for x in a] == [y.n_tokens for y in b]
            diff = max(abs(x.logprob - y.logprob) for x, y in zip(a, b))
            assert diff <= TOL, (r.task, r.doc_id, bs, diff)
    return ref


# With gates: masks that really change the scores. On SmolLM2 a pruning-curve-like mask (10% of
# heads, the last FFN); removing 40% of its heads at random wrecks the model (~11 nats/token) and
# fp32 rounding then reaches ~3e-4 nats per choice in both scorers alike (3e-6 relative).
@pytest.mark.parametrize("model,head_drop,ffn_layer", [("tiny-opt", 0.4, 0),
                                                      pytest.param("smollm2-135m", 0.1, -1, marks=pytest.mark.slow)])
def test_prefix_cached_equals_naive(task_data, model, head_drop, ffn_layer):
    lm = get_model(model)
    reqs = _requests(task_data)
    g = lm.adapter.geometry
    ref = _compare(lm, reqs)
    hm = (torch.rand(g.n_layers, g.n_heads, generator=torch.Generator().manual_seed(0)) > head_drop).float()
    fm = torch.ones(g.n_layers)
    fm[ffn_layer] = 0
    gated = _compare(lm, reqs, hm, fm)
    assert max(abs(a[0].logprob - b[0].logprob) for a, b in zip(ref, gated)) > 1e-2


@pytest.mark.parametrize("model", ["tiny-opt", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_prompts_longer_than_max_length(task_data, model):
    base = get_model(model)
    lm = dataclasses.replace(base, max_length=48)  # force left-truncation on real prompts
    reqs = build_requests("hellaswag", shot=2, limit=3, data_dir=task_data)
    reqs += build_requests("boolq", shot=0, limit=2, data_dir=task_data)
    tk = Tokenised(lm, reqs)
    assert all(not tk.fits(*r.pair(0)) for r in reqs)  # every one is truncated
    for r in reqs:
        inp, cont = tk.pair(*r.pair(0))
        assert len(inp) == 48 and inp[-len(cont) + 1:] == cont[:-1] if len(cont) > 1 else len(inp) == 48
        assert inp[: len(lm.doc_start_ids)] == lm.doc_start_ids  # the document-start token is kept
    _compare(lm, reqs, batch_sizes=(1, 8))


def testlength_groups():
    L = [0, 10, 3, 9, 2, 1]  # row 0 has no tail: it needs no pass
    assert length_groups(L, pass_cost=float("inf")) == [[1, 3, 2, 4, 5]]  # one pass when passes are dear
    assert length_groups(L, pass_cost=0) == [[1], [3], [2], [4], [5]]  # no padding when they are free
    assert length_groups(L, pass_cost=4) == [[1, 3], [2, 4, 5]]  # (4 + 2*10) + (4 + 3*3) = 37
    capped = length_groups(L, pass_cost=float("inf"), max_size=2)  # fewest passes, then least padding
    assert len(capped) == 3 and sum(len(g) * L[g[0]] for g in capped) == 27 and capped[0] == [1, 3]
    assert length_groups([0, 0], pass_cost=1) == []


def _plain_dp_groups(lengths, pass_cost, m):
    """The grouping DP written plainly (the first best cut on ties), as a reference."""
    order = sorted((k for k, n in enumerate(lengths) if n > 0), key=lambda k: -lengths[k])
    best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for i in range(1, len(order) + 1):
        for j in range(max(0, i - m), i):
            c = best[j] + pass_cost + (i - j) * lengths[order[j]]
            if c < best[i]:
                best[i], cut[i] = c, j
    groups, i = [], len(order)
    while i > 0:
        groups.append(order[cut[i]: i])
        i = cut[i]
    return groups[::-1]


def test_length_groups_by_runs_cuts_where_the_plain_dp_does():
    """Lists under several masks repeat every length: length_groups then runs its DP by runs of equal
    lengths (passes._cuts_by_runs), which must cut exactly where the plain DP cuts, ties included."""
    import random

    from icl_scale.passes import _cuts, _cuts_by_runs

    rng = random.Random(0)
    for _ in range(400):
        values = [rng.randint(1, 40) for _ in range(rng.randint(1, 10))]
        rows = sorted((rng.choice(values) for _ in range(rng.randint(1, 200))), reverse=True)
        m, cost = rng.randint(1, 50), float(rng.choice([0, 1, 5, 40, 2048]))
        assert _cuts_by_runs(rows, cost, m) == _cuts(rows, cost, m)
    lengths = [rng.choice([30, 45, 60, 90]) for _ in range(300)] * 8  # one list under 8 masks: the fast path
    assert length_groups(lengths, 40.0, max_size=48) == _plain_dp_groups(lengths, 40.0, 48)


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in _partitions(rest):
        yield [[first], *p]
        for i in range(len(p)):
            yield [*p[:i], [first, *p[i]], *p[i + 1:]]


def test_length_groups_is_optimal_over_all_partitions():
    import random

    rnd = random.Random(0)
    for _ in range(30):
        L = [rnd.randint(1, 40) for _ in range(rnd.randint(1, 7))]
        cost, size = rnd.choice([0, 5, 40, 1000]), rnd.choice([None, 2, 3])

        def total(groups, cost=cost, L=L):
            return sum(cost + len(g) * max(L[k] for k in g) for g in groups)

        got = length_groups(L, pass_cost=cost, max_size=size)
        assert sorted(k for g in got for k in g) == list(range(len(L)))
        assert all(size is None or len(g) <= size for g in got)
        ok = [p for p in _partitions(list(range(len(L)))) if all(size is None or len(g) <= size for g in p)]
        assert total(got) == min(total(p) for p in ok), (L, cost, size)


def test_continuations_split_by_length_reuse_the_context_cache(task_data, monkeypatch):
    """Several continuation passes over one context pass: each must start from the context-only
    cache (a pass that saw another's tokens would be off by far more than 1e-4)."""
    lm = get_model("tiny-opt")
    reqs = build_requests("piqa", shot=0, limit=6, data_dir=task_data)
    passes = []
    real = scoring._continuation_hidden
    monkeypatch.setattr(scoring, "_continuation_hidden", lambda *a: passes.append(len(a[2])) or real(*a))
    _compare(lm, reqs, batch_sizes=(8,))
    assert len(passes) > 1 and sum(passes) == 12, passes


def test_truncation_keeps_the_right_tokens():
    lm = dataclasses.replace(get_model("tiny-opt"), max_length=8)  # tiny-opt has a doc-start token
    from icl_scale.tasks.base import Request

    r = Request(doc_id=0, contexts=["a b c d e f g h i j k l m"], continuations=[" n o"], gold=0)
    tk = Tokenised(lm, [r])
    ctx = tk.context(r.contexts[0])
    cont = tk.continuation(" n o")
    inp, c = tk.pair(r.contexts[0], " n o")
    full = lm.doc_start_ids + (ctx[1:] + cont)[-(8 + 1 - 1):]
    assert inp == full[:-1] and len(inp) == 8 and c == cont
    assert inp[0] == lm.doc_start_ids[0]


def test_empty_continuation_is_an_error():
    lm = get_model("tiny-opt")
    from icl_scale.tasks.base import Request

    with pytest.raises(ValueError, match="tokenises to nothing"):
        score_requests(lm, [Request(doc_id=0, contexts=["x"], continuations=[""], gold=0)])
