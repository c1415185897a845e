"""The reducer on a synthetic store: one real tiny shard, copied and altered. A shard whose files do
not have the shape the reducer reads is named as corrupt (file and field) and the others are still
aggregated; shards made with other settings are aggregated and named in warnings."""

import json
import shutil
import subprocess
import sys

import pytest

from icl_scale import report
from icl_scale.shard import run_shard
from icl_scale.store import Shard, write_tensors

from conftest import REPO, get_model, tiny_shard_cfg

MODEL = "tiny-opt"
FIGURES = {"fig5_curves_heads.png", "fig6_curves_ffn.png", "fig3_importance.png", "fig4_ffn_knockout.png"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A store with one complete tiny shard (copa, 1 shot)."""
    root = tmp_path_factory.mktemp("base")
    run_shard(tiny_shard_cfg(root, "copa", 1), lm=get_model(MODEL))
    return root


def clone(base, root, task, shot, config=None, manifest=None):
    """Copy the base shard to <root>/tiny-opt/<task>/<shot>shot, its recorded task/shot rewritten
    (a faithful shard of that cell); `config`: {"section.key": value} changes in the manifest's config."""
    src, dst = Shard(base, MODEL, "copa", 1), Shard(root, MODEL, task, shot)
    shutil.copytree(src.path, dst.path)
    m = json.loads(dst.file("manifest.json").read_text())
    m["config"].update(task=task, shot=shot)
    for key, v in (config or {}).items():
        section, name = key.split(".")
        m["config"][section][name] = v
    m.update(manifest or {})
    dst.file("manifest.json").write_text(json.dumps(m))
    c = json.loads(dst.file("curves.json").read_text())
    c.update(task=task, shot=shot)
    dst.file("curves.json").write_text(json.dumps(c))
    return dst


def store(base, root, cells=(("copa", 0), ("copa", 1), ("rte", 1))):
    return {cell: clone(base, root, *cell) for cell in cells}


def edit_json(sh, name, fn):
    p = sh.file(name)
    p.write_text(json.dumps(fn(json.loads(p.read_text()))))


def without(d, key):
    return {k: v for k, v in d.items() if k != key}


def _heads_row(c, i, fn):
    c["heads"][i] = fn(c["heads"][i])
    return c


def _metric(c, fn):
    m = c["heads"][0]["metrics"][c["metric"]]
    c["heads"][0]["metrics"][c["metric"]] = fn(m)
    return c


# (file, how it is altered, the reason the reducer gives)
BAD = [
    ("curves.json", lambda c: {}, "curves.json: lacks 'metric'"),
    ("curves.json", lambda c: {"heads": 3}, "curves.json: lacks 'metric'"),
    ("curves.json", lambda c: [c], "curves.json: is a list of 1, expected an object"),
    ("curves.json", lambda c: {**c, "heads": 3}, "curves.json: heads is 3, expected a list of rows"),
    ("curves.json", lambda c: without(c, "ffn"), "curves.json: lacks 'ffn'"),
    ("curves.json", lambda c: _heads_row(c, 1, lambda r: without(r, "metrics")),
     "curves.json: heads[1] lacks 'metrics'"),
    ("curves.json", lambda c: _heads_row(c, 0, lambda r: {**r, "level": "0"}),
     "curves.json: heads[0].level is '0', expected a number"),
    ("curves.json", lambda c: _heads_row(c, 1, lambda r: {**r, "metrics": {"f1": r["metrics"]["acc"]}}),
     "curves.json: heads[1].metrics lacks 'acc'"),
    ("curves.json", lambda c: _metric(c, lambda m: {**m, "ci95": [0.1]}),
     "curves.json: heads[0].metrics.acc.ci95 is a list of 1, expected 2 numbers [lo, hi]"),
    ("curves.json", lambda c: _metric(c, lambda m: without(m, "n")), "curves.json: heads[0].metrics.acc lacks 'n'"),
    ("curves.json", lambda c: {**c, "combined": [without(c["combined"][0], "ffn_level")]},
     "curves.json: combined[0] lacks 'ffn_level'"),
    ("curves.json", lambda c: {**c, "heads_by": {"heads_random0": [{"level": 0}]}},
     "curves.json: heads_by.heads_random0[0] lacks 'value'"),
    ("curves.json", lambda c: {**c, "n_eval": "12"}, "curves.json: n_eval is '12', expected a count"),
    ("curves.json", lambda c: {**c, "task": "copa"}, "curves.json is for tiny-opt/copa/1shot/seed0 but the folder is "
                                                     "tiny-opt/rte/1shot/seed0"),
    ("manifest.json", lambda m: [m], "manifest.json: is a list of 1, expected an object"),
    ("manifest.json", lambda m: {**m, "timings": 3}, "manifest.json: timings is 3, expected an object"),
    ("manifest.json", lambda m: {**m, "config": {**m["config"], "task": "copa"}},
     "manifest.json: config is for tiny-opt/copa/1shot/seed0 but the folder is tiny-opt/rte/1shot/seed0"),
]


@pytest.mark.parametrize("name,alter,reason", BAD, ids=[f"{i}-{b[2][:40]}" for i, b in enumerate(BAD)])
def test_a_shard_of_the_wrong_shape_is_named_and_the_rest_aggregated(base, tmp_path, name, alter, reason):
    """Regression (issue #10): valid JSON of the wrong shape crashed the whole reduction (KeyError,
    TypeError...) and a copied folder was aggregated as the cell it sits in."""
    shards = store(base, tmp_path)
    edit_json(shards[("rte", 1)], name, alter)
    drawn = alter is BAD[0][1]  # drawing every figure once is enough (and takes seconds)
    res = report.reduce_store(tmp_path, MODEL, [("copa", 0), ("copa", 1), ("rte", 1)], figures=drawn)
    assert [(p["shard"], p["status"]) for p in res["problems"]] == [("tiny-opt/rte/1shot/seed0", "corrupt")]
    assert len(res["problems"][0]["reason"].splitlines()) == 1
    assert res["problems"][0]["reason"].startswith(reason), res["problems"]
    out = tmp_path / MODEL / "summary"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_complete"] == 2 and summary["problems"] == res["problems"]
    assert [(r["task"], r["shot"]) for r in summary["summary"]] == [("copa", 0), ("copa", 1)]
    assert (out / "summary.csv").read_text().count("\n") == 3 and (out / "curves.csv").exists()
    assert not drawn or FIGURES <= set(res["figures"]) and all((out / f).stat().st_size > 0 for f in FIGURES)
    assert summary["warnings"] == []  # the good shards agree


@pytest.mark.parametrize("name,content,reason", [
    ("curves.json", b"{not json", "curves.json: not valid JSON"),
    ("curves.json", b"\xff\xfe\x00garbage", "curves.json: unreadable"),
    ("importance.safetensors", b"not safetensors", "importance.safetensors: not a readable safetensors file"),
    ("manifest.json", b"", "manifest.json: not valid JSON"),
])
def test_unreadable_files_are_named(base, tmp_path, name, content, reason):
    shards = store(base, tmp_path, (("copa", 1), ("rte", 1)))
    shards[("rte", 1)].file(name).write_bytes(content)
    res = report.reduce_store(tmp_path, MODEL, figures=False)
    assert [p["shard"] for p in res["problems"]] == ["tiny-opt/rte/1shot/seed0"]
    assert res["problems"][0]["reason"].startswith(reason)
    assert res["n_complete"] == 1


def test_bad_importance_tensors_are_named(base, tmp_path):
    shards = store(base, tmp_path, (("copa", 1), ("rte", 1), ("rte", 0)))
    imp = shards[("copa", 1)].importance()
    write_tensors(shards[("rte", 1)].file("importance.safetensors"), {k: v for k, v in imp.items() if k != "ffn"})
    write_tensors(shards[("rte", 0)].file("importance.safetensors"), {**imp, "ffn_knockout": imp["ffn"][:1].clone()})
    res = report.reduce_store(tmp_path, MODEL, figures=False)
    reasons = {p["shard"]: p["reason"] for p in res["problems"]}
    assert reasons == {"tiny-opt/rte/1shot/seed0": "importance.safetensors: lacks 'ffn'",
                       "tiny-opt/rte/0shot/seed0":
                           "importance.safetensors: inconsistent shapes: heads (2, 4), ffn (2,), "
                                             "ffn_knockout (1,) (one layer count expected)"}
    assert res["n_complete"] == 1


def test_shards_with_different_settings_are_flagged_and_still_aggregated(base, tmp_path):
    clone(base, tmp_path, "copa", 1)
    clone(base, tmp_path, "copa", 0)
    clone(base, tmp_path, "rte", 1, config={"importance.n_examples": 16, "eval.limit": None})
    res = report.reduce_store(tmp_path, MODEL, figures=False)
    assert res["n_complete"] == 3 and res["problems"] == []
    assert res["warnings"] == ["tiny-opt/rte/1shot/seed0: different settings: eval.limit=null vs 12 in the other "
                               "2 shards; "
                               "importance.n_examples=16 vs 8 in the other 2 shards (aggregated all the same)"]
    assert res["mixed_settings"] == [{"shard": "tiny-opt/rte/1shot/seed0", "keys": {
        "eval.limit": {"value": None, "others": 12}, "importance.n_examples": {"value": 16, "others": 8}}}]
    summary = json.loads((tmp_path / MODEL / "summary" / "summary.json").read_text())
    assert summary["warnings"] == res["warnings"] and summary["mixed_settings"] == res["mixed_settings"]
    assert len(summary["summary"]) == 3


def test_same_task_rows_must_match_across_shots_and_sources_are_compared(base, tmp_path):
    """The per-task data fingerprints agree across a task's shots; where the data came from agrees
    across all shards."""
    clone(base, tmp_path, "copa", 1)
    clone(base, tmp_path, "copa", 0, config={"data.train": "0000000000000000"})
    clone(base, tmp_path, "rte", 1, manifest={"data_sources": {"train": "hub super_glue/rte",
                                                                "validation": "hub super_glue/rte"}})
    res = report.reduce_store(tmp_path, MODEL, figures=False)
    assert res["n_complete"] == 3
    m = Shard(base, MODEL, "copa", 1).manifest()
    train, source = m["config"]["data"]["train"], m["data_sources"]["train"]
    # copa 0 and 1 shot disagree one to one: the first (0 shot) is the reference, the other is named.
    assert res["warnings"] == [
        f"tiny-opt/copa/1shot/seed0: different settings: data.train={train} vs 0000000000000000 in the other shard "
        "(aggregated all the same)",
        f"tiny-opt/rte/1shot/seed0: different settings: data.source=hub vs {source} in the other 2 shards "
        "(aggregated all the same)"]


def test_missing_failed_running_and_corrupt_induction_are_named(base, tmp_path):
    clone(base, tmp_path, "copa", 1)
    clone(base, tmp_path, "rte", 1, manifest={"status": "failed", "error": "RuntimeError: boom"})
    clone(base, tmp_path, "rte", 0, manifest={"status": "running"})
    (tmp_path / MODEL / "boolq" / "1shot" / "seed0").mkdir(parents=True)  # a job that died before its manifest
    ind = tmp_path / MODEL / "induction" / "scores.safetensors"
    ind.parent.mkdir()
    ind.write_bytes(b"truncated")
    expected = [("copa", 1), ("rte", 1), ("rte", 0), ("boolq", 1), ("wic", 0)]
    res = report.reduce_store(tmp_path, MODEL, expected)
    got = {p["shard"]: (p["status"], p["reason"]) for p in res["problems"]}
    assert got["tiny-opt/rte/1shot/seed0"] == ("failed", "RuntimeError: boom")
    assert got["tiny-opt/rte/0shot/seed0"][0] == "running"
    assert got["tiny-opt/boolq/1shot/seed0"] == ("incomplete", "no manifest")
    assert got["tiny-opt/wic/0shot/seed0"][0] == "missing"
    status, reason = got["tiny-opt/induction"]
    assert status == "corrupt" and reason.startswith("scores.safetensors: not a readable safetensors file")
    assert "rerun `python jobs/induction.py model=tiny-opt`" in reason
    assert len(got) == 5
    assert res["n_complete"] == 1 and not res["has_induction"] and FIGURES <= set(res["figures"])
    summary = json.loads((tmp_path / MODEL / "summary" / "summary.json").read_text())
    assert [(r["task"], r["shot"]) for r in summary["summary"]] == [("copa", 1)]


def test_the_reducer_job_prints_problems_and_warnings(base, tmp_path):
    """jobs/reduce.py end to end: a corrupt, a missing and a mixed shard are one line each."""
    shards = store(base, tmp_path, (("copa", 0), ("copa", 1)))
    clone(base, tmp_path, "rte", 0, config={"importance.n_examples": 16})
    edit_json(shards[("copa", 0)], "curves.json", lambda c: {**c, "ffn": {}})
    r = subprocess.run([sys.executable, "jobs/reduce.py", f"model={MODEL}", f"store.root={tmp_path}",
                        "sweep.tasks=[copa,rte]", "sweep.shots=[0,1]", "wandb.mode=disabled"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert ("  problem: tiny-opt/copa/0shot/seed0: corrupt (curves.json: ffn is an object, expected a list of "
            "rows)") in lines
    assert any(line.startswith("  problem: tiny-opt/rte/1shot/seed0: missing") for line in lines), r.stdout
    assert ("  warning: tiny-opt/rte/0shot/seed0: different settings: importance.n_examples=16 vs 8 in the other shard "
            "(aggregated all the same)") in lines, r.stdout
    assert lines[-1].startswith("reduced 2 shards (2 problems, 1 warnings)"), r.stdout
