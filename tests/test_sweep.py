"""The batch job end to end: local executor, and (marked slurm) real arrays on the local cluster."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from icl_scale.report import collect
from icl_scale.slurm_env import SKIP_REASON, slurm_status
from icl_scale.store import Shard, read_tensors
from icl_scale.sweep import submit

from conftest import REPO, compose, data_dir
from fault_injection import hold_env
from wandb_offline import find_offline_runs, read_offline_run

SMALL = ["model=tiny-opt", "eval.limit=12", "importance.n_examples=8", "importance.batch_size=4",
         "knockout.limit=6", "pruning.levels=[0,50]", "pruning.combined_levels=[0,50]", "progress=false",
         "importance.checkpoint_every=1", "induction.n_seeds=3"]


def cfg_for(root, *extra):
    return compose(*SMALL, f"store.root={root}", f"data.dir={data_dir()}", f"wandb.dir={root}", *extra)


def snapshot(path: Path) -> dict:
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != "manifest.json" and "checkpoint" not in p.parts:
            rel = str(p.relative_to(path))
            out[rel] = ({k: v.tolist() for k, v in read_tensors(p).items()} if p.suffix == ".safetensors"
                        else p.read_text())
    return out


def wandb_runs(root: Path) -> dict:
    runs = {}
    for d in find_offline_runs(root):
        info = read_offline_run(d)
        runs.setdefault(info["name"], []).append(info)
    return runs


@pytest.mark.slow
def test_local_sweep_end_to_end(tmp_path, mirror):
    cfg = cfg_for(tmp_path, "sweep.tasks=[copa]", "sweep.shots=[1]", "sweep.induction=false", "sweep.name=t")
    sub = submit(cfg)
    assert len(sub.shard_jobs) == 1 and sub.reduce_job.done()
    res = sub.reduce_job.result()
    assert res["n_complete"] == 1 and res["problems"] == []
    assert Shard(tmp_path, "tiny-opt", "copa", 1).is_complete()
    summary = tmp_path / "tiny-opt" / "summary"
    assert (summary / "summary.csv").exists() and (summary / "fig5_curves_heads.png").exists()
    runs = wandb_runs(tmp_path)
    assert set(runs) == {"copa-1shot-seed0", "reduce-tiny-opt"}
    shard_runs = runs["copa-1shot-seed0"]  # the shard's live run, resumed by the reducer: one run id
    assert len({r["run_id"] for r in shard_runs}) == 1 and len(shard_runs) == 2
    assert any("importance/done" in row for row in shard_runs[0]["history"])  # logged while it ran
    curves = next(r["tables"]["curves"] for r in shard_runs if "curves" in r["tables"])
    assert curves["columns"][:3] == ["kind", "head_level", "ffn_level"] and len(curves["data"]) == 8
    # A second submission does no work.
    again = submit(cfg)
    assert again.all_jobs() == [] and again.skipped == ["copa/1shot/seed0"]


def test_bad_launcher_and_store(tmp_path):
    with pytest.raises(ValueError, match="launcher='nope' is unknown"):
        submit(cfg_for(tmp_path, "launcher.name=nope"))
    (tmp_path / "f").write_text("")
    from icl_scale.store import StoreError

    with pytest.raises(StoreError, match="not writable"):
        submit(cfg_for(tmp_path / "f" / "x"))


# --- the real Slurm cluster -------------------------------------------------------------------------

slurm = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    st = slurm_status(timeout=10)
    if not (st.ok and st.accounting):
        pytest.skip(f"{SKIP_REASON} ({st.reason})")
    return st


SLURM = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=null", "launcher.timeout_min=20"]


def make_sweep(*args, timeout=600):
    """`make sweep` exactly as a user runs it."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    quoted = " ".join(f"'{a}'" for a in args)
    p = subprocess.run(["make", "-s", "sweep", f"ARGS={quoted}"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout


def slurm_args(root):
    return [*SMALL, *SLURM, f"store.root={root}", f"data.dir={data_dir()}", f"wandb.dir={root}",
            "sweep.name=it", "sweep.wait=true"]


@pytest.fixture(scope="module")
def slurm_store(cluster, tmp_path_factory):
    """A 4-shard `make sweep` on the local cluster: (store root, its output)."""
    root = tmp_path_factory.mktemp("slurm_store")
    return root, make_sweep(*slurm_args(root), "sweep.tasks=[copa,rte]", "sweep.shots=[0,1]")


@slurm
def test_make_sweep_on_slurm(slurm_store):
    root, out = slurm_store
    assert "4 shard jobs" in out and "reducer" in out, out
    # 4 array elements + induction + reducer, all seen by Slurm accounting as COMPLETED.
    ids = [line for line in out.splitlines() if line.startswith("sweep it (slurm)")]
    assert ids, out
    col = collect(root, "tiny-opt", [(t, s) for t in ("copa", "rte") for s in (0, 1)])
    assert len(col.ok) == 4 and col.problems == []
    assert (root / "tiny-opt" / "induction" / "scores.safetensors").exists()
    summary = json.loads((root / "tiny-opt" / "summary" / "summary.json").read_text())
    assert summary["n_complete"] == 4 and summary["has_induction"]
    runs = wandb_runs(root)
    shards = {f"{t}-{k}shot-seed0" for t in ("copa", "rte") for k in (0, 1)}
    assert shards | {"reduce-tiny-opt"} <= set(runs)
    red = runs["reduce-tiny-opt"][-1]
    assert {r[1] for r in red["tables"]["summary"]["data"]} == {"copa", "rte"}
    assert red["group"] == "it" and runs["rte-1shot-seed0"][0]["job_type"] == "shard"
    # A second `make sweep` submits nothing and changes nothing.
    before = {str(p): p.stat().st_mtime_ns for p in (root / "tiny-opt").rglob("*") if p.is_file()}
    out2 = make_sweep(*slurm_args(root), "sweep.tasks=[copa,rte]", "sweep.shots=[0,1]")
    assert "nothing submitted" in out2
    assert {str(p): p.stat().st_mtime_ns for p in (root / "tiny-opt").rglob("*") if p.is_file()} == before


@slurm
def test_requeued_shard_resumes_to_identical_store(cluster, slurm_store, tmp_path, mirror, monkeypatch):
    ref_root = slurm_store[0]  # the same shard, uninterrupted
    # The first run holds after its importance stage while `hold` exists, so the requeue below always
    # lands mid-run (a tiny shard can otherwise finish before the requeue arrives); the resumed run
    # does not hold.
    hold = tmp_path / "hold"
    hold.touch()
    for k, v in hold_env("importance", hold).items():  # the Slurm job inherits this environment
        monkeypatch.setenv(k, v)
    cfg = compose(*slurm_args(tmp_path / "store"), "sweep.tasks=[rte]", "sweep.shots=[1]", "sweep.induction=false")
    sub = submit(cfg, wait=False)
    (job,) = sub.shard_jobs
    shard = Shard(tmp_path / "store", "tiny-opt", "rte", 1)
    t0 = time.time()
    while not (shard.path / "checkpoint" / "importance_state.safetensors").exists():
        assert time.time() - t0 < 300, "shard never reached the importance stage"
        assert not job.done(), "shard ended before it could be requeued"
        time.sleep(0.2)
    assert not shard.is_complete()
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    sub.reduce_job.result()
    assert job.result()["status"] == "complete"
    acct = subprocess.run(["sacct", "-j", job.job_id, "-n", "-X", "-D", "-o", "State"], capture_output=True,
                          text=True).stdout.split()
    assert "REQUEUED" in acct or len(acct) > 1, acct  # it really ran twice
    got = snapshot(shard.path)
    assert got == snapshot(Shard(ref_root, "tiny-opt", "rte", 1).path)


@slurm
def test_failing_shard_is_named_by_reducer(cluster, tmp_path, mirror):
    bad = tmp_path / "data"
    for task in ("copa", "rte"):
        shutil.copytree(mirror / task, bad / task)
    rows = (bad / "rte" / "validation.jsonl").read_text().splitlines()
    row = json.loads(rows[3])
    del row["hypothesis"]
    rows[3] = json.dumps(row)
    (bad / "rte" / "validation.jsonl").write_text("\n".join(rows) + "\n")
    root = tmp_path / "store"
    out = make_sweep(*slurm_args(root), f"data.dir={bad}", "sweep.tasks=[copa,rte]", "sweep.shots=[0]",
                     "sweep.induction=false")
    assert "problem: tiny-opt/rte/0shot/seed0: failed" in out and "hypothesis" in out, out
    summary = json.loads((root / "tiny-opt" / "summary" / "summary.json").read_text())
    assert summary["n_complete"] == 1 and [r["task"] for r in summary["summary"]] == ["copa"]
    assert "hypothesis" in summary["problems"][0]["reason"]


@pytest.mark.slow
def test_demo_entry_point_on_a_tiny_model(tmp_path):
    """`make run`'s script end to end (the demo experiment on tiny-opt) as on a fresh offline machine:
    no data settings, so the embedded slice; model summary, induction, 4 shards, reducer, and the
    closing line naming the figures."""
    env = {k: v for k, v in os.environ.items() if k != "ICL_SCALE_DATA_DIR"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    p = subprocess.run([sys.executable, "jobs/demo.py", "model=tiny-opt", f"store.root={tmp_path}", "progress=false"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "model tiny-opt:" in p.stdout and "per-token loss" in p.stdout
    assert "task data: copa from embedded, arc_easy from embedded" in p.stdout
    manifest = json.loads((tmp_path / "tiny-opt" / "copa" / "1shot" / "seed0" / "manifest.json").read_text())
    assert manifest["data_sources"]["train"].startswith("embedded slice")
    summary = json.loads((tmp_path / "tiny-opt" / "summary" / "summary.json").read_text())
    assert summary["n_complete"] == 4 and summary["has_induction"]
    expected = {(t, s) for t in ("copa", "arc_easy") for s in (0, 1)}
    assert {(r["task"], r["shot"]) for r in summary["summary"]} == expected
    for r in summary["summary"]:  # the demo's few docs cannot resolve 1 point, and its summary says so
        assert f"(n={r['n_eval']}); heads prunable within 1 point: {r['heads_prunable']}" in p.stdout
        assert r["heads_prunable"].startswith(f"too few docs to tell (n={r['n_eval']}: one doc is")
    assert f"figures and report.md in {tmp_path / 'tiny-opt' / 'summary'}" in p.stdout
    assert (tmp_path / "tiny-opt" / "summary" / "fig5_curves_heads.png").exists()


# --- a sweep over two models (sweep.models): each model's shards and reducer, then the cross-model one -----

TINY_TWO = "sweep.models=[tiny-llama,{preset: tiny-llama, name: tiny-llama-4l, config: {num_hidden_layers: 4}}]"


def check_two_model_store(root: Path, name: str, models: list[str]) -> dict:
    """Each model's shard and summary, the sweep's one manifest, the cross-model summary and W&B runs."""
    for m in models:
        assert Shard(root, m, "copa", 1).is_complete()
        assert (root / m / "summary" / "fig5_curves_heads.png").exists()
    manifest = json.loads((root / "_sweeps" / name / "manifest.json").read_text())
    assert [m["name"] for m in manifest["models"]] == models and manifest["tasks"] == ["copa"]
    assert all(m["shards"] == ["copa/1shot/seed0"] and m["jobs"]["shards"] and m["jobs"]["reduce"]
               for m in manifest["models"])
    summary = root / "_sweeps" / name / "summary"
    scale = json.loads((summary / "scale.json").read_text())
    assert {m["model"] for m in scale["models"]} == set(models) and scale["problems"] == []
    recorded = {m: json.loads(Shard(root, m, "copa", 1).file("manifest.json").read_text())["parameters"]
                for m in models}
    assert {m["model"]: m["parameters"] for m in scale["models"]} == recorded  # the loaded models' counts
    assert {(r["model"], r["kind"]) for r in scale["prunable"]} == {(m, k) for m in models for k in ("heads", "ffn")}
    assert all(0 <= r["fraction"] <= 0.5 for r in scale["prunable"]) and len(scale["depth"]) == 2
    assert set(scale["figures"]) == {"scale_prunable.png", "scale_depth.png"}
    assert all((summary / f).stat().st_size > 1000 for f in scale["figures"])
    assert "the role of scale over 2 models" in (summary / "report.md").read_text()
    runs = wandb_runs(root)
    assert {f"reduce-{m}" for m in models} | {f"reduce-scale-{name}"} <= set(runs)
    assert runs[f"reduce-scale-{name}"][-1]["job_type"] == "reduce_scale"
    return scale


@pytest.mark.slow
def test_two_model_sweep_with_the_embedded_model_locally(tmp_path, mirror):
    """A random tiny model and the real SmolLM2-135M, through shards, each reducer and the cross-model one."""
    cfg = cfg_for(tmp_path, "sweep.models=[tiny-opt,smollm2-135m]", "sweep.tasks=[copa]", "sweep.shots=[1]",
                  "sweep.induction=false", "sweep.name=two-local", "knockout.split=heldout")
    sub = submit(cfg)
    assert set(sub.models) == {"tiny-opt", "smollm2-135m"} and len(sub.shard_jobs) == 2
    res = sub.reduce_job.result()
    assert res["n_complete"] == 2 and res["problems"] == [] and len(res["figures"]) == 2
    scale = check_two_model_store(tmp_path, "two-local", ["tiny-opt", "smollm2-135m"])
    assert [m["model"] for m in scale["models"]] == ["tiny-opt", "smollm2-135m"]  # by size
    assert 134_000_000 < scale["models"][1]["parameters"] < 135_000_000
    again = submit(cfg)  # nothing left to do
    assert again.all_jobs() == [] and again.skipped == ["tiny-opt/copa/1shot/seed0", "smollm2-135m/copa/1shot/seed0"]


@slurm
@pytest.mark.slow
def test_two_model_sweep_on_slurm(cluster, tmp_path):
    """`jobs/sweep.py` with two tiny models of different depth on the local cluster: two arrays, two
    induction jobs, two reducers and the cross-model reducer after them (afterany)."""
    root = tmp_path / "store"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    p = subprocess.run([sys.executable, str(REPO / "jobs" / "sweep.py"), *slurm_args(root), TINY_TWO,
                        "sweep.tasks=[copa]", "sweep.shots=[1]", "sweep.name=two-slurm",
                        f"launcher.folder={tmp_path / 'submitit'}"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "2 shard jobs" in p.stdout and "of 2 models (tiny-llama, tiny-llama-4l)" in p.stdout, p.stdout
    scale = check_two_model_store(root, "two-slurm", ["tiny-llama", "tiny-llama-4l"])
    assert {m["model"]: m["n_layers"] for m in scale["models"]} == {"tiny-llama": 2, "tiny-llama-4l": 4}
