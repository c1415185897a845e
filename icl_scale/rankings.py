"""Comparing and combining importance rankings: the two rank statistics, top-k overlap and the
aggregate ranking (mean importance over tasks).

Two statistics, both reported wherever a correlation appears:

* `argsort_spearman` (the paper's, default): Spearman's rho between the *argsort* vectors of the two
  score tensors, `spearmanr(torch.sort(a)[1], torch.sort(b)[1])` as the original
  `scripts/plotting/spearman_rankings.py` computes it. Element i of an argsort vector is the id of
  the i-th least important component, so this correlates component *ids* rank by rank: it is 1 for
  identical orders, but otherwise it depends on how the components are numbered (layer-major), not
  only on how their ranks agree. It is not the rank correlation of the scores.
* `spearman` (true Spearman): rho between the scores themselves (their ranks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from scipy.stats import spearmanr

STATISTICS = ("argsort_spearman", "spearman")


def _rho(x: torch.Tensor, y: torch.Tensor) -> float:
    r = spearmanr(x.double().numpy(), y.double().numpy()).statistic
    return float(r) if not math.isnan(r) else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho of two same-shape score tensors (NaN for two shapes: other models)."""
    if a.shape != b.shape:
        return float("nan")
    return _rho(a.flatten(), b.flatten())


def argsort_order(a: torch.Tensor) -> torch.Tensor:
    """Component ids from least to most important (ties: lower flat index first)."""
    return torch.sort(a.detach().flatten().double(), stable=True).indices


def argsort_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """The paper's statistic: Spearman's rho between the argsort vectors of a and b."""
    if a.shape != b.shape:
        return float("nan")
    return _rho(argsort_order(a), argsort_order(b))


def correlation(a: torch.Tensor, b: torch.Tensor, statistic: str) -> float:
    if statistic == "argsort_spearman":
        return argsort_spearman(a, b)
    if statistic == "spearman":
        return spearman(a, b)
    raise ValueError(f"statistic={statistic!r}; use one of {', '.join(STATISTICS)}")


def top_overlap(a: torch.Tensor, b: torch.Tensor, frac: float = 0.2) -> float:
    """Fraction of a's top-`frac` heads that are also in b's top-`frac` heads (NaN for two shapes)."""
    if a.shape != b.shape:
        return float("nan")
    k = max(1, int(round(frac * a.numel())))
    ta = set(torch.topk(a.flatten(), k).indices.tolist())
    tb = set(torch.topk(b.flatten(), k).indices.tolist())
    return len(ta & tb) / k


def aggregate(importance: Mapping[str, torch.Tensor], leave_out: Sequence[str] = ()) -> torch.Tensor:
    """Mean importance over tasks (the paper's aggregate ranking: `spearman_rankings.py --aggregate`
    sums the tasks' raw scores and divides by their number), without the tasks in `leave_out`."""
    used = [t for t in sorted(importance) if t not in set(leave_out)]
    if not used:
        raise ValueError(f"no task left to aggregate (tasks {sorted(importance)}, leaving out {list(leave_out)})")
    shapes = {tuple(importance[t].shape) for t in used}
    if len(shapes) > 1:
        raise ValueError(f"the tasks' importance tensors have different shapes {sorted(shapes)}: one model only")
    return torch.stack([importance[t].double() for t in used]).mean(0).float()
