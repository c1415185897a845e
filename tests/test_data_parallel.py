"""Data-parallel ranks in one shard job (icl_scale.distributed): two CPU ranks over gloo, launched as
a user launches them (`torchrun --standalone --nproc_per_node 2 jobs/score.py ...`), with and
without ZeRO-3 (DeepSpeed's CPU accelerator), write the store one process writes: importance within
1e-5 relative, every knock-out and curve accuracy exactly, per-doc log-likelihoods within 1e-4 nats.
A 2-rank run killed in the middle of the importance pass resumes to the same store."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from icl_scale.distributed import balanced_slices, clear_stale_build_locks
from icl_scale.store import read_tensors

from conftest import REPO, assert_same_store, data_dir
from fault_injection import hold_env

SHARD = ["task=copa", "shot=1", "eval.limit=13", "importance.n_examples=9", "importance.batch_size=2",
         "knockout.limit=6", "pruning.levels=[0,50]", "pruning.combined_levels=[0,50]", "progress=false",
         "wandb.mode=disabled", "importance.checkpoint_every=1"]
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "ICL_SCALE_DATA_DIR": str(data_dir())}
ENV.pop("RANK", None)
ENV.pop("WORLD_SIZE", None)


def score(root: Path, model: str, *extra: str, ranks: int = 1, env=None, wait=True, shard=SHARD):
    launcher = [*TORCHRUN[:-1], str(ranks)] if ranks > 1 else [sys.executable]
    cmd = [*launcher, str(REPO / "jobs" / "score.py"), f"model={model}", f"store.root={root}", *shard, *extra]
    p = subprocess.Popen(cmd, cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    if not wait:
        return p
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
    return out


def kill_job(p: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks (each in a session of its own), as a preemption does."""
    import psutil  # a DeepSpeed dependency

    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for q in procs:
        q.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    p.wait()


def shard_dir(root: Path, model: str, task: str = "copa", shot: int = 1) -> Path:
    return root / model / task / f"{shot}shot" / "seed0"


def test_a_stale_extension_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, caplog):
    """A killed JIT build (DeepSpeed's CPU collectives) leaves `lock` in its build folder and torch waits
    on it forever; the job's start removes one older than the limit, never a build still running."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert clear_stale_build_locks(600) == [str(stale)]
    assert not stale.exists() and fresh.exists() and "did not finish" in caplog.text


def test_balanced_slices_are_deterministic_balanced_and_capped():
    costs = [9, 1, 8, 2, 7, 3]
    parts = balanced_slices(costs, 2)
    assert sorted(i for p in parts for i in p) == list(range(6))
    assert [sum(costs[i] for i in p) for p in parts] == [15, 15]
    assert balanced_slices(costs, 2) == parts and all(p == sorted(p) for p in parts)
    assert [len(p) for p in balanced_slices([5, 1, 1, 1], 2, cap=2)] == [2, 2]
    assert balanced_slices([3], 2) == [[0], []]  # fewer items than ranks: a rank with nothing


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, no ZeRO: the numbers every multi-rank run must reproduce."""
    root = tmp_path_factory.mktemp("one")
    for model in ("tiny-opt", "tiny-llama"):
        score(root, model)
    return root


