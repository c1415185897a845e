"""Physical pruning (icl_scale/models/physical.py) and its export job (jobs/export.py): a pruned model
computes what the gated model computes, holds exactly the kept slices, and survives export + reload."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from icl_scale.models import Gates, MaskError, load_model
from icl_scale.models.gates import read_mask_file
from icl_scale.models.physical import cheaper_pruned, compute_fraction, n_parameters, plan, prune_physically
from icl_scale.scoring import score_requests
from icl_scale.shard import run_shard
from icl_scale.tasks import build_requests

from conftest import REPO, assert_same_store, data_dir, get_model, tiny_shard_cfg

FAMILIES = ["tiny-opt", "tiny-llama", "tiny-gpt2", "tiny-gpt-neox"]  # 2 layers x 4 heads (llama: 2 KV heads)


@pytest.fixture(scope="module")
def reqs():
    return build_requests("copa", shot=1, limit=6, data_dir=data_dir())


def _masks(name: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, head mask, ffn mask): a whole layer's heads, one KV group (tiny-llama: heads 0-1 share KV
    head 0), a partial group, FFNs, a random mask, a layer with nothing left."""
    g = get_model(name).adapter.geometry
    assert (g.n_layers, g.n_heads) == (2, 4)
    gen = torch.Generator().manual_seed(1)
    rand = (torch.rand(g.n_layers, g.n_heads, generator=gen) > 0.5).float()
    return [
        ("layer 0 without heads, layer 1 partial, FFN 1 removed", torch.tensor([[0., 0, 0, 0], [1, 0, 1, 1]]),
         torch.tensor([1., 0])),
        ("KV group 0 of layer 0 removed, partial group in layer 1, no FFNs",
         torch.tensor([[0., 0, 1, 1], [0, 1, 1, 1]]), torch.zeros(2)),
        ("layer 0 random, layer 1 empty (no heads, no FFN)", torch.cat([rand[:1], torch.zeros(1, 4)]),
         torch.tensor([1., 0])),
    ]


