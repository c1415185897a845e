"""Rank/world from the launcher and the few collectives the pipeline needs.

Big models run under DeepSpeed ZeRO-3 across the GPUs of a job (icl_scale/models/zero.py). Every
rank holds a slice of the parameters and gathers the rest layer by layer during each forward, so
all ranks must make the same sequence of forward calls. icl_scale therefore runs the ranks in
lockstep on identical inputs (ZeRO-Inference: the model is sharded for memory, not the data) and
only rank 0 writes to the store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """From torchrun/deepspeed (RANK, LOCAL_RANK, WORLD_SIZE) or Slurm (SLURM_PROCID, SLURM_LOCALID,
    SLURM_NTASKS); a single process otherwise."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return DistEnv()


def init_process_group(backend: str | None = None) -> DistEnv:
    """Set the variables DeepSpeed expects (else it tries MPI) and initialise torch.distributed."""
    import torch
    import torch.distributed as td

    de = dist_env()
    os.environ.setdefault("RANK", str(de.rank))
    os.environ.setdefault("LOCAL_RANK", str(de.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(de.world_size))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_node()
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
    if not td.is_initialized():
        import deepspeed

        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        deepspeed.init_distributed(dist_backend=backend)
    return de


def _first_node() -> str:
    """The job's first host (Slurm), else this machine."""
    nodes = os.environ.get("SLURM_JOB_NODELIST")
    if not nodes:
        return "127.0.0.1"
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=10)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else "127.0.0.1"
    except (OSError, subprocess.TimeoutExpired):
        return "127.0.0.1"


def barrier() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
        td.barrier()
