"""A running shard's own W&B run, logged while it works (rank 0): the stage, progress and ETA,
tokens/s, peak memory, each knock-out and curve point as it lands, and a failure with its reason.

One run per shard: its id is fixed by the shard's folder and config hash (`shard_run_id`), so a
requeued or resumed job continues the same run (W&B `resume="allow"`; offline, each attempt is a
folder of its own with that id, and `wandb sync` merges them). Runs are grouped by the sweep
(`wandb.group`, else `sweep.name`). The reducer adds its curves table to the same run and lists the
shard runs in its own. `wandb.mode=disabled` (or any rank but 0) logs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import resource
import sys
import time
from pathlib import Path

import torch

from .distributed import dist_env
from .tracking import TrackedRun, TrackingError, resolve_mode, start_run

log = logging.getLogger(__name__)


def shard_run_id(shard_path: str | Path, config_hash: str) -> str:
    """The shard's W&B run id: the same for every attempt at this folder with these settings."""
    return "shard-" + hashlib.sha1(f"{Path(shard_path).resolve()}|{config_hash}".encode()).hexdigest()[:16]


def shard_run_name(task: str, shot: int, seed: int) -> str:
    return f"{task}-{shot}shot-seed{seed}"


def run_group(cfg: dict) -> str | None:
    return cfg["wandb"]["group"] or cfg["sweep"]["name"] or cfg["model"]["name"]


def peak_memory_gb() -> float:
    """Peak GPU memory of this process if it uses a GPU, else its peak resident memory."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class LiveRun:
    """The shard's live run (a no-op when W&B is disabled or on ranks other than 0)."""

    def __init__(self, cfg: dict, shard, config_hash: str, resumed: bool):
        self.run: TrackedRun | None = None
        wb = cfg["wandb"]
        if not dist_env().is_main or resolve_mode(wb["mode"]) == "disabled":
            return
        args = dict(name=shard_run_name(shard.task, shard.shot, shard.seed), group=run_group(cfg), job_type="shard",
                    run_id=shard_run_id(shard.path, config_hash), mode=wb["mode"], project=wb["project"],
                    entity=wb["entity"], dir=wb["dir"])
        conf = {k: cfg[k] for k in ("model", "task", "shot", "seed", "eval", "importance", "knockout", "pruning")
                if k in cfg}
        for attempt in range(2):  # a requeued job may start while the killed attempt still holds the id
            try:
                self.run = start_run(conf, **args)
                break
            except TrackingError as e:  # monitoring never stops a shard: it goes on without
                if attempt:
                    log.warning("%s: no live W&B run (%s)", shard, str(e).splitlines()[0])
                    return
                time.sleep(10)
        self.run.log_summary({"status": "running", "resumed": resumed})
        self.stage_t0, self.first = time.time(), {}

    def log(self, **metrics) -> None:
        if self.run:
            self.run.log_metrics({**metrics, "peak_memory_gb": round(peak_memory_gb(), 3)})

    def stage(self, name: str) -> None:
        self.stage_t0, self.first = time.time(), {}
        self.log(stage=name)

    def progress(self, stage: str, done: float, total: float, tokens: int | None = None) -> None:
        """`done` of `total` units of this stage; ETA and tokens/s from this attempt's own rate."""
        if not self.run:
            return
        t = time.time() - self.stage_t0
        d0, tok0 = self.first.setdefault("done", done), self.first.setdefault("tokens", tokens or 0)
        rate = (done - d0) / t if t > 0 and done > d0 else None
        m = {f"{stage}/done": done, f"{stage}/total": total, f"{stage}/fraction": done / total if total else 1.0}
        if rate:
            m[f"{stage}/eta_s"] = round((total - done) / rate, 1)
        if tokens is not None and t > 0:
            m[f"{stage}/tokens_per_s"] = round((tokens - tok0) / t, 1)
        self.log(stage=stage, **m)

    def point(self, curve: str, level, value: float) -> None:
        """One knock-out or pruning-curve point, as soon as it is measured."""
        self.log(**{f"{curve}/level": level, f"{curve}/value": value})

    def finish(self, summary: dict) -> None:
        if self.run:
            self.run.log_summary({"status": "complete", **summary})
            self.run.finish(0)
            self.run = None

    def fail(self, e: BaseException) -> None:
        if self.run:
            first = str(e).splitlines()[0] if str(e) else ""
            self.run.log_summary({"status": "failed", "error": f"{type(e).__name__}: {first}"})
            self.run.finish(1)
            self.run = None
