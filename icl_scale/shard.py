"""One (model, task, shot) shard, end to end: the unit of work a sweep distributes.

Stages, each checkpointed in the shard's store folder so a killed or preempted job resumes
without redoing finished work:

1. render eval requests (eval split) and train requests (importance + held-out knock-out docs);
2. gradient importance of every head and FFN over `importance.n_examples` train docs;
3. FFN knock-out importance (accuracy drop per removed FFN) on the knock-out split;
4. pruning curves: heads, FFNs, and a heads x FFN grid, evaluated on the eval split;
5. importance.safetensors, masks, curves.json, samples, and the manifest marked complete.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import pruning as P
from .importance import ImportanceState, ffn_knockout, gradient_importance
from .models.loading import LoadedModel, load_model
from .scoring import score_requests
from .store import Shard, StoreError, check_writable, config_hash, library_versions, read_json, read_tensors
from .store import write_json, write_jsonl, write_tensors
from .tasks import build_requests, compute_metrics, get_task

log = logging.getLogger(__name__)

# Fault injection for preemption tests (a separate Slurm process cannot be monkeypatched):
# "<stage>:<file>" makes a fresh (not resumed) run wait after <stage> for as long as <file> exists,
# so a test can requeue it at a known point instead of racing a job that may already have finished;
# the resumed run goes straight through.
HOLD_ENV = "ICL_SCALE_HOLD_AFTER"

# Settings that change a shard's numbers (paths, batch sizes, launcher, W&B do not).
HASHED = {
    "model": ("name", "source", "id", "path", "revision", "gguf_file", "family", "seed", "config", "dtype",
              "doc_start", "max_length"),
    "eval": ("split", "limit"),
    "importance": ("n_examples", "abs", "normalize_layers"),
    "knockout": ("split", "limit"),
    "pruning": ("levels", "combined_levels", "ffn_ranking", "iterative", "compare", "random_seeds"),
}


def shard_config(cfg: dict) -> dict:
    out: dict[str, Any] = {"task": cfg["task"], "shot": int(cfg["shot"]), "seed": int(cfg.get("seed", 0))}
    for section, keys in HASHED.items():
        sec = cfg.get(section) or {}
        out[section] = {k: sec.get(k) for k in keys if k in sec}
    return out


def validate(cfg: dict) -> None:
    get_task(cfg["task"])  # unknown task -> one-line error listing valid ones
    if int(cfg["shot"]) < 0:
        raise ValueError(f"shot={cfg['shot']}: must be >= 0")
    if int(cfg["importance"]["n_examples"]) < 1:
        raise ValueError(f"importance.n_examples={cfg['importance']['n_examples']}: must be >= 1")
    P.check_levels(cfg["pruning"]["levels"], "pruning.levels")
    P.check_levels(cfg["pruning"]["combined_levels"], "pruning.combined_levels")
    if cfg["pruning"]["ffn_ranking"] not in ("knockout", "gradient"):
        raise ValueError(f"pruning.ffn_ranking={cfg['pruning']['ffn_ranking']!r}; use knockout or gradient")
    bad = set(cfg["pruning"].get("compare") or []) - {"induction", "random"}
    if bad:
        raise ValueError(f"pruning.compare has {sorted(bad)}; use a list of induction and/or random")
    if cfg["knockout"]["split"] not in ("heldout", "paper"):
        raise ValueError(f"knockout.split={cfg['knockout']['split']!r}; use heldout or paper")


def _mask_key(mask: torch.Tensor | None) -> bytes | None:
    """All-ones masks are no mask: the 0% levels and every curve's unpruned point share one key."""
    if mask is None or bool((mask == 1).all()):
        return None
    return mask.detach().to(torch.float32).cpu().numpy().tobytes()


