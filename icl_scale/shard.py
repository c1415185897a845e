"""One (model, task, shot) shard, end to end: the unit of work a sweep distributes.

`ShardRun.run` reads top to bottom as the method: each stage is checkpointed in the shard's store
folder (the resumable-run skeleton, icl_scale/runs.py), so a killed or preempted job resumes without
redoing finished work.

1. render: eval requests (eval split), importance and knock-out requests (train split);
2. importance: gradient importance of every head and FFN over `importance.n_examples` train docs;
3. knockout: FFN knock-out importance (accuracy drop per removed FFN) on the knock-out split;
4. curves: pruning curves (heads, FFNs, other head rankings, a heads x FFN grid) on the eval split
   (icl_scale/curves.py);
5. finish: importance.safetensors, masks, curves.json, samples, and the manifest marked complete.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .collect import load_shard
from .curves import CurvesStage
from .distributed import announce_failure, dist_env, dp_world, failure_text, max_over_ranks
from .evaluator import Evaluator, primary_metric
from .importance import ImportanceState, gradient_importance
from .knockout import KnockoutState, checkpoint_name, knockout_drops, knockout_mask, knockout_scores
from .lease import LeaseHeld, shard_lease
from .live import LiveRun
from .models.loading import LoadedModel, load_model, n_parameters
from .models.zero import count_gathers
from .runs import ResumableRun, start_ranks
from .schema import hashed_settings
from .scoring import Tokenised
from .store import (
    Shard,
    StoreError,
    check_writable,
    config_hash,
    library_versions,
    read_tensors,
    set_writer,
    shard_seed,
    write_json,
    write_tensors,
)
from .tasks import Request, build_requests, get_task, load_split
from .tasks.data import data_source
from .tasks.fewshot import demo_pool
from .tracking import sanitize_config
from .validation import check_config, check_data

log = logging.getLogger(__name__)

def shard_config(cfg: dict, data: dict[str, str]) -> dict:
    """What the config hash covers: the settings the schema marks `hashed` (icl_scale/schema.py) and a
    fingerprint of the data rows used (validation.check_data), so fixed data or another data.dir is
    never mistaken for done work."""
    shot = int(cfg["shot"])
    out: dict[str, Any] = {"task": cfg["task"], "shot": shot, "seed": shard_seed(shot, int(cfg["seed"]))}
    for section in ("model", "eval", "importance", "knockout", "pruning"):
        out[section] = hashed_settings(cfg, section)
    out["data"] = dict(data)
    return out


def n_truncated(lm: LoadedModel, requests: list[Request]) -> int:
    """Requests with a (context, continuation) longer than the model's max_length."""
    tk = Tokenised(lm, requests)
    return sum(not all(tk.fits(*r.pair(i)) for i in range(r.n_choices)) for r in requests)


def every_nth(n: int, fn: Callable) -> Callable:
    """fn, called only on every n-th call (checkpoint every n batches)."""
    calls = itertools.count(1)
    return lambda *a: fn(*a) if next(calls) % n == 0 else None


@dataclass
class Requests:
    eval: list[Request]
    importance: list[Request]
    knockout: list[Request]


# --- the shard ------------------------------------------------------------------------------------

