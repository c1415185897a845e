"""The distributed batch job: one submitit array element per (task, shot, demonstration seed), the
induction job, with `sweep.transfer=true` a transfer array after the shards (icl_scale.transfer),
and a reducer that waits for all of them (afterany, so it can report failures).

Launchers (conf/launcher/): `local` runs the jobs as local processes through submitit's
LocalExecutor (the laptop default); `slurm` submits sbatch job arrays with a dependent reducer.
Shard jobs are submitit `Checkpointable`: on preemption or timeout they are requeued and resume from
the store's checkpoints without redoing finished work.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from .collect import read_induction
from .config import setup_environment
from .lease import describe, is_live, read_holder
from .store import Shard, check_writable, shard_seed
from .tracking import sanitize_config

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm")


class SweepError(RuntimeError):
    pass


def shard_cfgs(cfg: dict) -> list[dict]:
    """One resolved config per (task, shot, demonstration seed) of the sweep; a 0-shot shard has one
    seed (its prompts have no demonstrations)."""
    from .validation import check_config, check_sweep

    check_sweep(cfg)
    sw = cfg["sweep"]
    out = []
    for task in sw["tasks"]:
        for shot in sw["shots"]:
            for seed in sorted({shard_seed(shot, s) for s in sw["seeds"]}):
                c = copy.deepcopy(cfg)
                c["task"], c["shot"], c["seed"] = task, int(shot), seed
                check_config(c)
                out.append(c)
    return out


def transfer_cfgs(cfg: dict) -> list[dict]:
    """One transfer job per shard of the sweep with sweep.transfer=true (none otherwise)."""
    return shard_cfgs(cfg) if cfg["sweep"]["transfer"] else []


def shard_label(c: dict) -> str:
    """task/<shot>shot/seed<k>, as in messages and the store."""
    return f"{c['task']}/{c['shot']}shot/seed{c['seed']}"


def shard_state(c: dict) -> str:
    """"done" (complete with the same settings and data, files readable), "clobber" (a complete shard
    made with other settings or data, not to be replaced without store.force), "running" (another
    job holds its live lease, icl_scale.lease) or "todo". Settings
    that do not fit the data (e.g. shot or knockout.limit too large) stop the sweep before it submits;
    data rows that cannot be read are "todo": the shard job then fails with the reason, which the
    reducer reports."""
    from .shard import ShardRun
    from .tasks import TaskDataError

    try:
        run = ShardRun(c)
    except TaskDataError:
        return "todo"
    if run.is_done():
        return "done"
    if is_live(read_holder(run.shard.path), c["store"]["lease_timeout_s"]):
        return "running"
    return "clobber" if run.other_complete() else "todo"


def induction_done(cfg: dict) -> bool:
    """The model's induction scores are in the store and read back (icl_scale.collect)."""
    scores, problem = read_induction(cfg["store"]["root"], cfg["model"]["name"])
    return scores is not None and problem is None and not cfg["store"]["force"]


# --- the jobs (callables submitit pickles and runs on the compute node) ---------------------------

class ShardJob(submitit.helpers.Checkpointable):
    """Runs one shard; on preemption/timeout submitit calls `checkpoint`, which requeues the same
    call. Progress lives in the store, so the requeued job resumes where it stopped."""

    def __call__(self, cfg: dict) -> dict:
        _job_env()
        from .shard import run_shard

        res = run_shard(cfg)
        return {k: res.get(k) for k in ("status", "shard", "config_hash", "timings", "baseline")}


class TransferJob(submitit.helpers.Checkpointable):
    """Transfer curves for one shard (after the source shards); resumes per level like a shard."""

    def __call__(self, cfg: dict) -> dict:
        _job_env()
        from .transfer import run_transfer

        res = run_transfer(cfg)
        return {k: res.get(k) for k in ("status", "task", "shot", "seed", "left_out")}


class InductionJob(submitit.helpers.Checkpointable):
    def __call__(self, cfg: dict) -> dict:
        _job_env()
        from omegaconf import OmegaConf

        from .induction import run_job

        return run_job(OmegaConf.create(cfg))


class ReduceJob:
    def __call__(self, cfg: dict, expected: list[tuple[str, int, int]]) -> dict:
        _job_env()
        from .reduce import run_reduce

        res = run_reduce(cfg, expected)
        return {k: res[k] for k in ("n_complete", "problems", "warnings", "figures", "wandb_runs")}


