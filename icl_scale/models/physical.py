"""Physical pruning: a copy of a model that computes only the heads and FFNs a mask keeps.

The gates (models/gates.py) remove a component by multiplying its output by 0, so a gated model
still spends the full compute. `prune_physically(lm, head_mask, ffn_mask)` returns a copy (the
original is never modified; untouched weights are shared with it) whose layers are cut down to the
kept components, and which computes exactly what the gated model computes (up to float rounding):

* heads: layer l keeps the rows of its query/key/value projections that belong to the kept heads
  and the matching input columns of its output projection (for GPT-2's fused c_attn and GPT-NeoX's
  per-head interleaved query_key_value, the kept heads' q, k and v slices of the fused weight).
  The output projection's bias stays: the gates scale the projection's input, never its bias.
* GQA (Llama family, e.g. SmolLM2: 9 query heads on 3 KV heads): a KV head is dropped only when
  all of its query heads are. When the kept query heads leave unequal groups (say 3 and 1), the
  layer keeps c = gcd(group sizes) query heads per KV slot and repeats a KV head's rows once per
  c of its query heads (c = 1: one KV slot per kept query head); the attention module's
  `num_key_value_groups` is set to c, which is all transformers 5's sdpa/eager attention reads.
* a layer with every head removed: its attention is replaced by `NoHeads`, which computes
  nothing, adds only the output projection's bias (zero if it has none) to the residual stream,
  and keeps a one-number-per-token placeholder in the KV cache so cache lengths and batch
  selection stay right for the other layers. The residual stream passes through.
* a removed FFN: nothing is computed; the block adds zero to the residual stream (the gates zero
  the FFN's whole output, OPT's fc2 bias included). In pre-norm blocks the norm that only feeds the
  removed part (the pre-attention norm of a layer without heads, the pre-FFN norm of a layer
  without FFN) is replaced by nn.Identity; OPT-350m's post-norms stay, they sit on the residual.

A layer with every head and its FFN removed passes its input through unchanged.

Why: Bansal et al. prune 70% of the heads and 20% of the FFNs with little loss in in-context
accuracy; only a physically smaller model turns that into fewer parameters and faster forwards.

The pruned model keeps its HF config (the full architecture): its structure is `structure(...)`
(kept heads and FFN per layer), which jobs/export.py writes into config.json and which
`apply_structure` re-applies to a freshly built full model before its pruned weights are loaded
(models/loading.py). Head/FFN gates (Gates) do not apply to a pruned model: its heads are
renumbered. Supported: OPT, the Llama family (Llama, Mistral, Qwen2, Qwen3), Gemma 2/3 (a removed FFN
takes its post-FFN norm with it: the norm of a zero branch is zero), GPT-2 and GPT-NeoX. Not Phi-3:
its attention splits the fused qkv output at the query width of the model-wide config, which one
layer's pruning cannot change; pruning curves on Phi-3 use the gates (`cheaper_pruned` says no).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, HeadGeometry
from .gates import MaskError, check_mask

STRUCTURE_KEY = "icl_scale_pruning"  # the block of config.json that describes a pruned checkpoint


class PruningError(ValueError):
    """Physical pruning cannot be applied as asked (one line, says what to change)."""


PRUNABLE_FAMILIES = ("opt", "llama", "gemma", "gpt2", "gpt_neox")  # adapters.Family names


def check_prunable(ad: Adapter) -> None:
    """A PruningError naming the family when physical pruning does not support it."""
    if ad.family.name not in PRUNABLE_FAMILIES:
        raise PruningError(f"physical pruning does not support model_type={ad.model.config.model_type!r} "
                           f"(family {ad.family.name}; supported: {', '.join(PRUNABLE_FAMILIES)}); score its masks "
                           "with gates (eval.physical_below=null)")


@dataclass(frozen=True)
class LayerPlan:
    """What one layer keeps: query heads (original indices), the original KV head behind each KV
    slot, query heads per KV slot, and whether its FFN stays."""

    heads: tuple[int, ...]
    kv_slots: tuple[int, ...]
    groups: int
    ffn: bool


def plan_layer(g: HeadGeometry, heads: list[int], ffn: bool) -> LayerPlan:
    heads = sorted(int(h) for h in heads)
    counts: dict[int, int] = {}
    for h in heads:
        counts[h // g.group_size] = counts.get(h // g.group_size, 0) + 1
    c = math.gcd(*counts.values()) if counts else 1
    slots = tuple(kv for kv in sorted(counts) for _ in range(counts[kv] // c))
    return LayerPlan(tuple(heads), slots, c, bool(ffn))


def plan(g: HeadGeometry, head_mask=None, ffn_mask=None) -> list[LayerPlan]:
    """Per-layer plans from 0/1 masks (None: keep everything); a bad mask is a MaskError."""
    hm = check_mask(head_mask, (g.n_layers, g.n_heads), "head_mask")
    fm = check_mask(ffn_mask, (g.n_layers,), "ffn_mask")
    hm = torch.ones(g.n_layers, g.n_heads) if hm is None else hm.detach().float().cpu()
    fm = torch.ones(g.n_layers) if fm is None else fm.detach().float().cpu()
    return [plan_layer(g, torch.nonzero(hm[l]).flatten().tolist(), bool(fm[l] == 1)) for l in range(g.n_layers)]


def structure(plans: list[LayerPlan]) -> dict:
    """The JSON block naming what each layer keeps (config.json's `icl_scale_pruning` layers)."""
    return {"layers": [{"heads": list(p.heads), "kv_heads": list(p.kv_slots), "ffn": p.ffn} for p in plans]}


def plans_from_structure(g: HeadGeometry, block: dict, where: str) -> list[LayerPlan]:
    """Plans back from a `structure` block; a block that does not fit the geometry is a PruningError."""
    layers = block.get("layers") if isinstance(block, dict) else None
    if not isinstance(layers, list) or len(layers) != g.n_layers:
        raise PruningError(f"{where}: {STRUCTURE_KEY}.layers must list the model's {g.n_layers} layers; "
                           "export the checkpoint again")
    out = []
    for l, row in enumerate(layers):
        heads = row.get("heads") if isinstance(row, dict) else None
        if not isinstance(heads, list) or any(not isinstance(h, int) or not 0 <= h < g.n_heads for h in heads) \
                or len(set(heads)) != len(heads) or not isinstance(row.get("ffn"), bool):
            raise PruningError(f"{where}: {STRUCTURE_KEY}.layers[{l}] needs `heads` (distinct head numbers "
                               f"0..{g.n_heads - 1}) and `ffn` (true/false); export the checkpoint again")
        out.append(plan_layer(g, heads, row["ffn"]))
    return out


# --- modules that stand in for removed parts ----------------------------------------------------

def _zeros_like_out(x: torch.Tensor, width: int) -> torch.Tensor:
    return x.new_zeros(()).expand(*x.shape[:-1], width)  # a view: costs nothing, adds 0 downstream


class NoHeads(nn.Module):
    """Attention of a layer whose heads are all removed: adds the output projection's bias (or
    nothing). Keeps a [batch, 1, tokens, 1] zero placeholder in the KV cache, so the cache's length
    and batch selection stay right (transformers reads the first layer's length for positions)."""

    def __init__(self, o_bias: torch.Tensor | None, layer_idx: int | None, hidden: int):
        super().__init__()
        self.layer_idx, self.hidden = layer_idx, hidden
        self.o_bias = None if o_bias is None else nn.Parameter(o_bias.detach().clone(), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "layer_past") if kwargs.get(k) is not None),
                     None)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # GPT-2's encoder-decoder cache
            z = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(z, z, self.layer_idx)
        if self.o_bias is None:
            return _zeros_like_out(hidden_states, self.hidden), None
        return self.o_bias.expand(*hidden_states.shape[:-1], self.hidden), None


