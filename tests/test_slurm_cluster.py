"""Real jobs on the local Slurm cluster (bash slurm/start.sh): submitit arrays, dependencies,
accounting, checkpoint/requeue, and a shard job of 2 tasks (ranks). Skipped when no cluster is
reachable. ~90 s in all."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from icl_scale.slurm_env import SKIP_REASON, slurm_status

submitit = pytest.importorskip("submitit")
import cloudpickle  # noqa: E402 - installed with submitit

pytestmark = pytest.mark.slurm

# The job processes cannot import this test module (tests/ is not a package on their sys.path):
# pickle its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 60
N_REQUEUE_STEPS = 30  # x 0.4 s


@pytest.fixture(scope="module", autouse=True)
def cluster():
    status = slurm_status(timeout=10)
    if not status.ok:
        pytest.skip(f"{SKIP_REASON} ({status.reason})")
    if not status.accounting:
        pytest.skip(f"{SKIP_REASON} ({status.reason})")
    return status


def _executor(folder: Path, partition: str, **params):
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition=partition, cpus_per_task=1, **params)
    return ex


def _wait(jobs, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while not all(j.done() for j in jobs):
        if time.time() > deadline:
            for j in jobs:
                j.cancel(check=False)
            pytest.fail(f"jobs {[j.job_id for j in jobs]} not done after {timeout} s: "
                        f"{[j.state for j in jobs]}")
        time.sleep(0.3)


def _sacct_states(job_ids: list[str], expect: int, timeout: float = 20.0) -> dict[str, str]:
    """JobID -> State from sacct, polled until `expect` finished rows arrive (slurmdbd lags a bit)."""
    deadline = time.time() + timeout
    states: dict[str, str] = {}
    while time.time() < deadline:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,State"],
            capture_output=True, text=True, check=True,
        ).stdout
        states = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
        if sum(s.split()[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states.values()) >= expect:
            return states
        time.sleep(0.5)
    return states


def _wait_for_file_int(path: Path, at_least: int, timeout: float = 30.0) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = int(path.read_text().strip() or -1)
        except (FileNotFoundError, ValueError):
            v = -1
        if v >= at_least:
            return v
        time.sleep(0.1)
    pytest.fail(f"{path} did not reach {at_least} within {timeout} s")


# ------------------------------------------------------------------------------- job functions


def square_to_file(x: int, out_dir: str) -> int:
    time.sleep(1.0)  # so that the dependent job, if started early, would find nothing
    Path(out_dir, f"{x}.txt").write_text(str(x * x))
    return x * x


def sum_files(out_dir: str, n_expected: int) -> tuple[int, int, str]:
    files = sorted(Path(out_dir).glob("*.txt"))
    return len(files), sum(int(f.read_text()) for f in files), os.environ.get("SLURM_JOB_ID", "")


class CountSteps(submitit.helpers.Checkpointable):
    """Counts to n_steps; its state (self.step, self.starts) survives preemption through checkpoint()."""

    def __init__(self) -> None:
        self.step = 0
        self.starts: list[int] = []

    def __call__(self, n_steps: int, progress_file: str, step_s: float) -> dict:
        self.starts.append(self.step)
        while self.step < n_steps:
            time.sleep(step_s)
            self.step += 1
            Path(progress_file).write_text(str(self.step))
        return {"starts": self.starts, "step": self.step, "job_id": os.environ.get("SLURM_JOB_ID")}


def count_with_file_checkpoint(n_steps: int, state_dir: str, step_s: float) -> dict:
    """Resumes from a progress file (no submitit checkpoint): used with an external scontrol requeue."""
    d = Path(state_dir)
    progress = d / "progress"
    start = int(progress.read_text()) if progress.exists() else 0
    with open(d / "runs", "a") as f:
        f.write(f"{os.getpid()} {start}\n")
    (d / "pid").write_text(str(os.getpid()))
    step = start
    while step < n_steps:
        time.sleep(step_s)
        step += 1
        progress.write_text(str(step))
    return {"start": start, "step": step, "pid": os.getpid()}


# ------------------------------------------------------------------------------- tests


def test_array_then_dependent_job_and_sacct(tmp_path, cluster):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ex = _executor(tmp_path / "logs", cluster.partition)
    t0 = time.time()
    array = ex.map_array(square_to_file, [2, 3], [str(out_dir)] * 2)
    array_id = array[0].job_id.split("_")[0]
    assert all(j.job_id.startswith(array_id + "_") for j in array)

    dep_ex = _executor(tmp_path / "logs", cluster.partition,
                       slurm_additional_parameters={"dependency": f"afterany:{array_id}"})
    dep = dep_ex.submit(sum_files, str(out_dir), 2)

    _wait([*array, dep])
    latency = time.time() - t0
    assert [j.result() for j in array] == [4, 9]
    n_files, total, dep_job_id = dep.result()
    assert (n_files, total) == (2, 13), "dependent job started before the array finished"
    assert dep_job_id == dep.job_id
    print(f"array(2) + dependent job done in {latency:.1f} s")

    states = _sacct_states([array_id, dep.job_id], expect=3)
    assert states.get(f"{array_id}_0", "").startswith("COMPLETED"), states
    assert states.get(f"{array_id}_1", "").startswith("COMPLETED"), states
    assert states.get(dep.job_id, "").startswith("COMPLETED"), states
    # submitit reads job states through sacct too (without slurmdbd they stay UNKNOWN forever).
    assert array[0].get_info(mode="force").get("State") == "COMPLETED"
    assert dep.get_info(mode="force").get("State") == "COMPLETED"


def test_checkpointable_job_resumes_after_interrupt(tmp_path, cluster):
    progress = tmp_path / "progress"
    ex = _executor(tmp_path / "logs", cluster.partition)
    job = ex.submit(CountSteps(), 12, str(progress), 0.4)
    reached = _wait_for_file_int(progress, 3)
    job._interrupt()  # what Slurm does on preemption: SIGTERM, then USR2 -> checkpoint + requeue
    _wait([job], timeout=JOB_TIMEOUT_S)
    res = job.result()
    assert res["step"] == 12
    assert len(res["starts"]) == 2, res
    assert res["starts"][0] == 0
    assert reached <= res["starts"][1] < 12, f"did not resume from the checkpoint: {res}"
    assert res["job_id"] == job.job_id


def test_scontrol_requeue_stops_old_process_and_restarts(tmp_path, cluster):
    state = tmp_path / "state"
    state.mkdir()
    ex = _executor(tmp_path / "logs", cluster.partition)
    # Long enough that the old process cannot finish before it is killed: slurmd sends SIGKILL
    # max(KillWait, 5) s after SIGTERM (the 5 s floor is hard-coded in slurmd).
    job = ex.submit(count_with_file_checkpoint, N_REQUEUE_STEPS, str(state), 0.4)
    _wait_for_file_int(state / "progress", 2)
    old_pid = int((state / "pid").read_text())
    subprocess.run(["scontrol", "requeue", job.job_id], check=True, capture_output=True)
    t0 = time.time()
    # submitit ignores SIGTERM: the old process must go at SIGKILL, ~5 s later.
    while _pid_alive(old_pid) and time.time() - t0 < 15:
        time.sleep(0.1)
    assert not _pid_alive(old_pid), "old process still running 15 s after scontrol requeue (KillWait?)"
    killed_after = time.time() - t0
    killed_at = int((state / "progress").read_text())
    assert killed_at < N_REQUEUE_STEPS, "the old process ran to the end instead of being killed"
    _wait([job], timeout=JOB_TIMEOUT_S)
    res = job.result()
    runs = [line.split() for line in (state / "runs").read_text().splitlines()]
    assert len(runs) == 2, runs
    assert 0 < int(runs[1][1]) < N_REQUEUE_STEPS and res["start"] == int(runs[1][1])
    assert res["step"] == N_REQUEUE_STEPS
    assert res["pid"] != old_pid
    print(f"old process gone {killed_after:.1f} s after scontrol requeue")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_shard_job_with_two_tasks_writes_the_one_rank_store(tmp_path, cluster):
    """One shard job as 2 Slurm tasks (ranks; launcher.tasks_per_node=2): rank, world and master
    address come from the job, the ranks split the work, and the store equals one process's."""
    from icl_scale.shard import run_shard
    from icl_scale.store import Shard
    from icl_scale.sweep import ShardJob, make_executor

    from conftest import assert_same_store, get_model, tiny_shard_cfg

    one = tiny_shard_cfg(tmp_path / "one", "copa", 1, "tiny-opt", "importance.n_examples=9", "eval.limit=13")
    run_shard(one, lm=get_model("tiny-opt"))
    cfg = tiny_shard_cfg(tmp_path / "two", "copa", 1, "tiny-opt", "importance.n_examples=9", "eval.limit=13",
                         "launcher=slurm", f"launcher.folder={tmp_path / 'logs'}", "launcher.tasks_per_node=2",
                         "launcher.cpus_per_task=1", "launcher.mem_gb=null", f"launcher.partition={cluster.partition}",
                         "wandb.mode=disabled")
    job = make_executor(cfg, "shard").submit(ShardJob(), cfg)
    _wait([job], timeout=300)
    results = job.results()  # one per task: both ranks ran the shard
    assert [r["status"] for r in results] == ["complete", "complete"], job.stderr()
    two = Shard(tmp_path / "two", "tiny-opt", "copa", 1)
    assert two.manifest()["ranks"] == 2  # the ranks split the work (not two copies of it)
    assert_same_store(Shard(tmp_path / "one", "tiny-opt", "copa", 1).path, two.path)
