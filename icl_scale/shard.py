"""One (model, task, shot) shard, end to end: the unit of work a sweep distributes.

`ShardRun.run` reads top to bottom as the method: each stage is checkpointed in the shard's store
folder, so a killed or preempted job resumes without redoing finished work.

1. render: eval requests (eval split), importance and knock-out requests (train split);
2. importance: gradient importance of every head and FFN over `importance.n_examples` train docs;
3. knockout: FFN knock-out importance (accuracy drop per removed FFN) on the knock-out split;
4. curves: pruning curves (heads, FFNs, other head rankings, a heads x FFN grid) on the eval split;
5. finish: importance.safetensors, masks, curves.json, samples, and the manifest marked complete.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import pruning as P
from .collect import load_shard, read_induction
from .distributed import barrier, dist_env, dp_world, init_process_group, max_over_ranks
from .importance import ImportanceState, gradient_importance
from .knockout import KnockoutState, checkpoint_name, knockout_drops, knockout_mask, knockout_scores
from .live import LiveRun
from .models.loading import LoadedModel, load_model
from .models.physical import cheaper_pruned, prune_physically
from .scoring import Tokenised, score_masks, score_requests
from .store import (
    Shard,
    StoreError,
    check_writable,
    config_hash,
    library_versions,
    read_json,
    read_tensors,
    set_writer,
    shard_seed,
    write_json,
    write_jsonl,
    write_tensors,
)
from .tasks import Request, build_requests, compute_metrics, get_task, load_split
from .tasks.data import data_source
from .tasks.fewshot import demo_pool
from .tracking import sanitize_config
from .validation import check_config, check_data

log = logging.getLogger(__name__)

# Settings that change a shard's numbers (paths, batch sizes, launcher, W&B do not).
HASHED = {
    "model": ("name", "source", "id", "path", "revision", "gguf_file", "family", "seed", "config", "dtype",
              "doc_start", "max_length"),
    "eval": ("split", "limit"),
    "importance": ("n_examples", "docs", "normalize", "abs", "normalize_layers", "continuation"),
    "knockout": ("split", "limit"),
    "pruning": ("levels", "combined_levels", "count", "ffn_ranking", "rescore_each_level", "compare",
                "random_seeds"),
}


def shard_config(cfg: dict, data: dict[str, str]) -> dict:
    """What the config hash covers: the settings in HASHED and a fingerprint of the data rows used
    (validation.check_data), so fixed data or another data.dir is never mistaken for done work."""
    shot = int(cfg["shot"])
    out: dict[str, Any] = {"task": cfg["task"], "shot": shot, "seed": shard_seed(shot, int(cfg.get("seed", 0)))}
    for section, keys in HASHED.items():
        sec = cfg.get(section) or {}
        out[section] = {k: sec.get(k) for k in keys if k in sec}
    out["data"] = dict(data)
    return out


def primary_metric(task: str) -> str:
    return get_task(task).metrics[0]


def _level_key(p: float) -> str:
    return f"{p:g}"


# --- evaluation under masks ----------------------------------------------------------------------

def _mask_key(mask: torch.Tensor | None) -> bytes | None:
    """All-ones masks are no mask: the 0% levels and every curve's unpruned point share one key."""
    if mask is None or bool((mask == 1).all()):
        return None
    return mask.detach().to(torch.float32).cpu().numpy().tobytes()


