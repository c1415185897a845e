"""The distributed batch job: per model (`sweep.models`, icl_scale.sweep_models) one submitit array
element per (task, shot, demonstration seed), the induction job, with `sweep.transfer=true` a transfer
array after the shards (icl_scale.transfer), a reducer that waits for all of them (afterany, so it can
report failures), and with several models a cross-model reducer after those.

Launchers (conf/launcher/): `local` runs the jobs as local processes through submitit's
LocalExecutor (the laptop default); `slurm` submits sbatch job arrays with a dependent reducer.
Shard jobs are submitit `Checkpointable`: on preemption or timeout they are requeued and resume from
the store's checkpoints without redoing finished work.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from .collect import read_induction
from .config import setup_environment
from .lease import describe, is_live, read_holder
from .resources import SweepError, check_request, job_resources, slurm_resources, tasks_per_node
from .store import Shard, check_writable, induction_dir, shard_seed
from .sweep_models import manifest_entry, model_cfgs, write_manifest
from .tracking import sanitize_config

__all__ = ["SweepError", "check_request", "job_resources", "make_executor", "shard_cfgs", "submit", "tasks_per_node",
           "transfer_cfgs"]

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm")


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
    job holds its live lease, icl_scale.lease) or "todo". Settings that do not fit the data (e.g. shot
    or knockout.limit too large) stop the sweep before it submits; data rows that cannot be read are
    "todo": the shard job then fails with the reason, which the reducer reports."""
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
    """The model's induction scores read back (icl_scale.collect), made with these settings (induction_key)."""
    from .induction import done_paths, induction_key

    root, name = cfg["store"]["root"], cfg["model"]["name"]
    scores, problem = read_induction(root, name)
    return (scores is not None and problem is None and not cfg["store"]["force"]
            and done_paths(induction_dir(root, name), induction_key(cfg)) is not None)


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


class ScaleJob:
    """The cross-model reducer (icl_scale.scale): each model's numbers against its size."""

    def __call__(self, cfg: dict, models: list[dict], expected: list[tuple[str, int, int]]) -> dict:
        _job_env()
        from .reduce import run_reduce_scale

        return run_reduce_scale(cfg, models, expected)


def _job_env() -> None:
    setup_environment(log_level=logging.INFO)
    # W&B exports WANDB_SERVICE so that child processes reuse the parent's service; a job inherits
    # the submitter's environment, and sharing one service across jobs keeps a killed attempt's run
    # id "in use" for its requeued successor. Every job talks to a service of its own.
    os.environ.pop("WANDB_SERVICE", None)


# --- executors -----------------------------------------------------------------------------------------

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
    extra.update({k: v for k, v in (("account", la["account"]), ("qos", la["qos"]), ("dependency", dependency)) if v})
    if extra:
        params["slurm_additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex


@dataclass
class Submitted:
    shard_jobs: list = field(default_factory=list)
    induction_job: object = None
    transfer_jobs: list = field(default_factory=list)
    reduce_job: object = None  # several models: the cross-model reducer (ScaleJob)
    skipped: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)  # shards another job is computing (live lease): not submitted
    models: dict = field(default_factory=dict)  # several models: {name: that model's Submitted}
    manifest: str | None = None  # the sweep's manifest (icl_scale.sweep_models.write_manifest)

    def all_jobs(self) -> list:
        per_model = [j for m in self.models.values() for j in (m.induction_job, m.reduce_job)]
        return [j for j in (*self.shard_jobs, self.induction_job, *self.transfer_jobs, *per_model, self.reduce_job)
                if j is not None]


@dataclass
class ModelSweep:
    """One model's part of the sweep: its shard configs and their states, what is left to submit."""

    cfg: dict
    cfgs: list[dict]
    states: list[str]
    need_induction: bool

    @classmethod
    def of(cls, cfg: dict) -> ModelSweep:
        cfgs = shard_cfgs(cfg)
        return cls(cfg, cfgs, [shard_state(c) for c in cfgs], cfg["sweep"]["induction"] and not induction_done(cfg))

    def labels(self, *states: str) -> list[str]:
        return [shard_label(c) for c, st in zip(self.cfgs, self.states) if st in states]

    @property
    def todo(self) -> list[dict]:
        return [c for c, st in zip(self.cfgs, self.states) if st == "todo"]

    @property
    def pending(self) -> bool:
        return bool(self.todo or self.need_induction or self.cfg["sweep"].get("transfer"))

    @property
    def expected(self) -> list[tuple]:  # the reducer's list
        return [(c["task"], c["shot"], c["seed"]) for c in self.cfgs]


