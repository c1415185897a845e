"""A shard job's request against the cluster's nodes (sinfo), and the ranks' rendezvous under Slurm
(icl_scale.sweep.job_resources / check_request, icl_scale.distributed.master_addr)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time

import cloudpickle
import pytest

from icl_scale import plan as P
from icl_scale.distributed import RendezvousError, master_addr
from icl_scale.slurm_env import NodeType, default_partition, parse_sinfo_nodes, partition_nodes, slurm_status
from icl_scale.sweep import SweepError, check_request, job_resources, make_executor

from conftest import REPO, compose

# The job process cannot import this module (tests/ is not a package on its path): pickle by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# sinfo -h -o "%P|%c|%m|%G|%D" on a cluster with two kinds of 8-GPU node and a CPU partition
SINFO = """gpu*|96|1031000|gpu:a100:8(S:0-1)|12
gpu*|128|2063000|gpu:h100:8|4
cpu|64|257000|(null)|40
"""


def test_sinfo_lines_become_node_kinds():
    nodes = parse_sinfo_nodes(SINFO)
    assert [(n.partition, n.cpus, n.mem_mb, n.gpus, n.count) for n in nodes] == [
        ("gpu", 96, 1031000, 8, 12), ("gpu", 128, 2063000, 8, 4), ("cpu", 64, 257000, 0, 40)]
    assert default_partition(SINFO) == "gpu"
    assert parse_sinfo_nodes("x|1+|2000|gpu:a100:4,gpu:v100:2|3")[0].gpus == 6


def test_paper_request_is_derived_from_the_node_and_the_plan():
    cfg = compose("experiment=paper")
    nodes = [n for n in parse_sinfo_nodes(SINFO) if n.partition == "gpu"]
    res = job_resources(cfg, nodes)
    # CPUs per task: the smaller 8-GPU node's 96 CPUs over its 8 ranks
    assert res == {"gpus": 8, "tasks": 8, "cpus_per_task": 12,
                   "mem_gb": math.ceil(8 * P.host_bytes_per_rank(cfg, 8) / 2**30)}
    # OPT-66B float16 is 131 GB: 8 partitioned ranks need far less than the 8 x 131 GB of private copies
    assert 8 * 131e9 / 8 < res["mem_gb"] * 2**30 < 2 * 131e9
    check_request(res, nodes, "gpu")  # fits both kinds


def test_a_request_no_node_can_take_is_refused_naming_the_setting_and_the_largest_node():
    nodes = [n for n in parse_sinfo_nodes(SINFO) if n.partition == "gpu"]
    res = {"gpus": 8, "tasks": 8, "cpus_per_task": 32, "mem_gb": 500}  # the old paper preset: 256 CPUs
    with pytest.raises(SweepError, match=r"^launcher.cpus_per_task=32 x 8 tasks per node needs 256 CPUs on one node "
                       r"but the largest node of partition gpu has 128 \(128 CPUs, 2014 GB, 8 GPUs\)"):
        check_request(res, nodes, "gpu")
    with pytest.raises(SweepError, match=r"^launcher.gpus_per_node=16 needs 16 GPUs"):
        check_request({**res, "gpus": 16, "cpus_per_task": 1}, nodes, "gpu")
    with pytest.raises(SweepError, match=r"^launcher.mem_gb=4000 needs 4096000 MB of memory"):
        check_request({**res, "cpus_per_task": 1, "mem_gb": 4000}, nodes, "gpu")
    # each fits some node, but no node has both: 128 CPUs are only on the H100 nodes, and 1,500 GB too
    check_request({**res, "cpus_per_task": 16, "mem_gb": 1500}, nodes, "gpu")
    small = [NodeType("gpu", 128, 1000 * 1024, 8, 1), NodeType("gpu", 64, 2000 * 1024, 8, 1)]
    with pytest.raises(SweepError, match=r"^no node of partition gpu has 8 GPUs, 128 CPUs and 1500 GB together"):
        check_request({**res, "cpus_per_task": 16, "mem_gb": 1500}, small, "gpu")
    with pytest.raises(SweepError, match=r"^launcher.partition=big: sinfo lists no nodes"):
        check_request(res, [], "big")


# --- rendezvous: a faked two-node Slurm job -------------------------------------------------------------

def _slurm_env(nodelist: str | None, nodes: int, procid: int = 0, ntasks: int = 2, job_id: int = 4242) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "LOCAL_WORLD_SIZE"))}
    env.update(SLURM_JOB_ID=str(job_id), SLURM_NTASKS=str(ntasks), SLURM_PROCID=str(procid),
               SLURM_LOCALID="0", SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
               SLURM_TASKS_PER_NODE=f"{ntasks // nodes}(x{nodes})")
    if nodelist is not None:
        env["SLURM_JOB_NODELIST"] = nodelist
    return env


@pytest.fixture
def slurm_env(monkeypatch):
    def set_env(*args, **kw):
        for k in [k for k in os.environ if k.startswith(("SLURM_", "MASTER_"))]:
            monkeypatch.delenv(k)
        for k, v in _slurm_env(*args, **kw).items():
            monkeypatch.setenv(k, v)
    return set_env


def test_multi_node_master_is_the_first_host_or_a_clear_error(slurm_env):
    slurm_env("localhost,icl-scale-nosuch-b", nodes=2)
    assert master_addr() == "localhost"
    slurm_env("icl-scale-nosuch[017-018]", nodes=2)  # submitit expands the list; its first host does not resolve
    with pytest.raises(RendezvousError, match=r"^the job's first node 'icl-scale-nosuch017' \(SLURM_JOB_NODELIST="
                       r"icl-scale-nosuch\[017-018\]\) does not resolve on this node .*; set MASTER_ADDR"):
        master_addr()
    slurm_env(None, nodes=2)
    with pytest.raises(RendezvousError, match=r"^a 2-node Slurm job without SLURM_JOB_NODELIST: set MASTER_ADDR"):
        master_addr()
    # one node: every rank is on this machine, so the loopback address is right
    slurm_env("icl-scale-nosuch017", nodes=1)
    assert master_addr() == "127.0.0.1"
    slurm_env(None, nodes=1)
    assert master_addr() == "127.0.0.1"


RANK = """
import torch, torch.distributed as td
from icl_scale.distributed import init_process_group
de = init_process_group("gloo")
x = torch.tensor([float(de.rank + 1)])
td.all_reduce(x)
import os
print(de.rank, de.world_size, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], int(x.item()), flush=True)
td.destroy_process_group()
"""


def _free_port_in_slurm_range() -> int:
    """A job id whose port (29500 + id % 1000) is free now."""
    for job in range(int(time.time()) % 1000, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 29500 + job))
                return job
            except OSError:
                continue
    pytest.skip("no free port in 29500-30499")


def test_two_faked_nodes_rendezvous_at_the_first_host():
    """Two ranks, each told by Slurm's variables that it is on its own node of a 2-node job whose first
    host is `localhost`: they meet at that address and all-reduce."""
    job = _free_port_in_slurm_range()
    procs = [subprocess.Popen([sys.executable, "-c", RANK], env={**_slurm_env("localhost,icl-scale-nosuch-b", nodes=2,
                                                                              procid=r, job_id=job),
                                                                 "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    lines = sorted(o[0].split() for o in outs)
    assert lines == [[str(r), "2", "localhost", str(29500 + job), "3"] for r in range(2)]


# --- the local Slurm cluster: refused before submission, auto request runs ----------------------------------

@pytest.fixture(scope="module")
def cluster():
    st = slurm_status(timeout=10)
    if not st.ok or not st.accounting:
        pytest.skip(f"local Slurm not running: bash slurm/start.sh ({st.reason})")
    return st


def _cpus_per_task() -> str:
    return os.environ["SLURM_CPUS_PER_TASK"]


def _jobs_in(folder) -> list:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.mark.slurm
def test_local_cluster_refuses_too_many_cpus_and_runs_auto(cluster, tmp_path):
    from icl_scale.sweep import submit

    partition, nodes = partition_nodes(None)
    biggest = max(n.cpus for n in nodes)
    folder = tmp_path / "submitit"
    cfg = compose("launcher=slurm", f"store.root={tmp_path / 'store'}", f"launcher.folder={folder}",
                  "sweep.tasks=[copa]", "sweep.shots=[0]", f"launcher.cpus_per_task={biggest + 1}")
    with pytest.raises(SweepError, match=rf"^launcher.cpus_per_task={biggest + 1} x 1 tasks per node needs "
                       rf"{biggest + 1} CPUs on one node but the largest node of partition {partition} has {biggest}"):
        submit(cfg)
    assert _jobs_in(folder) == []  # nothing was submitted
    cfg = compose("launcher=slurm", f"launcher.folder={folder}", "launcher.cpus_per_task=auto",
                  "launcher.mem_gb=auto", "launcher.timeout_min=5", "model=tiny-opt")
    job = make_executor(cfg, "shard").submit(_cpus_per_task)
    assert job.result() == str(biggest)  # the whole node's CPUs for its one task
