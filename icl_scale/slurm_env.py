"""Is a Slurm cluster reachable from here? Small helpers for tests, launchers and the CLI.

The local development cluster is started with ``bash slurm/start.sh`` (see slurm/README.md); these
helpers work with any Slurm cluster whose client commands are on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["SKIP_REASON", "NodeType", "SlurmStatus", "accounting_available", "parse_sinfo_nodes", "partition_nodes",
           "slurm_available", "slurm_status"]

SKIP_REASON = "local Slurm not running: bash slurm/start.sh"

# Debian keeps the daemons in /usr/sbin, which a non-login shell may lack; the clients are in /usr/bin.
_EXTRA_PATH = ("/usr/bin", "/usr/sbin", "/usr/local/bin")


def _which(cmd: str) -> str | None:
    return shutil.which(cmd) or shutil.which(cmd, path=os.pathsep.join(_EXTRA_PATH))


def _run(args: list[str], timeout: float) -> tuple[int, str]:
    exe = _which(args[0])
    if exe is None:
        return 127, f"{args[0]}: not found"
    try:
        p = subprocess.run([exe, *args[1:]], check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(args)}: timed out after {timeout:g} s"
    except OSError as e:
        return 126, f"{' '.join(args)}: {e}"
    return p.returncode, (p.stdout + p.stderr).strip()


@dataclass(frozen=True)
class SlurmStatus:
    ok: bool            # controller answers and a partition has a usable node
    accounting: bool    # sacct works (submitit needs it to see job states)
    reason: str         # empty when ok and accounting; else why not, in one line
    partition: str | None = None
    cpus: int | None = None

    def __bool__(self) -> bool:
        return self.ok


def slurm_status(timeout: float = 10.0, need_accounting: bool = True) -> SlurmStatus:
    """Probe the cluster with sinfo/scontrol (and sacct). Never raises."""
    if _which("sinfo") is None or _which("sbatch") is None:
        return SlurmStatus(False, False, "Slurm client commands (sinfo, sbatch) are not installed")
    rc, out = _run(["scontrol", "ping"], timeout)
    if rc != 0 or "is UP" not in out:
        first = out.splitlines()[0] if out else f"rc={rc}"
        return SlurmStatus(False, False, f"Slurm controller unreachable ({first})")
    rc, out = _run(["sinfo", "-h", "-o", "%P|%T|%C"], timeout)
    if rc != 0:
        return SlurmStatus(False, False, f"sinfo failed: {out.splitlines()[0] if out else rc}")
    partition, cpus, usable = None, 0, False
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) != 3:
            continue
        name, state, cpu = parts
        default = name.endswith("*")
        name = name.rstrip("*")
        if state.rstrip("*~#!%$@^-") in ("idle", "mixed", "allocated", "completing") and not state.endswith("*"):
            usable = True
            if partition is None or default:
                partition = name
                try:
                    cpus = int(cpu.split("/")[3])
                except (IndexError, ValueError):
                    cpus = 0
    if not usable:
        return SlurmStatus(False, False, "no Slurm node is up (sinfo shows none idle/mixed/allocated)")
    accounting = True
    reason = ""
    if need_accounting:
        rc, out = _run(["sacct", "-n", "-X", "-S", "now-1hours", "-o", "JobID"], timeout)
        accounting = rc == 0
        if not accounting:
            reason = f"sacct does not work (no slurmdbd?): {out.splitlines()[0] if out else rc}"
    return SlurmStatus(True, accounting, reason, partition, cpus or None)


def slurm_available(timeout: float = 10.0) -> bool:
    """True when jobs can be submitted, run, and followed with sacct."""
    s = slurm_status(timeout)
    return s.ok and s.accounting


def accounting_available(timeout: float = 10.0) -> bool:
    rc, _ = _run(["sacct", "-n", "-X", "-S", "now-1hours", "-o", "JobID"], timeout)
    return rc == 0


@dataclass(frozen=True)
class NodeType:
    """One kind of node of a partition, as `sinfo -o "%P|%c|%m|%G|%D"` lists it."""

    partition: str
    cpus: int
    mem_mb: int
    gpus: int
    count: int

    def describe(self) -> str:
        return f"{self.cpus} CPUs, {self.mem_mb // 1024} GB, {self.gpus} GPUs"


SINFO_NODES = ["sinfo", "-h", "-o", "%P|%c|%m|%G|%D"]


def _gres_gpus(gres: str) -> int:
    """GPUs in a gres string: "gpu:8", "gpu:a100:8(S:0-1)", "gpu:a100:4,gpu:v100:2", "(null)"."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_sinfo_nodes(text: str) -> list[NodeType]:
    """sinfo's `%P|%c|%m|%G|%D` lines -> node kinds (the default partition's `*` dropped). Memory
    "1+" style (a range over nodes grouped together) counts as its lower bound."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        name, cpus, mem, gres, count = parts
        try:
            out.append(NodeType(name.rstrip("*"), int(cpus.rstrip("+")), int(mem.rstrip("+")), _gres_gpus(gres),
                                int(count)))
        except ValueError:
            continue
    return out


def default_partition(text: str) -> str | None:
    """The partition sinfo marks with `*` in `%P|...` lines."""
    return next((line.split("|")[0].rstrip("*") for line in text.splitlines() if line.split("|")[0].endswith("*")),
                None)


def partition_nodes(partition: str | None, timeout: float = 10.0) -> tuple[str | None, list[NodeType]] | str:
    """(partition, its node kinds) from sinfo; `partition=None` is the cluster's default partition.
    A string when sinfo cannot answer (the reason, one line)."""
    rc, out = _run(SINFO_NODES, timeout)
    if rc != 0:
        return f"sinfo failed: {out.splitlines()[0] if out else rc}"
    name = partition or default_partition(out)
    return name, [n for n in parse_sinfo_nodes(out) if n.partition == name]