class ShardRun(CurvesStage, ResumableRun):
    """One shard's run: `run()` skips a complete shard, else resumes or starts it, stage by stage
    (the resumable-run skeleton, icl_scale/runs.py)."""

    def __init__(self, cfg: dict, lm: LoadedModel | None = None):
        self.cfg, self.lm = cfg, lm
        self.task, self.shot = cfg["task"], int(cfg["shot"])
        self.shard = Shard(cfg["store"]["root"], cfg["model"]["name"], self.task, self.shot, int(cfg["seed"]))
        self.scfg = shard_config(cfg, check_data(cfg))
        self.metric = primary_metric(self.task)
        self.show_progress = bool(cfg["progress"])
        super().__init__(self.shard.path, config_hash(self.scfg), bool(cfg["store"]["force"]))

    def stages(self):
        return [("importance", self.importance), ("knockout", self.knockout), ("curves", self.curves)]

    def run(self) -> dict:
        if self.is_done():
            log.info("%s is complete (config %s): nothing to do", self.shard, self.hash)
            return {**self.shard.manifest(), "status": "skipped", "shard": str(self.shard.path)}
        self.refuse_to_clobber()
        if "induction" in self.cfg["pruning"]["compare"]:
            self.induction = self.induction_scores()  # before any work: the job may not have run
        t_start = time.time()
        start_ranks()  # several ranks split the work (icl_scale.distributed), ZeRO-3 or not
        self.lm = self.lm or load_model(self.cfg["model"])
        self.gathers = count_gathers(self.lm.model) if self.lm.engine is not None else None  # ZeRO-3
        self.zero: dict[str, dict] = {}
        t_load = time.time()
        self.requests = self.render()
        self.start(t_start)  # the store is touched only now: the model and the data are fine
        self.timings.update(load=round(t_load - t_start, 2), render=round(time.time() - t_load, 2))
        ev = self.cfg["eval"]
        self.evaluate = Evaluator(self.lm, self.task, int(ev["batch_size"]), self.show_progress,
                                  ev["physical_below"], ev["masks_per_pass"])
        self.live = LiveRun(self.cfg, self.shard, self.hash, self.resumed)  # W&B while it works
        try:
            self.run_stages(on_start=self.stage_started, on_end=self.stage_gathers)
            res = self.finish(t_start)
        except BaseException as e:
            self.live.fail(e)
            raise
        self.live.finish({"baseline": res.get("baseline"), "timings": res.get("timings"),
                          "evaluations": res.get("evaluations")})
        return res

    def stage_started(self, name: str) -> None:
        self.live.stage(name)
        self.gathers_before = self.gathers.totals() if self.gathers else None

    def stage_gathers(self, name: str) -> None:
        """Under ZeRO-3 (models.zero.GatherCount): the model parameters the stage gathered on this rank
        (every rank makes the same calls, so every rank gathers the same), in the log, the manifest's
        `zero` and W&B."""
        if not self.gathers:
            return
        z = self.zero[name] = self.gathers.since(self.gathers_before)
        log.info("stage %s: %.1f s, %.2f full-model gathers (%.3f GiB) per rank", name, self.timings[name],
                 z["gathers"], z["gathered_gb"])
        t = self.gathers.totals()
        self.live.log(**{"zero/gathers": t["gathers"], "zero/gathered_gb": t["gathered_gb"]})

    def zero_record(self) -> dict:
        """The manifest's `zero`: per stage and in all, with the model's size ({} without ZeRO-3)."""
        if not self.gathers:
            return {}
        return {"stages": self.zero, "total": self.gathers.totals(),
                "model_gb": round(self.gathers.model_bytes / 2**30, 6)}

    def is_done(self) -> bool:
        """Complete with this config hash and files that read back; a corrupt manifest or result file
        is never trusted: the shard is recomputed."""
        try:
            if self.force or not self.shard.is_complete(self.hash):
                return False
            load_shard(self.shard, self.shard.manifest())
        except StoreError as e:
            log.warning("%s: %s; recomputing it", self.shard, str(e).splitlines()[0])
            return False
        return True

    def other_complete(self) -> str | None:
        """The config hash of a complete shard in this folder made with other settings or data, which
        this run would replace (None if there is none, or with store.force=true)."""
        try:
            m = self.shard.manifest()
        except StoreError:
            return None  # a corrupt manifest is never trusted: recompute
        if m and m.get("status") == "complete" and m.get("config_hash") != self.hash and not self.force:
            return m.get("config_hash")
        return None

    def refuse_to_clobber(self) -> None:
        """A complete shard made with other settings or data is replaced only with store.force=true:
        the shard's folder does not depend on its settings."""
        old = self.other_complete()
        if old:
            raise StoreError(f"{self.shard.path} holds a complete shard made with other settings or data "
                             f"(config {old}, this run {self.hash}); add store.force=true to "
                             f"replace it, or set store.root to another folder")

    def start(self, t_start: float) -> None:
        """Open the checkpoint (resumed when it has this config hash) and mark the shard running."""
        self.open_checkpoint()
        self.shard.remove_stale_temps()
        self.resolved = sanitize_config(self.cfg)  # the settings; auto ones as they resolve
        self.shard.write_manifest(status="running", config_hash=self.hash, config=self.scfg,
                                  resolved=self.resolved, versions=library_versions(),
                                  started=t_start, data_sources=self.data_sources, truncated=self.truncated,
                                  ranks=dp_world()[1],  # data-parallel ranks that split the work
                                  parameters=n_parameters(self.lm.model))

    # --- stages ---------------------------------------------------------------------------------

    def render(self) -> Requests:
        """Importance docs are the first `importance.n_examples` train docs (of the task's training
        docs, `importance.docs`); knock-out runs on the eval docs (`knockout.split=paper`) or on the
        last `knockout.limit` train docs, then cut from the importance pool (`heldout`)."""
        c, seed = self.cfg, int(self.cfg["seed"])
        data_dir = c["data"]["dir"]
        ev = c["eval"]
        eval_reqs = build_requests(self.task, split=ev["split"], shot=self.shot, seed=seed,
                                   limit=ev["limit"], data_dir=data_dir)
        train_reqs = build_requests(self.task, split="train", shot=self.shot, seed=seed, data_dir=data_dir)
        eval_split = ev["split"] or get_task(self.task).eval_split
        self.data_sources = {split: data_source(self.task, split, data_dir) for split in {"train", eval_split}}
        log.info("%s data: %s", self.shard, self.data_sources)
        if c["knockout"]["split"] == "paper":
            ko_reqs, imp_pool = eval_reqs, train_reqs
        else:
            k = int(c["knockout"]["limit"])
            if k < 1 or k >= len(train_reqs):
                raise ValueError(f"knockout.limit={k} must be in 1..{len(train_reqs) - 1} for {self.task} "
                                 f"({len(train_reqs)} train docs)")
            ko_reqs, imp_pool = train_reqs[-k:], train_reqs[:-k]
        if c["importance"]["docs"] == "training_docs":  # the harness's training_docs (WSC: positives)
            keep = set(demo_pool(self.task, load_split(get_task(self.task), "train", data_dir)))
            imp_pool = [r for r in imp_pool if r.doc_id in keep]
        reqs = Requests(eval_reqs, imp_pool[: int(c["importance"]["n_examples"])], ko_reqs)
        self.truncated = {name: n_truncated(self.lm, getattr(reqs, name))
                          for name in ("eval", "importance", "knockout")}
        if any(self.truncated.values()):
            log.warning("%s: contexts longer than max_length=%d are cut from the left (as lm-eval does): %s",
                        self.shard, self.lm.max_length, self.truncated)
        return reqs

    def gradient_importance(self, head_mask=None, state=None, on_batch=None) -> ImportanceState:
        ic = self.cfg["importance"]
        return gradient_importance(self.lm, self.requests.importance, batch_size=ic["batch_size"],
                                   head_mask=head_mask, abs_mode=ic["abs"], state=state,
                                   on_batch=on_batch, progress=self.show_progress,
                                   continuation=ic["continuation"])

    def importance_result(self, state: ImportanceState) -> dict[str, torch.Tensor]:
        ic = self.cfg["importance"]
        return state.result(bool(ic["normalize_layers"]), ic["normalize"])

    def importance(self) -> None:
        """Gradient importance, checkpointed every `importance.checkpoint_every` steps."""
        path = self.shard.ckpt("importance_state.safetensors")
        saved = self.read_checkpoint(path, read_tensors)
        state = ImportanceState.from_tensors(saved) if saved else None
        every = int(self.cfg["importance"]["checkpoint_every"])

        def checkpoint(s: ImportanceState) -> None:
            write_tensors(path, s.tensors())
            self.checkpointed("importance", s.n_examples)

        save = every_nth(every, checkpoint)

        def on_batch(s: ImportanceState) -> None:
            self.live.progress("importance", s.n_examples, len(self.requests.importance), tokens=s.n_tokens)
            save(s)

        state = self.gradient_importance(state=state, on_batch=on_batch)
        write_tensors(path, state.tensors())
        self.imp_state, self.imp = state, self.importance_result(state)
        log.info("stage importance: %d examples, importance.batch_size=%d per rank per step (setting: %s)",
                 state.n_examples, state.batch_size, self.cfg["importance"]["batch_size"])
        self.resolved["importance"]["batch_size"] = state.batch_size  # auto: the size its steps were made with
        self.shard.write_manifest(resolved=self.resolved)

    def knockout(self) -> None:
        """FFN knock-out importance on the knock-out split (icl_scale.knockout: per batch of contexts one
        unpruned pass, then every knock-out restarted at its layer), checkpointed after every batch in
        checkpoint/knockout_state.safetensors. Each knock-out's per-doc results go into the evaluator's
        memo (Evaluator.remember), so the curves never rescore a mask scored here
        (the unpruned point with knockout.split=paper, an FFN level that removes one FFN) and the
        manifest's `evaluations` counts them as it did when each knock-out was an Evaluator call."""
        reqs, n, ev = self.requests.knockout, self.lm.adapter.geometry.n_layers, self.evaluate
        name = checkpoint_name(self.lm)  # data-parallel ranks: each its own slice's file
        path = self.shard.ckpt(name)
        saved = self.read_checkpoint(path, read_tensors)
        drops = self.state("knockout")  # layer ("-1": none knocked out) -> metric, once scored
        # (else: finished before per-batch checkpoints); every rank takes the same branch
        if max_over_ranks(saved is not None) or len(drops) < n + 1:
            own = name != "knockout_state.safetensors"
            state = knockout_scores(self.lm, reqs, batch_size=ev.batch_size,
                                    state=KnockoutState.from_tensors(saved) if saved else None,
                                    on_batch=lambda s: self.knockout_batch(path, s, own), progress=self.show_progress,
                                    masks_per_pass=ev.per_pass(reqs, n + 1))
            for layer in range(-1, n):
                mask = knockout_mask(n, layer)
                done = ev.key(reqs, None, mask) in ev.memo
                metrics, _ = ev.remember(reqs, None, mask, None if done else state.scores(reqs, layer))
                drops[str(layer)] = metrics[self.metric]["value"]
                self.live.point("knockout", layer, metrics[self.metric]["value"])
            self.save()
        self.ko_base, self.imp["ffn_knockout"] = knockout_drops({int(k): v for k, v in drops.items()}, n)
        s = self.imp_state
        write_tensors(self.shard.file("importance.safetensors"), self.imp,
                      metadata={"n_examples": str(s.n_examples), "n_tokens": str(s.n_tokens),
                                "knockout_baseline": repr(self.ko_base), "config_hash": self.hash})

    def knockout_batch(self, path, state: KnockoutState, own: bool) -> None:
        """After each knock-out batch: the checkpoint (this rank's own file with several ranks) and progress."""
        write_tensors(path, state.tensors(), every_rank=own)
        self.live.progress("knockout", int(state.done.sum()), state.done.numel())
        self.knockout_batches = getattr(self, "knockout_batches", 0) + 1
        self.checkpointed("knockout", self.knockout_batches)

    # --- outputs -------------------------------------------------------------------------------------

    def finish(self, t_start: float) -> dict:
        kinds = self.state("curves")
        grid = kinds["combined"]
        curves = {
            "model": self.cfg["model"]["name"], "task": self.task, "shot": self.shot, "seed": self.shard.seed,
            "metric": self.metric,
            "n_eval": len(self.requests.eval), "n_importance": self.imp_state.n_examples,
            "n_knockout": len(self.requests.knockout),
            "heads": self.curve_rows("heads"), "ffn": self.curve_rows("ffn"),
            "heads_by": {kind: self.curve_rows(kind) for kind in kinds if kind.startswith("heads_")},
            "ffn_by": {kind: self.curve_rows(kind) for kind in kinds if kind.startswith("ffn_")},
            "combined": sorted(({"value": v["metrics"][self.metric]["value"], **v} for v in grid.values()),
                               key=lambda r: (r["head_level"], r["ffn_level"])),
            "ffn_ranking": self.cfg["pruning"]["ffn_ranking"], "knockout_baseline": self.ko_base,
        }
        write_json(self.shard.file("curves.json"), curves)
        self.timings["total"] = round(time.time() - t_start, 2)
        baseline = {self.metric: curves["heads"][0]["value"]} if curves["heads"] else {}
        m = self.shard.write_manifest(status="complete", config_hash=self.hash, timings=self.timings,
                                      zero=self.zero_record(),
                                      finished=time.time(), evaluations=self.evaluate.n_scored,
                                      evaluations_pruned_copy=self.evaluate.n_physical,
                                      evaluations_shared_pass=self.evaluate.n_shared, baseline=baseline)
        self.shard.clear_checkpoint()
        return {"status": "complete", "shard": str(self.shard.path), **m}


