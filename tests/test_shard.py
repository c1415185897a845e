"""One shard end to end on a tiny model: store layout, resume, skip, atomicity, bad input."""

import json
import os

import pytest
import torch

import icl_scale.shard as shard_mod
from icl_scale.evaluator import Evaluator
from icl_scale.shard import run_shard
from icl_scale.store import Shard, StoreError, read_tensors, write_json
from icl_scale.tasks import build_requests

from conftest import get_model, tiny_shard_cfg
from fault_injection import crash_after


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _snapshot(path):
    """Everything a shard produced except volatile manifest fields."""
    out = {}
    for p in sorted(path.rglob("*")):
        if not p.is_file() or p.name == "manifest.json":
            continue
        if p.suffix == ".safetensors":
            out[str(p.relative_to(path))] = {k: v.tolist() for k, v in read_tensors(p).items()}
        else:
            out[str(p.relative_to(path))] = p.read_text()
    return out


@pytest.fixture(scope="module")
def complete(tmp_path_factory, mirror):
    root = tmp_path_factory.mktemp("store")
    cfg = tiny_shard_cfg(root)
    res = run_shard(cfg, lm=get_model("tiny-opt"))
    return root, cfg, res


def test_layout_and_contents(complete):
    root, cfg, res = complete
    sh = Shard(root, "tiny-opt", "copa", 1)
    assert res["status"] == "complete" and sh.is_complete()
    imp = sh.importance()
    assert imp["heads"].shape == (2, 4) and imp["ffn"].shape == (2,) and imp["ffn_knockout"].shape == (2,)
    assert all(v.dtype == torch.float32 for v in imp.values())
    assert (imp["heads"] > 0).all()
    curves = sh.curves()
    assert [r["level"] for r in curves["heads"]] == [0.0, 50.0]
    assert len(curves["combined"]) == 4 and curves["n_eval"] == 12
    m = sh.manifest()
    assert m["config_hash"] and m["versions"]["torch"] and "importance" in m["timings"]
    assert sorted(m["data_sources"]) == ["train", "validation"]
    assert all(v.startswith("mirror ") and v.endswith("fixtures") for v in m["data_sources"].values())
    assert not (sh.path / "checkpoint").exists()
    assert not [f for f in _files(root) if f.endswith(".tmp")]
    # Masks on disk are exactly the lowest-ranked heads.
    mask = read_tensors(sh.file("masks/heads_50.safetensors"))["mask"]
    order = imp["heads"].flatten().argsort()
    assert (mask.flatten()[order[:4]] == 0).all() and (mask.flatten()[order[4:]] == 1).all()


def test_zero_level_equals_unpruned_evaluation(complete, mirror):
    root, cfg, _ = complete
    sh = Shard(root, "tiny-opt", "copa", 1)
    reqs = build_requests("copa", shot=1, limit=12, data_dir=mirror)
    metrics, per_doc = Evaluator(get_model("tiny-opt"), "copa", 8)(reqs)
    assert sh.curves()["heads"][0]["value"] == metrics["acc"]["value"]
    saved = [json.loads(line) for line in sh.file("samples/heads_0.jsonl").read_text().splitlines()]
    assert [d["logprobs"] for d in saved] == [d["logprobs"] for d in per_doc]


def test_memoised_evaluations_equal_fresh_ones(complete, mirror):
    root, cfg, _ = complete
    sh = Shard(root, "tiny-opt", "copa", 1)
    # Knock-out runs on the eval docs (the paper): distinct masks {none, heads 50, ffn 0, ffn 1, both 50};
    # ffn 50 (floor(50% of 2) = 1 FFN) is one of the knock-outs.
    assert sh.manifest()["evaluations"] == 5
    lm = get_model("tiny-opt")
    reqs = build_requests("copa", shot=1, limit=12, data_dir=mirror)
    for kind in ("heads", "ffn"):
        mask = read_tensors(sh.file(f"masks/{kind}_50.safetensors"))["mask"]
        _, fresh = Evaluator(lm, "copa", 8)(reqs, *((mask, None) if kind == "heads" else (None, mask)))
        saved = [json.loads(line) for line in sh.file(f"samples/{kind}_50.jsonl").read_text().splitlines()]
        assert [d["logprobs"] for d in saved] == [d["logprobs"] for d in fresh]
    grid = {(r["head_level"], r["ffn_level"]): r["value"] for r in sh.curves()["combined"]}
    assert grid[(50, 0)] == sh.curves()["heads"][1]["value"] and grid[(0, 50)] == sh.curves()["ffn"][1]["value"]
    ev = Evaluator(lm, "copa", 8)
    base = ev(reqs)
    assert ev(reqs, torch.ones(2, 4), torch.ones(2)) == base and ev.n_scored == 1  # all-ones == no mask
    hm = torch.ones(2, 4)
    hm[0, 1] = 0
    masked = ev(reqs, hm)
    assert ev.n_scored == 2 and masked[1][0]["logprobs"] != base[1][0]["logprobs"]
    masked[0]["acc"]["value"] = -1.0  # callers get copies
    assert ev(reqs, hm.clone())[0]["acc"]["value"] != -1.0 and ev.n_scored == 2


def test_rerun_same_config_does_no_work(complete):
    root, cfg, _ = complete
    before = {f: os.stat(root / f).st_mtime_ns for f in _files(root)}
    res = run_shard(cfg, lm=get_model("tiny-opt"))
    assert res["status"] == "skipped"
    assert {f: os.stat(root / f).st_mtime_ns for f in _files(root)} == before


