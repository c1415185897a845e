"""Masks that remove the least important p% of components, and accuracy curves.

Ranking is global across layers (the paper): the p% of all L*H heads (or all L FFNs) with the
lowest importance are masked (0), the rest kept (1). The number removed is floor(p * N / 100), as
the original (`lm_eval/models/opt.py::HFLM.__init__`: `int(head_percent_mask) * len(head_indices) //
100`), or round(p/100 * N) with `pruning.count=round`. Ties are broken by flat index (layer-major),
so masks are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .schema import options

DEFAULT_LEVELS = tuple(range(0, 100, 10))
COUNTS = options("pruning.count")


def check_levels(levels: Sequence[float], name: str = "pruning.levels") -> list[float]:
    out = []
    for p in levels:
        if not isinstance(p, (int, float)) or not 0 <= p <= 100:
            raise ValueError(f"{name} contains {p!r}; every level is a percentage in 0..100")
        out.append(float(p))
    return out


def n_removed(p: float, n: int, count: str = "floor") -> int:
    """Components removed at p% of n: floor(p * n / 100) (the paper) or round(p / 100 * n)."""
    if not 0 <= p <= 100:
        raise ValueError(f"pruning level p={p} is outside 0..100")
    if count == "floor":
        return int(math.floor(p * n / 100 + 1e-9))  # + 1e-9: 70 * 10 / 100 is 7, not 6.999...
    if count == "round":
        return int(round(p / 100 * n))
    raise ValueError(f"pruning.count={count!r}; use one of {', '.join(COUNTS)}")


def prune_mask(importance: torch.Tensor, p: float, keep: torch.Tensor | None = None,
               count: str = "floor") -> torch.Tensor:
    """0/1 mask of importance's shape with the lowest-ranked p% of ALL entries set to 0.

    `keep` (optional 0/1 mask): entries already removed stay removed and count towards p
    (re-scoring after each level)."""
    flat = importance.detach().flatten().double()
    n = flat.numel()
    k = n_removed(p, n, count)
    mask = torch.ones(n)
    if keep is not None:
        already = (keep.flatten() == 0)
        mask[already] = 0
        k_more = max(0, k - int(already.sum()))
        flat = flat.masked_fill(already, float("inf"))
    else:
        k_more = k
    if k_more:
        # Stable sort on (importance, index): ties go to the lower flat index first.
        order = torch.sort(flat, stable=True).indices
        mask[order[:k_more]] = 0
    return mask.view_as(importance)


def random_ranking(shape: Sequence[int], seed: int) -> torch.Tensor:
    """A uniformly random ranking (a baseline for pruning by importance), reproducible from `seed`."""
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def curve(
    importance: torch.Tensor,
    levels: Sequence[float],
    evaluate: Callable[[torch.Tensor], dict],
    rescore: Callable[[torch.Tensor], torch.Tensor] | None = None,
    done: dict[float, dict] | None = None,
    on_level: Callable[[float, torch.Tensor, dict], None] | None = None,
    count: str = "floor",
) -> dict[float, dict]:
    """Evaluate at every pruning level. `evaluate(mask) -> metrics`.

    Default (the paper, whose "iterative" pruning is this): every level's mask comes from the one
    ranking, so the masks nest. `rescore` given (`pruning.rescore_each_level`, HF's bertology):
    importance is recomputed with the current mask applied before removing the next components."""
    levels = sorted(check_levels(levels))
    done = dict(done or {})
    mask = None
    imp = importance
    for p in levels:
        if rescore is not None and mask is not None:
            imp = rescore(mask)
        mask = prune_mask(imp, p, keep=mask if rescore is not None else None, count=count)
        if p not in done:
            done[p] = evaluate(mask)
            if on_level:
                on_level(p, mask, done[p])
    return done
