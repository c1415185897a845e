"""The curves stage of a shard (shard.ShardRun): accuracy under pruning at every level of
`pruning.levels` for heads (task ranking), FFNs (knock-out or gradient ranking), the comparison
rankings (`pruning.compare`: prefix matching, random) and the heads x FFN grid
(`pruning.combined_levels`). Each level is checkpointed as it lands, with its mask and samples.
"""

from __future__ import annotations

import itertools

import torch

from . import pruning as P
from .collect import read_induction
from .store import StoreError, write_jsonl, write_tensors


def level_key(p: float) -> str:
    return f"{p:g}"


class CurvesStage:
    """Mixed into ShardRun: needs its cfg, imp (importance), evaluate (Evaluator), requests, metric,
    shard, live and the skeleton's state()/save()."""

    def curves(self) -> None:
        pr = self.cfg["pruning"]
        heads = self.imp["heads"]
        self.ffn_rank = self.imp["ffn_knockout"] if pr["ffn_ranking"] == "knockout" else self.imp["ffn"]
        todo = [("heads", heads, "heads", bool(pr["rescore_each_level"])), ("ffn", self.ffn_rank, "ffn", False)]
        # Beyond the paper: prune heads by a task-agnostic ranking (prefix matching, lowest first) and
        # by random rankings, to compare with pruning by task importance at the same levels.
        compare = list(pr["compare"])
        if "induction" in compare:
            todo.append(("heads_by_induction", self.induction_ranking(), "heads", False))
        if "random" in compare:  # chance: the same counts of heads, and of FFNs, removed at random
            todo += [(f"heads_random{k}", P.random_ranking(heads.shape, k), "heads", False)
                     for k in range(int(pr["random_seeds"]))]
            todo += [(f"ffn_random{k}", P.random_ranking(self.ffn_rank.shape, k), "ffn", False)
                     for k in range(int(pr["random_seeds"]))]
        # Under ZeRO-3 every pass gathers the model once, whatever its masks: the masks of the whole
        # stage known ahead (all but re-ranked levels, done or not: the groups must not depend on how
        # far a resumed job got) share passes across curves and the grid (Evaluator.plan).
        self.planned = self.lm.engine is not None
        if self.planned:
            self.evaluate.plan(self.requests.eval, [
                m for kind, ranking, component, rescore in todo if not rescore
                for m in self.level_masks(kind, ranking, component, done=True)] + self.grid_masks())
        for kind, ranking, component, rescore in todo:
            self.curve(kind, ranking, component, rescore_each_level=rescore)
        self.combined_grid()

    def level_masks(self, kind: str, ranking: torch.Tensor, component: str, done: bool = False) -> list[tuple]:
        """The (head mask, FFN mask) of every level of curve `kind` not yet done (`done`: also those done),
        in the order asked for."""
        pr = self.cfg["pruning"]
        skip = set() if done else {float(k) for k in self.state("curves").get(kind, {})}
        masks = [P.prune_mask(ranking, p, count=pr["count"]) for p in sorted(P.check_levels(pr["levels"]))
                 if p not in skip]
        return [(m, None) if component == "heads" else (None, m) for m in masks]

    def curve(self, kind: str, ranking: torch.Tensor, component: str, rescore_each_level: bool = False) -> None:
        """One accuracy curve over `pruning.levels`: masks, samples and results saved per level."""
        pr = self.cfg["pruning"]
        saved = self.state("curves").setdefault(kind, {})

        def pair(mask):
            return (mask, None) if component == "heads" else (None, mask)

        done = {float(k): v for k, v in saved.items()}
        # The levels' masks, known ahead unless each level is re-ranked: shared passes (prefetch).
        ahead = [] if rescore_each_level or self.planned else self.level_masks(kind, ranking, component)

        def evaluate(mask):
            hm, fm = pair(mask)
            self.evaluate.prefetch(self.requests.eval, ahead, desc=f"{kind} prune")
            metrics, per_doc = self.evaluate(self.requests.eval, hm, fm, desc=f"{kind} prune")
            return {"metrics": metrics, "per_doc": per_doc}

        def on_level(p, mask, res):
            key = f"{kind}_{level_key(p)}"
            write_tensors(self.shard.file(f"masks/{key}.safetensors"), {"mask": mask.float()})
            per_doc = res.pop("per_doc")
            if pr["save_samples"]:
                write_jsonl(self.shard.file(f"samples/{key}.jsonl"), per_doc)
            saved[level_key(p)] = res
            self.save()
            self.live.point(f"curve_{kind}", p, res["metrics"][self.metric]["value"])
            self.checkpointed("curves", sum(len(v) for k, v in self.state("curves").items() if k != "combined"))

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

    def grid_points(self) -> list[tuple]:
        """(key, head level, FFN level, head mask, FFN mask) of every grid point."""
        levels, count = P.check_levels(self.cfg["pruning"]["combined_levels"]), self.cfg["pruning"]["count"]
        return [(f"h{level_key(ph)}_f{level_key(pf)}", ph, pf, P.prune_mask(self.imp["heads"], ph, count=count),
                 P.prune_mask(self.ffn_rank, pf, count=count)) for ph, pf in itertools.product(levels, levels)]

    def grid_masks(self) -> list[tuple]:
        return [(hm, fm) for *_, hm, fm in self.grid_points()]

    def combined_grid(self) -> None:
        """Heads pruned at p_h and FFNs at p_f together, for every pair of `pruning.combined_levels`."""
        grid = self.state("curves").setdefault("combined", {})
        todo = [point for point in self.grid_points() if point[0] not in grid]
        masks = [] if self.planned else [(hm, fm) for *_, hm, fm in todo]
        for key, ph, pf, hm, fm in todo:
            self.evaluate.prefetch(self.requests.eval, masks, desc="combined")
            metrics, per_doc = self.evaluate(self.requests.eval, hm, fm, desc=f"combined {key}")
            if self.cfg["pruning"]["save_samples"]:  # per-doc rows for the paired intervals (icl_scale.paired)
                write_jsonl(self.shard.file(f"samples/combined_{key}.jsonl"), per_doc)
            grid[key] = {"head_level": ph, "ffn_level": pf, "metrics": metrics}
            self.save()
            self.checkpointed("combined", len(grid))
            self.live.log(**{"grid/head_level": ph, "grid/ffn_level": pf, "grid/value": metrics[self.metric]["value"]})

    def curve_rows(self, kind: str) -> list[dict]:
        rows = [{"level": float(k), "value": v["metrics"][self.metric]["value"], **v}
                for k, v in self.state("curves")[kind].items()]
        return sorted(rows, key=lambda r: r["level"])
