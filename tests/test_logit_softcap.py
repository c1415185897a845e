"""Gemma 2/3's final-logit soft-capping (logits = cap * tanh(logits / cap), after the head): every path
that unembeds by hand (the cached scorer, the knock-out restarts) goes through Adapter.logits and gives
the model's own numbers; the packed path (and the importance pass) call the whole model. The cap is 2.0
here so that it matters: skipping it moves a choice's log-probability by ~0.02 nats on these tiny
random models, over 100x the tolerance."""

import pytest
import torch

from icl_scale import knockout as ko
from icl_scale.models.loading import load_model, preset
from icl_scale.packed import score_packed
from icl_scale.scoring import Tokenised, plan_units, score_naive, score_requests
from icl_scale.tasks import build_requests

from conftest import data_dir, get_model

CAP = 2.0
TOL = 1e-4  # nats per choice: float32 sums of hundreds of nats (piqa) differ between paths by an ulp (6e-5)


@pytest.fixture(scope="module", params=["tiny-gemma2", "tiny-gemma3"])
def capped(request):
    spec = preset(request.param)
    spec["config"] = {"final_logit_softcapping": CAP}
    lm = load_model(spec)
    assert lm.model.config.final_logit_softcapping == CAP
    return lm


@pytest.fixture(scope="module")
def reqs():
    return (build_requests("copa", shot=1, limit=4, data_dir=data_dir())
            + build_requests("piqa", shot=0, limit=2, data_dir=data_dir()))  # long multi-token choices


def _ids(t=12):
    return torch.randint(100, 5000, (2, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-qwen3", "tiny-gemma2"])
def test_adapter_logits_are_the_models_own(name):
    """Bit for bit (OPT: project_out is in the base model; tiny-gemma2: Gemma 2's default cap, 30)."""
    lm = get_model(name)
    with torch.no_grad():
        h = lm.model.base_model(input_ids=_ids()).last_hidden_state
        assert torch.equal(lm.adapter.logits(h), lm.model(input_ids=_ids()).logits)


def test_adapter_logits_apply_the_cap(capped):
    with torch.no_grad():
        want = capped.model(input_ids=_ids()).logits
        h = capped.model.base_model(input_ids=_ids()).last_hidden_state
        assert (capped.adapter.logits(h) - want).abs().max().item() <= 1e-5
        assert want.abs().max().item() < CAP
        assert (capped.model.get_output_embeddings()(h) - want).abs().max().item() > 1e-2  # the cap matters


def _direct(lm, reqs) -> list[list[float]]:
    """Each choice's log-probability from the model's own logits, one pair per call."""
    tk, out = Tokenised(lm, reqs), []
    with torch.no_grad():
        for r in reqs:
            row = []
            for j in range(r.n_choices):
                inp, cont = tk.pair(*r.pair(j))
                logp = torch.log_softmax(lm.model(input_ids=torch.tensor([inp])).logits[0].float(), -1)
                pos = torch.arange(len(inp) - len(cont), len(inp))
                row.append(float(logp[pos, torch.tensor(cont)].sum()))
            out.append(row)
    return out


def _gap(scores, want) -> float:
    return max(abs(s.logprob - w) for x, y in zip(scores, want) for s, w in zip(x, y))


def test_the_cached_scorer_applies_the_cap(capped, reqs):
    want = _direct(capped, reqs)
    assert _gap(score_naive(capped, reqs), want) <= TOL
    for bs in (1, 3):  # continuation passes on top of shared prefix caches
        assert _gap(score_requests(capped, reqs, batch_size=bs), want) <= TOL, bs


def test_restarted_knockouts_apply_the_cap(capped, reqs):
    state = ko.knockout_scores(capped, reqs, batch_size=3)
    n = capped.adapter.geometry.n_layers
    for layer in (-1, n - 1):
        want = [[c.logprob for c in row] for row in score_naive(capped, reqs, None, ko.knockout_mask(n, layer))]
        assert _gap(state.scores(reqs, layer), want) <= TOL, layer


def test_the_packed_path_applies_the_cap(capped, reqs):
    """ZeRO-3's packed step calls the whole model (logits_to_keep), so its forward soft-caps."""
    tk = Tokenised(capped, reqs)
    units, overflow = plan_units(tk, reqs)
    assert not overflow
    got = [[None] * r.n_choices for r in reqs]
    with torch.no_grad():
        for i, j, sc in score_packed(capped, tk, reqs, units):
            got[i][j] = sc
    assert _gap(got, _direct(capped, reqs)) <= TOL
