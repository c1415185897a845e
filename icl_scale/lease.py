"""One writer per shard: a lease in the shard's store folder (`lease.json`), taken before any work.

The lease names its holder (job id, host, pid, start) and carries a heartbeat that a background
thread rewrites every `store.lease_timeout_s / 10` seconds. A second run of the same shard finds a
live lease and stops with one line naming the holder; the sweep does not submit such a shard. A
lease is stale, and is taken over by the next run (which resumes the shard from its checkpoint),
when its heartbeat is older than `store.lease_timeout_s`, or at once when its holder ran on this
host and its process is gone (a killed job). A requeued job (same Slurm job id) takes over its own
lease.

Taking the lease (read, judge, write) is one critical section under filelock's SoftFileLock: an
O_EXCL marker file, so it excludes contenders on other nodes of a shared filesystem too (flock-based
locks do not on many NFS mounts) and leaves no file behind when released. The lease file itself is
written atomically (store.write_json). Under several ranks only rank 0 takes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path

from .store import StoreError, read_json, write_json

log = logging.getLogger(__name__)

LEASE = "lease.json"
LOCK = ".lease.lock"  # the critical section's marker (removed on release)


class LeaseHeld(StoreError):
    """The shard is being computed by another job: one line naming it."""


def job_id() -> str:
    """The Slurm job (array element) running this process, else "local"."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or "local"


def read_holder(folder: Path) -> dict | None:
    """The lease in `folder`, or None (no lease, or an unreadable one: a killed writer's)."""
    try:
        holder = read_json(Path(folder) / LEASE)
    except (OSError, StoreError):
        return None
    return holder if isinstance(holder, dict) and "heartbeat" in holder else None


def _process_gone(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError):
        return False
    return False


def is_live(holder: dict | None, timeout_s: float, now: float | None = None) -> bool:
    """A lease whose heartbeat is fresh and, on this host, whose process still runs."""
    if not holder:
        return False
    if holder.get("host") == socket.gethostname() and _process_gone(holder.get("pid")):
        return False
    return (now or time.time()) - float(holder.get("heartbeat", 0)) <= timeout_s


def describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("start", 0))))
    return f"job {holder.get('job_id')} (host {holder.get('host')}, pid {holder.get('pid')}, started {started})"


class ShardLease:
    """`with ShardLease(folder, timeout_s):` holds the folder's lease while the block runs."""

    def __init__(self, folder: Path, timeout_s: float):
        self.folder, self.timeout_s = Path(folder), float(timeout_s)
        self.me = {"job_id": job_id(), "host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> ShardLease:
        from filelock import SoftFileLock

        self.folder.mkdir(parents=True, exist_ok=True)
        with SoftFileLock(self.folder / LOCK, timeout=60):
            holder = read_holder(self.folder)
            ours = holder and holder.get("job_id") == self.me["job_id"] != "local"  # our own requeued job
            if is_live(holder, self.timeout_s) and not ours:
                raise LeaseHeld(f"{self.folder} is being computed by {describe(holder)}: wait for it, or stop "
                                f"that job (its lease expires {self.timeout_s:g} s after its last heartbeat, "
                                f"store.lease_timeout_s)")
            if holder:
                log.warning("%s: taking over the stale lease of %s", self.folder, describe(holder))
            self.beat()
        self.thread = threading.Thread(target=self._heartbeat, name="shard-lease", daemon=True)
        self.thread.start()
        return self

    def mine(self, holder: dict | None) -> bool:
        return bool(holder) and (holder.get("host"), holder.get("pid")) == (self.me["host"], self.me["pid"])

    def beat(self) -> None:
        write_json(self.folder / LEASE, {**self.me, "heartbeat": time.time()})

    def _heartbeat(self) -> None:
        while not self.stop.wait(max(0.05, self.timeout_s / 10)):
            try:
                if not self.mine(read_holder(self.folder)):
                    log.warning("%s: the lease was taken over by another job", self.folder)
                    return
                self.beat()
            except (OSError, StoreError) as e:  # e.g. a full disk: the next beat tries again
                log.warning("%s: lease heartbeat failed (%s)", self.folder, e)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join()
        if self.mine(read_holder(self.folder)):
            with contextlib.suppress(FileNotFoundError):
                (self.folder / LEASE).unlink()


def shard_lease(cfg: dict, folder: Path, is_main: bool):
    """The shard's lease on the main rank; other ranks take none (nothing)."""
    return ShardLease(folder, cfg["store"]["lease_timeout_s"]) if is_main else contextlib.nullcontext()
