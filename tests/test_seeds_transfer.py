"""The demonstration-seed axis of the store and cross-task transfer (aggregate and other tasks' rankings)."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t

from icl_scale import report
from icl_scale.collect import collect
from icl_scale.rankings import aggregate, argsort_spearman, spearman
from icl_scale.shard import run_shard
from icl_scale.store import Shard, list_shards, read_tensors
from icl_scale.sweep import submit, transfer_cfgs
from icl_scale.transfer import high_low_for, run_transfer

from conftest import REPO, compose, data_dir, get_model, tiny_shard_cfg

MODEL = "tiny-opt"


def _bytes(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """copa 1-shot at seeds 0 and 1, and copa 0-shot, in one store."""
    root = tmp_path_factory.mktemp("seeds")
    lm = get_model(MODEL)
    run_shard(tiny_shard_cfg(root, "copa", 1, MODEL, "seed=0"), lm=lm)
    before = _bytes(Shard(root, MODEL, "copa", 1, 0).path)
    run_shard(tiny_shard_cfg(root, "copa", 1, MODEL, "seed=1"), lm=lm)
    run_shard(tiny_shard_cfg(root, "copa", 0, MODEL), lm=lm)
    return root, before


def test_two_seeds_live_side_by_side(two_seeds):
    root, before = two_seeds
    s0, s1 = Shard(root, MODEL, "copa", 1, 0), Shard(root, MODEL, "copa", 1, 1)
    assert s0.path.name == "seed0" and s1.path.name == "seed1" and s0.is_complete() and s1.is_complete()
    assert _bytes(s0.path) == before  # the second seed wrote nothing into the first's folder
    assert s0.manifest()["config_hash"] != s1.manifest()["config_hash"]
    # Different demonstrations, so different importance (the seed reaches the prompts).
    assert not torch.equal(s0.importance()["heads"], s1.importance()["heads"])
    assert [sh.name for sh in list_shards(root)] == [f"{MODEL}/copa/0shot/seed0", f"{MODEL}/copa/1shot/seed0",
                                                     f"{MODEL}/copa/1shot/seed1"]


def test_a_0shot_shard_has_one_seed(two_seeds, tmp_path):
    root, _ = two_seeds
    res = run_shard(tiny_shard_cfg(root, "copa", 0, MODEL, "seed=3"), lm=get_model(MODEL))
    assert res["status"] == "skipped" and res["shard"].endswith("0shot/seed0")


def test_the_reducer_reports_the_seed_mean_and_interval(two_seeds, tmp_path):
    root, _ = two_seeds
    res = report.reduce_store(root, MODEL, out_dir=tmp_path / "summary")
    v = [Shard(root, MODEL, "copa", 1, k).curves()["heads"][0]["value"] for k in (0, 1)]
    row = next(r for r in res["seeds"] if r["shot"] == 1)
    mean, sd = float(np.mean(v)), float(np.std(v, ddof=1))
    half = student_t.ppf(0.975, 1) * sd / math.sqrt(2)  # 12.71 * sd / sqrt(2) for two seeds
    assert row["n_seeds"] == 2 and row["seeds"] == [0, 1] and row["mean"] == pytest.approx(mean)
    assert (row["seed_ci_lo"], row["seed_ci_hi"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    zero = next(r for r in res["seeds"] if r["shot"] == 0)
    assert zero["n_seeds"] == 1 and math.isnan(zero["seed_ci_lo"])
    # Rankings per (task, shot) are the seed means; the cross-shot table compares them with both statistics.
    imp1 = torch.stack([Shard(root, MODEL, "copa", 1, k).importance()["heads"] for k in (0, 1)]).mean(0)
    imp0 = Shard(root, MODEL, "copa", 0).importance()["heads"]
    (cs,) = res["cross_shot"]["per_task"]
    assert cs["shots"] == "0-1"
    assert cs["argsort_spearman"] == pytest.approx(argsort_spearman(imp0, imp1))
    assert cs["spearman"] == pytest.approx(spearman(imp0, imp1))
    assert "seeds.csv" in res["files"]


def test_a_store_from_before_the_seed_axis_still_reads(two_seeds, tmp_path):
    root, _ = two_seeds
    old = tmp_path / "old"
    src = Shard(root, MODEL, "copa", 1, 1).path
    shutil.copytree(src, old / MODEL / "copa" / "1shot")  # files directly in 1shot/, as before
    col = collect(old, MODEL)
    (d,) = col.ok
    assert d.shard.legacy and d.shard.seed == 1 and d.name == f"{MODEL}/copa/1shot"
    # A new seed-1 run next to it gets its own folder; the old files are never touched.
    before = _bytes(old / MODEL / "copa" / "1shot")
    run_shard(tiny_shard_cfg(old, "copa", 1, MODEL, "seed=0"), lm=get_model(MODEL))
    after = {k: v for k, v in _bytes(old / MODEL / "copa" / "1shot").items() if not k.startswith("seed0/")}
    assert after == before
    assert sorted(sh.name for sh in list_shards(old)) == [f"{MODEL}/copa/1shot", f"{MODEL}/copa/1shot/seed0"]
    assert len(collect(old, MODEL).ok) == 2  # seeds 1 (old layout) and 0
    # An old-layout shard of a seed that now has its own folder is superseded, and says so.
    shutil.copytree(Shard(root, MODEL, "copa", 1, 0).path, old / MODEL / "copa" / "1shot", dirs_exist_ok=True)
    col = collect(old, MODEL)
    assert [d.name for d in col.ok] == [f"{MODEL}/copa/1shot/seed0"]
    assert col.warnings == [f"{MODEL}/copa/1shot: a shard from before the seed axis, superseded by "
                            f"{MODEL}/copa/1shot/seed0 (not aggregated)"]


# --- transfer ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """A tiny sweep with transfer: copa and rte 1-shot, transfer with rankings from copa."""
    root = tmp_path_factory.mktemp("transfer")
    cfg = compose(f"model={MODEL}", f"store.root={root}", f"data.dir={data_dir()}", f"wandb.dir={root}",
                  "eval.limit=12", "importance.n_examples=8", "importance.batch_size=4",
                  "pruning.levels=[0,25,50,75]", "pruning.combined_levels=[0]", "progress=false",
                  "sweep.tasks=[copa,rte]", "sweep.shots=[1]", "sweep.induction=false", "sweep.transfer=true",
                  "transfer.rankings_from=[copa]", "wandb.mode=disabled", f"launcher.folder={root / 'submitit'}")
    sub = submit(cfg)
    assert all(j.exception() is None for j in sub.all_jobs()), [j.exception() for j in sub.all_jobs()]
    return root, cfg, sub


@pytest.mark.slow  # a local sweep (submitit processes)
def test_transfer_rankings_and_provenance(sweep_store):
    root, _, sub = sweep_store
    assert len(sub.transfer_jobs) == 2
    rte, copa = Shard(root, MODEL, "rte", 1), Shard(root, MODEL, "copa", 1)
    t = json.loads((rte.path / "transfer" / "curves.json").read_text())
    ranks = read_tensors(rte.path / "transfer" / "rankings.safetensors")
    imp = {"copa": copa.importance()["heads"], "rte": rte.importance()["heads"]}
    assert torch.allclose(ranks["aggregate"], (imp["copa"] + imp["rte"]) / 2)
    assert torch.equal(ranks["aggregate"], aggregate(imp))
    assert torch.equal(ranks["aggregate_without_rte"], imp["copa"]) and torch.equal(ranks["from_copa"], imp["copa"])
    assert t["rankings"]["aggregate"]["sources"] == ["copa", "rte"]
    assert t["rankings"]["aggregate"]["source_config_hashes"] == {
        "copa": copa.manifest()["config_hash"], "rte": rte.manifest()["config_hash"]}
    assert t["left_out"] == [] and set(t["curves"]) == {"aggregate", "aggregate_without_rte", "from_copa"}
    # aggregate_without_rte and from_copa are the same ranking: their masks are scored once, and the 0%
    # point is rte's own unpruned score (reused from its shard's heads curve).
    assert t["evaluations"] <= 2 * 3
    own0 = rte.curves()["heads"][0]["value"]
    assert all(c[0]["value"] == own0 for c in t["curves"].values())
    assert t["curves"]["from_copa"] == t["curves"]["aggregate_without_rte"]


@pytest.mark.slow  # a local sweep (submitit processes)
def test_transfer_equals_evaluating_with_the_source_mask(sweep_store, tmp_path):
    """Pruning rte with copa's ranking at 50% = jobs/evaluate.py on rte with copa's saved heads_50 mask."""
    root, _, _ = sweep_store
    copa_mask = Shard(root, MODEL, "copa", 1).file("masks/heads_50.safetensors")
    rte = Shard(root, MODEL, "rte", 1)
    saved = read_tensors(rte.file("transfer/masks/from_copa_50.safetensors"))["mask"]
    assert torch.equal(read_tensors(copa_mask)["mask"], saved)
    out = tmp_path / "eval"
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "evaluate.py"), f"model={MODEL}", "task=rte", "shot=1",
                        "eval.limit=12", f"data.dir={data_dir()}", f"out_dir={out}", f"head_mask={copa_mask}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads((out / "metrics.json").read_text())["metrics"]
    t = json.loads((rte.path / "transfer" / "curves.json").read_text())
    at50 = next(r for r in t["curves"]["from_copa"] if r["level"] == 50)
    assert at50["metrics"] == got


@pytest.mark.slow  # a local sweep (submitit processes)
def test_a_missing_source_is_named_and_the_rest_runs(sweep_store):
    root, cfg, _ = sweep_store
    c = {**cfg, "task": "copa", "shot": 1, "transfer": {"sources": ["copa", "rte", "boolq"], "rankings_from": [],
                                                              "high_low": None}}
    res = run_transfer(c, lm=get_model(MODEL))
    assert res["status"] == "complete"
    assert res["left_out"] == [f"{MODEL}/boolq/1shot/seed0: missing (run its shard first)"]
    assert res["rankings"]["aggregate"]["sources"] == ["copa", "rte"]
    again = run_transfer(c, lm=get_model(MODEL))
    assert again["status"] == "skipped"


@pytest.mark.slow  # a local sweep (submitit processes)
def test_the_reducer_reads_the_transfer_curves(sweep_store, tmp_path):
    root, _, _ = sweep_store
    res = report.reduce_store(root, MODEL, out_dir=tmp_path / "s")
    assert "fig9_transfer.png" in res["figures"]
    rows = report.transfer_table(collect(root, MODEL))
    rte = {(r["ranking"], r["level"]): r["value"] for r in rows if r["task"] == "rte"}
    t = json.loads((Shard(root, MODEL, "rte", 1).path / "transfer" / "curves.json").read_text())
    assert rte[("aggregate", 50.0)] == next(r["value"] for r in t["curves"]["aggregate"] if r["level"] == 50)
    assert rte[("own", 0.0)] == Shard(root, MODEL, "rte", 1).curves()["heads"][0]["value"]
    assert res["induction_relation"] == []  # no induction scores in this store: no retained-capacity rows


# The paper's high/low-correlated tasks for Fig. 9: scripts/plotting/crosstask_accuracy.py's cross_task_map.
CROSS_TASK_MAP = {0: {"copa": {"high": "winogrande", "low": "record"}, "winogrande": {"high": "copa", "low": "record"},
                      "record": {"high": "rte", "low": "openbookqa"}},
                  1: {"copa": {"high": "wsc", "low": "record"}, "winogrande": {"high": "copa", "low": "record"},
                      "record": {"high": "hellaswag", "low": "wic"}},
                  5: {"copa": {"high": "wsc", "low": "record"}, "winogrande": {"high": "boolq", "low": "record"},
                      "record": {"high": "hellaswag", "low": "wic"}}}


def test_the_paper_preset_runs_fig9_transfer():
    """experiment=paper: transfer after the shards, with the paper's high/low-correlated rankings."""
    cfg = compose("experiment=paper")
    assert cfg["sweep"]["transfer"] is True and cfg["transfer"]["high_low"] == CROSS_TASK_MAP
    assert set(cfg["transfer"]["sources"]) == set(cfg["sweep"]["tasks"])  # the aggregate of all 14 tasks
    assert len(transfer_cfgs(cfg)) == len(cfg["sweep"]["tasks"]) * len(cfg["sweep"]["shots"])
    assert high_low_for(cfg["transfer"]["high_low"], 1, "copa") == {"high": "wsc", "low": "record"}
    assert high_low_for(cfg["transfer"]["high_low"], 1, "rte") == {}


