"""The one hook system: named hook points on the modules an adapter locates, installed for one
`with` block and always removed on exit (also when the block raises).

Head/FFN gates (models/gates.py, which importance and pruning use), the induction probes
(icl_scale/induction/probes.py) and the restarted FFN knock-outs (icl_scale/knockout.py) are built on
it; nothing else in icl_scale patches a model.

    with Hooks(adapter, [("heads", 3, pre_hook), ("attention", 3, look)]):
        model(ids)

Hook points, per layer l:

* "block": forward pre-hook on decoder block l. fn(module, args, kwargs) -> None, or the
  replacement (args, kwargs); args[0] is the block's input hidden states.
* "heads": forward pre-hook on layer l's attention output projection, whose input is the
  concatenated head outputs [..., heads * head_dim]. Same signature as "block".
* "ffn": forward hook on the module whose output is layer l's FFN contribution to the residual
  stream. fn(module, args, output) -> None, or the replacement output.
* "ffn_input": forward pre-hook on layer l's pre-FFN norm, whose input is the block's
  post-attention residual stream. Same signature as "block".
* "attention": inside layer l's attention computation, after RoPE and before the output
  projection. fn(view: AttentionView) -> None. transformers 5.x computes attention in a function
  it looks up by name (config._attn_implementation) in its AttentionInterface registry, so while
  an attention hook is installed the model runs a registered wrapper of its own implementation
  (sdpa or eager) that hands the layer's queries, keys, values, head outputs and attention
  probabilities (or their log-sum-exp) to the hook; the implementation is restored on exit.
  Layers without an attention hook run the original function unchanged.

Model-wide hook points (layer None):

* "model": forward pre-hook on the base model (the decoder stack without the LM head), same
  signature as "block"; "model_output": its forward hook, fn(module, args, kwargs, output);
* "final_norm": forward pre-hook on the final norm, same signature as "block".
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, UnsupportedArchitecture

LAYER_POINTS = ("block", "heads", "ffn", "ffn_input", "attention")
MODEL_POINTS = ("model", "model_output", "final_norm")
HOOK_POINTS = LAYER_POINTS + MODEL_POINTS
_WRAPPER = "icl_scale_hooks"  # registered attention functions are named icl_scale_hooks_<sdpa|eager>


class HookError(ValueError):
    """A hook that cannot be installed (one line, says what to change)."""


@dataclass
class AttentionView:
    """What an "attention" hook sees of one layer's attention (batch first, one entry per query head).

    probs is set when the layer ran eager attention; lse (the log-sum-exp of each query's scaled
    scores, so that the attention on key k is exp(q.k * scaling - lse)) when it ran the CPU flash
    kernel, which never materialises the [T, T] pattern. Exactly one of the two is not None."""

    layer: int
    module: nn.Module
    query: torch.Tensor  # [B, H, T, D] after RoPE
    key: torch.Tensor  # [B, H, T, D], GQA groups repeated per query head
    value: torch.Tensor  # [B, H, T, D], GQA groups repeated per query head
    output: torch.Tensor  # [B, H, T, D] head outputs (attention-weighted values)
    scaling: float
    probs: torch.Tensor | None = None  # [B, H, T, T]
    lse: torch.Tensor | None = None  # [B, H, T]


# Attention hooks by attention module (weak keys: a dropped model takes its entries with it).
_ATTENTION_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Hooks:
    """Hooks on named points of one model: `with Hooks(adapter, [(point, layer, fn), ...]):`."""

    def __init__(self, adapter: Adapter, hooks: Iterable[tuple[str, int, Callable]]):
        self.adapter = adapter
        self.hooks = list(hooks)
        n = adapter.geometry.n_layers
        for point, layer, _ in self.hooks:
            if point not in HOOK_POINTS:
                raise HookError(f"unknown hook point {point!r}; use one of {', '.join(HOOK_POINTS)}")
            if point in MODEL_POINTS:
                if layer is not None:
                    raise HookError(f"hook {point!r} is model-wide: give layer None, not {layer}")
            elif layer is None or not 0 <= layer < n:
                raise HookError(f"hook {point!r} on layer {layer}, but the model has layers 0..{n - 1}")
        self._handles: list = []
        self._attention: list[nn.Module] = []
        self._restore_impl: str | None = None

    def __enter__(self) -> Hooks:
        try:
            self._install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _install(self) -> None:
        ad = self.adapter
        for point, layer, fn in self.hooks:
            if point == "block":
                self._handles.append(ad.layer(layer).register_forward_pre_hook(fn, with_kwargs=True))
            elif point == "heads":
                self._handles.append(ad.o_proj(layer).register_forward_pre_hook(fn, with_kwargs=True))
            elif point == "ffn":
                self._handles.append(ad.ffn(layer).register_forward_hook(fn))
            elif point in ("ffn_input", "model", "final_norm"):
                self._handles.append(self._module(point, layer).register_forward_pre_hook(fn, with_kwargs=True))
            elif point == "model_output":
                self._handles.append(ad.model.base_model.register_forward_hook(fn, with_kwargs=True))
        attention = [(layer, fn) for point, layer, fn in self.hooks if point == "attention"]
        if attention:
            self._install_attention(attention)

    def _module(self, point: str, layer: int | None) -> nn.Module:
        ad = self.adapter
        if point == "ffn_input":
            return ad.layer(layer).get_submodule(ad.family.pre_ffn_norm)
        return ad.model.base_model if point == "model" else ad.final_norm()

    def _install_attention(self, attention: list[tuple[int, Callable]]) -> None:
        model = self.adapter.model
        impl = model.config._attn_implementation
        if str(impl).startswith(_WRAPPER):
            raise HookError("attention hooks are already installed on this model; use one Hooks set with "
                            "all its attention hooks at a time")
        if impl not in ("sdpa", "eager"):
            raise HookError(f"attn_implementation={impl!r}: attention hooks support sdpa and eager "
                            f"(model.attn_implementation=sdpa)")
        for layer, fn in attention:
            module = self.adapter.attn(layer)
            if module not in self._attention:
                _ATTENTION_HOOKS[module] = (layer, [])
                self._attention.append(module)
            _ATTENTION_HOOKS[module][1].append(fn)
        self._restore_impl = impl
        model.set_attn_implementation(_register_wrapper(impl))

    def remove(self) -> None:
        """Remove every hook installed by this set (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._attention:
            _ATTENTION_HOOKS.pop(module, None)
        self._attention.clear()
        if self._restore_impl is not None:
            self.adapter.model.set_attn_implementation(self._restore_impl)
            self._restore_impl = None


# --- the "attention" hook point ---------------------------------------------------------------------------

def _register_wrapper(impl: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = f"{_WRAPPER}_{impl}"
    AttentionInterface.register(name, _hooked_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])  # the masks `impl` gets
    return name


def _family_eager(module: nn.Module) -> Callable:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedArchitecture(f"{type(module).__name__} has no eager_attention_forward; attention "
                                      f"hooks need the transformers AttentionInterface")
    return fn


def _additive_causal(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The mask as eager attention wants it (sdpa gets None for plain causal, or a bool mask)."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    tq, tk = q.shape[-2], k.shape[-2]
    keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq) if mask is None else mask
    return torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(
        ~keep, torch.finfo(q.dtype).min)


def _hooked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: the layer's output as its own implementation computes it,
    with an AttentionView of the pieces handed to the layer's hooks."""
    impl = module.config._attn_implementation.removeprefix(_WRAPPER + "_")
    layer, fns = _ATTENTION_HOOKS.get(module, (None, None))
    if fns is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = _family_eager(module) if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    group = query.shape[1] // key.shape[1]
    if impl == "sdpa" and query.device.type == "cpu" and attention_mask is None and kwargs.get("softcap") is None:
        # The flash kernel sdpa dispatches to on CPU (same output as F.scaled_dot_product_attention
        # with is_causal=True) also returns the log-sum-exp, so hooks can read any attention entry
        # as exp(q.k * scaling - lse) without the [T, T] softmax. No public API returns it, and
        # torch.logsumexp over q.k^T differs from the kernel's value by ~1 ulp, which would change
        # the induction scores' last bits: hence the private op.
        k, v = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, k, v, 0.0, True, scale=scaling)
        view = AttentionView(layer, module, query, k, v, out, scaling, lse=lse)
        result = out.transpose(1, 2).contiguous(), None
    else:
        mask = attention_mask if impl == "eager" else _additive_causal(attention_mask, query, key)
        # kwargs carry what some families' eager attention needs (Gemma 2: softcap, sliding_window)
        out, weights = _family_eager(module)(module, query, key, value, mask, scaling=scaling, dropout=0.0,
                                             **kwargs)
        k, v = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        view = AttentionView(layer, module, query, k, v, out.transpose(1, 2), scaling, probs=weights)
        result = out, weights
    for fn in fns:
        fn(view)
    return result


__all__ = ["HOOK_POINTS", "LAYER_POINTS", "MODEL_POINTS", "AttentionView", "HookError", "Hooks"]
