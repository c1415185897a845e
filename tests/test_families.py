"""The adapters of Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3, each on a tiny random config
(2 layers, 4 query heads on 2 KV heads): gates at 1 change nothing, a closed head equals its output
projection columns zeroed by hand, a closed FFN equals the block without its FFN (computed from the
block's own residual), the FFN gate scales the FFN's contribution to the residual (Gemma: after its
post-FFN norm), GQA gates query heads, attention hooks change nothing, physical pruning equals the
gates (Phi-3: a one-line error), and an unknown architecture is one line naming the supported ones."""

import copy

import pytest
import torch

from icl_scale.models import Gates, Hooks, UnsupportedArchitecture
from icl_scale.models.adapters import FAMILY_NAMES, Adapter
from icl_scale.models.physical import PruningError, cheaper_pruned, prune_physically
from icl_scale.scoring import score_requests
from icl_scale.tasks import build_requests

from conftest import data_dir, get_model

NEW = ["tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3"]
FAMILY = {"tiny-mistral": "llama", "tiny-qwen2": "llama", "tiny-qwen3": "llama", "tiny-gemma2": "gemma",
          "tiny-gemma3": "gemma", "tiny-phi3": "phi3"}


@pytest.fixture(params=NEW)
def lm(request):
    return get_model(request.param)


