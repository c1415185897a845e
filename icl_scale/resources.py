"""A shard job's request on a Slurm cluster: GPUs, ranks, CPUs and memory, derived from the launcher
settings and the planner, and checked against the partition's nodes before anything is submitted."""

from __future__ import annotations

import math


class SweepError(RuntimeError):
    pass


def tasks_per_node(la: dict) -> int:
    """Ranks of a shard job: `launcher.tasks_per_node`, by default one per GPU (1 without GPUs)."""
    n = la["tasks_per_node"]
    return int(n) if n else max(1, int(la["gpus_per_node"]))


def job_resources(cfg: dict, nodes: list) -> dict:
    """A shard job's request on one node: GPUs, tasks (ranks), CPUs per task and memory in GB.
    `launcher.cpus_per_task=auto` is the node's CPUs / tasks per node, `launcher.mem_gb=auto` the plan's
    host memory of the job's ranks (icl_scale.plan.host_bytes_per_rank); with several kinds of node
    that have the GPUs, the smallest, so that any of them can run it. null: not requested."""
    from .plan import PlanError, host_bytes_per_rank

    la = cfg["launcher"]
    gpus, tasks = int(la["gpus_per_node"]), tasks_per_node(la)
    usable = [n for n in nodes if n.gpus >= gpus] or nodes
    cpus, mem = la["cpus_per_task"], la["mem_gb"]
    if cpus == "auto":
        cpus = max(1, min(n.cpus for n in usable) // tasks) if usable else 1
    if mem == "auto":
        try:
            mem = math.ceil(tasks * host_bytes_per_rank(cfg, tasks) / 2**30)
        except PlanError as e:
            raise SweepError(f"launcher.mem_gb=auto needs the plan's host memory: {e}; "
                             "or set launcher.mem_gb") from None
    return {"gpus": gpus, "tasks": tasks, "cpus_per_task": cpus, "mem_gb": mem}


def check_request(res: dict, nodes: list, partition: str | None) -> None:
    """Refuse, before anything is submitted, a request no node of the partition can satisfy (Slurm
    would leave it pending forever): one line naming the setting and the largest node."""
    where = f"partition {partition}" if partition else "the default partition"
    if not nodes:
        raise SweepError(f"launcher.partition={partition}: sinfo lists no nodes in {where}; set launcher.partition "
                         "to one that `sinfo` shows")
    cpus, mem = res["cpus_per_task"] or 1, res["mem_gb"] or 0
    needs = [("launcher.gpus_per_node", res["gpus"], res["gpus"], lambda n: n.gpus, "GPUs"),
             ("launcher.cpus_per_task", cpus, cpus * res["tasks"], lambda n: n.cpus, "CPUs"),
             ("launcher.mem_gb", mem, mem * 1024, lambda n: n.mem_mb, "MB of memory")]
    if any(n.gpus >= res["gpus"] and n.cpus >= cpus * res["tasks"] and n.mem_mb >= mem * 1024 for n in nodes):
        return
    for key, value, total, have, unit in needs:
        largest = max(nodes, key=have)
        if total > have(largest):
            per = f" x {res['tasks']} tasks per node" if key == "launcher.cpus_per_task" else ""
            raise SweepError(f"{key}={value}{per} needs {total} {unit} on one node but the largest node of {where} "
                             f"has {have(largest)} ({largest.describe()}); lower {key} (cpus_per_task and mem_gb "
                             "also take auto) or pick a partition with bigger nodes")
    kinds = "; ".join(n.describe() for n in nodes)
    raise SweepError(f"no node of {where} has {res['gpus']} GPUs, {cpus * res['tasks']} CPUs and {mem} GB together "
                     f"(nodes: {kinds}); lower launcher.cpus_per_task or launcher.mem_gb")


def slurm_resources(cfg: dict) -> dict:
    """The shard job's request, derived and checked against the partition's nodes (`sinfo`)."""
    from .slurm_env import partition_nodes

    found = partition_nodes(cfg["launcher"]["partition"])
    if isinstance(found, str):
        raise SweepError(f"cannot check the job's request against the cluster ({found}); is Slurm up?")
    partition, nodes = found
    res = job_resources(cfg, nodes)
    check_request(res, nodes, partition)
    return res