def test_injected_failure_resumes_to_identical_result(complete, tmp_path, monkeypatch):
    root, cfg, _ = complete
    cfg2 = tiny_shard_cfg(tmp_path)
    lm = get_model("tiny-opt")
    for stage in ("importance", "knockout"):
        with monkeypatch.context() as m, pytest.raises(RuntimeError, match=f"injected failure after stage {stage}"):
            crash_after(m, stage)
            run_shard(cfg2, lm=lm)
        sh = Shard(tmp_path, "tiny-opt", "copa", 1)
        assert sh.manifest()["status"] == "failed" and not sh.is_complete()
        assert f"injected failure after stage {stage}" in sh.manifest()["error"]
        assert not [f for f in _files(tmp_path) if f.endswith(".tmp")]  # nothing half-written
        assert not sh.file("curves.json").exists()
    assert (sh.path / "checkpoint" / "importance_state.safetensors").exists()
    res = run_shard(cfg2, lm=lm)
    assert res["status"] == "complete"
    assert _snapshot(sh.path) == _snapshot(Shard(root, "tiny-opt", "copa", 1).path)


def test_partial_importance_is_resumed_not_recomputed(tmp_path, monkeypatch):
    lm = get_model("tiny-opt")
    cfg = tiny_shard_cfg(tmp_path, "copa", 1, "tiny-opt", "importance.checkpoint_every=1")
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="injected failure after stage importance"):
        crash_after(m, "importance")
        run_shard(cfg, lm=lm)
    seen = []
    real = shard_mod.gradient_importance

    def spy(*a, state=None, **k):
        seen.append(None if state is None else state.n_examples)
        return real(*a, state=state, **k)

    monkeypatch.setattr(shard_mod, "gradient_importance", spy)
    assert run_shard(cfg, lm=lm)["status"] == "complete"
    assert seen == [cfg["importance"]["n_examples"]]  # the resumed run started from the full checkpoint


def test_bad_input(tmp_path, mirror):
    lm = get_model("tiny-opt")
    with pytest.raises(ValueError, match="importance.n_examples=0 must be >= 1"):
        run_shard(tiny_shard_cfg(tmp_path, "copa", 1, "tiny-opt", "importance.n_examples=0"), lm=lm)
    with pytest.raises(ValueError, match=r"pruning.levels contains 150"):
        run_shard(tiny_shard_cfg(tmp_path, "copa", 1, "tiny-opt", "pruning.levels=[0,150]"), lm=lm)
    with pytest.raises(ValueError, match="unknown task"):
        run_shard(tiny_shard_cfg(tmp_path, "nope", 1), lm=lm)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() != 0:  # root ignores permission bits; use a path under a file instead
        with pytest.raises(StoreError, match="not writable"):
            run_shard(tiny_shard_cfg(ro / "s"), lm=lm)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="store.root=.*not writable"):
        run_shard(tiny_shard_cfg(tmp_path / "afile" / "s"), lm=lm)
    # A corrupt manifest is reported by readers and never trusted by the runner.
    sh = Shard(tmp_path / "c", "tiny-opt", "copa", 1)
    sh.path.mkdir(parents=True)
    sh.file("manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json is corrupt"):
        sh.manifest()
    # An importance file of the wrong shape is refused as a mask.
    from icl_scale.models import Gates, MaskError

    with pytest.raises(MaskError, match=r"head_mask has shape \(3, 4\)"):
        Gates(lm.adapter, head_mask=torch.ones(3, 4))
    write_json(tmp_path / "ok.json", {"a": 1})
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}


def test_compare_rankings(tmp_path, mirror):
    lm = get_model("tiny-opt")
    with pytest.raises(ValueError, match="no induction scores.*jobs/induction.py"):
        run_shard(tiny_shard_cfg(tmp_path, "copa", 1, "tiny-opt", "pruning.compare=[induction]"), lm=lm)
    with pytest.raises(ValueError, match="pruning.compare has \\['nope'\\]"):
        run_shard(tiny_shard_cfg(tmp_path, "copa", 1, "tiny-opt", "pruning.compare=[nope]"), lm=lm)
    from icl_scale.store import write_tensors

    ind = torch.arange(8.0).view(2, 4)
    write_tensors(tmp_path / "tiny-opt" / "induction" / "scores.safetensors",
                  {"prefix_matching": ind, "copying": ind.flip(0)})
    cfg = tiny_shard_cfg(tmp_path, "copa", 1, "tiny-opt", "pruning.compare=[induction,random]",
                         "pruning.random_seeds=2")
    run_shard(cfg, lm=lm)
    sh = Shard(tmp_path, "tiny-opt", "copa", 1)
    c = sh.curves()
    assert set(c["heads_by"]) == {"heads_by_induction", "heads_random0", "heads_random1"}
    m = read_tensors(sh.file("masks/heads_by_induction_50.safetensors"))["mask"]
    assert torch.equal(m, torch.tensor([[0.0, 0, 0, 0], [1, 1, 1, 1]]))  # lowest prefix matching first
    assert c["heads_by"]["heads_by_induction"][0]["value"] == c["heads"][0]["value"]  # 0% = unpruned
    from icl_scale.report import reduce_store

    res = reduce_store(tmp_path, "tiny-opt", [("copa", 1)])
    assert "curves_heads_rankings.png" in res["figures"] and res["has_induction"]
    assert res["induction_relation"][0]["retained_prefix_matching"]["0"] == pytest.approx(1.0)
