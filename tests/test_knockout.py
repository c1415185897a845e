"""FFN knock-out restarted at its layer (icl_scale.knockout) equals one full evaluation per knock-out:
per-choice log-likelihoods, predictions, drops; with a head mask; on OPT and Llama (GQA), in both
restart modes; the model is left unchanged; the stage resumes per batch inside a shard."""

import dataclasses

import pytest
import torch

import icl_scale.knockout as ko
from icl_scale.evaluator import Evaluator
from icl_scale.models import load_model
from icl_scale.models.loading import preset
from icl_scale.scoring import score_requests
from icl_scale.shard import run_shard
from icl_scale.store import Shard, read_tensors
from icl_scale.tasks import build_requests, compute_metrics

from conftest import data_dir, get_model, tiny_shard_cfg
from reference_knockout import ffn_knockout

N_LAYERS = 4
_models: dict = {}


def deep(name: str, **config):
    """The tiny preset with 4 layers (2 would leave nothing between the first and the last)."""
    key = (name, tuple(sorted(config.items())))
    if key not in _models:
        spec = preset(name)
        spec["config"] = {"num_hidden_layers": N_LAYERS, **config}
        _models[key] = load_model(spec)
    return _models[key]


@pytest.fixture(scope="module")
def reqs():
    return build_requests("copa", shot=1, limit=8, data_dir=data_dir())


def head_mask(lm):
    g = lm.adapter.geometry
    m = torch.ones(g.n_layers, g.n_heads)
    m[1, 0] = 0
    m[-1, 1:3] = 0
    return m


def reference(lm, reqs, hm, batch_size):
    """Today's numbers: score_requests under each knock-out's FFN mask (-1: none)."""
    n = lm.adapter.geometry.n_layers
    return {l: score_requests(lm, reqs, hm, ko.knockout_mask(n, l), batch_size=batch_size) for l in range(-1, n)}


def check_equal(lm, reqs, state, ref):
    for layer, want in ref.items():
        got = state.scores(reqs, layer)
        assert [[c.n_tokens for c in r] for r in got] == [[c.n_tokens for c in r] for r in want]
        diff = max(abs(a.logprob - b.logprob) for ra, rb in zip(got, want) for a, b in zip(ra, rb))
        assert diff <= 1e-4, (layer, diff)
        preds = [compute_metrics("copa", reqs, [[c.logprob for c in r] for r in s])[1] for s in (got, want)]
        assert [d["pred"] for d in preds[0]] == [d["pred"] for d in preds[1]]
    base = [c.logprob for r in ref[-1] for c in r]
    for layer in range(lm.adapter.geometry.n_layers):  # every knock-out really changes the model
        assert [c.logprob for r in ref[layer] for c in r] != base


def model_state(lm):
    layers = lm.adapter.layers()
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in lm.model.modules())
    return id(layers), [id(m) for m in layers], hooks


@pytest.mark.parametrize("name,config,mode,masked", [
    ("tiny-opt", {}, "post_attention", False),
    ("tiny-opt", {}, "post_attention", True),
    ("tiny-llama", {}, "post_attention", False),
    ("tiny-llama", {}, "post_attention", True),
    ("tiny-opt", {"do_layer_norm_before": False}, "block", True),  # OPT-350m's post-norm blocks
    ("tiny-llama", {}, "block", True),  # forced: the generic restart at the block's input
])
def test_equals_one_evaluation_per_knockout(name, config, mode, masked, reqs):
    lm = deep(name, **config)
    assert lm.adapter.geometry.n_layers == N_LAYERS
    assert ko.restart_mode(lm) == ("block" if config else "post_attention")
    before = model_state(lm)
    x = torch.tensor([[5, 6, 7, 8]])
    logits = lm.model(input_ids=x).logits
    hm = head_mask(lm) if masked else None
    state = ko.knockout_scores(lm, reqs, head_mask=hm, batch_size=3, mode=mode)
    assert state.complete
    check_equal(lm, reqs, state, reference(lm, reqs, hm, 3))
    assert model_state(lm) == before  # layer list restored, no hook left behind
    assert torch.equal(lm.model(input_ids=x).logits, logits)


@pytest.mark.parametrize("task", ["winogrande", "multirc"])
def test_shared_prefixes_and_contexts(task):
    """Winogrande (one shared prefix, a suffix per option) and MultiRC (answer rows share their prompt)."""
    lm = deep("tiny-llama")
    reqs = build_requests(task, shot=1, limit=4, data_dir=data_dir())
    state = ko.knockout_scores(lm, reqs, batch_size=2)
    ref = reference(lm, reqs, None, 2)
    for layer, want in ref.items():
        got = state.scores(reqs, layer)
        assert max(abs(a.logprob - b.logprob) for ra, rb in zip(got, want) for a, b in zip(ra, rb)) <= 1e-4


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gpt-neox"])
def test_other_families(name, reqs):
    lm = get_model(name)
    assert ko.restart_mode(lm) == ("post_attention" if name == "tiny-gpt2" else "block")  # NeoX: parallel residual
    state = ko.knockout_scores(lm, reqs, head_mask=head_mask(lm), batch_size=4)
    check_equal(lm, reqs, state, reference(lm, reqs, head_mask(lm), 4))