def submit(cfg: dict, wait: bool | None = None, progress: bool = False) -> Submitted:
    """Submit the sweep: every model of `sweep.models` (else the one `model`), each with its own
    resources (icl_scale.sweep_models), and with several models a cross-model reducer after theirs.
    Complete shards (same config hash) are not resubmitted. With the local launcher the array runs in
    waves of `launcher.array_parallelism`, a model's reducer after it, model after model; with Slurm
    each model's reducer depends on its array and induction job, the cross-model one on those (afterany).

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
    parts = [ModelSweep.of(c) for c in model_cfgs(cfg)]
    several = len(parts) > 1
    clobber = [f"{p.cfg['model']['name']}/" * several + label for p in parts for label in p.labels("clobber")]
    if clobber:
        raise SweepError(f"store.root={cfg['store']['root']} has complete shards made with other settings or data "
                         f"({', '.join(clobber)}); add store.force=true to replace them, or use another store.root")
    for p in parts:
        for c in (c for c, st in zip(p.cfgs, p.states) if st == "running"):
            holder = read_holder(Shard(cfg["store"]["root"], c["model"]["name"], c["task"], c["shot"], c["seed"]).path)
            log.warning("%s is being computed by %s: not submitted", shard_label(c), describe(holder or {}))
    if not several:
        out = _submit_model(parts[0], wait, progress)
        if out.all_jobs():
            out.manifest = str(write_manifest(cfg, [_manifest_entry(parts[0], out)]))
        return out
    return _submit_models(cfg, parts, wait, progress)


def _manifest_entry(p: ModelSweep, sub: Submitted) -> dict:
    jobs = {"shards": [j.job_id for j in sub.shard_jobs], "transfer": [j.job_id for j in sub.transfer_jobs],
            "induction": getattr(sub.induction_job, "job_id", None), "reduce": getattr(sub.reduce_job, "job_id", None)}
    return manifest_entry(p.cfg, [shard_label(c) for c in p.cfgs], jobs)


def _submit_model(p: ModelSweep, wait: bool | None, progress: bool) -> Submitted:
    out = Submitted(skipped=p.labels("done", "clobber"), running=p.labels("running"))
    if not p.pending:
        return out
    if p.cfg["launcher"]["name"] == "local":
        return _submit_local(p.cfg, p.todo, p.need_induction, p.expected, out, wait=True if wait is None else wait,
                             progress=progress)
    return _submit_slurm(p.cfg, p.todo, p.need_induction, p.expected, out, wait=bool(wait))


def _submit_models(cfg: dict, parts: list[ModelSweep], wait: bool | None, progress: bool) -> Submitted:
    """Each model's jobs, the sweep's manifest, then the cross-model reducer (ScaleJob) over all."""
    named = [(p.cfg["model"]["name"], p) for p in parts]
    out = Submitted(skipped=[f"{n}/{s}" for n, p in named for s in p.labels("done", "clobber")],
                    running=[f"{n}/{s}" for n, p in named for s in p.labels("running")])
    if not any(p.pending for p in parts):
        return out
    local = cfg["launcher"]["name"] == "local"
    for name, p in named:
        sub = out.models[name] = _submit_model(p, local, progress)  # locally: one model after another
        out.shard_jobs += sub.shard_jobs
        out.transfer_jobs += sub.transfer_jobs
    out.manifest = str(write_manifest(cfg, [_manifest_entry(p, out.models[n]) for n, p in named]))
    reducers = [s.reduce_job.job_id for s in out.models.values() if s.reduce_job is not None]
    dep = "afterany:" + ":".join(reducers) if reducers and not local else None
    out.reduce_job = make_executor(cfg, "reduce", dependency=dep).submit(
        ScaleJob(), cfg, [p.cfg["model"] for p in parts], parts[0].expected)
    if wait or (local and wait is None):
        for j in out.all_jobs():
            _wait_quietly(j)
    return out


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

