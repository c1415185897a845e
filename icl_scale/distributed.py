"""Rank/world from the launcher and the few collectives the pipeline needs.

A shard job may run as several ranks (torchrun, or one Slurm task per GPU). The ranks split the
work: every document list (importance examples, knock-out docs, eval docs) is cut into
deterministic, token-balanced slices (`balanced_slices`), one per rank; sums are all-reduced and
per-doc results gathered, so every rank ends each step with the numbers a single process would
have, and only rank 0 writes to the store.

Big models run under DeepSpeed ZeRO-3 across the GPUs of a job (icl_scale/models/zero.py). Every
rank holds a slice of the parameters and gathers the rest layer by layer during each forward, so
all ranks must make the same sequence of module calls; their inputs may differ. Under ZeRO-3 the
scorer follows a schedule every rank computes from the shard's inputs before any work
(passes.rank_works: each pass's units dealt to the ranks by tokens; passes.Lockstep), the importance
pass runs every step on every rank, and a rank with less work runs placeholder calls (one pad token,
weight zero). A rank that fails ends the job (`FailureWatch`).

`set_data_parallel(False)` makes every rank do all the work on identical inputs instead
(lockstep, the earlier behaviour; kept for the benchmark that compares the two).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta


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
    if ("RANK" in env) != ("WORLD_SIZE" in env):
        have, lack = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise RuntimeError(f"{have} is set but {lack} is not: launch the ranks with torchrun (or Slurm "
                           f"tasks), or unset {have} for one process")
    if "RANK" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]))
    return DistEnv()


# A rank that dies makes the others fail in a collective after this long instead of hanging forever.
COLLECTIVE_TIMEOUT_MIN = float(os.environ.get("ICL_SCALE_COLLECTIVE_TIMEOUT_MIN", "30"))


def init_process_group(backend: str | None = None) -> DistEnv:
    """torch.distributed over the job's ranks (NCCL on GPUs, gloo on CPUs), with the variables it and
    DeepSpeed expect (else DeepSpeed tries MPI). DeepSpeed's ZeRO-3 then uses this process group."""
    import torch
    import torch.distributed as td

    de = dist_env()
    check_gpus(de)
    os.environ.setdefault("RANK", str(de.rank))
    os.environ.setdefault("LOCAL_RANK", str(de.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(de.world_size))
    os.environ["MASTER_ADDR"] = master_addr()
    os.environ["MASTER_PORT"] = str(master_port())
    clear_stale_build_locks()
    if not td.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(de.local_rank)
        td.init_process_group(backend=backend, rank=de.rank, world_size=de.world_size,
                              timeout=timedelta(minutes=COLLECTIVE_TIMEOUT_MIN))
    start_failure_watch()
    return de


# A JIT build of a torch extension (DeepSpeed's CPU shared-memory collectives, built when its comm
# starts) holds a `lock` file in its build folder; a build that was killed leaves it, and every later
# job then waits on it forever (torch's FileBaton has no timeout). A build takes about a minute.
STALE_BUILD_LOCK_S = 600


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Remove torch extension build locks older than `max_age_s` (TORCH_EXTENSIONS_DIR, else torch's
    default build root), with a warning each; returns their paths."""
    import glob
    import logging
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    locks = glob.glob(os.path.join(root, "*", "lock")) if root else glob.glob(
        os.path.join(get_default_build_root(), "*", "*", "lock"))
    removed = []
    for lock in locks:
        try:
            if time.time() - os.path.getmtime(lock) > max_age_s:
                os.remove(lock)
                removed.append(lock)
                logging.getLogger(__name__).warning(
                    "removed %s, left by a torch extension build that did not finish (older than %d s); the "
                    "extension is built again", lock, max_age_s)
        except FileNotFoundError:  # another rank removed it, or the build finished
            pass
    return removed


def ranks_on_this_node() -> int:
    """Ranks the launcher started on this machine (torchrun: LOCAL_WORLD_SIZE; Slurm: the node's tasks)."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1").split("(")[0]
    return int(per_node.split(",")[0])


def check_gpus(de: DistEnv) -> None:
    """One rank per GPU: a job whose ranks on a node do not match its visible GPUs stops here, before
    any model is loaded."""
    import torch

    if de.world_size == 1 or not torch.cuda.is_available():
        return
    n, gpus = ranks_on_this_node(), torch.cuda.device_count()
    if n != gpus:
        raise RuntimeError(f"{n} ranks on this node but {gpus} GPUs visible: run one rank per GPU "
                           f"(launcher.tasks_per_node={gpus}, or torchrun --nproc_per_node {gpus})")


class RendezvousError(ValueError):
    """The ranks of a multi-node job cannot agree on a master address: one line naming the fix."""


def _nodes() -> int:
    """Nodes of the Slurm job (SLURM_JOB_NUM_NODES, else SLURM_NNODES); 1 outside Slurm."""
    return int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)


def master_addr() -> str:
    """Where rank 0 listens: MASTER_ADDR when the launcher set it (torchrun does), else the Slurm job's
    first host, expanded from SLURM_JOB_NODELIST by submitit's own parser (the one its
    helpers.TorchDistributedEnvironment uses), else this machine. A single-node job may fall back to
    127.0.0.1 (all its ranks are here); a multi-node job whose first host is unknown or does not
    resolve stops with RendezvousError instead of splitting into groups that each wait for the others."""
    import socket

    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "")
    multi = _nodes() > 1
    if not nodelist:
        if multi:
            raise RendezvousError(f"a {_nodes()}-node Slurm job without SLURM_JOB_NODELIST: set MASTER_ADDR to "
                                  "the first node's address (export MASTER_ADDR=... before srun)")
        return "127.0.0.1"
    from submitit.slurm.slurm import SlurmJobEnvironment

    try:
        first = SlurmJobEnvironment().hostnames[0]
    except Exception as e:  # noqa: BLE001 - submitit's parser raises plain exceptions on bad lists
        raise RendezvousError(f"SLURM_JOB_NODELIST={nodelist!r} cannot be read ({e}); set MASTER_ADDR to the "
                              "first node's address") from None
    try:
        socket.getaddrinfo(first, None)
    except OSError as e:
        if multi:
            raise RendezvousError(f"the job's first node {first!r} (SLURM_JOB_NODELIST={nodelist}) does not resolve "
                                  f"on this node ({e.strerror or e}); set MASTER_ADDR to its address") from None
        return "127.0.0.1"
    return first