class NoFFN(nn.Module):
    """A removed FFN (or OPT's removed fc2): output zero of width `hidden`, nothing computed."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _zeros_like_out(x, self.hidden)


class Nothing(nn.Module):
    """OPT's removed fc1: an empty activation (its fc2 is a NoFFN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :0]


# --- weight surgery (on the copy) ------------------------------------------------------------------

def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=False)


def _head_index(heads, head_dim: int, device, stride: int | None = None, offset: int = 0) -> torch.Tensor:
    """Rows of heads' slices: head h -> offset + h*stride + [0, head_dim) (stride default head_dim)."""
    stride = stride or head_dim
    idx = [offset + h * stride + i for h in heads for i in range(head_dim)]
    return torch.tensor(idx, dtype=torch.long, device=device)


def _keep_out(mod: nn.Module, idx: torch.Tensor, conv1d: bool) -> None:
    """Keep output features `idx` of a Linear (weight [out, in]) or Conv1D (weight [in, out])."""
    mod.weight = _param(mod.weight.index_select(1 if conv1d else 0, idx))
    if getattr(mod, "bias", None) is not None:
        mod.bias = _param(mod.bias.index_select(0, idx))
    if conv1d:
        mod.nf = len(idx)
    else:
        mod.out_features = len(idx)