def test_drops_equal_ffn_knockout(reqs):
    """The shard's numbers: baseline and drops as the reference (one evaluation per knock-out) gives them."""
    lm = deep("tiny-llama")
    ev = Evaluator(lm, "copa", 4)
    base, drops = ffn_knockout(lm, lambda hm, fm: ev(reqs, hm, fm)[0]["acc"]["value"])
    state = ko.knockout_scores(lm, reqs, batch_size=4)
    acc = {l: compute_metrics("copa", reqs, [[c.logprob for c in r] for r in state.scores(reqs, l)])[0]["acc"]["value"]
           for l in range(-1, N_LAYERS)}
    b2, d2 = ko.knockout_drops(acc, N_LAYERS)
    assert b2 == base and d2.tolist() == drops.tolist() and d2.dtype == torch.float32


def _count_blocks(lm):
    calls = [0]
    handles = [b.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)) for b in lm.adapter.layers()]
    return calls, handles


@pytest.mark.parametrize("mode,blocks", [("post_attention", N_LAYERS + sum(N_LAYERS - l - 1 for l in range(N_LAYERS))),
                                         ("block", N_LAYERS + sum(N_LAYERS - l for l in range(N_LAYERS)))])
def test_cost_in_block_passes(mode, blocks, reqs):
    """Per base-model pass, the stage runs `blocks` decoder blocks instead of L per knock-out and baseline."""
    lm, reqs = deep("tiny-llama"), reqs[:4]
    calls, handles = _count_blocks(lm)
    try:
        ko.knockout_scores(lm, reqs, batch_size=2, mode="full")
        full, calls[0] = calls[0], 0
        ko.knockout_scores(lm, reqs, batch_size=2, mode=mode)
        new = calls[0]
    finally:
        for h in handles:
            h.remove()
    assert full % (N_LAYERS * (N_LAYERS + 1)) == 0
    passes = full // (N_LAYERS * (N_LAYERS + 1))
    assert new == passes * blocks


def test_truncated_pairs_take_the_naive_path(reqs):
    lm = dataclasses.replace(deep("tiny-opt"), max_length=34)  # one 1-shot COPA pair no longer fits
    fits = [ko.Tokenised(lm, [r]).fits(*r.pair(j)) for r in reqs for j in range(r.n_choices)]
    assert not all(fits) and any(fits)
    state = ko.knockout_scores(lm, reqs, batch_size=3)
    check_equal(lm, reqs, state, reference(lm, reqs, None, 3))


def spy(monkeypatch) -> list:
    """Counts knock-out batches (one unpruned run and its knock-outs each)."""
    real, calls = ko._knock_chunk, []
    monkeypatch.setattr(ko, "_knock_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_resume_skips_finished_batches(reqs, monkeypatch):
    lm = deep("tiny-opt")
    whole = ko.knockout_scores(lm, reqs, batch_size=2)
    saved = []

    def crash(state):
        saved.append({k: v.clone() for k, v in state.tensors().items()})
        if len(saved) == 2:
            raise RuntimeError("injected crash")

    with pytest.raises(RuntimeError, match="injected crash"):
        ko.knockout_scores(lm, reqs, batch_size=2, on_batch=crash)
    partial = ko.KnockoutState.from_tensors(saved[-1])
    assert 0 < int(partial.done.sum()) < partial.done.numel() and not partial.complete
    calls = spy(monkeypatch)
    ko.knockout_scores(lm, reqs, batch_size=2)
    n_chunks, calls[:] = len(calls), []
    resumed = ko.knockout_scores(lm, reqs, batch_size=2, state=partial)
    assert n_chunks >= 3 and len(calls) == n_chunks - 2  # the two checkpointed batches are not redone
    assert torch.equal(resumed.logprobs, whole.logprobs) and torch.equal(resumed.n_tokens, whole.n_tokens)
    with pytest.raises(ValueError, match="knock-out mode 'nope'"):
        ko.knockout_scores(lm, reqs, mode="nope")


# --- in a shard -----------------------------------------------------------------------------------

def _snapshot(path):
    """Everything a shard wrote except the manifest (timings)."""
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            rel = str(p.relative_to(path))
            out[rel] = ({k: v.tolist() for k, v in read_tensors(p).items()} if p.suffix == ".safetensors"
                        else p.read_text())
    return out


def test_shard_resumes_mid_knockout_to_identical_files(tmp_path, monkeypatch):
    """A crash after the second knock-out batch: the resumed shard redoes only the other batches and
    ends with the files of an uninterrupted run; `evaluations` counts the knock-outs as before."""
    lm = get_model("tiny-opt")
    extra = "eval.batch_size=4"
    real = ko._knock_chunk
    with monkeypatch.context() as m:
        calls = spy(m)
        whole = run_shard(tiny_shard_cfg(tmp_path / "a", "copa", 1, "tiny-opt", extra), lm=lm)
    n_chunks, calls = len(calls), []
    # distinct masks {none, heads 50, ffn 0, ffn 1, both 50}, as in test_shard (ffn 50 is a knock-out)
    assert whole["evaluations"] == 5

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in knock-out batch 3")
        return real(*a, **k)

    cfg = tiny_shard_cfg(tmp_path / "b", "copa", 1, "tiny-opt", extra)
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="injected failure in knock-out batch 3"):
        m.setattr(ko, "_knock_chunk", crash)
        run_shard(cfg, lm=lm)
    sh = Shard(tmp_path / "b", "tiny-opt", "copa", 1)
    state = ko.KnockoutState.from_tensors(read_tensors(sh.ckpt("knockout_state.safetensors")))
    assert 0 < int(state.done.sum()) < state.done.numel()
    calls = spy(monkeypatch)
    res = run_shard(cfg, lm=lm)
    assert res["status"] == "complete" and res["evaluations"] == 5
    assert n_chunks >= 3 and len(calls) == n_chunks - 2
    assert _snapshot(sh.path) == _snapshot(Shard(tmp_path / "a", "tiny-opt", "copa", 1).path)
