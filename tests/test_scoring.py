"""The prefix-cached scorer equals naive per-choice scoring (<= 1e-4 nats per choice)."""

import dataclasses

import pytest
import torch

from icl_scale.scoring import Tokenised, score_naive, score_requests
from icl_scale.tasks import build_requests

from conftest import get_model

TOL = 1e-4


def _requests(mirror):
    reqs = []
    # multi-token choices, shared context (hellaswag, 1-shot), per-option contexts (winogrande),
    # single-token answers that need no continuation pass (boolq), contexts shared across docs (multirc).
    reqs += build_requests("hellaswag", shot=1, limit=3, data_dir=mirror)
    reqs += build_requests("winogrande", shot=1, limit=2, data_dir=mirror)
    reqs += build_requests("boolq", shot=0, limit=2, data_dir=mirror)
    reqs += build_requests("copa", shot=2, limit=2, data_dir=mirror)
    reqs += build_requests("multirc", shot=0, limit=3, data_dir=mirror)  # answer rows share one prompt
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
@pytest.mark.parametrize("model,head_drop,ffn_layer", [("tiny-opt", 0.4, 0), ("smollm2-135m", 0.1, -1)])
def test_prefix_cached_equals_naive(mirror, model, head_drop, ffn_layer):
    lm = get_model(model)
    reqs = _requests(mirror)
    g = lm.adapter.geometry
    ref = _compare(lm, reqs)
    hm = (torch.rand(g.n_layers, g.n_heads, generator=torch.Generator().manual_seed(0)) > head_drop).float()
    fm = torch.ones(g.n_layers)
    fm[ffn_layer] = 0
    gated = _compare(lm, reqs, hm, fm)
    assert max(abs(a[0].logprob - b[0].logprob) for a, b in zip(ref, gated)) > 1e-2


@pytest.mark.parametrize("model", ["tiny-opt", "smollm2-135m"])
def test_prompts_longer_than_max_length(mirror, model):
    base = get_model(model)
    lm = dataclasses.replace(base, max_length=48)  # force left-truncation on real prompts
    reqs = build_requests("hellaswag", shot=2, limit=3, data_dir=mirror)
    reqs += build_requests("boolq", shot=0, limit=2, data_dir=mirror)
    tk = Tokenised(lm, reqs)
    assert all(not tk.fits(*r.pair(0)) for r in reqs)  # every one is truncated
    for r in reqs:
        inp, cont = tk.pair(*r.pair(0))
        assert len(inp) == 48 and inp[-len(cont) + 1:] == cont[:-1] if len(cont) > 1 else len(inp) == 48
        assert inp[: len(lm.doc_start_ids)] == lm.doc_start_ids  # the document-start token is kept
    _compare(lm, reqs, batch_sizes=(1, 8))


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