def _keep_in(mod: nn.Module, idx: torch.Tensor, conv1d: bool) -> None:
    """Keep input features `idx` (the bias is untouched)."""
    mod.weight = _param(mod.weight.index_select(0 if conv1d else 1, idx))
    if conv1d:
        mod.nx = len(idx)
    else:
        mod.in_features = len(idx)


def _slice_attention(ad: Adapter, l: int, p: LayerPlan) -> None:
    fam, g = ad.family, ad.geometry
    attn = ad.attn(l)
    dev = ad.o_proj(l).weight.device
    q_idx = _head_index(p.heads, g.head_dim, dev)
    if fam.name == "gpt2":  # c_attn's output is [q | k | v], each hidden wide
        idx = torch.cat([q_idx + k * g.hidden for k in range(3)])
        _keep_out(getattr(attn, fam.qkv_proj), idx, conv1d=True)
        attn.split_size = len(p.heads) * g.head_dim
    elif fam.name == "gpt_neox":  # query_key_value's rows are (head, [q|k|v], head_dim)
        idx = _head_index(p.heads, 3 * g.head_dim, dev)
        _keep_out(getattr(attn, fam.qkv_proj), idx, conv1d=False)
    else:
        _keep_out(getattr(attn, fam.q_proj), q_idx, conv1d=False)
        kv_idx = _head_index(p.kv_slots, g.head_dim, dev)
        for name in (fam.k_proj, fam.v_proj):
            _keep_out(getattr(attn, name), kv_idx, conv1d=False)
    _keep_in(ad.o_proj(l), q_idx, conv1d=fam.conv1d)
    for attr, value in (("num_heads", len(p.heads)), ("num_key_value_heads", len(p.kv_slots)),
                        ("num_key_value_groups", p.groups)):
        if hasattr(attn, attr):
            setattr(attn, attr, value)


def _pre_norm(ad: Adapter) -> bool:
    """Do the attention/FFN norms only feed their own part? (not in OPT-350m's post-norm blocks)"""
    return ad.family.name != "opt" or bool(getattr(ad.model.config, "do_layer_norm_before", True))


def _prune_layer(ad: Adapter, l: int, p: LayerPlan) -> None:
    fam, g = ad.family, ad.geometry
    layer = ad.layer(l)
    if not p.heads:
        attn = ad.attn(l)
        setattr(layer, fam.attn, NoHeads(ad.o_proj(l).bias, getattr(attn, "layer_idx", l), g.hidden))
        if _pre_norm(ad):
            setattr(layer, fam.pre_attn_norm, nn.Identity())
    elif len(p.heads) < g.n_heads:
        _slice_attention(ad, l, p)
    if not p.ffn:
        if fam.name == "opt":  # fc1 -> activation -> fc2 inline in the block
            layer.fc1, layer.fc2 = Nothing(), NoFFN(g.hidden)
        else:
            setattr(layer, fam.ffn, NoFFN(g.hidden))  # Gemma: its post-FFN norm
            if fam.mlp:
                setattr(layer, fam.mlp, NoFFN(g.hidden))
        if _pre_norm(ad):
            setattr(layer, fam.pre_ffn_norm, nn.Identity())


def apply_structure(model: nn.Module, plans: list[LayerPlan]) -> nn.Module:
    """Cut `model` down to `plans` IN PLACE (a full, unpruned model of the same config); returns it.
    prune_physically does this on a copy; loading does it on a freshly built model."""
    ad = Adapter(model)
    check_prunable(ad)
    if len(plans) != ad.geometry.n_layers:
        raise PruningError(f"a pruning structure of {len(plans)} layers does not fit a model of "
                           f"{ad.geometry.n_layers} layers")
    for l, p in enumerate(plans):
        _prune_layer(ad, l, p)
    return model