def masks_per_pass(setting, batch_size: int, requests) -> int:
    """How many masks share one pass (`eval.masks_per_pass`): an int, or "auto": as many copies of the
    request list as fill one pass of `batch_size` prefixes (its distinct contexts), so 1 whenever the
    list fills a pass by itself. Below a full pass, a pass of more rows is cheaper per row (one read
    of every weight, one parameter gather under ZeRO-3, one unembedding call for all its rows;
    bench/masks.py: 1.2-1.4x on a CPU). With full passes, sharing only packs equal-length copies
    into fewer continuation passes (~1.1x on a CPU): auto leaves those lists as they were."""
    if setting != "auto":
        return int(setting)
    return max(1, batch_size // max(1, len({tuple(r.contexts) for r in requests})))


@dataclass
class Evaluator:
    """Scores a request list under (head, FFN) masks and computes the task metrics.

    Evaluations are memoised by the masks' contents: the curves share their unpruned point, the
    heads x FFN grid's edges are the single-kind curves, and different rankings often give the same
    mask at a level, so a shard never evaluates one mask twice (a third of the evaluations in the
    demo). Results are deep-copied out, so callers may change them. `prefetch` scores several
    masks in shared passes ahead of their calls."""

    lm: LoadedModel
    task: str
    batch_size: int
    progress: bool = False
    physical_below: float | None = None  # eval.physical_below: see score()
    masks_per_pass: int | str = 1  # eval.masks_per_pass: see prefetch()

    def __post_init__(self):
        self.memo: dict[tuple, tuple] = {}
        self.n_scored = self.n_physical = self.n_shared = 0

    def key(self, requests, head_mask=None, ffn_mask=None) -> tuple:
        return (id(requests), len(requests), _mask_key(head_mask), _mask_key(ffn_mask))

    def remember(self, requests, head_mask, ffn_mask, scores) -> tuple[dict, list[dict]]:
        """Metrics and per-doc rows of `scores` (score_requests' shape) under these masks, memoised
        (also for scores computed elsewhere, e.g. the knock-out stage's restarted passes)."""
        key = self.key(requests, head_mask, ffn_mask)
        if key not in self.memo:
            metrics, per_doc = compute_metrics(self.task, requests, [[c.logprob for c in row] for row in scores])
            for row, sc in zip(per_doc, scores):
                row["logprobs"] = [c.logprob for c in sc]
                row["n_tokens"] = [c.n_tokens for c in sc]
            self.memo[key] = (requests, metrics, per_doc)  # holding `requests` keeps its id unique
            self.n_scored += 1
        return self.memo[key][1:]

    def __call__(self, requests, head_mask=None, ffn_mask=None, desc="eval") -> tuple[dict, list[dict]]:
        if self.key(requests, head_mask, ffn_mask) not in self.memo:
            self.remember(requests, head_mask, ffn_mask, self.score(requests, head_mask, ffn_mask, desc))
        return copy.deepcopy(self.memo[self.key(requests, head_mask, ffn_mask)][1:])

    def on_pruned_copy(self, head_mask, ffn_mask) -> bool:
        return self.physical_below is not None and cheaper_pruned(self.lm, _keep(head_mask), _keep(ffn_mask),
                                                                   self.physical_below)

    def score(self, requests, head_mask, ffn_mask, desc):
        """Gated, or on a physically pruned copy that computes only the kept heads and FFNs when its
        blocks cost at most `physical_below` of the full model's (models/physical.cheaper_pruned;
        None: always gated). Both give the same numbers up to float rounding."""
        if not self.on_pruned_copy(head_mask, ffn_mask):
            return score_requests(self.lm, requests, head_mask, ffn_mask, batch_size=self.batch_size,
                                  progress=self.progress, desc=desc)
        self.n_physical += 1
        return score_requests(prune_physically(self.lm, _keep(head_mask), _keep(ffn_mask)), requests,
                              batch_size=self.batch_size, progress=self.progress, desc=f"{desc} (pruned copy)")

    def prefetch(self, requests, masks, desc="eval") -> None:
        """Before each call of a run of calls on `masks` ([(head_mask, ffn_mask)], all of them, in the
        order they are asked for): the first `masks_per_pass` that are neither memoised nor cheaper on
        a pruned copy, scored together in shared passes (scoring.score_masks) and memoised. The masks
        already asked for are memoised, so the group starts at the one needed now, and a job that
        stops loses at most the group being scored. Nothing when fewer than two would share."""
        k = masks_per_pass(self.masks_per_pass, self.batch_size, requests)
        group, seen = [], set()
        for hm, fm in masks:
            key = self.key(requests, hm, fm)
            if len(group) == k:
                break
            if key in self.memo or key in seen or self.on_pruned_copy(hm, fm):
                continue
            seen.add(key)
            group.append((hm, fm))
        if len(group) < 2:
            return
        scores = score_masks(self.lm, requests, group, batch_size=self.batch_size, progress=self.progress,
                             desc=f"{desc} ({len(group)} masks per pass)")
        for (hm, fm), sc in zip(group, scores):
            self.remember(requests, hm, fm, sc)
        self.n_shared += len(group)


def _keep(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if _mask_key(mask) is None else mask


# --- checkpoint, stage timing, fault hooks --------------------------------------------------------

@dataclass
class Progress:
    """A running shard's checkpoint (checkpoint/progress.json): what is finished, for one config hash.
    Importance sums and the knock-out stage's per-batch scores are checkpointed separately
    (checkpoint/importance_state.safetensors, checkpoint/knockout_state.safetensors)."""

    config_hash: str
    # layer ("-1" = no knock-out) -> metric, once the knock-out stage is done; the stage's per-batch
    # progress is checkpoint/knockout_state.safetensors (icl_scale.knockout.KnockoutState)
    knockout: dict[str, float] = field(default_factory=dict)
    curves: dict[str, dict] = field(default_factory=dict)  # curve -> level -> result; "combined" -> cell

    @classmethod
    def from_json(cls, d: dict) -> Progress:
        return cls(d["config_hash"], d.get("knockout", {}), d.get("curves", {}))


# Fault injection for the crash/preemption tests, in this one place. A Slurm job is a separate
# process that a test cannot monkeypatch, so "<stage>:<file>" in this variable makes a fresh (not
# resumed) run wait after <stage> for as long as <file> exists: the test requeues it at a known point
# instead of racing a job that may already have finished; the resumed run goes straight through.
# "importance@<n>:<file>" holds in the middle of the importance pass, once a checkpoint with at least
# <n> examples is written.
HOLD_ENV = "ICL_SCALE_HOLD_AFTER"
HOLD_MAX_S = 900


def after_stage(stage: str, resumed: bool) -> None:
    """Runs after every finished stage; in-process tests monkeypatch it to inject a crash."""
    _hold(stage, resumed)


def _hold(point: str, resumed: bool) -> None:
    hold_point, _, hold_file = os.environ.get(HOLD_ENV, "").partition(":")
    t0 = time.time()
    while (hold_point == point and hold_file and not resumed and os.path.exists(hold_file)
           and time.time() - t0 < HOLD_MAX_S):
        time.sleep(0.2)


def _hold_in_importance(n_examples: int, resumed: bool) -> None:
    point = os.environ.get(HOLD_ENV, "").partition(":")[0]
    if point.startswith("importance@") and n_examples >= int(point.partition("@")[2]):
        _hold(point, resumed)


class Stages:
    """Times each stage (manifest `timings`) and calls `after_stage` when one finishes."""

    def __init__(self, resumed: bool):
        self.resumed = resumed
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.time()
        yield
        self.timings[name] = round(time.time() - t0, 2)
        after_stage(name, self.resumed)


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

class ShardRun:
    """One shard's run: `run()` skips a complete shard, else resumes or starts it, stage by stage."""

    def __init__(self, cfg: dict, lm: LoadedModel | None = None):
        self.cfg, self.lm = cfg, lm
        self.task, self.shot = cfg["task"], int(cfg["shot"])
        self.shard = Shard(cfg["store"]["root"], cfg["model"]["name"], self.task, self.shot, int(cfg.get("seed", 0)))
        self.scfg = shard_config(cfg, check_data(cfg))
        self.hash = config_hash(self.scfg)
        self.metric = primary_metric(self.task)
        self.force = bool(cfg["store"].get("force"))
        self.show_progress = bool(cfg.get("progress", False))

    def run(self) -> dict:
        if self.is_done():
            log.info("%s is complete (config %s): nothing to do", self.shard, self.hash)
            return {**self.shard.manifest(), "status": "skipped", "shard": str(self.shard.path)}
        self.refuse_to_clobber()
        if "induction" in (self.cfg["pruning"].get("compare") or []):
            self.induction = self.induction_scores()  # before any work: the job may not have run
        t_start = time.time()
        if dist_env().world_size > 1:  # ranks split the work (icl_scale.distributed), ZeRO-3 or not
            init_process_group()
        self.lm = self.lm or load_model(self.cfg["model"])
        t_load = time.time()
        self.requests = self.render()
        self.start(t_start)  # the store is touched only now: the model and the data are fine
        self.stages.timings.update(load=round(t_load - t_start, 2), render=round(time.time() - t_load, 2))
        ev = self.cfg["eval"]
        self.evaluate = Evaluator(self.lm, self.task, int(ev.get("batch_size", 8)), self.show_progress,
                                  ev.get("physical_below"), ev.get("masks_per_pass", "auto"))
        self.live = LiveRun(self.cfg, self.shard, self.hash, self.stages.resumed)  # W&B while it works
        try:
            for stage in ("importance", "knockout", "curves"):
                self.live.stage(stage)
                with self.stages(stage):
                    getattr(self, stage)()
            res = self.finish(t_start)
        except BaseException as e:
            self.live.fail(e)
            raise
        self.live.finish({"baseline": res.get("baseline"), "timings": res.get("timings"),
                          "evaluations": res.get("evaluations")})
        return res

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
        """Resume the checkpoint if it belongs to this config; a checkpoint from another config (or a
        forced rerun) is discarded, never mixed in. The fresh checkpoint is stamped at once, so a
        partial importance pass is reused after a crash."""
        prog_path = self.shard.ckpt("progress.json")
        saved = self._read_checkpoint(prog_path, read_json) or {}
        barrier()  # every rank has read the checkpoint before rank 0 may clear it
        resumed = saved.get("config_hash") == self.hash and not self.force
        self.progress = Progress.from_json(saved) if resumed else Progress(self.hash)
        if not resumed:
            self.shard.clear_checkpoint()
            self.save_progress()
        self.stages = Stages(resumed)
        self.shard.remove_stale_temps()
        self.shard.write_manifest(status="running", config_hash=self.hash, config=self.scfg,
                                  resolved=sanitize_config(self.cfg), versions=library_versions(),
                                  started=t_start, data_sources=self.data_sources, truncated=self.truncated,
                                  ranks=dp_world()[1])  # data-parallel ranks that split the work

    def _read_checkpoint(self, path, read):
        """A checkpoint only saves time: an unreadable one is discarded with a warning."""
        if not path.exists():
            return None
        try:
            return read(path)
        except StoreError as e:
            log.warning("%s: discarding an unreadable checkpoint (%s)", self.shard, str(e).splitlines()[0])
            return None

    def save_progress(self) -> None:
        write_json(self.shard.ckpt("progress.json"), asdict(self.progress))

    # --- stages ---------------------------------------------------------------------------------

    def render(self) -> Requests:
        """Importance docs are the first `importance.n_examples` train docs (of the task's training
        docs, `importance.docs`); knock-out runs on the eval docs (`knockout.split=paper`) or on the
        last `knockout.limit` train docs, then cut from the importance pool (`heldout`)."""
        c, seed = self.cfg, int(self.cfg.get("seed", 0))
        data_dir = (c.get("data") or {}).get("dir")
        ev = c["eval"]
        eval_reqs = build_requests(self.task, split=ev.get("split"), shot=self.shot, seed=seed,
                                   limit=ev.get("limit"), data_dir=data_dir)
        train_reqs = build_requests(self.task, split="train", shot=self.shot, seed=seed, data_dir=data_dir)
        eval_split = ev.get("split") or get_task(self.task).eval_split
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
        return gradient_importance(self.lm, self.requests.importance, batch_size=int(ic.get("batch_size", 4)),
                                   head_mask=head_mask, abs_mode=ic.get("abs", "per_token"), state=state,
                                   on_batch=on_batch, progress=self.show_progress,
                                   continuation=ic["continuation"])

    def importance_result(self, state: ImportanceState) -> dict[str, torch.Tensor]:
        ic = self.cfg["importance"]
        return state.result(bool(ic["normalize_layers"]), ic["normalize"])

    def importance(self) -> None:
        """Gradient importance, checkpointed every `importance.checkpoint_every` steps."""
        path = self.shard.ckpt("importance_state.safetensors")
        saved = self._read_checkpoint(path, read_tensors)
        state = ImportanceState.from_tensors(saved) if saved else None
        every = max(1, int(self.cfg["importance"].get("checkpoint_every", 8)))

        def checkpoint(s: ImportanceState) -> None:
            write_tensors(path, s.tensors())
            _hold_in_importance(s.n_examples, self.stages.resumed)

        save = every_nth(every, checkpoint)

        def on_batch(s: ImportanceState) -> None:
            self.live.progress("importance", s.n_examples, len(self.requests.importance), tokens=s.n_tokens)
            save(s)

        state = self.gradient_importance(state=state, on_batch=on_batch)
        write_tensors(path, state.tensors())
        self.imp_state, self.imp = state, self.importance_result(state)

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
        saved = self._read_checkpoint(path, read_tensors)
        # (else: finished before per-batch checkpoints); every rank takes the same branch
        if max_over_ranks(saved is not None) or len(self.progress.knockout) < n + 1:
            own = name != "knockout_state.safetensors"
            state = knockout_scores(self.lm, reqs, batch_size=ev.batch_size,
                                    state=KnockoutState.from_tensors(saved) if saved else None,
                                    on_batch=lambda s: self.knockout_batch(path, s, own), progress=self.show_progress)
            for layer in range(-1, n):
                mask = knockout_mask(n, layer)
                done = ev.key(reqs, None, mask) in ev.memo
                metrics, _ = ev.remember(reqs, None, mask, None if done else state.scores(reqs, layer))
                self.progress.knockout[str(layer)] = metrics[self.metric]["value"]
                self.live.point("knockout", layer, metrics[self.metric]["value"])
            self.save_progress()
        self.ko_base, self.imp["ffn_knockout"] = knockout_drops(
            {int(k): v for k, v in self.progress.knockout.items()}, n)
        s = self.imp_state
        write_tensors(self.shard.file("importance.safetensors"), self.imp,
                      metadata={"n_examples": str(s.n_examples), "n_tokens": str(s.n_tokens),
                                "knockout_baseline": repr(self.ko_base), "config_hash": self.hash})

    def knockout_batch(self, path, state: KnockoutState, own: bool) -> None:
        """After each knock-out batch: the checkpoint (this rank's own file with several ranks) and progress."""
        write_tensors(path, state.tensors(), every_rank=own)
        self.live.progress("knockout", int(state.done.sum()), state.done.numel())

    def curves(self) -> None:
        pr = self.cfg["pruning"]
        heads = self.imp["heads"]
        self.ffn_rank = self.imp["ffn_knockout"] if pr["ffn_ranking"] == "knockout" else self.imp["ffn"]
        self.curve("heads", heads, "heads", rescore_each_level=bool(pr["rescore_each_level"]))
        self.curve("ffn", self.ffn_rank, "ffn")
        # Beyond the paper: prune heads by a task-agnostic ranking (prefix matching, lowest first) and
        # by random rankings, to compare with pruning by task importance at the same levels.
        compare = list(pr.get("compare") or [])
        if "induction" in compare:
            self.curve("heads_by_induction", self.induction_ranking(), "heads")
        if "random" in compare:  # chance: the same counts of heads, and of FFNs, removed at random
            for k in range(int(pr.get("random_seeds", 3))):
                self.curve(f"heads_random{k}", P.random_ranking(heads.shape, k), "heads")
            for k in range(int(pr.get("random_seeds", 3))):
                self.curve(f"ffn_random{k}", P.random_ranking(self.ffn_rank.shape, k), "ffn")
        self.combined_grid()

    def curve(self, kind: str, ranking: torch.Tensor, component: str, rescore_each_level: bool = False) -> None:
        """One accuracy curve over `pruning.levels`: masks, samples and results saved per level."""
        pr = self.cfg["pruning"]
        saved = self.progress.curves.setdefault(kind, {})

        def pair(mask):
            return (mask, None) if component == "heads" else (None, mask)

        done = {float(k): v for k, v in saved.items()}
        # The levels' masks, known ahead unless each level is re-ranked: shared passes (prefetch).
        ahead = [] if rescore_each_level else [pair(P.prune_mask(ranking, p, count=pr["count"]))
                                              for p in sorted(P.check_levels(pr["levels"])) if p not in done]

        def evaluate(mask):
            hm, fm = pair(mask)
            self.evaluate.prefetch(self.requests.eval, ahead, desc=f"{kind} prune")
            metrics, per_doc = self.evaluate(self.requests.eval, hm, fm, desc=f"{kind} prune")
            return {"metrics": metrics, "per_doc": per_doc}

        def on_level(p, mask, res):
            key = f"{kind}_{_level_key(p)}"
            write_tensors(self.shard.file(f"masks/{key}.safetensors"), {"mask": mask.float()})
            per_doc = res.pop("per_doc")
            if pr.get("save_samples", True):
                write_jsonl(self.shard.file(f"samples/{key}.jsonl"), per_doc)
            saved[_level_key(p)] = res
            self.save_progress()
            self.live.point(f"curve_{kind}", p, res["metrics"][self.metric]["value"])

        def rescore(mask):  # re-rank the remaining heads with the current mask applied
            return self.importance_result(self.gradient_importance(head_mask=mask))["heads"]

        P.curve(ranking, pr["levels"], evaluate, rescore=rescore if rescore_each_level else None, done=done,
                on_level=on_level, count=pr["count"])

    def induction_scores(self) -> dict[str, torch.Tensor]:
        name = self.cfg["model"]["name"]
        ind, problem = read_induction(self.cfg["store"]["root"], name)
        if problem:  # a corrupt scores file: say so, and how to remake it
            reason = problem["reason"].split("; rerun")[0]
            raise StoreError(f"pruning.compare includes induction but {name}'s induction scores are unusable "
                             f"({reason}); rerun `python jobs/induction.py model={name}`")
        if ind is None:
            raise ValueError("pruning.compare includes induction but the store has no induction scores for "
                             f"{name}: run `python jobs/induction.py model={name}` first")
        return ind

    def induction_ranking(self) -> torch.Tensor:
        name = self.cfg["model"]["name"]
        if self.induction["prefix_matching"].shape != self.imp["heads"].shape:
            raise ValueError(f"the store's induction scores for {name} do not fit this model's heads: rerun "
                             f"`python jobs/induction.py model={name}`")
        return self.induction["prefix_matching"].float()

    def combined_grid(self) -> None:
        """Heads pruned at p_h and FFNs at p_f together, for every pair of `pruning.combined_levels`."""
        grid = self.progress.curves.setdefault("combined", {})
        levels, count = P.check_levels(self.cfg["pruning"]["combined_levels"]), self.cfg["pruning"]["count"]
        todo = [(f"h{_level_key(ph)}_f{_level_key(pf)}", ph, pf) for ph, pf in itertools.product(levels, levels)]
        todo = [(key, ph, pf, P.prune_mask(self.imp["heads"], ph, count=count),
                 P.prune_mask(self.ffn_rank, pf, count=count)) for key, ph, pf in todo if key not in grid]
        masks = [(hm, fm) for *_, hm, fm in todo]
        for key, ph, pf, hm, fm in todo:
            self.evaluate.prefetch(self.requests.eval, masks, desc="combined")
            metrics, per_doc = self.evaluate(self.requests.eval, hm, fm, desc=f"combined {key}")
            if self.cfg["pruning"]["save_samples"]:  # per-doc rows for the paired intervals (icl_scale.paired)
                write_jsonl(self.shard.file(f"samples/combined_{key}.jsonl"), per_doc)
            grid[key] = {"head_level": ph, "ffn_level": pf, "metrics": metrics}
            self.save_progress()
            self.live.log(**{"grid/head_level": ph, "grid/ffn_level": pf, "grid/value": metrics[self.metric]["value"]})

    # --- outputs -------------------------------------------------------------------------------------

    def curve_rows(self, kind: str) -> list[dict]:
        rows = [{"level": float(k), "value": v["metrics"][self.metric]["value"], **v}
                for k, v in self.progress.curves[kind].items()]
        return sorted(rows, key=lambda r: r["level"])

    def finish(self, t_start: float) -> dict:
        kinds = self.progress.curves
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
        self.stages.timings["total"] = round(time.time() - t_start, 2)
        baseline = {self.metric: curves["heads"][0]["value"]} if curves["heads"] else {}
        m = self.shard.write_manifest(status="complete", config_hash=self.hash, timings=self.stages.timings,
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
    shard = Shard(cfg["store"]["root"], cfg["model"]["name"], cfg["task"], int(cfg["shot"]), int(cfg.get("seed", 0)))
    try:
        return ShardRun(cfg, lm).run()  # reads the data first: a bad row is a failure the reducer names
    except BaseException as e:
        _record_failure(shard, e)
        raise


def _record_failure(shard: Shard, e: BaseException) -> None:
    """Name the error in the manifest for the reducer; a complete shard is never marked failed
    (e.g. a run with other settings that refused to replace it)."""
    first = str(e).splitlines()[0] if str(e) else ""
    try:
        m = shard.manifest()
    except StoreError:
        m = None
    if m and m.get("status") == "complete":
        return
    try:
        shard.write_manifest(status="failed", error=f"{type(e).__name__}: {first}")
    except Exception:  # noqa: BLE001 - never mask the original error
        pass
