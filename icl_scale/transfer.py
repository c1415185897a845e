"""Cross-task transfer: prune task B's heads with rankings made from other tasks' importance.

For a target (model, task B, shot, seed), after the source tasks' shards are complete, B's eval docs
are scored under head-pruning masks from

* `aggregate`: the mean head importance over the source tasks (the paper's aggregate ranking);
* `aggregate_without_<B>`: the same mean without B (does the ranking transfer to an unseen task?);
* `from_<A>` for each A in `transfer.rankings_from`: task A's own ranking;
* `high_<A>` / `low_<A>`: the rankings of the tasks `transfer.high_low` names for this shot and target,
  the paper's high- and low-correlated tasks (scripts/plotting/crosstask_accuracy.py, Fig. 9).

Every source is the shard of the same model, shot and demonstration seed. A source whose shard is
missing, incomplete or unreadable is named in the result and left out; the rest still runs.
Results go beside B's shard, in <shard>/transfer/: `curves.json` (the curves, each ranking's
sources and their config hashes), `rankings.safetensors` and `masks/<ranking>_<level>.safetensors`.
Masks that coincide (two rankings, or B's own heads curve, at a level) are scored once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from . import pruning as P
from .collect import load_shard
from .evaluator import Evaluator, mask_key, primary_metric
from .models.loading import LoadedModel, load_model
from .rankings import aggregate
from .runs import ResumableRun, start_ranks
from .store import (
    Shard,
    StoreError,
    clear_checkpoint,
    config_hash,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)
from .tasks import build_requests
from .validation import check_config, check_data, check_transfer

log = logging.getLogger(__name__)


@dataclass
class Source:
    task: str
    shard: Shard
    heads: torch.Tensor | None = None
    config_hash: str | None = None
    problem: str | None = None


def read_source(root, model: str, task: str, shot: int, seed: int) -> Source:
    """A source task's head importance from its complete shard, or the reason it is unusable."""
    sh = Shard(root, model, task, shot, seed)
    try:
        m = sh.manifest()
        if not m or m.get("status") != "complete":
            state = "missing" if m is None else f"status {m.get('status')!r}"
            return Source(task, sh, problem=f"{sh.name}: {state} (run its shard first)")
        d = load_shard(sh, m)
    except StoreError as e:
        return Source(task, sh, problem=f"{sh.name}: {str(e).splitlines()[0]}")
    return Source(task, sh, d.importance["heads"].float(), m.get("config_hash"))


def high_low_for(high_low: dict, shot: int, task: str) -> dict[str, str]:
    """{"high": A, "low": B} that `transfer.high_low` names for (shot, target task); {} when none."""
    by_task = (high_low or {}).get(shot) or (high_low or {}).get(str(shot)) or {}
    return dict(by_task.get(task) or {})


def transfer_rankings(target: str, in_aggregate: list[Source], rankings_from: list[str],
                      sources: list[Source], correlated: dict[str, str] | None = None) -> dict[str, dict]:
    """{name: {"ranking": [L, H], "sources": [tasks]}} from the usable sources: the aggregate over
    `in_aggregate`, the same without the target, each task of `rankings_from` on its own, and the
    high- and low-correlated tasks' (`correlated`: {"high": A, "low": B})."""
    agg = {s.task: s.heads for s in in_aggregate if s.heads is not None}
    out: dict[str, dict] = {}
    if agg:
        out["aggregate"] = {"ranking": aggregate(agg), "sources": sorted(agg)}
    rest = sorted(t for t in agg if t != target)
    if rest:
        out[f"aggregate_without_{target}"] = {"ranking": aggregate(agg, leave_out=[target]), "sources": rest}
    own = {s.task: s.heads for s in sources if s.heads is not None}
    for a in rankings_from:
        if a in own:
            out[f"from_{a}"] = {"ranking": own[a], "sources": [a]}
    for role, a in (correlated or {}).items():
        if a in own:  # a copy: safetensors refuses two names for one tensor (A may be in rankings_from too)
            out[f"{role}_{a}"] = {"ranking": own[a].clone(), "sources": [a]}
    return out


