"""Head and FFN gates applied in the forward pass with hooks (models/hooks.py).

transformers 5.x ignores `head_mask` and has no `prune_heads`, so gates are installed as
hooks that work the same for every supported family:

* head gate g[l, h] multiplies head h's attention output, i.e. the input of layer l's output
  projection viewed as (..., heads, head_dim) (the "heads" hook point);
* FFN gate f[l] multiplies the FFN block's output before it is added to the residual stream
  (the "ffn" hook point).

Three uses:
* fixed masks for evaluation: `Gates(adapter, head_mask=m, ffn_mask=f)`;
* differentiable gates: pass tensors with requires_grad=True and differentiate the loss w.r.t.
  them (d loss / d g[l, h] = sum over tokens of <head output, d loss / d head output>);
* per-token probes (`record=True`): every forward creates ones-tensors of shape
  (batch, seq, heads) / (batch, seq) that require grad, so one backward pass yields the
  per-token contributions <head output, d loss / d head output> needed for sum-of-|.| importance.

Several fixed masks in one batched forward, each batch row under its own (`RowGates`, which
scoring.score_masks uses).

Model parameters are never touched. Leaving the context removes every hook.

A head mask that removes every head of a layer is allowed: that layer's attention output is zero
and the residual stream passes through it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .adapters import Adapter, HeadGeometry
from .hooks import Hooks


class MaskError(ValueError):
    """A mask is unusable (shape, dtype, values, file); the message names it and the fix."""


def check_mask(mask: torch.Tensor | None, shape: tuple[int, ...] | None, name: str,
               binary: bool = True) -> torch.Tensor | None:
    """`mask` as a tensor of `shape` ([layers, heads] or [layers]; None: any), float or bool, finite,
    and with `binary` only 0/1 (1 = keep, 0 = remove): every mask the project writes is binary. Gates
    also take scaled and differentiable gates (binary=False)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if shape is not None and tuple(mask.shape) != shape:
        raise MaskError(f"{name} has shape {tuple(mask.shape)} but this model needs {shape}; "
                        f"build it with shape {shape} (layers{', heads' if len(shape) == 2 else ''})")
    if not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
        raise MaskError(f"{name} has dtype {str(mask.dtype).replace('torch.', '')}; "
                        "use a float (0.0/1.0) or bool tensor")
    fix = "masks are binary: build it with 1 = keep, 0 = remove" if binary else "use finite gate values"
    values = mask.detach()
    if mask.dtype != torch.bool and not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise MaskError(f"{name} has {bad} NaN/inf value{'s' if bad > 1 else ''}; {fix}")
    if binary and mask.dtype != torch.bool:
        other = (values != 0) & (values != 1)
        if bool(other.any()):
            first = values[other].flatten()[0].item()
            raise MaskError(f"{name} has {int(other.sum())} value(s) other than 0 and 1 (e.g. {first:g}); {fix}")
    return mask


def check_model_masks(masks: dict[str, torch.Tensor], geometry: HeadGeometry, name: Callable[[str], str]) -> None:
    """Masks read from files ({"head_mask": [L, H], "ffn_mask": [L]}, either may be absent) checked
    against a loaded model's geometry; `name(key)` says where each came from in the error."""
    shapes = {"head_mask": (geometry.n_layers, geometry.n_heads), "ffn_mask": (geometry.n_layers,)}
    for key, shape in shapes.items():
        if key in masks:
            check_mask(masks[key], shape, name(key))


def read_mask_file(path: str | Path, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A user's mask file (`head_mask=` / `ffn_mask=`): a safetensors file holding one tensor (key
    `mask`), float or bool, 0/1, of `shape` when given (check it later with check_mask when the model
    is not loaded yet). Every problem is a MaskError naming `name=path`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    what = f"{name}={path}"
    p = Path(path)
    kind = "[layers, heads]" if name == "head_mask" else "[layers]"
    fix = (f"use a shard's masks/*.safetensors, or write one with safetensors.torch.save_file({{'mask': m}}, "
           f"path), m a {kind} tensor of 1 (keep) and 0 (remove)")
    if not p.exists():
        raise MaskError(f"{what}: no such file; {fix}")
    if not p.is_file():
        raise MaskError(f"{what} is not a file; {fix}")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as e:
        first = (str(e).splitlines() or [""])[0]
        raise MaskError(f"{what} is not a readable safetensors file ({first}); {fix}") from None
    if len(tensors) != 1:
        keys = ", ".join(sorted(tensors)) or "none"
        raise MaskError(f"{what} holds {len(tensors)} tensors ({keys}); it needs exactly one (key 'mask'): {fix}")
    mask = next(iter(tensors.values()))
    return check_mask(mask, shape, what, binary=True)