def _gap(a, b) -> float:
    return max(abs(x.logprob - y.logprob) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _preds(scores) -> list[int]:
    return [max(range(len(row)), key=lambda j: row[j].logprob) for row in scores]


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_forward_equals_gated(name, reqs):
    lm = get_model(name)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ids = torch.randint(0, 5000, (2, 11), generator=torch.Generator().manual_seed(0))
    for what, hm, fm in _masks(name):
        pruned = prune_physically(lm, hm, fm)
        gated = score_requests(lm, reqs, hm, fm)
        phys = score_requests(pruned, reqs)
        assert _gap(gated, phys) <= 1e-4, (name, what)
        assert _preds(gated) == _preds(phys), (name, what)
        with torch.inference_mode():
            with Gates(lm.adapter, head_mask=hm, ffn_mask=fm):
                want = lm.model(input_ids=ids).logits
            got = pruned.model(input_ids=ids).logits
        assert (want - got).abs().max().item() <= 1e-5, (name, what)
        assert n_parameters(pruned) < n_parameters(lm)
    after = lm.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _opt_removed(lm, hm, fm) -> int:
    """OPT (pre-norm, biases): per removed head its q/k/v rows and biases and its o_proj columns; a
    layer without heads also its pre-attention LayerNorm (the o_proj bias stays); a removed FFN fc1,
    fc2 (biases too) and the pre-FFN LayerNorm."""
    g, cfg = lm.adapter.geometry, lm.model.config
    d, hd, f = g.hidden, g.head_dim, cfg.ffn_dim
    n = 0
    for l in range(g.n_layers):
        gone = int((hm[l] == 0).sum())
        n += gone * (3 * (hd * d + hd) + hd * d)
        if gone == g.n_heads:
            n += 2 * d
        if fm[l] == 0:
            n += (f * d + f) + (d * f + d) + 2 * d
    return n


def test_parameter_count_drops_by_the_removed_slices():
    lm = get_model("tiny-opt")
    hm, fm = torch.tensor([[0., 0, 0, 0], [1, 0, 1, 1]]), torch.tensor([1., 0])
    assert n_parameters(lm) - n_parameters(prune_physically(lm, hm, fm)) == _opt_removed(lm, hm, fm)

    # Llama (GQA 4 query / 2 KV heads, no biases). Layer 0 drops head 0: groups of 1 and 2 query
    # heads -> 3 KV slots of one query head each (KV head 1 repeated): +1 KV head of k and v rows.
    # Layer 1 drops heads 0 and 1 (all of KV group 0) and its FFN (gate/up/down + its RMSNorm).
    lm = get_model("tiny-llama")
    g, inter = lm.adapter.geometry, lm.model.config.intermediate_size
    assert (g.n_heads, g.n_kv_heads) == (4, 2)
    d, hd = g.hidden, g.head_dim
    hm, fm = torch.tensor([[0., 1, 1, 1], [0, 0, 1, 1]]), torch.tensor([1., 0])
    removed = (2 * hd * d - 2 * hd * d) + (2 * 2 * hd * d + 2 * hd * d + 3 * d * inter + d)
    assert n_parameters(lm) - n_parameters(prune_physically(lm, hm, fm)) == removed
    attn = prune_physically(lm, hm, fm).adapter.attn(0)
    assert attn.k_proj.out_features == 3 * hd and attn.num_key_value_groups == 1
    # Groups of 2 and 2 stay grouped (no repeat); groups of 2 and 0 drop the KV head.
    attn = prune_physically(lm, torch.tensor([[1., 1, 1, 1], [0, 0, 1, 1]])).adapter.attn(1)
    assert attn.k_proj.out_features == hd and attn.num_key_value_groups == 2


def test_the_copy_shares_untouched_weights_and_leaves_the_original():
    lm = get_model("tiny-llama")
    hm = torch.tensor([[1., 1, 0, 0], [1, 0, 1, 1]])
    pruned = prune_physically(lm, hm, torch.tensor([1., 0]))
    emb = lm.adapter.model.get_input_embeddings().weight
    assert pruned.model.get_input_embeddings().weight is emb  # shared, not copied
    assert pruned.adapter.attn(1).q_proj.weight.shape[0] == 3 * lm.adapter.geometry.head_dim
    assert lm.adapter.attn(1).q_proj.weight.shape[0] == 4 * lm.adapter.geometry.head_dim
    assert pruned.adapter.layer(1).mlp is not lm.adapter.layer(1).mlp


def test_compute_fraction_counts_projections_and_ffns():
    lm = get_model("tiny-llama")  # 4 query heads on 2 KV heads
    g, ad = lm.adapter.geometry, lm.adapter
    d, hd, inter = g.hidden, g.head_dim, lm.model.config.intermediate_size
    attn, ffn = (2 * 4 + 2 * 2) * hd * d, 3 * d * inter
    assert compute_fraction(ad, plan(g)) == 1.0
    no_ffn1 = compute_fraction(ad, plan(g, ffn_mask=torch.tensor([1., 0])))
    assert no_ffn1 == pytest.approx((2 * attn + ffn) / (2 * (attn + ffn)))
    # heads 0, 2, 3: groups of 1 and 2 -> 3 KV slots, more KV rows than the full layer's 2
    frac = compute_fraction(ad, plan(g, torch.tensor([[1., 0, 1, 1], [1, 1, 1, 1]])))
    assert frac == pytest.approx((attn + (2 * 3 + 2 * 3) * hd * d + 2 * ffn) / (2 * (attn + ffn)))
    assert not cheaper_pruned(lm, torch.tensor([[1., 0, 1, 1], [1, 1, 1, 1]]))  # frac > 0.9
    assert cheaper_pruned(lm, None, torch.tensor([1., 0])) and cheaper_pruned(lm, None, torch.tensor([1., 0]), 0.7)
    assert not cheaper_pruned(lm, None, torch.tensor([1., 0]), 0.6)  # no_ffn1 is ~0.66
    assert not cheaper_pruned(lm)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_a_shard_on_pruned_copies_equals_the_gated_shard(name, tmp_path):
    """The curves and the grid score masks that cost <= eval.physical_below on a pruned copy: same
    curves, predictions and (<= 1e-4 nats) log-likelihoods as gating every mask (physical_below=null)."""
    lm = get_model(name)
    a = run_shard(tiny_shard_cfg(tmp_path / "pruned", "copa", 1, name, "eval.physical_below=1.5"), lm=lm)
    b = run_shard(tiny_shard_cfg(tmp_path / "gated", "copa", 1, name, "eval.physical_below=null"), lm=lm)
    # every evaluation but the unpruned one and the knock-outs (restarted passes, icl_scale/knockout.py)
    n_layers = lm.adapter.geometry.n_layers
    assert a["evaluations_pruned_copy"] == a["evaluations"] - 1 - n_layers > 0 and b["evaluations_pruned_copy"] == 0
    assert_same_store(Path(a["shard"]), Path(b["shard"]))


@pytest.mark.parametrize("mask,ffn,message", [
    (torch.ones(3, 4), None, r"head_mask has shape \(3, 4\) but this model needs \(2, 4\)"),
    (torch.full((2, 4), 0.5), None, "head_mask has 8 value.* other than 0 and 1"),
    (None, torch.tensor([1.0, float("nan")]), "ffn_mask has 1 NaN"),
    (None, torch.ones(4), r"ffn_mask has shape \(4,\) but this model needs \(2,\)"),
])
def test_bad_masks_are_one_line(mask, ffn, message):
    with pytest.raises(MaskError, match=message) as e:
        prune_physically(get_model("tiny-opt"), mask, ffn)
    assert "\n" not in str(e.value)


# --- export ---------------------------------------------------------------------------------------

def _export_module():
    spec = importlib.util.spec_from_file_location("export_job", REPO / "jobs" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    run_shard(tiny_shard_cfg(root, "copa", 1, "tiny-opt"), lm=get_model("tiny-opt"))
    return root


def _args(root, *extra) -> list[str]:
    return ["model=tiny-opt", "task=copa", "shot=1", f"store.root={root}", f"data.dir={data_dir()}",
            "progress=false", *extra]


@pytest.fixture(scope="module")
def exported(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "copa1"
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "export.py"), *_args(store, "heads=50", "ffn=50",
                        f"out_dir={out}", "repeats=1")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_export_reloads_and_scores_like_the_gated_model(store, exported):
    masks = store / "tiny-opt" / "copa" / "1shot" / "seed0" / "masks"
    hm = read_mask_file(masks / "heads_50.safetensors", "head_mask")
    fm = read_mask_file(masks / "ffn_50.safetensors", "ffn_mask")
    lm = get_model("tiny-opt")
    assert not (hm == 1).all() and not (fm == 1).all()
    files = sorted(f.name for f in exported.iterdir())
    assert {"model.safetensors", "config.json", "report.json", "report.md", "tokenizer.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    cfg = json.loads((exported / "config.json").read_text())
    block = cfg["icl_scale_pruning"]
    assert cfg["model_type"] == "opt" and len(block["layers"]) == 2
    assert [r["heads"] for r in block["layers"]] == [torch.nonzero(hm[l]).flatten().tolist() for l in range(2)]
    assert [r["ffn"] for r in block["layers"]] == [bool(v) for v in fm]
    assert block["source"]["head_mask"]["level"] == 50

    back = load_model({"name": "pruned", "source": "local", "path": str(exported), "dtype": "float32",
                       "device": "cpu", "attn_implementation": "sdpa", "doc_start": "<|endoftext|>",
                       "max_length": 256})
    report = json.loads((exported / "report.json").read_text())
    assert report["parameters"]["before"] == n_parameters(lm)
    assert report["parameters"]["after"] == n_parameters(back) == n_parameters(prune_physically(lm, hm, fm))
    assert report["heads"] == {"kept": int(hm.sum()), "total": 8}
    assert report["ffn"] == {"kept": int(fm.sum()), "total": 2}
    assert report["accuracy"]["pruned"] == report["accuracy"]["gated"] and report["accuracy"]["n"] == 12
    assert report["speed"]["unpruned_s"] > 0 and report["speed"]["pruned_s"] > 0
    eval_reqs = build_requests("copa", shot=1, limit=12, data_dir=data_dir())
    gated, phys = score_requests(lm, eval_reqs, hm, fm), score_requests(back, eval_reqs)
    assert _gap(gated, phys) <= 1e-4 and _preds(gated) == _preds(phys)


def _job_error(monkeypatch, capsys, *args) -> str:
    """jobs/export.py run in this process: it must exit 2 with exactly one `error:` line."""
    mod = _export_module()
    monkeypatch.setattr(sys, "argv", ["export.py", *args])
    monkeypatch.delenv("ICL_SCALE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        mod.main()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0].removeprefix("error: ")


def test_export_bad_input_is_one_line(store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    # (The success case above runs the job as a subprocess; these run it in-process, exit code and all.)
    assert "no heads mask at level 70%; its levels are: 0, 50" in _job_error(
        monkeypatch, capsys, *_args(store, "heads=70", f"out_dir={out}"))
    assert "no ffn mask at level 20%; its levels are: 0, 50" in _job_error(
        monkeypatch, capsys, *_args(store, "heads=50", "ffn=20", f"out_dir={out}"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "already exists and is not empty" in _job_error(
        monkeypatch, capsys, *_args(store, "heads=50", f"out_dir={tmp_path / 'full'}"))
    assert "not both" in _job_error(monkeypatch, capsys, *_args(store, "heads=50", f"head_mask={tmp_path / 'x'}",
                                                                 f"out_dir={out}"))
    assert "nothing to prune" in _job_error(monkeypatch, capsys, *_args(store, f"out_dir={out}"))

    # Mask files: wrong shape (checked once the model is loaded) and values other than 0/1.
    save_file({"mask": torch.ones(3, 4)}, str(tmp_path / "shape.safetensors"))
    save_file({"mask": torch.full((2, 4), 0.5)}, str(tmp_path / "half.safetensors"))
    assert "has shape (3, 4) but this model needs (2, 4)" in _job_error(
        monkeypatch, capsys, *_args(store, f"head_mask={tmp_path / 'shape.safetensors'}", f"out_dir={out}"))
    assert "value(s) other than 0 and 1" in _job_error(
        monkeypatch, capsys, *_args(store, f"head_mask={tmp_path / 'half.safetensors'}", f"out_dir={out}"))

    # An incomplete shard (its manifest says running): named, with how to finish it.
    other = tmp_path / "store2"
    shard = other / "tiny-opt" / "copa" / "1shot" / "seed0"
    shard.mkdir(parents=True)
    (shard / "manifest.json").write_text(json.dumps({"status": "running"}))
    assert "is not complete (status running)" in _job_error(
        monkeypatch, capsys, *_args(other, "heads=50", f"out_dir={out}"))
    assert not out.exists() and not [f for f in tmp_path.iterdir() if f.name.startswith(".out.")]


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """The export is written into a temporary sibling folder: a failure midway removes it."""
    from icl_scale import export as mod

    lm = get_model("tiny-opt")
    pruned = prune_physically(lm, torch.tensor([[1., 0, 1, 1], [1, 1, 1, 1]]))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lm.tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        mod.write_export(tmp_path / "out", lm, pruned, [], {"source": {}, "load_with": {}, "parameters": {}})
    assert list(tmp_path.iterdir()) == []
