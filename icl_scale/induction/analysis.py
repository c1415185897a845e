"""What the reducer needs to relate induction scores to task importance: the share of induction
capacity a task's pruning order keeps (paper Fig. 11) and pruning masks from score and random
rankings, all with the task-importance pruning rule (icl_scale.pruning)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..pruning import DEFAULT_LEVELS, prune_mask, random_ranking
from .options import InductionConfigError

PRUNE_LEVELS = DEFAULT_LEVELS  # 0..90 step 10, as task-importance pruning


def mask_from_ranking(values: torch.Tensor, p: float, lowest_first: bool = True, count: str = "floor") -> torch.Tensor:
    """[L, H] float mask (1 keep, 0 pruned) removing p% of heads, lowest `values` first (or highest);
    the same rule as task-importance pruning (icl_scale.pruning.prune_mask: floor(p * N / 100) heads
    by default, ties to the lower layer-major index)."""
    return prune_mask(values if lowest_first else -values.double(), p, count=count)


def retained_capacity(scores: torch.Tensor, ranking_importance: torch.Tensor,
                      levels: Sequence[float] = PRUNE_LEVELS, count: str = "floor") -> list[float]:
    """Fraction of the total induction score (sum over heads) kept when heads are pruned p% at a time
    by a task's importance, least important first (Bansal et al. Fig. 11)."""
    if scores.shape != ranking_importance.shape:
        raise InductionConfigError(f"scores {tuple(scores.shape)} and importance "
                                   f"{tuple(ranking_importance.shape)} must have the same [L, H] shape")
    total = float(scores.sum())
    return [float((scores * mask_from_ranking(ranking_importance, p, count=count)).sum()) / total
            if total else float("nan")
            for p in levels]


def ranking_masks(scores: torch.Tensor, p: float, n_random: int = 5, seed: int = 0,
                  lowest_first: bool = True) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Pruning masks at p%: from the induction-score ranking (lowest scores pruned first unless
    lowest_first=False) and from `n_random` random rankings, the k-th one
    icl_scale.pruning.random_ranking(shape, seed + k) (with seed=0 the same rankings as a shard's
    heads_random<k> curves), to compare against task-importance pruning at the same p."""
    rand = [mask_from_ranking(random_ranking(scores.shape, int(seed) + k), p) for k in range(n_random)]
    return {"induction": mask_from_ranking(scores, p, lowest_first), "random": rand}