class Gates:
    """Context manager installing head/FFN gates on a model through its adapter."""

    def __init__(
        self,
        adapter: Adapter,
        head_mask: torch.Tensor | None = None,
        ffn_mask: torch.Tensor | None = None,
        record: bool = False,
    ):
        g = adapter.geometry
        self.adapter = adapter
        # Not only 0/1: finite differences and differentiable gates scale components.
        self.head_mask = check_mask(head_mask, (g.n_layers, g.n_heads), "head_mask", binary=False)
        self.ffn_mask = check_mask(ffn_mask, (g.n_layers,), "ffn_mask", binary=False)
        self.record = record
        self.head_probes: list[list[torch.Tensor]] = [[] for _ in range(g.n_layers)]
        self.ffn_probes: list[list[torch.Tensor]] = [[] for _ in range(g.n_layers)]
        self._hooks: Hooks | None = None

    # --- hooks ---------------------------------------------------------------------------------
    def _head_gate(self, l: int):
        g = self.adapter.geometry
        mask = self.head_mask
        row = None
        if mask is not None:
            row = mask[l]
            # A fixed all-ones row is the identity: skip the multiply (keeps logits bit-identical
            # and costs nothing).
            if not row.requires_grad and bool((row == 1).all()):
                row = None
        if row is None and not self.record:
            return None

        def pre_hook(module, args, kwargs):
            x = args[0]
            shape = x.shape
            xh = x.view(*shape[:-1], g.n_heads, g.head_dim)
            if row is not None:
                xh = xh * row.to(dtype=x.dtype, device=x.device)[:, None]
            if self.record:
                probe = torch.ones(shape[:-1] + (g.n_heads,), dtype=x.dtype, device=x.device,
                                   requires_grad=True)
                self.head_probes[l].append(probe)
                xh = xh * probe[..., None]
            return (xh.reshape(shape), *args[1:]), kwargs

        return pre_hook

    def _ffn_gate(self, l: int):
        mask = self.ffn_mask
        val = None
        if mask is not None:
            val = mask[l]
            if not val.requires_grad and bool(val == 1):
                val = None
        if val is None and not self.record:
            return None

        def hook(module, args, out):
            y = out[0] if isinstance(out, tuple) else out
            if val is not None:
                y = y * val.to(dtype=y.dtype, device=y.device)
            if self.record:
                probe = torch.ones(y.shape[:-1], dtype=y.dtype, device=y.device, requires_grad=True)
                self.ffn_probes[l].append(probe)
                y = y * probe[..., None]
            return (y, *out[1:]) if isinstance(out, tuple) else y

        return hook

    # --- context ----------------------------------------------------------------------------
    def __enter__(self) -> Gates:
        hooks = []
        for l in range(self.adapter.geometry.n_layers):
            h = self._head_gate(l)
            if h is not None:
                hooks.append(("heads", l, h))
            f = self._ffn_gate(l)
            if f is not None:
                hooks.append(("ffn", l, f))
        self._hooks = Hooks(self.adapter, hooks).__enter__()
        return self

    def remove(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def __exit__(self, *exc) -> None:
        self.remove()

    def probe_grads(self, loss: torch.Tensor, batch_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token contributions from one recorded forward pass.

        Returns head [layers, batch, seq, heads] and ffn [layers, batch, seq]: entry (l, b, t, h)
        is <head output, d loss / d head output> at token t, i.e. d loss / d gate for a gate that
        acts on that token alone. Only the probes receive gradients (no parameter gradients).
        """
        if not self.record:
            raise RuntimeError("probe_grads needs Gates(..., record=True)")
        heads = [p for lst in self.head_probes for p in lst]
        ffns = [p for lst in self.ffn_probes for p in lst]
        n = self.adapter.geometry.n_layers
        if len(heads) != n or len(ffns) != n:
            raise RuntimeError(f"expected one recorded forward pass ({n} probes each), got "
                               f"{len(heads)} head and {len(ffns)} FFN probes; call clear_probes() first")
        grads = torch.autograd.grad(loss, heads + ffns)
        b, t = batch_shape
        head = torch.stack([g.reshape(b, t, -1) for g in grads[:n]])
        ffn = torch.stack([g.reshape(b, t) for g in grads[n:]])
        return head, ffn

    def clear_probes(self) -> None:
        for lst in self.head_probes + self.ffn_probes:
            lst.clear()


class RowGates:
    """Several fixed masks at once: batch row b of every forward runs under mask `rows[b]` (set with
    `select` before each forward), so one batched pass scores several masks (scoring.score_masks).

    head_masks [M, layers, heads] and ffn_masks [M, layers] (either None: all kept), 0/1. A head
    gate multiplies row b's head outputs by head_masks[rows[b], l]; an FFN gate row b's FFN output
    by ffn_masks[rows[b], l] (OPT's FFN output is flat, [batch * seq, d]: viewed per row). Layers
    where every mask keeps everything get no hook. A forward whose batch is not len(rows) is an
    error, never a silent guess of which mask a row has."""

    def __init__(self, adapter: Adapter, head_masks: torch.Tensor | None = None,
                 ffn_masks: torch.Tensor | None = None):
        g = adapter.geometry
        if head_masks is None and ffn_masks is None:
            raise MaskError("RowGates needs head_masks [M, layers, heads] or ffn_masks [M, layers]")
        m = len(head_masks if head_masks is not None else ffn_masks)
        self.adapter, self.n_masks = adapter, m
        self.head_masks = check_mask(head_masks, (m, g.n_layers, g.n_heads), "head_masks")
        self.ffn_masks = check_mask(ffn_masks, (m, g.n_layers), "ffn_masks")
        self.rows: torch.Tensor | None = None
        self._on_device: dict = {}
        self._block_batch = 0
        self._hooks: Hooks | None = None

    def select(self, rows) -> None:
        """The mask index of every batch row of the next forwards."""
        rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        if len(rows) and not (0 <= int(rows.min()) and int(rows.max()) < self.n_masks):
            raise MaskError(f"RowGates.select: mask indices must be in 0..{self.n_masks - 1}")
        self.rows = rows
        self._on_device: dict = {}  # rows and tables moved once per select, not per layer

    def _factors(self, table: torch.Tensor, like: torch.Tensor, batch: int) -> torch.Tensor:
        if self.rows is None or len(self.rows) != batch:
            n = "none" if self.rows is None else len(self.rows)
            raise RuntimeError(f"RowGates: a forward of batch {batch} with {n} rows selected; call select() first")
        key = (like.device, like.dtype, table.data_ptr())
        if key not in self._on_device:
            self._on_device[key] = table.to(dtype=like.dtype, device=like.device)[self.rows.to(like.device)]
        return self._on_device[key]

    def _head_gate(self, l: int):
        g, table = self.adapter.geometry, self.head_masks[:, l]

        def pre_hook(module, args, kwargs):
            x = args[0]  # [batch, seq, heads * head_dim]
            f = self._factors(table, x, x.shape[0])  # [batch, heads]
            xh = x.view(*x.shape[:-1], g.n_heads, g.head_dim) * f[:, None, :, None]
            return (xh.reshape(x.shape), *args[1:]), kwargs

        return pre_hook

    def _ffn_gate(self, l: int):
        table, flat = self.ffn_masks[:, l], self.adapter.family.ffn_output_is_flat

        def hook(module, args, out):
            y = out[0] if isinstance(out, tuple) else out
            b = self._block_batch if flat else y.shape[0]  # flat: [b * seq, d], b read at the block's input
            f = self._factors(table, y, b)
            z = (y.reshape(b, -1, y.shape[-1]) * f[:, None, None]).view(y.shape)
            return (z, *out[1:]) if isinstance(out, tuple) else z

        return hook

    def _note_batch(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self._block_batch = x.shape[0]

    def __enter__(self) -> RowGates:
        hooks = []
        for l in range(self.adapter.geometry.n_layers):
            if self.head_masks is not None and not bool((self.head_masks[:, l] == 1).all()):
                hooks.append(("heads", l, self._head_gate(l)))
            if self.ffn_masks is not None and not bool((self.ffn_masks[:, l] == 1).all()):
                hooks.append(("ffn", l, self._ffn_gate(l)))
                if self.adapter.family.ffn_output_is_flat:
                    hooks.append(("block", l, self._note_batch))
        self._hooks = Hooks(self.adapter, hooks).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
