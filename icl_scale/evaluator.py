"""Scoring a request list under (head, FFN) masks, memoised by the masks' contents: what the
curves, the heads x FFN grid, the knock-out stage and the transfer curves share.

`Evaluator(requests, head_mask, ffn_mask)` returns the task metrics and per-doc rows; a mask is
scored gated (models/gates.py), on a physically pruned copy when that is cheaper
(models/physical.py), or together with the next masks in shared passes (`prefetch`,
scoring.score_masks).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .models.loading import LoadedModel
from .models.physical import cheaper_pruned, prune_physically
from .scoring import score_masks, score_requests
from .tasks import compute_metrics, get_task


def mask_key(mask: torch.Tensor | None) -> bytes | None:
    """All-ones masks are no mask: the 0% levels and every curve's unpruned point share one key."""
    if mask is None or bool((mask == 1).all()):
        return None
    return mask.detach().to(torch.float32).cpu().numpy().tobytes()


def primary_metric(task: str) -> str:
    """The metric curves and rankings use (the first of the task's metrics)."""
    return get_task(task).metrics[0]


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


def pass_token_bytes(n_layers: int, n_kv_heads: int, head_dim: int, hidden: int, width: int) -> int:
    """Bytes one token of a ZeRO-3 pass holds: its KV cache in every layer and one layer's working set."""
    return width * (2 * n_layers * n_kv_heads * head_dim + 6 * hidden)


def mask_pass_bytes(tk, requests, batch_size: int, per_token: int, vocab: int) -> int:
    """One mask's share of a ZeRO-3 pass, costed at its heaviest: the `batch_size` longest requests,
    every choice's row with its own copy of the prefix's KV cache (`per_token`: pass_token_bytes) and
    float32 log-probs of every scored token."""
    costs = sorted((sum(len(tk.context(r.pair(j)[0])) * per_token
                        + len(tk.continuation(r.pair(j)[1])) * (per_token + 8 * vocab)
                        for j in range(r.n_choices)) for r in requests), reverse=True)
    return max(1, sum(costs[:batch_size]))


def zero3_group_size(per_mask: int, n_masks: int, beside_bytes: int) -> int:
    """Masks per ZeRO-3 pass: as many of `n_masks` as half the memory beside the live-parameter budget
    (`beside_bytes`) holds."""
    return int(max(1, min(n_masks, beside_bytes // 2 // per_mask)))


def zero3_masks_per_pass(lm: LoadedModel, requests, batch_size: int, n_masks: int) -> int:
    """Masks per pass under ZeRO-3 ("auto"): every pass gathers the whole model once, whatever its rows,
    so as many of the `n_masks` masks share each pass as the memory beside the live-parameter budget
    holds (half of it, the least over the ranks), each mask with its own `batch_size` prefixes
    (scoring.score_masks). The planner (plan_passes.py) sizes its groups with the same functions."""
    from .models.zero import memory_beside_parameters
    from .passes import Tokenised

    g, width = lm.adapter.geometry, lm.dtype.itemsize
    per_token = pass_token_bytes(g.n_layers, g.n_kv_heads, g.head_dim, g.hidden, width)
    per_mask = mask_pass_bytes(Tokenised(lm, requests), requests, batch_size, per_token, lm.model.config.vocab_size)
    return zero3_group_size(per_mask, n_masks, memory_beside_parameters(lm))


@dataclass
class Evaluator:
    """Scores a request list under (head, FFN) masks and computes the task metrics.

    Evaluations are memoised by the masks' contents: the curves share their unpruned point, the
    heads x FFN grid's edges are the single-kind curves, and different rankings often give the same
    mask at a level, so a shard never evaluates one mask twice (a third of the evaluations in the
    demo). Results are deep-copied out, so callers may change them. `prefetch` scores several
    masks in shared passes ahead of their calls; `plan` fixes such groups for a whole run of calls."""

    lm: LoadedModel
    task: str
    batch_size: int
    progress: bool = False
    physical_below: float | None = None  # eval.physical_below: see score()
    masks_per_pass: int | str = 1  # eval.masks_per_pass: see prefetch()

    def __post_init__(self):
        self.memo: dict[tuple, tuple] = {}
        self.planned: dict[tuple, list[tuple]] = {}  # mask key -> the group it is scored with (plan())
        self.n_scored = self.n_physical = self.n_shared = 0

    def key(self, requests, head_mask=None, ffn_mask=None) -> tuple:
        return (id(requests), len(requests), mask_key(head_mask), mask_key(ffn_mask))

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
        planned = self.planned.get(self.key(requests, head_mask, ffn_mask))
        if planned and self.key(requests, head_mask, ffn_mask) not in self.memo:
            self.score_group(requests, planned, desc)
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

    def per_pass(self, requests, n_masks: int) -> int:
        """Masks sharing a pass over `requests` when `n_masks` are asked for: eval.masks_per_pass, whose
        auto is `masks_per_pass`'s, or under ZeRO-3 `zero3_masks_per_pass`'s (sized from memory)."""
        if self.masks_per_pass == "auto" and self.lm.engine is not None:
            return zero3_masks_per_pass(self.lm, requests, self.batch_size, n_masks)
        return masks_per_pass(self.masks_per_pass, self.batch_size, requests)

    def prefetch(self, requests, masks, desc="eval") -> None:
        """Before each call of a run of calls on `masks` ([(head_mask, ffn_mask)], all of them, in the
        order they are asked for): the first `masks_per_pass` that are neither memoised nor cheaper on
        a pruned copy, scored together in shared passes (scoring.score_masks) and memoised. The masks
        already asked for are memoised, so the group starts at the one needed now, and a job that
        stops loses at most the group being scored. Nothing when fewer than two would share."""
        k = self.per_pass(requests, len(masks))
        group, seen = [], set()
        for hm, fm in masks:
            key = self.key(requests, hm, fm)
            if len(group) == k:
                break
            if key in self.memo or key in seen or self.on_pruned_copy(hm, fm):
                continue
            seen.add(key)
            group.append((hm, fm))
        if len(group) >= 2:
            self.score_group(requests, group, desc)

    def plan(self, requests, masks) -> None:
        """Fixes which masks share passes in a run of calls on `masks` ([(head_mask, ffn_mask)], every
        one the run has, done or not, in the order asked for): those not memoised now, distinct, in
        consecutive groups of `per_pass`; a call on one of them scores its whole group. A mask is then
        always scored beside the same others, so a resumed job gets the bits an uninterrupted one got
        (a pass's rounding depends on its rows), as long as the group size is the same."""
        todo, seen = [], set()
        for hm, fm in masks:
            key = self.key(requests, hm, fm)
            if key not in self.memo and key not in seen and not self.on_pruned_copy(hm, fm):
                seen.add(key)
                todo.append((hm, fm))
        k = self.per_pass(requests, len(todo))
        for s in range(0, len(todo), k):
            for hm, fm in todo[s: s + k]:
                self.planned[self.key(requests, hm, fm)] = todo[s: s + k]

    def score_group(self, requests, group, desc="eval") -> None:
        """Masks scored together in shared passes (scoring.score_masks) and memoised (those not yet)."""
        scores = score_masks(self.lm, requests, group, batch_size=self.batch_size, progress=self.progress,
                             desc=f"{desc} ({len(group)} masks per pass)")
        for (hm, fm), sc in zip(group, scores):
            self.remember(requests, hm, fm, sc)
        self.n_shared += len(group) if len(group) > 1 else 0


def _keep(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask_key(mask) is None else mask