@pytest.mark.slow  # a local sweep (submitit processes)
def test_the_reducer_draws_fig9_with_high_and_low_rankings(sweep_store, tmp_path):
    root, cfg, _ = sweep_store
    root2 = tmp_path / "store"
    shutil.copytree(root, root2)
    c = {**cfg, "store": {**cfg["store"], "root": str(root2)}, "task": "rte", "shot": 1,
         "transfer": {**cfg["transfer"], "high_low": {1: {"rte": {"high": "copa", "low": "rte"}}}}}
    res = run_transfer(c, lm=get_model(MODEL))
    ranks = read_tensors(Shard(root2, MODEL, "rte", 1).path / "transfer" / "rankings.safetensors")
    imp = {t: Shard(root2, MODEL, t, 1).importance()["heads"] for t in ("copa", "rte")}
    assert torch.equal(ranks["high_copa"], imp["copa"]) and torch.equal(ranks["low_rte"], imp["rte"])
    assert {"high_copa", "low_rte"} <= set(res["curves"])
    out = report.reduce_store(root2, MODEL, out_dir=tmp_path / "s")
    assert "fig9_transfer.png" in out["figures"]
    drawn = {r["ranking"] for r in report.transfer_table(collect(root2, MODEL)) if r["task"] == "rte"}
    assert {"own", "aggregate", "high_copa", "low_rte"} <= drawn