def _ids(seed, b=2, t=12):
    return torch.randint(100, 5000, (b, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_each_family_has_its_adapter_and_geometry(lm):
    g = lm.adapter.geometry
    assert lm.adapter.family.name == FAMILY[lm.name]
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.hidden) == (2, 4, 2, 16, 64)
    # The value projection the induction OV circuit reads: [kv_heads * head_dim, hidden], the rows that
    # produce the attention's values (Phi-3: the last block of the fused qkv_proj).
    x = torch.randn(3, g.hidden, generator=torch.Generator().manual_seed(0))
    w, b = lm.adapter.v_weight(0)
    attn = lm.adapter.attn(0)
    if lm.adapter.family.qkv_proj:
        fused = attn.qkv_proj(x)
        want = fused[:, (g.n_heads + g.n_kv_heads) * g.head_dim:]
    else:
        want = attn.v_proj(x)
    got = x @ w.t() + (b if b is not None else 0)
    assert torch.allclose(got, want, atol=1e-6)


def test_all_ones_gates_are_bit_identical(lm):
    ids = _ids(0)
    ref = _logits(lm.model, ids)
    g = lm.adapter.geometry
    with Gates(lm.adapter, head_mask=torch.ones(g.n_layers, g.n_heads), ffn_mask=torch.ones(g.n_layers)):
        assert torch.equal(_logits(lm.model, ids), ref)
    with Gates(lm.adapter, head_mask=torch.ones(g.n_layers, g.n_heads, requires_grad=True),
               ffn_mask=torch.ones(g.n_layers, requires_grad=True)):
        assert torch.equal(lm.model(input_ids=ids).logits.detach(), ref)


def test_a_closed_query_head_equals_its_output_projection_columns_zeroed(lm):
    """GQA: heads 0 and 1 share KV head 0; closing query head 0 alone is a [layers, query heads] mask
    and differs from closing head 1."""
    ids = _ids(1)
    g = lm.adapter.geometry
    results = {}
    for h in (0, 1):
        mask = torch.ones(g.n_layers, g.n_heads)
        mask[g.n_layers - 1, h] = 0
        with Gates(lm.adapter, head_mask=mask):
            gated = _logits(lm.model, ids)
        ref_model = copy.deepcopy(lm.model)
        with torch.no_grad():
            Adapter(ref_model).o_proj(g.n_layers - 1).weight[:, h * g.head_dim:(h + 1) * g.head_dim] = 0
        ref = _logits(ref_model, ids)
        assert torch.allclose(gated, ref, atol=1e-6, rtol=0), (h, (gated - ref).abs().max())
        results[h] = gated
    assert not torch.allclose(results[0], results[1])
    assert not torch.allclose(results[0], _logits(lm.model, ids))


def _without_ffn(model, layer):
    """A copy whose block `layer` returns its post-attention residual (the pre-FFN norm's input): the
    block with its FFN skipped, whatever the family does inside the FFN branch."""
    ref = copy.deepcopy(model)
    ad = Adapter(ref)
    block = ad.layer(layer)
    seen = {}
    block.get_submodule(ad.family.pre_ffn_norm).register_forward_pre_hook(
        lambda m, args: seen.__setitem__("x", args[0]))
    block.register_forward_hook(lambda m, args, out: seen["x"])
    return ref


def test_a_closed_ffn_equals_skipping_it(lm):
    ids = _ids(2)
    g = lm.adapter.geometry
    for layer in range(g.n_layers):
        mask = torch.ones(g.n_layers)
        mask[layer] = 0
        with Gates(lm.adapter, ffn_mask=mask):
            gated = _logits(lm.model, ids)
        ref = _logits(_without_ffn(lm.model, layer), ids)
        assert torch.allclose(gated, ref, atol=1e-5, rtol=0), (layer, (gated - ref).abs().max())
        assert not torch.allclose(gated, _logits(lm.model, ids))


def test_the_ffn_gate_scales_the_ffn_contribution_to_the_residual(lm):
    """Block 0's output is r + f * c (r: post-attention residual, c: the FFN's contribution at f = 1).
    A gate before Gemma's post-FFN RMS norm would be normalised away (c unchanged at f = 0.5)."""
    ids = _ids(3)
    ad = lm.adapter
    seen = {}

    def run(f):
        with Gates(ad, ffn_mask=torch.tensor([f, 1.0])):
            handle = ad.layer(0).get_submodule(ad.family.pre_ffn_norm).register_forward_pre_hook(
                lambda m, args: seen.__setitem__("r", args[0]))
            try:
                with torch.no_grad():
                    out = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
            finally:
                handle.remove()
        return out, seen["r"]

    full, r = run(1.0)
    half, r_half = run(0.5)
    assert torch.equal(r, r_half)
    assert torch.allclose(half, r + 0.5 * (full - r), atol=1e-5), (half - (r + 0.5 * (full - r))).abs().max()


def test_attention_hooks_change_nothing(lm):
    ids = _ids(4, b=1, t=20)
    impls = ["eager"] if lm.name == "tiny-gemma2" else ["sdpa", "eager"]  # transformers: no sdpa for Gemma 2
    original = lm.model.config._attn_implementation
    try:
        for impl in impls:
            lm.model.set_attn_implementation(impl)
            ref = _logits(lm.model, ids)
            views = []
            with Hooks(lm.adapter, [("attention", l, views.append) for l in range(lm.adapter.geometry.n_layers)]):
                out = _logits(lm.model, ids)
            assert torch.equal(out, ref), impl
            assert [v.layer for v in views] == [0, 1] and views[0].query.shape[1] == 4
    finally:
        lm.model.set_attn_implementation(original)


@pytest.fixture(scope="module")
def reqs():
    return build_requests("copa", shot=1, limit=4, data_dir=data_dir())


def test_physical_pruning_equals_the_gates(lm, reqs):
    hm = torch.tensor([[0., 0, 1, 1], [1, 0, 1, 1]])  # layer 0: KV group 0 gone; layer 1: an uneven group
    fm = torch.tensor([1., 0])
    if lm.adapter.family.name == "phi3":
        with pytest.raises(PruningError, match=r"^physical pruning does not support model_type='phi3' .*"
                                               r"\(eval.physical_below=null\)$"):
            prune_physically(lm, hm, fm)
        assert not cheaper_pruned(lm, hm, fm, below=1.0)  # the shard scores Phi-3's masks with gates
        return
    ids = _ids(5)
    pruned = prune_physically(lm, hm, fm)
    with torch.no_grad(), Gates(lm.adapter, head_mask=hm, ffn_mask=fm):
        want = lm.model(input_ids=ids).logits
    assert (want - _logits(pruned.model, ids)).abs().max().item() <= 1e-5
    gated, phys = score_requests(lm, reqs, hm, fm), score_requests(pruned, reqs)
    assert max(abs(a.logprob - b.logprob) for x, y in zip(gated, phys) for a, b in zip(x, y)) <= 1e-4


def test_an_architecture_without_an_adapter_is_one_line():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=100, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitecture) as e:
        Adapter(model)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("unsupported architecture model_type='bloom'; supported: opt, llama, ")
    for name in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox"):
        assert name in msg
    assert msg.endswith(f"({FAMILY_NAMES})")


def test_the_unembedding_folds_the_final_norm(lm):
    """unembedding_matrix(fold) applied to x / rms(x) gives lm_head(final_norm(x)): Gemma's norm scales
    by 1 + weight (its weights are randomised here so a missing 1 would show)."""
    from icl_scale.induction.reductions import unembedding_matrix

    model = copy.deepcopy(lm.model)
    ad = Adapter(model)
    norm = ad.final_norm()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(0)))
        x = torch.randn(3, ad.geometry.hidden, generator=torch.Generator().manual_seed(1))
        want = model.get_output_embeddings()(norm(x))
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
        got = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) @ unembedding_matrix(ad).t()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_induction_scores_run_on_every_family(lm):
    from icl_scale.induction import induction_scores

    res = induction_scores(lm, n_seeds=2, lengths=[8, 9])
    for name in ("prefix_matching", "copying"):
        score = getattr(res, name)
        assert score.shape == (2, 4) and bool(torch.isfinite(score).all())


