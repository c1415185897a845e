"""Masks that remove the least important p% of components, and accuracy curves.

Ranking is global across layers (the paper): the p% of all L*H heads (or all L FFNs) with the
lowest importance are masked (0), the rest kept (1). The number removed is round(p/100 * N).
Ties are broken by flat index (layer-major), so masks are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

DEFAULT_LEVELS = tuple(range(0, 100, 10))


def check_levels(levels: Sequence[float], name: str = "pruning.levels") -> list[float]:
    out = []
    for p in levels:
        if not isinstance(p, (int, float)) or not 0 <= p <= 100:
            raise ValueError(f"{name} contains {p!r}; every level is a percentage in 0..100")
        out.append(float(p))
    return out


def n_removed(p: float, n: int) -> int:
    if not 0 <= p <= 100:
        raise ValueError(f"pruning level p={p} is outside 0..100")
    return int(round(p / 100 * n))


def prune_mask(importance: torch.Tensor, p: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 mask of importance's shape with the lowest-ranked p% of ALL entries set to 0.

    `keep` (optional 0/1 mask): entries already removed stay removed and count towards p
    (iterative pruning)."""
    flat = importance.detach().flatten().double()
    n = flat.numel()
    k = n_removed(p, n)
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
) -> dict[float, dict]:
    """Evaluate at every pruning level. `evaluate(mask) -> metrics`.

    One-shot (default): each level's mask comes from the same ranking. Iterative (`rescore` given,
    as HF's bertology): importance is recomputed with the current mask applied before removing the
    next components, so level p's mask contains level p-1's."""
    levels = sorted(check_levels(levels))
    done = dict(done or {})
    mask = None
    imp = importance
    for p in levels:
        if rescore is not None and mask is not None:
            imp = rescore(mask)
        mask = prune_mask(imp, p, keep=mask if rescore is not None else None)
        if p not in done:
            done[p] = evaluate(mask)
            if on_level:
                on_level(p, mask, done[p])
    return done