def prune_physically(lm_or_model: Any, head_mask=None, ffn_mask=None):
    """A pruned deep copy of a LoadedModel (returned as a LoadedModel, ready for score_requests) or
    of a bare model (returned as a model). head_mask [layers, heads] and ffn_mask [layers] are 0/1
    (1 = keep; None = keep all); a mask of the wrong shape or with other values is a MaskError.
    A layer may lose every head and/or its FFN: the residual stream passes through it."""
    is_lm = dataclasses.is_dataclass(lm_or_model) and hasattr(lm_or_model, "adapter")
    model = lm_or_model.model if is_lm else lm_or_model
    if is_lm and getattr(lm_or_model, "engine", None) is not None:
        raise PruningError("physical pruning of a ZeRO-3 partitioned model is not supported; load it with "
                           "model.deepspeed.enabled=false")
    check_prunable(Adapter(model))
    plans = plan(Adapter(model).geometry, head_mask, ffn_mask)
    pruned = apply_structure(_copy_sharing_weights(model), plans)
    pruned.eval()
    if not is_lm:
        return pruned
    return dataclasses.replace(lm_or_model, model=pruned, adapter=Adapter(pruned))


def _copy_sharing_weights(model: nn.Module) -> nn.Module:
    """A deep copy of the modules whose parameters and buffers are the original's tensors: the surgery
    then replaces only the sliced ones (new tensors on the copy's modules), so a pruned copy costs the
    kept slices' memory, not a second model, and the original stays as it was."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _ffn_weights(ad: Adapter, l: int) -> int:
    layer = ad.layer(l)
    mods = (layer.fc1, layer.fc2) if ad.family.name == "opt" else (ad.mlp(l),)
    return sum(p.numel() for m in mods for p in m.parameters() if p.dim() == 2)


def compute_fraction(ad: Adapter, plans: list[LayerPlan]) -> float:
    """Multiply-adds per token of the blocks' projections and FFNs under `plans`, as a fraction of the
    unpruned model's (attention scores, norms and the unembedding not counted: they are a small,
    unchanged share). Above 1 is possible: GQA layers with unequal groups repeat KV heads."""
    g = ad.geometry

    def attn(p: LayerPlan) -> int:
        return (2 * len(p.heads) + 2 * len(p.kv_slots)) * g.head_dim * g.hidden

    full_plan = plan_layer(g, list(range(g.n_heads)), True)
    ffn = [_ffn_weights(ad, l) for l in range(g.n_layers)]
    full = sum(attn(full_plan) + f for f in ffn)
    kept = sum(attn(p) + (f if p.ffn else 0) for p, f in zip(plans, ffn))
    return kept / full


def cheaper_pruned(lm, head_mask=None, ffn_mask=None, below: float = 0.9) -> bool:
    """Whether a physically pruned copy of `lm` for these masks costs at most `below` of the full
    model's block compute (compute_fraction). False for no masks, for a ZeRO-3 partitioned model,
    whose weights no rank holds whole, and for a family physical pruning does not support (Phi-3).
    `below` is measured: bench/pruned.py times pruned vs gated forwards at the curves' levels."""
    if (head_mask is None and ffn_mask is None) or getattr(lm, "engine", None) is not None \
            or lm.adapter.family.name not in PRUNABLE_FAMILIES:
        return False
    return compute_fraction(lm.adapter, plan(lm.adapter.geometry, head_mask, ffn_mask)) <= below


def n_parameters(model: nn.Module) -> int:
    """Stored parameters (tied weights once; a GQA KV head repeated for unequal groups counts per copy)."""
    model = getattr(model, "model", model) if dataclasses.is_dataclass(model) else model
    return sum(p.numel() for p in model.parameters())


__all__ = ["PRUNABLE_FAMILIES", "STRUCTURE_KEY", "LayerPlan", "MaskError", "NoFFN", "NoHeads", "PruningError",
           "apply_structure", "cheaper_pruned", "check_prunable", "compute_fraction", "n_parameters", "plan",
           "plan_layer", "plans_from_structure", "prune_physically", "structure"]