def master_port() -> int:
    """MASTER_PORT when set, else one port per Slurm job (the same on every rank of it)."""
    return int(os.environ.get("MASTER_PORT") or 29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000)


def barrier() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
        td.barrier()


# --- data parallelism ------------------------------------------------------------------------------

_DATA_PARALLEL = True


def set_data_parallel(on: bool) -> None:
    """False: every rank does all the work (lockstep); True (default): the ranks split it."""
    global _DATA_PARALLEL
    _DATA_PARALLEL = bool(on)


def dp_world() -> tuple[int, int]:
    """(rank, world size) over which work is split: (0, 1) in one process or in lockstep."""
    import torch.distributed as td

    if not _DATA_PARALLEL or not (td.is_available() and td.is_initialized()):
        return 0, 1
    return td.get_rank(), td.get_world_size()


def balanced_slices(costs: Sequence[int], n: int, cap: int | None = None) -> list[list[int]]:
    """Indices of `costs` split into `n` slices of nearly equal total cost: largest first onto the
    least-loaded slice (ties: the lower slice), each slice at most `cap` items (None: no cap).
    Deterministic: every rank computes the same split. Each slice is in ascending index order."""
    load, parts = [0] * n, [[] for _ in range(n)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        open_ = [r for r in range(n) if cap is None or len(parts[r]) < cap]
        r = min(open_, key=lambda r: (load[r], r))
        parts[r].append(i)
        load[r] += costs[i]
    return [sorted(p) for p in parts]


def _device():
    """Where collectives' tensors live: the GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as td

    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t):
    """Sum of `t` over the ranks (a new tensor on t's device and dtype)."""
    import torch.distributed as td

    x = t.to(_device()).clone()
    td.all_reduce(x, op=td.ReduceOp.SUM)
    return x.to(t.device)


def max_over_ranks(n: int) -> int:
    """The largest of every rank's `n` (1 process: n)."""
    import torch
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return int(n)
    x = torch.tensor([int(n)], dtype=torch.long, device=_device())
    td.all_reduce(x, op=td.ReduceOp.MAX)
    return int(x.item())


def gather_objects(obj) -> list:
    """Every rank's `obj` (JSON-like values), in rank order, on every rank."""
    import torch.distributed as td

    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


# --- a failing rank ends the job -------------------------------------------------------------------
#
# Under ZeRO-3 a rank that raises leaves the others inside a parameter gather or an all-reduce, which
# only the collective timeout would end (and NCCL never notices a dead peer by itself). So the first
# rank that fails writes its rank and exception to the job's rendezvous store (`announce_failure`),
# and a thread on every rank (`FailureWatch`, started with the process group) polls the store: a rank
# that sees another's failure logs it and exits at once. The failing rank itself exits normally, or
# after FAILED_EXIT_S if something in its own shutdown waits on the others.

FAILURE_KEY = "icl_scale/failure"
WATCH_POLL_S = 1.0
FAILED_EXIT_S = 60.0
_WATCH = None
_FIRST: dict | None = None  # the job's first failure, once this rank has announced its own


def _store_client():
    """A client of the job's rendezvous store (torchrun's agent, or rank 0 under Slurm)."""
    import torch.distributed as td

    return td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                       timeout=timedelta(seconds=30))


def failure_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _exit_now(message: str) -> None:
    """Log `message` and end this process at once (no collectives, no atexit handlers that wait)."""
    import logging
    import sys

    logging.getLogger(__name__).error(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    for h in logging.getLogger().handlers:
        h.flush()
    os._exit(1)


class FailureWatch:
    """A daemon thread that ends this rank as soon as another rank has announced a failure (or the
    job's store is gone while this rank still works). `stop()` when the job's work is done."""

    def __init__(self, rank: int, world: int):
        import threading

        self.rank, self.world = rank, world
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="icl_scale-failure-watch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        import json

        try:
            store = _store_client()
        except Exception:  # noqa: BLE001 - no store to watch (never fatal by itself)
            return
        while not self.stopped.wait(WATCH_POLL_S):
            try:
                found = store.check([FAILURE_KEY])
                rec = json.loads(store.get(FAILURE_KEY)) if found else None
            except Exception as e:  # noqa: BLE001 - the store's host has exited
                if self.stopped.wait(2 * WATCH_POLL_S):
                    return
                _exit_now(f"rank {self.rank}/{self.world} stops: the job's rendezvous store is gone "
                          f"({failure_text(e)}); another rank has exited")
            if rec and rec["rank"] != self.rank and not self.stopped.is_set():
                _exit_now(f"rank {self.rank}/{self.world} stops: rank {rec['rank']} failed: {rec['error']}")


def start_failure_watch() -> None:
    """Watch the other ranks of this job for failures (several ranks only; once per process)."""
    global _WATCH
    de = dist_env()
    if de.world_size > 1 and _WATCH is None:
        _WATCH = FailureWatch(de.rank, de.world_size)


def announce_failure(e: BaseException) -> dict | None:
    """Publish this rank's failure unless another rank's came first; returns the first failure
    ({rank, world, error}) or None (one process, or no store). The others stop (`FailureWatch`); this
    process is ended after FAILED_EXIT_S if its own shutdown hangs."""
    import json
    import threading

    import torch.distributed as td

    global _FIRST
    if _WATCH is None or not td.is_initialized():
        return None
    if _FIRST is not None:
        return _FIRST
    mine = {"rank": _WATCH.rank, "world": _WATCH.world, "error": failure_text(e)}
    try:
        first = json.loads(_store_client().compare_set(FAILURE_KEY, "", json.dumps(mine)))
    except Exception:  # noqa: BLE001 - the store is gone: this failure is still this rank's to report
        first = mine
    if first["rank"] == mine["rank"]:
        import logging

        logging.getLogger(__name__).error("rank %d/%d failed: %s", mine["rank"], mine["world"], mine["error"])
    _WATCH.stop()
    t = threading.Timer(FAILED_EXIT_S, os._exit, (1,))
    t.daemon = True
    t.start()
    _FIRST = first
    return first


def finish_ranks() -> None:
    """The job's work is done on this rank: wait for the others, then stop watching them."""
    if _WATCH is not None:
        barrier()
        _WATCH.stop()