def run_shard(cfg: dict, lm: LoadedModel | None = None) -> dict:
    """Run (or resume, or skip) one shard. `cfg` is the resolved config as a plain dict.

    A failure is recorded in the manifest (status `failed`, the error) so the reducer can name it;
    finished stages stay checkpointed and the next run resumes from them."""
    check_config(cfg)  # every setting, before a model loads or the store is touched
    set_writer(dist_env().is_main)
    check_writable(cfg["store"]["root"])
    shard = Shard(cfg["store"]["root"], cfg["model"]["name"], cfg["task"], int(cfg["shot"]), int(cfg["seed"]))
    try:
        run = ShardRun(cfg, lm)  # reads the data first: a bad row is a failure the reducer names
        with shard_lease(cfg, shard.path, dist_env().is_main):  # one writer per shard (icl_scale.lease)
            return run.run()
    except LeaseHeld:
        raise  # the shard is another job's: its manifest is not ours to mark
    except BaseException as e:
        _record_failure(shard, e)
        raise


def _record_failure(shard: Shard, e: BaseException) -> None:
    """Name the error in the manifest for the reducer; a complete shard is never marked failed
    (e.g. a run with other settings that refused to replace it). With several ranks the record names
    the job's first failing rank and its exception (icl_scale.distributed.announce_failure), and that
    rank writes it (the others stop when they see the failure)."""
    first = announce_failure(e)
    try:
        m = shard.manifest()
    except StoreError:
        m = None
    if m and m.get("status") == "complete":
        return
    fields = {"error": failure_text(e)}
    if first is not None:
        fields = {"error": f"rank {first['rank']}/{first['world']}: {first['error']}", "failed_rank": first["rank"]}
    try:
        shard.write_manifest(status="failed", every_rank=first is not None, **fields)
    except Exception:  # noqa: BLE001 - never mask the original error
        pass
