"""The resumable-run skeleton every long job shares (a shard, a transfer run): an explicit list of
stages run in order, each with a completion marker in the run's checkpoint, resume from a
checkpoint made with the same config hash, rank 0 as the only writer, and the failure record.

    class MyRun(ResumableRun):
        def stages(self):
            return [("scores", self.scores), ("finish", self.finish)]

A stage keeps its fine-grained progress (per batch, per level) in `self.checkpoint.state[stage]`
(saved with `save()`) or in its own files under the checkpoint folder (`ckpt(name)`), and skips
what is there when it runs again; the skeleton records when it has finished (`checkpoint.done`),
times it (`timings`), and calls `STAGE_CALLBACKS` after it (a monitor, or a test that stops the run
at a known point: tests/faults.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .distributed import barrier, dist_env, init_process_group
from .store import StoreError, clear_checkpoint, read_json, set_writer, write_json

log = logging.getLogger(__name__)

# fn(run, stage) after every finished stage, and fn(run, stage, n_done) after every progress
# checkpoint a stage writes; exceptions propagate (a callback may stop the run).
STAGE_CALLBACKS: list[Callable] = []
CHECKPOINT_CALLBACKS: list[Callable] = []


@dataclass
class Checkpoint:
    """checkpoint/progress.json: which config it belongs to, the finished stages, each stage's state."""

    config_hash: str
    done: list[str] = field(default_factory=list)
    state: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> Checkpoint:
        # (a checkpoint from before the skeleton kept the stages' states at the top level)
        state = d.get("state", {k: v for k, v in d.items() if k not in ("config_hash", "done")})
        return cls(d["config_hash"], list(d.get("done", [])), state)


def start_ranks() -> None:
    """Several ranks (torchrun, Slurm tasks) split a run's work: join their process group; only
    rank 0 writes to the store."""
    env = dist_env()
    set_writer(env.is_main)
    if env.world_size > 1:
        init_process_group()


class ResumableRun:
    """A run in `folder` (its checkpoint in `folder/checkpoint/`) for one config hash."""

    def __init__(self, folder: Path, config_hash: str, force: bool = False):
        self.folder, self.hash, self.force = Path(folder), config_hash, force
        self.timings: dict[str, float] = {}
        self.resumed = False

    def stages(self) -> list[tuple[str, Callable[[], None]]]:
        raise NotImplementedError

    def ckpt(self, name: str) -> Path:
        return self.folder / "checkpoint" / name

    def open_checkpoint(self) -> None:
        """Resume the checkpoint if it belongs to this config; one from another config (or a forced
        rerun) is discarded, never mixed in. A fresh checkpoint is stamped at once, so a partial
        first stage is reused after a crash."""
        saved = self.read_checkpoint(self.ckpt("progress.json"), read_json) or {}
        barrier()  # every rank has read the checkpoint before rank 0 may clear it
        self.resumed = isinstance(saved, dict) and saved.get("config_hash") == self.hash and not self.force
        self.checkpoint = Checkpoint.from_json(saved) if self.resumed else Checkpoint(self.hash)
        if not self.resumed:
            clear_checkpoint(self.folder)
            self.save()

    def read_checkpoint(self, path: Path, read):
        """A checkpoint only saves time: an unreadable one is discarded with a warning."""
        if not path.exists():
            return None
        try:
            return read(path)
        except StoreError as e:
            log.warning("%s: discarding an unreadable checkpoint (%s)", self.folder, str(e).splitlines()[0])
            return None

    def save(self) -> None:
        write_json(self.ckpt("progress.json"), asdict(self.checkpoint))

    def state(self, stage: str) -> dict:
        return self.checkpoint.state.setdefault(stage, {})

    def run_stages(self, on_start: Callable[[str], None] | None = None,
                   on_end: Callable[[str], None] | None = None) -> None:
        """Every stage in order; each is timed, marked done in the checkpoint, and announced (`on_end`
        after its timing). (The run's last step, writing its results and clearing the checkpoint, is
        the subclass's.)"""
        for name, fn in self.stages():
            if on_start:
                on_start(name)
            t0 = time.time()
            fn()
            self.timings[name] = round(time.time() - t0, 2)
            if on_end:
                on_end(name)
            if name not in self.checkpoint.done:
                self.checkpoint.done.append(name)
                self.save()
            for cb in STAGE_CALLBACKS:
                cb(self, name)

    def checkpointed(self, stage: str, n_done: int) -> None:
        """A stage wrote a progress checkpoint covering `n_done` items."""
        for cb in CHECKPOINT_CALLBACKS:
            cb(self, stage, n_done)
