"""One writer per shard (icl_scale.lease): a live lease refuses a second run and keeps the sweep from
submitting the shard; a stale one (old heartbeat, or a killed holder on this host) is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from icl_scale.lease import LEASE, LOCK, LeaseHeld, ShardLease, read_holder
from icl_scale.store import Shard
from icl_scale.sweep import submit

from conftest import REPO, data_dir, tiny_shard_cfg
from fault_injection import hold_env


def _fake_lease(folder: Path, host: str, pid: int, age_s: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    t = time.time() - age_s
    (folder / LEASE).write_text(json.dumps({"job_id": "4242_3", "host": host, "pid": pid, "start": t, "heartbeat": t}))


def test_second_holder_is_refused_and_heartbeat_refreshes(tmp_path):
    with ShardLease(tmp_path, timeout_s=1):
        first = read_holder(tmp_path)["heartbeat"]
        with pytest.raises(LeaseHeld, match=rf"is being computed by job local \(host {socket.gethostname()}, pid "
                                            rf"{os.getpid()}, started .*store.lease_timeout_s"):
            ShardLease(tmp_path, timeout_s=1).__enter__()
        time.sleep(0.5)  # heartbeats every 0.1 s
        assert read_holder(tmp_path)["heartbeat"] > first
    assert not (tmp_path / LEASE).exists() and not (tmp_path / LOCK).exists()


def test_stale_leases_are_taken_over(tmp_path):
    _fake_lease(tmp_path, "node-elsewhere", 1, age_s=5)
    with pytest.raises(LeaseHeld, match="job 4242_3 \\(host node-elsewhere, pid 1"):
        ShardLease(tmp_path, timeout_s=60).__enter__()  # heartbeat 5 s old, timeout 60 s: live
    with ShardLease(tmp_path, timeout_s=2):  # 5 s old, timeout 2 s: a dead job's
        assert read_holder(tmp_path)["pid"] == os.getpid()
    dead = subprocess.Popen(["true"])
    dead.wait()
    _fake_lease(tmp_path, socket.gethostname(), dead.pid, age_s=0)  # fresh, but its process is gone
    with ShardLease(tmp_path, timeout_s=600):
        assert read_holder(tmp_path)["pid"] == os.getpid()


def test_sweep_does_not_submit_a_shard_with_a_live_lease(tmp_path):
    cfg = tiny_shard_cfg(tmp_path / "store", "copa", 1, "tiny-opt", "sweep.tasks=[copa]", "sweep.shots=[1]",
                         "sweep.induction=false", f"launcher.folder={tmp_path / 'submitit'}")
    _fake_lease(Shard(tmp_path / "store", "tiny-opt", "copa", 1).path, "node-elsewhere", 7, age_s=1)
    sub = submit(cfg)
    assert sub.running == ["copa/1shot/seed0"] and not sub.all_jobs()


def _score(root: Path, hold: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("ICL_SCALE_DEBUG", None)
    if hold:
        env = hold_env("importance", hold, env)
    args = ["model=tiny-opt", "task=copa", "shot=1", f"data.dir={data_dir()}", "eval.limit=6",
            "importance.n_examples=4", "importance.batch_size=2", "pruning.levels=[0,50]",
            "pruning.combined_levels=[0,50]", "progress=false",
            f"store.root={root}", "wandb.mode=disabled"]
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "score.py"), *args], env=env, cwd=root.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_importance(root: Path, proc: subprocess.Popen) -> Path:
    folder = Shard(root, "tiny-opt", "copa", 1).path
    t0 = time.time()
    while not (folder / "checkpoint" / "importance_state.safetensors").exists():
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()
        time.sleep(0.2)
    return folder


@pytest.mark.slow
def test_two_concurrent_runs_then_a_killed_holder(tmp_path):
    root, hold = tmp_path / "store", tmp_path / "hold"
    root.mkdir()
    hold.touch()
    first = _score(root, hold)
    folder = _wait_for_importance(root, first)  # holds after importance, lease live
    second = _score(root)
    out, err = second.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"is being computed by job local (host {socket.gethostname()}, pid {first.pid}," in errors[0]
    assert json.loads((folder / "manifest.json").read_text())["status"] == "running"  # not marked failed

    first.send_signal(signal.SIGKILL)  # the holder dies; its lease stays behind
    first.wait()
    assert read_holder(folder)["pid"] == first.pid
    third = _score(root)
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-3000:]
    assert "taking over the stale lease of job local" in out + err and "done in" in out
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and not (folder / LEASE).exists()