def _job_env() -> None:
    setup_environment(log_level=logging.INFO)
    # W&B exports WANDB_SERVICE so that child processes reuse the parent's service; a job inherits
    # the submitter's environment, and sharing one service across jobs keeps a killed attempt's run
    # id "in use" for its requeued successor. Every job talks to a service of its own.
    os.environ.pop("WANDB_SERVICE", None)


# --- executors -----------------------------------------------------------------------------------------

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


def make_executor(cfg: dict, job: str, dependency: str | None = None) -> submitit.Executor:
    la = cfg["launcher"]
    name = la["name"]
    if name not in LAUNCHERS:
        raise ValueError(f"launcher={name!r} is unknown; use launcher=local or launcher=slurm")
    folder = Path(la["folder"]) / "%j"  # submitit's pickles and logs: outside the results store
    if name == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=int(la["timeout_min"]))
        return ex
    from .slurm_env import slurm_status

    st = slurm_status()
    if not st.ok:
        raise SweepError(f"Slurm is not reachable ({st.reason}); start the local cluster with "
                         f"`bash slurm/start.sh` (or `make slurm-start`), or use launcher=local")
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = {
        "timeout_min": int(la["timeout_min"]),
        "slurm_job_name": f"icl_{job}",
        "slurm_array_parallelism": int(la["array_parallelism"]),
    }
    if job != "reduce":  # the reducer needs no GPU
        res = slurm_resources(cfg)
        if res["gpus"]:
            params["gpus_per_node"] = res["gpus"]
        if res["tasks"] > 1:  # one rank per task (icl_scale.distributed)
            params["tasks_per_node"] = res["tasks"]
            # A rank that dies ends the job's other tasks at once, not after the collective timeout.
            params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        if res["cpus_per_task"]:
            params["cpus_per_task"] = int(res["cpus_per_task"])
        if res["mem_gb"]:
            params["mem_gb"] = int(res["mem_gb"])
    if la["partition"]:
        params["slurm_partition"] = la["partition"]
    extra = dict(la["additional"] or {})
    if la["account"]:
        extra["account"] = la["account"]
    if la["qos"]:
        extra["qos"] = la["qos"]
    if dependency:
        extra["dependency"] = dependency
    if extra:
        params["slurm_additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex


@dataclass
class Submitted:
    shard_jobs: list = field(default_factory=list)
    induction_job: object = None
    transfer_jobs: list = field(default_factory=list)
    reduce_job: object = None
    skipped: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)  # shards another job is computing (live lease): not submitted

    def all_jobs(self) -> list:
        return [j for j in (*self.shard_jobs, self.induction_job, *self.transfer_jobs, self.reduce_job)
                if j is not None]


def submit(cfg: dict, wait: bool | None = None, progress: bool = False) -> Submitted:
    """Submit the sweep. Complete shards (same config hash) are not resubmitted. With the local
    launcher the array runs in waves of `launcher.array_parallelism` and the reducer after it;
    with Slurm the reducer depends on the array and the induction job (afterany).

    A credential-like setting (e.g. +wandb.api_key=...) is refused before anything is written or
    pickled for the jobs: W&B reads WANDB_API_KEY or `wandb login` on the node."""
    from .validation import check_no_secrets

    check_no_secrets(cfg)
    cfg = sanitize_config(cfg)  # and a value equal to $WANDB_API_KEY
    check_writable(cfg["store"]["root"])
    la = cfg["launcher"]
    if la.get("name") not in LAUNCHERS:
        raise ValueError(f"launcher={la.get('name')!r} is unknown; use launcher=local or launcher=slurm")
    check_writable(la["folder"], "launcher.folder")
    cfgs = shard_cfgs(cfg)
    states = [shard_state(c) for c in cfgs]
    clobber = [shard_label(c) for c, st in zip(cfgs, states) if st == "clobber"]
    if clobber:
        raise SweepError(f"store.root={cfg['store']['root']} has complete shards made with other settings or data "
                         f"({', '.join(clobber)}); add store.force=true to replace them, or use another store.root")
    todo = [c for c, st in zip(cfgs, states) if st == "todo"]
    for c in (c for c, st in zip(cfgs, states) if st == "running"):
        holder = read_holder(Shard(cfg['store']['root'], cfg['model']['name'], c['task'], c['shot'], c['seed']).path)
        log.warning("%s is being computed by %s: not submitted", shard_label(c), describe(holder or {}))
    need_induction = bool(cfg["sweep"].get("induction", True)) and not induction_done(cfg)
    out = Submitted(skipped=[shard_label(c) for c, st in zip(cfgs, states) if st in ("done", "clobber")],
                    running=[shard_label(c) for c, st in zip(cfgs, states) if st == "running"])
    expected = [(c["task"], c["shot"], c["seed"]) for c in cfgs]
    if not todo and not need_induction and not cfg["sweep"].get("transfer"):
        return out
    if la["name"] == "local":
        return _submit_local(cfg, todo, need_induction, expected, out, wait=True if wait is None else wait,
                             progress=progress)
    return _submit_slurm(cfg, todo, need_induction, expected, out, wait=bool(wait))


