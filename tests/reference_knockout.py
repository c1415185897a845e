"""The reference FFN knock-out: one full evaluation per removed FFN (what the shard's fast path,
icl_scale/knockout.py, must equal)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from icl_scale.knockout import knockout_drops
from icl_scale.models.loading import LoadedModel


def ffn_knockout(
    lm: LoadedModel,
    evaluate: Callable[[torch.Tensor | None, torch.Tensor | None], float],
    head_mask: torch.Tensor | None = None,
    done: dict[int, float] | None = None,
    on_layer: Callable[[int, float], None] | None = None,
    ) -> tuple[float, torch.Tensor]:
    """Accuracy drop when FFN l alone is removed, for every layer: (baseline, [L] drops).

    `evaluate(head_mask, ffn_mask) -> accuracy` on the knock-out split, called once per knock-out
    (each a full evaluation); `done` holds accuracies already measured (resume) keyed by layer, with
    -1 for the baseline. The shard computes the same numbers with icl_scale.knockout, which restarts
    every knock-out at its layer instead of rerunning the layers before it."""
    n = lm.adapter.geometry.n_layers
    done = dict(done or {})
    if -1 not in done:
        done[-1] = evaluate(head_mask, None)
        if on_layer:
            on_layer(-1, done[-1])
    for l in range(n):
        if l in done:
            continue
        m = torch.ones(n)
        m[l] = 0
        done[l] = evaluate(head_mask, m)
        if on_layer:
            on_layer(l, done[l])
    return knockout_drops(done, n)