@dataclass
class Evaluator:
    """Scores a request list under (head, FFN) masks and computes the task metrics.

    Evaluations are memoised by the masks' contents: the curves share their unpruned point, the
    heads x FFN grid's edges are the single-kind curves, and different rankings often give the same
    mask at a level, so a shard never evaluates one mask twice (a third of the evaluations in the
    demo). Results are deep-copied out, so callers may change them."""

    lm: LoadedModel
    task: str
    batch_size: int
    progress: bool = False

    def __post_init__(self):
        self.memo: dict[tuple, tuple] = {}
        self.n_scored = 0

    def __call__(self, requests, head_mask=None, ffn_mask=None, desc="eval") -> tuple[dict, list[dict]]:
        key = (id(requests), len(requests), _mask_key(head_mask), _mask_key(ffn_mask))
        if key not in self.memo:
            scores = score_requests(self.lm, requests, head_mask, ffn_mask, batch_size=self.batch_size,
                                    progress=self.progress, desc=desc)
            lls = [[c.logprob for c in row] for row in scores]
            metrics, per_doc = compute_metrics(self.task, requests, lls)
            for row, sc in zip(per_doc, scores):
                row["logprobs"] = [c.logprob for c in sc]
                row["n_tokens"] = [c.n_tokens for c in sc]
            self.memo[key] = (requests, metrics, per_doc)  # holding `requests` keeps its id unique
            self.n_scored += 1
        return copy.deepcopy(self.memo[key][1:])


def primary_metric(task: str) -> str:
    return get_task(task).metrics[0]


def _level_key(p: float) -> str:
    return f"{p:g}"