# --- model=hf: any supported causal LM by hub id or local folder ------------------------------------------

@pytest.fixture(scope="module")
def saved_qwen3(tmp_path_factory):
    """tiny-qwen3 saved with save_pretrained (weights, config.json, tokenizer): a model=hf folder."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-qwen3-saved"
    lm = get_model("tiny-qwen3")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def _hf_cfg(*overrides):
    from hydra import compose, initialize_config_dir

    from icl_scale.config import CONF_DIR, to_dict
    from icl_scale.schema import register

    register()  # the schemas the presets compose over
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_dict(compose(config_name="plan", overrides=["model=hf", *overrides]))


def test_model_hf_loads_a_local_folder_with_its_geometry(saved_qwen3):
    from icl_scale.models import load_model
    from icl_scale.validation import check_model

    cfg = _hf_cfg(f"model.id={saved_qwen3}", "model.device=cpu")
    assert cfg["model"]["name"] == "tiny-qwen3-saved"  # the store folder: the id's last part
    check_model(cfg["model"])
    lm = load_model(cfg["model"])
    ref = get_model("tiny-qwen3")
    assert lm.adapter.family.name == "llama" and lm.adapter.geometry == ref.adapter.geometry
    ids = _ids(6)
    assert torch.equal(_logits(lm.model, ids), _logits(ref.model, ids))


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-gemma2", "tiny-phi3", "tiny-opt"])
def test_the_planner_reads_the_geometry_from_config_json(name, tmp_path):
    """python -m icl_scale.plan model=hf model.id=<folder>: the arch block from config.json, and the exact
    parameter count (tied embeddings once) of the model itself."""
    from icl_scale.plan import Arch, compose, n_params

    lm = get_model(name)
    lm.model.save_pretrained(tmp_path / name)
    cfg = compose(["model=hf", f"model.id={tmp_path / name}", "gpus=1"])
    a = Arch.from_spec(cfg["model"])
    g, c = lm.adapter.geometry, lm.model.config
    assert (a.layers, a.heads, a.kv_heads, a.head_dim, a.hidden, a.vocab) == \
        (g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim, g.hidden, c.vocab_size)
    assert a.ffn == (c.ffn_dim if name == "tiny-opt" else c.intermediate_size)
    assert n_params(a) == sum(p.numel() for p in lm.model.parameters())


def test_the_planner_without_config_json_is_one_line():
    from icl_scale.plan import Arch, PlanError

    with pytest.raises(PlanError, match=r"^model.id=nobody/not-cached: no readable config.json \(OSError\); "
                                        r"download the model first or add a model.arch block$"):
        Arch.from_spec({"name": "x", "source": "hf", "id": "nobody/not-cached"})


def test_model_hf_without_an_id_is_one_line():
    from icl_scale.validation import check_model

    cfg = _hf_cfg()
    assert cfg["model"]["name"] == "hf"
    with pytest.raises(ValueError, match=r"^model.id is required for model=hf: add model.id=<org>/<name> "
                                         r"\(a hub id\) or model.id=/path/to/checkpoint$"):
        check_model(cfg["model"])


def test_the_cached_scorer_equals_naive_scoring(lm, reqs):
    """The prefix-cached batched scorer on each family's cache (Gemma: sliding-window layers)."""
    from icl_scale.scoring import score_naive

    cached, naive = score_requests(lm, reqs, batch_size=3), score_naive(lm, reqs)
    assert max(abs(a.logprob - b.logprob) for x, y in zip(cached, naive) for a, b in zip(x, y)) <= 1e-4


def test_restarted_ffn_knockouts_equal_one_evaluation_each(lm, reqs):
    from icl_scale import knockout as ko

    mode = ko.restart_mode(lm)
    assert mode in ("post_attention", "full")
    state = ko.knockout_scores(lm, reqs, batch_size=3)
    n = lm.adapter.geometry.n_layers
    for layer in range(-1, n):
        want = score_requests(lm, reqs, None, ko.knockout_mask(n, layer), batch_size=3)
        got = state.scores(reqs, layer)
        assert max(abs(a.logprob - b.logprob) for x, y in zip(got, want) for a, b in zip(x, y)) <= 1e-4, (mode, layer)