@pytest.mark.slow  # torchrun ranks
@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
@pytest.mark.parametrize("zero", [False, True], ids=["replicas", "zero3"])
def test_two_ranks_write_the_one_process_store(reference, tmp_path, model, zero):
    extra = ["model.deepspeed.enabled=true"] if zero else []
    out = score(tmp_path, model, *extra, ranks=2)
    assert out.count("done in") == 2  # both ranks finished
    assert_same_store(shard_dir(reference, model), shard_dir(tmp_path, model))
    manifest = json.loads((shard_dir(tmp_path, model) / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["ranks"] == 2


@pytest.mark.slow  # torchrun ranks
def test_zero3_with_a_quarter_of_the_model_live_gathers_once_per_step_and_writes_the_one_process_store(
        reference, tmp_path):
    """Under ZeRO-3 with a live-parameter budget of a quarter of the model, the knock-outs (3 masks on
    tiny-opt) share packed calls, and so do the curves' masks (heads, FFN and the grid at 50%): at most
    two calls per stage on a rank's 7 docs, and the store is still the one process's. tiny-opt is
    mostly its tied embedding, which a quarter budget releases between the embedding and the
    unembedding: ~2 model-sized gathers per call (one mask per pass: 3 knock-outs x 3 calls)."""
    out = score(tmp_path, "tiny-opt", "model.deepspeed.enabled=true", "model.deepspeed.max_live_parameters=800000",
                ranks=2)
    assert out.count("done in") == 2
    assert_same_store(shard_dir(reference, "tiny-opt"), shard_dir(tmp_path, "tiny-opt"))
    stages = json.loads((shard_dir(tmp_path, "tiny-opt") / "manifest.json").read_text())["zero"]["stages"]
    assert stages["knockout"]["gathers"] <= 4.2 and stages["curves"]["gathers"] <= 4.2, stages


@pytest.mark.slow  # torchrun ranks
def test_shared_passes_under_zero3_on_two_ranks_equal_one_mask_per_pass_in_one_process(tmp_path):
    """Several masks per batched forward (eval.masks_per_pass) under ZeRO-3 on 2 ranks: the ranks'
    passes stay in call-lockstep (the placeholder calls select a mask too) and the store equals one
    process scoring one mask per pass."""
    levels = "pruning.levels=[0,25,50,75]"
    score(tmp_path / "one", "tiny-llama", levels, "eval.masks_per_pass=1")
    out = score(tmp_path / "zero", "tiny-llama", levels, "eval.masks_per_pass=3", "model.deepspeed.enabled=true",
                ranks=2)
    assert out.count("done in") == 2
    assert_same_store(shard_dir(tmp_path / "one", "tiny-llama"), shard_dir(tmp_path / "zero", "tiny-llama"))
    manifest = json.loads((shard_dir(tmp_path / "zero", "tiny-llama") / "manifest.json").read_text())
    assert manifest["evaluations_shared_pass"] >= 2 and manifest["ranks"] == 2


@pytest.mark.slow  # torchrun ranks
def test_two_ranks_killed_mid_importance_resume_to_the_same_store(reference, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    env = hold_env("importance@4", hold, ENV)
    p = score(tmp_path, "tiny-opt", ranks=2, env=env, wait=False)
    ckpt = shard_dir(tmp_path, "tiny-opt") / "checkpoint" / "importance_state.safetensors"
    t0 = time.time()
    while not ckpt.exists() and p.poll() is None and time.time() - t0 < 600:
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[0][-3000:]
    n_done = int(read_tensors(ckpt)["counts"][0])
    assert 4 <= n_done < 9  # stopped in the middle of the pass
    kill_job(p)
    hold.unlink()
    assert not (shard_dir(tmp_path, "tiny-opt") / "importance.safetensors").exists()
    out = score(tmp_path, "tiny-opt", ranks=2)
    assert out.count("done in") == 2
    assert_same_store(shard_dir(reference, "tiny-opt"), shard_dir(tmp_path, "tiny-opt"))


@pytest.mark.slow  # torchrun ranks
@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
def test_induction_scores_under_zero3_on_two_ranks_equal_one_process(tmp_path, model):
    """The copying score reads weights outside a forward pass (the OV circuit): under ZeRO-3 they are
    gathered first (induction/job.py), so two partitioned ranks give the plain run's scores."""
    args = [f"model={model}", "induction.n_seeds=6", "induction.progress=false", "wandb.mode=disabled"]
    job = str(REPO / "jobs" / "induction.py")
    for cmd, root in (([sys.executable, job], tmp_path / "one"),
                      ([*TORCHRUN, job, "model.deepspeed.enabled=true"], tmp_path / "two")):
        p = subprocess.run([*cmd, *args, f"store.root={root}"], cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    a, b = (read_tensors(tmp_path / r / model / "induction" / "scores.safetensors") for r in ("one", "two"))
    assert set(a) == set(b) and {"prefix_matching", "copying"} <= set(a)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    assert float(a["copying"].abs().max()) > 0


def test_bad_distributed_environment_is_one_line_error(monkeypatch):
    from icl_scale import distributed as D

    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match="RANK is set but WORLD_SIZE is not"):
        D.dist_env()
    # 2 ranks on a node with 4 visible GPUs: stopped before any model is loaded
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(RuntimeError, match=r"2 ranks on this node but 4 GPUs.*tasks_per_node=4"):
        D.check_gpus(D.DistEnv(0, 0, 2))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    D.check_gpus(D.DistEnv(0, 0, 2))  # one rank per GPU: fine


def test_bad_zero3_settings_fail_before_loading(tmp_path, monkeypatch):
    import importlib.util

    from icl_scale.shard import run_shard
    from icl_scale.validation import ConfigError

    from conftest import tiny_shard_cfg

    with pytest.raises(ConfigError, match="model.deepspeed.offload_param='nvme' is not an option; use one of none, "
                                          "cpu"):
        run_shard(tiny_shard_cfg(tmp_path, "copa", 1, "tiny-opt", "model.deepspeed.enabled=true",
                                 "model.deepspeed.offload_param=nvme"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match="needs DeepSpeed: pip install deepspeed"):
        run_shard(tiny_shard_cfg(tmp_path, "copa", 1, "tiny-opt", "model.deepspeed.enabled=true"))
    assert not (tmp_path / "tiny-opt").exists()  # nothing written


def _draw(seed: int) -> tuple[str, int, list[str]]:
    """A random small shard (seeded: a failure names its seed): task, shot, and the overrides."""
    rng = random.Random(seed)
    task, shot = rng.choice(["copa", "boolq", "winogrande"]), rng.choice([0, 1])
    max_length = rng.choice([None, 32, 48]) if task != "winogrande" else None
    return task, shot, [f"task={task}", f"shot={shot}", f"eval.limit={rng.randint(3, 12)}",
                        f"importance.n_examples={rng.randint(2, 7)}", f"importance.batch_size={rng.randint(1, 3)}",
                        f"eval.batch_size={rng.randint(1, 6)}", f"eval.masks_per_pass={rng.randint(1, 3)}",
                        f"knockout.limit={rng.randint(2, 4)}", "pruning.levels=[0,30,60]",
                        "pruning.combined_levels=[0,50]", "progress=false", "wandb.mode=disabled",
                        *([f"model.max_length={max_length}"] if max_length else [])]


@pytest.mark.slow
# (copa 0-shot max_length 32 on 2 ranks; winogrande 1-shot on 3)
@pytest.mark.parametrize("seed,ranks,batch", [(14, 2, "auto"), (5, 3, "drawn")])
def test_random_shards_under_zero3_on_2_and_3_ranks_write_the_one_process_store(tmp_path, seed, ranks, batch):
    """The pass schedule (scoring.Lockstep) keeps every rank in call-lockstep whatever its share:
    random draws of task, shot, limits, max_length, batch sizes and masks per pass finish on 2 and 3
    ZeRO-3 ranks and write what one process writes. (Single-process checks of the schedule over many
    more draws: test_lockstep.py.) On 2 ranks importance.batch_size=auto (sized from memory, the
    same on both ranks) against the one process's drawn size."""
    task, shot, shard = _draw(seed)
    score(tmp_path / "one", "tiny-opt", shard=shard)
    auto = ["importance.batch_size=auto"] if batch == "auto" else []
    out = score(tmp_path / "zero", "tiny-opt", "model.deepspeed.enabled=true", *auto, ranks=ranks, shard=shard)
    assert out.count("done in") == ranks, shard
    assert_same_store(shard_dir(tmp_path / "one", "tiny-opt", task, shot),
                      shard_dir(tmp_path / "zero", "tiny-opt", task, shot))
    manifest = json.loads((shard_dir(tmp_path / "zero", "tiny-opt", task, shot) / "manifest.json").read_text())
    if auto:  # CPU ranks hold the tiny model's steps easily: one step, each rank its share of the examples
        n = int(next(o for o in shard if o.startswith("importance.n_examples=")).split("=")[1])
        assert manifest["resolved"]["importance"]["batch_size"] == -(-n // ranks), manifest["resolved"]
        assert f"importance.batch_size={-(-n // ranks)} per rank per step (setting: auto)" in out
    # the gather counters: per stage, in the manifest and the stage log (none without ZeRO-3)
    zero = manifest["zero"]
    assert set(zero["stages"]) == {"importance", "knockout", "curves"}
    # (a whole forward gathers a little under the model: the persistent norms and biases never)
    assert all(s["gathers"] >= 0.5 and s["gathered_gb"] > 0 for s in zero["stages"].values()), zero
    total = sum(s["gathers"] for s in zero["stages"].values())
    assert abs(zero["total"]["gathers"] - total) <= 1e-2 * total
    assert "stage curves: " in out and "full-model gathers" in out
    assert json.loads((shard_dir(tmp_path / "one", "tiny-opt", task, shot) / "manifest.json").read_text())["zero"] == {}


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_promptly_and_is_named(tmp_path):
    """Rank 1 raises in its second importance batch and its own shutdown then hangs (tests/faulty_job.py);
    rank 0 waits for it inside a ZeRO-3 gather or the step's all-reduce. Every rank stops within 2
    minutes (the collective timeout is 10), and the job log and the manifest name rank 1 and its error."""
    env = {**ENV, "FAULT_RANK": "1", "FAULT_AT": "2", "ICL_SCALE_COLLECTIVE_TIMEOUT_MIN": "10",
           "PYTHONPATH": str(REPO)}
    cmd = [*TORCHRUN, str(REPO / "tests" / "faulty_job.py"), "model=tiny-opt", f"store.root={tmp_path}", *SHARD,
           "model.deepspeed.enabled=true"]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600, start_new_session=True)
    wall = time.time() - t0
    assert p.returncode != 0
    assert "rank 1/2 failed: ValueError: injected fault on rank 1" in p.stdout, p.stdout[-3000:]
    assert "rank 0/2 stops: rank 1 failed: ValueError: injected fault on rank 1" in p.stdout, p.stdout[-3000:]
    manifest = json.loads((shard_dir(tmp_path, "tiny-opt") / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["failed_rank"] == 1
    assert manifest["error"] == "rank 1/2: ValueError: injected fault on rank 1"
    assert wall < 120, wall  # model load and DeepSpeed start included


def run_job(script: str, root: Path, *args: str, ranks: int = 1) -> str:
    launcher = TORCHRUN if ranks == 2 else [sys.executable]
    p = subprocess.run([*launcher, str(REPO / "jobs" / script), "model=tiny-opt", f"store.root={root}", *args],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout


@pytest.mark.slow
def test_transfer_on_two_ranks_writes_what_one_process_writes(tmp_path):
    """The transfer run shares the shard's run skeleton (icl_scale/runs.py): its ranks join one
    process group, split the evaluations, and only rank 0 writes."""
    shard_args = [a for a in SHARD if not a.startswith("task=")]
    for task in ("copa", "rte"):
        run_job("score.py", tmp_path / "one", f"task={task}", *shard_args)
    import shutil

    shutil.copytree(tmp_path / "one", tmp_path / "two")
    transfer = [*shard_args, "task=rte", "transfer.sources=[copa,rte]", "transfer.rankings_from=[copa]"]
    out1 = run_job("transfer.py", tmp_path / "one", *transfer)
    out2 = run_job("transfer.py", tmp_path / "two", *transfer, ranks=2)
    assert out2.count("aggregate:") == 2 * out1.count("aggregate:") > 0  # both ranks ran it
    a, b = (root / "tiny-opt" / "rte" / "1shot" / "seed0" / "transfer" for root in (tmp_path / "one", tmp_path / "two"))
    ca, cb = (json.loads((d / "curves.json").read_text()) for d in (a, b))
    assert ca["curves"].keys() == cb["curves"].keys() == {"aggregate", "aggregate_without_rte", "from_copa"}
    for name in ca["curves"]:
        assert [r["value"] for r in ca["curves"][name]] == [r["value"] for r in cb["curves"][name]], name
    assert sorted(p.name for p in (a / "masks").iterdir()) == sorted(p.name for p in (b / "masks").iterdir())
    assert not (b / "checkpoint").exists() and not list(b.rglob(".*.tmp"))