def run_shard(cfg: dict, lm: LoadedModel | None = None, fail_after: str | None = None) -> dict:
    """Run (or resume, or skip) one shard. `cfg` is the resolved config as a plain dict.
    `fail_after` (tests only) raises after the named stage to simulate a crash.

    A failure is recorded in the manifest (status `failed`, the error) so the reducer can name it;
    finished stages stay checkpointed and the next run resumes from them."""
    validate(cfg)
    shard = Shard(cfg["store"]["root"], cfg["model"]["name"], cfg["task"], int(cfg["shot"]))
    try:
        return _run_shard(cfg, lm, fail_after)
    except BaseException as e:
        if shard.path.exists():
            try:
                shard.write_manifest(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            except Exception:  # never mask the original error
                pass
        raise


def _run_shard(cfg: dict, lm: LoadedModel | None, fail_after: str | None) -> dict:
    from .distributed import barrier, dist_env
    from .store import set_writer

    set_writer(dist_env().is_main)
    task, shot = cfg["task"], int(cfg["shot"])
    root = check_writable(cfg["store"]["root"])
    shard = Shard(root, cfg["model"]["name"], task, shot)
    scfg = shard_config(cfg)
    h = config_hash(scfg)
    try:
        done = shard.is_complete(h)
    except StoreError:
        done = False  # a corrupt manifest: recompute (never trusted)
    if done and not cfg["store"].get("force"):
        log.info("%s is complete (config %s): nothing to do", shard, h)
        return {**shard.manifest(), "status": "skipped", "shard": str(shard.path)}

    t_start = time.time()
    timings: dict[str, float] = {}
    progress = bool(cfg.get("progress", False))
    # A checkpoint from another config (or a forced rerun) is discarded, never mixed in.
    prog_path = shard.ckpt("progress.json")
    progress_state = read_json(prog_path) if prog_path.exists() else {}
    barrier()  # every rank has read the checkpoint before rank 0 may clear it

    def save_progress():
        write_json(prog_path, progress_state)

    resumed = progress_state.get("config_hash") == h and not cfg["store"].get("force")
    if not resumed:
        shard.clear_checkpoint()
        progress_state = {"config_hash": h, "knockout": {}, "curves": {}}
        save_progress()  # stamps the checkpoint folder with the config, so a partial importance pass is reused
    shard.write_manifest(status="running", config_hash=h, config=scfg, resolved=cfg,
                         versions=library_versions(), started=t_start)

    def stage_done(name: str, t0: float):
        timings[name] = round(time.time() - t0, 2)
        if fail_after == name:
            raise RuntimeError(f"injected failure after stage {name}")
        stage, _, hold_file = os.environ.get(HOLD_ENV, "").partition(":")
        t_hold = time.time()
        while (stage == name and hold_file and not resumed and os.path.exists(hold_file)
               and time.time() - t_hold < 900):
            time.sleep(0.2)

    t0 = time.time()
    lm = lm or load_model(cfg["model"])
    stage_done("load", t0)

    t0 = time.time()
    data_dir = (cfg.get("data") or {}).get("dir")
    seed = int(cfg.get("seed", 0))
    ev = cfg["eval"]
    eval_reqs = build_requests(task, split=ev.get("split"), shot=shot, seed=seed, limit=ev.get("limit"),
                               data_dir=data_dir)
    train_reqs = build_requests(task, split="train", shot=shot, seed=seed, data_dir=data_dir)
    ko = cfg["knockout"]
    if ko["split"] == "paper":
        ko_reqs = eval_reqs
        imp_pool = train_reqs
    else:
        k = int(ko["limit"])
        if k < 1 or k >= len(train_reqs):
            raise ValueError(f"knockout.limit={k} must be in 1..{len(train_reqs) - 1} for {task} "
                             f"({len(train_reqs)} train docs)")
        ko_reqs, imp_pool = train_reqs[-k:], train_reqs[:-k]  # disjoint from importance docs
    imp_reqs = imp_pool[: int(cfg["importance"]["n_examples"])]
    stage_done("render", t0)
    evaluate = Evaluator(lm, task, int(ev.get("batch_size", 8)), progress)
    metric = primary_metric(task)

    # --- gradient importance -----------------------------------------------------------------
    t0 = time.time()
    imp_cfg = cfg["importance"]
    st_path = shard.ckpt("importance_state.safetensors")
    state = ImportanceState.from_tensors(read_tensors(st_path)) if st_path.exists() else None
    every = max(1, int(imp_cfg.get("checkpoint_every", 8)))
    counter = {"n": 0}

    def ckpt_importance(s: ImportanceState):
        counter["n"] += 1
        if counter["n"] % every == 0:
            write_tensors(st_path, s.tensors())

    state = gradient_importance(lm, imp_reqs, batch_size=int(imp_cfg.get("batch_size", 4)),
                                abs_mode=imp_cfg.get("abs", "per_token"), state=state,
                                on_batch=ckpt_importance, progress=progress)
    write_tensors(st_path, state.tensors())
    imp = state.result(bool(imp_cfg.get("normalize_layers", False)))
    stage_done("importance", t0)

    # --- FFN knock-out ---------------------------------------------------------------------------
    t0 = time.time()

    def ko_eval(hm, fm):
        return evaluate(ko_reqs, hm, fm, desc="knock-out")[0][metric]["value"]

    def ko_save(l, acc):
        progress_state["knockout"][str(l)] = acc
        save_progress()

    ko_done = {int(k): v for k, v in progress_state["knockout"].items()}
    ko_base, ko_drop = ffn_knockout(lm, ko_eval, done=ko_done, on_layer=ko_save, progress=progress)
    imp["ffn_knockout"] = ko_drop
    write_tensors(shard.file("importance.safetensors"), imp,
                  metadata={"n_examples": str(state.n_examples), "n_tokens": str(state.n_tokens),
                            "knockout_baseline": repr(ko_base), "config_hash": h})
    stage_done("knockout", t0)

    # --- pruning curves ---------------------------------------------------------------------------
    t0 = time.time()
    pr = cfg["pruning"]
    ffn_rank = imp["ffn_knockout"] if pr["ffn_ranking"] == "knockout" else imp["ffn"]
    curves_state = progress_state["curves"]

    def run_curve(kind: str, ranking: torch.Tensor, levels, mask_of):
        done = {float(k): v for k, v in curves_state.get(kind, {}).items()}

        def ev_level(mask):
            hm, fm = mask_of(mask)
            metrics, per_doc = evaluate(eval_reqs, hm, fm, desc=f"{kind} prune")
            return {"metrics": metrics, "per_doc": per_doc}

        def on_level(p, mask, res):
            key = f"{kind}_{_level_key(p)}"
            write_tensors(shard.file(f"masks/{key}.safetensors"), {"mask": mask.float()})
            if pr.get("save_samples", True):
                write_jsonl(shard.file(f"samples/{key}.jsonl"), res.pop("per_doc"))
            res.pop("per_doc", None)
            curves_state.setdefault(kind, {})[_level_key(p)] = res
            save_progress()

        rescore = None
        if pr.get("iterative") and kind == "heads":
            def rescore(mask):
                s = gradient_importance(lm, imp_reqs, batch_size=int(imp_cfg.get("batch_size", 4)),
                                        head_mask=mask, abs_mode=imp_cfg.get("abs", "per_token"))
                return s.result(bool(imp_cfg.get("normalize_layers", False)))["heads"]
        P.curve(ranking, levels, ev_level, rescore=rescore, done=done, on_level=on_level)

    run_curve("heads", imp["heads"], pr["levels"], lambda m: (m, None))
    run_curve("ffn", ffn_rank, pr["levels"], lambda m: (None, m))
    # Beyond the paper: prune heads by a task-agnostic ranking (prefix matching, lowest first) and by
    # random rankings, to compare with pruning by task importance at the same levels.
    compare = list(pr.get("compare") or [])
    if "induction" in compare:
        from .report import load_induction

        ind = load_induction(cfg["store"]["root"], cfg["model"]["name"])
        if ind is None or ind["prefix_matching"].shape != imp["heads"].shape:
            raise ValueError("pruning.compare includes induction but the store has no induction scores for "
                             f"{cfg['model']['name']}: run `python jobs/induction.py model={cfg['model']['name']}` first")
        run_curve("heads_by_induction", ind["prefix_matching"].float(), pr["levels"], lambda m: (m, None))
    if "random" in compare:
        for k in range(int(pr.get("random_seeds", 3))):
            rnd = torch.rand(imp["heads"].shape, generator=torch.Generator().manual_seed(k))
            run_curve(f"heads_random{k}", rnd, pr["levels"], lambda m: (m, None))
    # Combined grid: heads at p_h and FFNs at p_f together.
    grid_done = curves_state.setdefault("combined", {})
    for ph in P.check_levels(pr["combined_levels"]):
        for pf in P.check_levels(pr["combined_levels"]):
            key = f"h{_level_key(ph)}_f{_level_key(pf)}"
            if key in grid_done:
                continue
            hm, fm = P.prune_mask(imp["heads"], ph), P.prune_mask(ffn_rank, pf)
            metrics, per_doc = evaluate(eval_reqs, hm, fm, desc=f"combined {key}")
            grid_done[key] = {"head_level": ph, "ffn_level": pf, "metrics": metrics}
            save_progress()
    stage_done("curves", t0)

    # --- final outputs -------------------------------------------------------------------------------
    def as_list(kind):
        rows = [{"level": float(k), "value": v["metrics"][metric]["value"], **v}
                for k, v in curves_state[kind].items()]
        return sorted(rows, key=lambda r: r["level"])

    curves = {
        "model": cfg["model"]["name"], "task": task, "shot": shot, "metric": metric,
        "n_eval": len(eval_reqs), "n_importance": state.n_examples, "n_knockout": len(ko_reqs),
        "heads": as_list("heads"), "ffn": as_list("ffn"),
        "heads_by": {kind: as_list(kind) for kind in curves_state if kind.startswith("heads_")},
        "combined": sorted(({"value": v["metrics"][metric]["value"], **v} for v in grid_done.values()),
                           key=lambda r: (r["head_level"], r["ffn_level"])),
        "ffn_ranking": pr["ffn_ranking"], "knockout_baseline": ko_base,
    }
    write_json(shard.file("curves.json"), curves)
    timings["total"] = round(time.time() - t_start, 2)
    m = shard.write_manifest(status="complete", config_hash=h, timings=timings, finished=time.time(),
                             evaluations=evaluate.n_scored,
                             baseline={metric: curves["heads"][0]["value"]} if curves["heads"] else {})
    shard.clear_checkpoint()
    return {"status": "complete", "shard": str(shard.path), **m}