def _submit_local(cfg, todo, need_induction, expected, out: Submitted, wait: bool, progress: bool) -> Submitted:
    from tqdm.auto import tqdm

    par = max(1, int(cfg["launcher"].get("array_parallelism", 1)))
    transfer = transfer_cfgs(cfg)
    bar = tqdm(total=len(todo) + int(need_induction) + len(transfer) + 1, desc="sweep jobs", unit="job",
               disable=not progress)
    if need_induction:
        bar.set_postfix_str("induction scores")
        out.induction_job = make_executor(cfg, "induction").submit(InductionJob(), cfg)
        _wait_quietly(out.induction_job)  # one process at a time on a laptop
        bar.update()
    ex = make_executor(cfg, "shard")
    for s in range(0, len(todo), par):
        chunk = todo[s: s + par]
        bar.set_postfix_str(", ".join(shard_label(c) for c in chunk))
        wave = ex.map_array(ShardJob(), chunk)
        out.shard_jobs += wave
        for j, c in zip(wave, chunk):
            _wait_quietly(j)
            bar.update()
            if progress and j.exception() is None:
                r = j.result()
                bar.write(f"  {shard_label(c)}: {r['status']}, "
                          + ", ".join(f"unpruned {k} {v:.3f}" for k, v in (r.get("baseline") or {}).items()))
    if transfer:  # after every shard: each needs the other tasks' importance
        tex = make_executor(cfg, "transfer")
        for s in range(0, len(transfer), par):
            bar.set_postfix_str("transfer")
            wave = tex.map_array(TransferJob(), transfer[s: s + par])
            out.transfer_jobs += wave
            for j in wave:
                _wait_quietly(j)
                bar.update()
    bar.set_postfix_str("reducer")
    out.reduce_job = make_executor(cfg, "reduce").submit(ReduceJob(), cfg, expected)
    if wait:
        _wait_quietly(out.reduce_job)
        bar.update()
    bar.close()
    return out


def _submit_slurm(cfg, todo, need_induction, expected, out: Submitted, wait: bool) -> Submitted:
    make_executor(cfg, "shard")  # the cluster is up and a node fits the request, before anything is submitted
    deps = []
    if need_induction:
        out.induction_job = make_executor(cfg, "induction").submit(InductionJob(), cfg)
        deps.append(out.induction_job.job_id)
    if todo:
        # Shards that prune by induction score need the scores first.
        wait_ind = out.induction_job is not None and "induction" in (cfg["pruning"].get("compare") or [])
        dep = f"afterok:{out.induction_job.job_id}" if wait_ind else None
        out.shard_jobs = make_executor(cfg, "shard", dependency=dep).map_array(ShardJob(), todo)
        deps.append(out.shard_jobs[0].job_id.split("_")[0])  # the array id: afterany waits for all elements
    transfer = transfer_cfgs(cfg)
    if transfer:  # after every shard job (afterany: a failed source is named, the rest still runs)
        dep = "afterany:" + out.shard_jobs[0].job_id.split("_")[0] if todo else None
        out.transfer_jobs = make_executor(cfg, "transfer", dependency=dep).map_array(TransferJob(), transfer)
        deps.append(out.transfer_jobs[0].job_id.split("_")[0])
    rex = make_executor(cfg, "reduce", dependency="afterany:" + ":".join(deps))
    out.reduce_job = rex.submit(ReduceJob(), cfg, expected)
    if wait:
        for j in out.all_jobs():
            _wait_quietly(j)
    return out


def _wait_quietly(job) -> None:
    """Wait for a job; its failure is the reducer's to report, not a reason to stop the sweep."""
    try:
        job.results()  # a shard job of several tasks (ranks) has one result per task
    except Exception as e:  # noqa: BLE001 - submitit wraps the job's own exception
        log.warning("job %s failed: %s", job.job_id, str(e).strip().splitlines()[-1] if str(e).strip() else e)