class TransferRun(ResumableRun):
    """One target's transfer curves; resumable per level (the skeleton of icl_scale/runs.py, its
    checkpoint in <shard>/transfer/checkpoint/)."""

    def __init__(self, cfg: dict, lm: LoadedModel | None = None):
        self.cfg, self.lm = cfg, lm
        self.task, self.shot = cfg["task"], int(cfg["shot"])
        self.shard = Shard(cfg["store"]["root"], cfg["model"]["name"], self.task, self.shot, int(cfg["seed"]))
        self.metric = primary_metric(self.task)
        tc = cfg["transfer"]
        correlated = high_low_for(tc["high_low"], self.shot, self.task)
        wanted = list(dict.fromkeys([*tc["sources"], *tc["rankings_from"], *correlated.values()]))
        self.sources = [read_source(cfg["store"]["root"], cfg["model"]["name"], t, self.shot, self.shard.seed)
                        for t in wanted]
        self.problems = [s.problem for s in self.sources if s.problem]
        self.rankings = transfer_rankings(self.task, [s for s in self.sources if s.task in tc["sources"]],
                                          tc["rankings_from"], self.sources, correlated)
        self.levels = P.check_levels(cfg["pruning"]["levels"])
        self.data = check_data(cfg)
        super().__init__(self.shard.path / "transfer", config_hash(self.settings()))

    def eval_settings(self) -> dict:
        return {k: self.cfg["eval"][k] for k in ("split", "limit")}

    def settings(self) -> dict:
        """What the results depend on: the eval docs, the levels and each source's shard."""
        c = self.cfg
        return {"task": self.task, "shot": self.shot, "seed": self.shard.seed, "model": c["model"]["name"],
                "eval": self.eval_settings(), "data": self.data, "levels": self.levels,
                "count": c["pruning"]["count"], "rankings": {k: v["sources"] for k, v in self.rankings.items()},
                "sources": {s.task: s.config_hash for s in self.sources if s.heads is not None}}

    def stages(self):
        return [("curves", self.curves)]

    def run(self) -> dict:
        if not self.rankings:
            raise ValueError(f"transfer for {self.shard.name}: no usable source shard "
                             f"({'; '.join(self.problems)})")
        for p in self.problems:
            log.warning("transfer for %s: leaving out %s", self.shard.name, p)
        done = self._read(self.folder / "curves.json")
        if done.get("config_hash") == self.hash:
            return {**done, "status": "skipped"}
        t0 = time.time()
        start_ranks()  # several ranks split the evaluations; only rank 0 writes
        self.lm = self.lm or load_model(self.cfg["model"])
        ev, c = self.cfg["eval"], self.cfg
        self.reqs = build_requests(self.task, split=ev["split"], shot=self.shot, seed=self.shard.seed,
                                   limit=ev["limit"], data_dir=c["data"]["dir"])
        self.evaluate = Evaluator(self.lm, self.task, int(ev["batch_size"]), bool(c["progress"]),
                                  ev["physical_below"], ev["masks_per_pass"])
        self.known = self.own_curve_results()
        self.open_checkpoint()
        write_tensors(self.folder / "rankings.safetensors", {k: v["ranking"] for k, v in self.rankings.items()})
        self.run_stages()
        return self.finish(time.time() - t0, self.evaluate.n_scored)

    def curves(self) -> None:
        for name, r in self.rankings.items():
            self.curve(name, r["ranking"])

    def curve(self, name: str, ranking: torch.Tensor) -> None:
        saved = self.state("curves").setdefault(name, {})
        count, done = self.cfg["pruning"]["count"], {float(k): v for k, v in saved.items()}
        ahead = [(m, None) for m in (P.prune_mask(ranking, p, count=count) for p in sorted(self.levels)
                                     if p not in done) if mask_key(m) not in self.known]  # in P.curve's order

        def score(mask):
            key = mask_key(mask)
            if key in self.known:  # B's own heads curve already scored this mask
                return {"metrics": self.known[key], "reused": "heads curve"}
            self.evaluate.prefetch(self.reqs, ahead, desc=f"transfer {name}")  # several masks in shared passes
            metrics, _ = self.evaluate(self.reqs, mask, None, desc=f"transfer {name}")
            return {"metrics": metrics}

        def on_level(p, mask, res):
            write_tensors(self.folder / f"masks/{name}_{p:g}.safetensors", {"mask": mask.float()})
            saved[f"{p:g}"] = {"level": p, "value": res["metrics"][self.metric]["value"], **res}
            self.save()

        P.curve(ranking, self.cfg["pruning"]["levels"], score, done=done, on_level=on_level, count=count)

    def own_curve_results(self) -> dict:
        """{mask key: metrics} of B's own complete shard's heads curve, when it scored the same docs
        (same eval settings and data)."""
        try:
            m = self.shard.manifest()
            if not m or m.get("status") != "complete":
                return {}
            cfg = m.get("config") or {}
            if cfg.get("eval") != self.eval_settings() or cfg.get("data") != self.data:  # (a manifest: read)
                return {}
            d = load_shard(self.shard, m)
            out = {}
            for row in d.curves["heads"]:
                f = self.shard.file(f"masks/heads_{row['level']:g}.safetensors")
                if f.exists():
                    out[mask_key(read_tensors(f)["mask"])] = row["metrics"]
            return out
        except (StoreError, KeyError):
            return {}

    def _read(self, f) -> dict:
        try:
            d = read_json(f) if f.exists() else {}
        except StoreError:
            return {}
        return d if isinstance(d, dict) else {}

    def finish(self, seconds: float, evaluations: int) -> dict:
        out = {"model": self.cfg["model"]["name"], "task": self.task, "shot": self.shot, "seed": self.shard.seed,
               "metric": self.metric, "config_hash": self.hash, "levels": self.levels,
               "rankings": {k: {"sources": v["sources"],
                                "source_config_hashes": {s.task: s.config_hash for s in self.sources
                                                         if s.task in v["sources"]}}
                            for k, v in self.rankings.items()},
               "left_out": self.problems,
               "curves": {name: sorted(levels.values(), key=lambda r: r["level"])
                          for name, levels in self.state("curves").items()},
               "seconds": round(seconds, 2), "evaluations": evaluations}
        write_json(self.folder / "curves.json", out)
        clear_checkpoint(self.folder)
        return {**out, "status": "complete"}


def run_transfer(cfg: dict, lm: LoadedModel | None = None) -> dict:
    """Transfer curves for cfg's (task, shot, seed); the settings are checked before anything loads."""
    check_config(cfg)
    check_transfer(cfg)
    return TransferRun(cfg, lm).run()
