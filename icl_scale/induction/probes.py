"""What the scores record inside the forward pass: hooks on the "attention" hook point
(icl_scale.models.hooks) that reduce each layer's attention to a [heads] row of `out` right away,
so no [layers, heads, T, T] tensor is ever kept.

    probe = PrefixProbe(adapter)
    probe.start(rows, cols, count)        # per sequence
    with Hooks(adapter, probe.hooks()):
        model.base_model(input_ids=ids)
    probe.out                              # [layers, heads]

A layer that ran eager attention hands over its probabilities; one that ran the CPU flash kernel
its queries, keys and log-sum-exp (AttentionView): each probe reads whichever is there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.adapters import Adapter
from ..models.hooks import AttentionView
from .options import CopyingOptions
from .reductions import copying_from, most_attended, prefix_from_lse, prefix_from_probs, unembedding_matrix


class PrefixProbe:
    """Prefix matching: the attention on each query's targets (prefix_targets), summed, / count."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def hooks(self) -> list[tuple[str, int, Callable]]:
        return [("attention", layer, self._take) for layer in range(self.adapter.geometry.n_layers)]

    def start(self, rows: torch.Tensor, cols: torch.Tensor, count: int) -> None:
        self.rows, self.cols, self.count = rows, cols, count
        self.out = torch.zeros(self.adapter.geometry.n_layers, self.adapter.geometry.n_heads)

    def _take(self, view: AttentionView) -> None:
        if view.probs is not None:
            score = prefix_from_probs(view.probs[0], self.rows, self.cols, self.count)
        else:
            score = prefix_from_lse(view.query[0], view.key[0], view.lse[0], view.scaling,
                                    self.rows, self.cols, self.count)
        self.out[view.layer] = score.cpu()


class CopyingProbe:
    """Copying: each head's OV logits on the sequence's tokens, read at the most-attended position.

    With opts.input == "embeddings", every decoder block reads block 0's input (token + learned
    position embeddings; RoPE acts inside attention), the original code's choice, so one pass gives
    every layer's attention on the embeddings with the model's own masks, positions and GQA."""

    def __init__(self, adapter: Adapter, opts: CopyingOptions):
        self.adapter = adapter
        self.opts = opts
        self._embeddings = None
        # The weights read outside their modules' forward, taken once here: under ZeRO-3 they are
        # whole only while gathered (induction/job.py), and ZeRO releases them after each forward.
        n, zero = adapter.geometry.n_layers, hasattr(adapter.unembedding_weight(), "ds_id")
        self.U = _own(unembedding_matrix(adapter, opts.final_norm == "fold"), zero)  # [vocab, hidden]
        self.W_o = [_own(adapter.o_proj_weight(layer), zero) for layer in range(n)]
        self.b_o = [_own(adapter.o_proj(layer).bias, zero) if opts.o_bias else None for layer in range(n)]

    def hooks(self) -> list[tuple[str, int, Callable]]:
        n = self.adapter.geometry.n_layers
        hooks = [("attention", layer, self._take) for layer in range(n)]
        if self.opts.input == "embeddings":
            hooks.append(("block", 0, self._keep_embeddings))
            hooks += [("block", layer, self._read_embeddings) for layer in range(1, n)]
        return hooks

    def start(self, ids: torch.Tensor, first: int) -> None:
        self.Uids = self.U[ids.to(self.U.device)]  # [T, hidden]
        self.first = first
        self._embeddings = None
        self.out = torch.zeros(self.adapter.geometry.n_layers, self.adapter.geometry.n_heads)

    def _keep_embeddings(self, module, args, kwargs) -> None:
        self._embeddings = args[0]

    def _read_embeddings(self, module, args, kwargs):
        return (self._embeddings, *args[1:]), kwargs

    def _take(self, view: AttentionView) -> None:
        if view.probs is not None:
            att = view.probs[0].argmax(-1)
        else:
            att = most_attended(view.query[0], view.key[0])
        x = view.output[0] if self.opts.source == "output" else view.value[0]  # [H, T, D]
        layer = view.layer
        self.out[layer] = copying_from(att, x, self.Uids, self.W_o[layer], self.b_o[layer],
                                       self.opts.softmax, self.first).cpu()


def _own(t: torch.Tensor | None, zero: bool) -> torch.Tensor | None:
    """`t` itself, or under ZeRO-3 (partitioned parameters, now gathered) a copy that outlives the gather."""
    return t.detach().clone() if zero and t is not None else t
