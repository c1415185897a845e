"""Task-specific importance of every attention head and FFN block.

Gradient importance (paper Eq. 8-9, after Michel et al. 2019): for each training example the input
is the k-shot context plus the gold continuation, the loss is the mean NLL of the continuation
tokens, and

    I[l, h] = (1 / T_l) * sum over examples, over token positions t of |<o_{l,h}(t), dL/do_{l,h}(t)>|

where o_{l,h}(t) is head h's attention output at token t (the input of the output projection).
T_l, `importance.normalize=paper` (default; the original's `lm_eval/base.py::calculate_importance`):
the number of input tokens (N-1 for an N-token context + continuation) summed over examples for
layers 0..L-2, and the number of gold-continuation tokens for the last layer, the only positions
whose last-layer output reaches the loss. `all_tokens`: the input-token count for every layer.
<o, dL/do> at one token is exactly dL/dg for a gate g that
scales that head at that token, so one backward pass to per-token gate probes gives every head and
every FFN at once (icl_scale.models.gates, record=True). No parameter gradients are computed.

Options: `abs_mode="sum"` takes |sum over tokens| per example instead of sum over tokens of |.|
(Michel et al.'s head-gate gradient; the paper's code takes |.| per token, the default);
`normalize_layers=True` divides each layer's head scores by their L2 norm (Michel et al.).

FFN knock-out importance (the paper's FFN ranking): accuracy drop when FFN l alone is removed
(`ffn_knockout`; the shard's fast path is icl_scale.knockout).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .distributed import all_reduce_sum, balanced_slices, dp_world
from .models.gates import Gates
from .models.loading import LoadedModel
from .schema import options
from .scoring import Tokenised, pad_right
from .tasks.base import Request

ABS_MODES = options("importance.abs")
NORMALIZE = options("importance.normalize")
CONTINUATIONS = options("importance.continuation")


@dataclass
class ImportanceState:
    """Running sums; checkpointable (all tensors / ints)."""

    heads: torch.Tensor  # [L, H] sum of |contributions|
    ffn: torch.Tensor  # [L]
    n_examples: int = 0
    n_tokens: int = 0  # input tokens (positions whose outputs can reach the loss)
    n_cont_tokens: int = 0  # gold-continuation tokens (the loss's positions)
    batch_size: int = 0  # examples per rank per step, fixed by the run that started it (0: none yet)

    @classmethod
    def zeros(cls, lm: LoadedModel) -> ImportanceState:
        g = lm.adapter.geometry
        return cls(torch.zeros(g.n_layers, g.n_heads, dtype=torch.float64),
                   torch.zeros(g.n_layers, dtype=torch.float64))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"heads_sum": self.heads, "ffn_sum": self.ffn,
                "counts": torch.tensor([self.n_examples, self.n_tokens, self.n_cont_tokens], dtype=torch.int64),
                "batch_size": torch.tensor([self.batch_size], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> ImportanceState:
        n_ex, n_tok, n_cont = (int(x) for x in t["counts"])
        size = int(t["batch_size"][0]) if "batch_size" in t else 0  # (a checkpoint from before it was kept)
        return cls(t["heads_sum"].double(), t["ffn_sum"].double(), n_ex, n_tok, n_cont, size)

    def add(self, flat: torch.Tensor) -> None:
        """Add one step's sums (`_batch_sums`' flat layout)."""
        nh = self.heads.numel()
        self.heads += flat[:nh].view_as(self.heads)
        self.ffn += flat[nh: nh + self.ffn.numel()]
        self.n_tokens += int(flat[-2])
        self.n_cont_tokens += int(flat[-1])

    def layer_tokens(self, normalize: str = "paper") -> torch.Tensor:
        """[L] token count each layer's sums are divided by (see the module docstring)."""
        if normalize not in NORMALIZE:
            raise ValueError(f"importance.normalize={normalize!r}; use one of {', '.join(NORMALIZE)}")
        t = torch.full((self.heads.shape[0],), float(self.n_tokens), dtype=torch.float64)
        if normalize == "paper":
            t[-1] = self.n_cont_tokens
        return t

    def result(self, normalize_layers: bool = False, normalize: str = "paper") -> dict[str, torch.Tensor]:
        if self.n_tokens == 0:
            raise ValueError("no importance examples were processed (importance.n_examples must be >= 1)")
        t = self.layer_tokens(normalize)
        heads = (self.heads / t[:, None]).float()
        ffn = (self.ffn / t).float()
        if normalize_layers:
            heads = heads / heads.norm(dim=1, keepdim=True).clamp_min(1e-20)
        return {"heads": heads, "ffn": ffn}


def importance_inputs(lm: LoadedModel, requests: Sequence[Request],
                      continuation: str = "paper") -> list[tuple[list[int], list[int]]]:
    """(input ids, gold continuation ids) per example, context and continuation tokenised apart as the
    scorer does. `continuation`: `paper`, the task's `doc_to_cont` as the original's
    `utils.get_input_from_ctx_cont` gets it (the bare choice for the multiple-choice tasks); `scoring`:
    the gold continuation as scored (" " + choice)."""
    if continuation not in CONTINUATIONS:
        raise ValueError(f"importance.continuation={continuation!r}; use one of {', '.join(CONTINUATIONS)}")
    tk = Tokenised(lm, requests)
    return [tk.pair(*r.importance_pair(continuation)) for r in requests]


def importance_batch_size(lm: LoadedModel, examples: Sequence[tuple[list[int], list[int]]], setting) -> int:
    """Examples per rank per step (`importance.batch_size`): an int, or auto: the planner's memory model
    (plan_machine.auto_importance_batch) at the longest example's tokens and gold continuation, in
    the device memory beside the parameters (models.zero.memory_beside_parameters, the least over
    the ranks, less the planner's SAFETY margin), at most a rank's share of the examples, at least 1.
    Every rank computes it from the same numbers, so every rank makes the same steps. Fewer, fuller
    steps: under ZeRO-3 each step gathers the whole model twice (its forward and its backward)."""
    if setting != "auto":
        return int(setting)
    from .models.zero import memory_beside_parameters
    from .plan_machine import SAFETY, Arch, arch_of_config, auto_importance_batch

    arch = Arch(**arch_of_config(lm.model.config, f"model {lm.spec['name']}", count=False))
    length = max((len(inp) for inp, _ in examples), default=1)
    scored = max((len(cont) for _, cont in examples), default=1)
    per_rank = math.ceil(len(examples) / dp_world()[1])
    return auto_importance_batch(arch, SAFETY * memory_beside_parameters(lm), length, scored, lm.dtype.itemsize,
                                 per_rank)


def importance_batch(lm: LoadedModel, chunk: Sequence[tuple[list[int], list[int]]]):
    """One batch of (input ids, gold continuation ids) examples on lm.device:
    (ids, mask, rows, pos, targets, weights); (rows[k], pos[k]) predicts targets[k], and weights
    make each example's loss its own mean NLL over its continuation tokens."""
    dev = lm.device
    ids, mask = pad_right([inp for inp, _ in chunk], lm.tokenizer.pad_token_id)
    rows, pos, tgt, weight = [], [], [], []
    for i, (inp, cont) in enumerate(chunk):
        n, m = len(inp), len(cont)
        rows += [i] * m
        pos += range(n - m, n)
        tgt += cont
        weight += [1.0 / m] * m
    return (ids.to(dev), mask.to(dev), torch.tensor(rows, device=dev), torch.tensor(pos, device=dev),
            torch.tensor(tgt, device=dev), torch.tensor(weight, device=dev))


def gradient_importance(
    lm: LoadedModel,
    requests: Sequence[Request],
    batch_size: int | str = 4,
    head_mask: torch.Tensor | None = None,
    ffn_mask: torch.Tensor | None = None,
    abs_mode: str = "per_token",
    state: ImportanceState | None = None,
    on_batch: Callable[[ImportanceState], None] | None = None,
    progress: bool = False,
    continuation: str = "paper",
) -> ImportanceState:
    """Accumulate gradient importance over `requests` (resuming from `state.n_examples`).

    `head_mask`/`ffn_mask` (fixed 0/1) apply while scoring: used by iterative pruning, where a
    removed component's importance is then exactly 0. `on_batch(state)` runs after every batch
    (checkpointing). `continuation` picks the loss's gold continuation (`importance_inputs`).

    With data-parallel ranks (icl_scale.distributed) a step is `batch_size` examples per rank, each
    rank takes a token-balanced share and the step's sums are all-reduced: every rank's state (and
    the checkpoint rank 0 writes after the step) is the single process's, up to summation order.

    `batch_size="auto"` is sized from memory (`importance_batch_size`); a resumed `state` keeps the size
    its run recorded (free memory may differ after a restart), so a resumed run makes the steps an
    unbroken one makes. The sums are per example, so any size gives the same result up to rounding."""
    if abs_mode not in ABS_MODES:
        raise ValueError(f"importance.abs={abs_mode!r}; use one of {', '.join(ABS_MODES)}")
    state = state or ImportanceState.zeros(lm)
    examples = importance_inputs(lm, requests, continuation)
    if not (batch_size == "auto" and state.batch_size):
        state.batch_size = importance_batch_size(lm, examples, batch_size)
    batch_size = state.batch_size
    rank, world = dp_world()
    lockstep = world > 1 and lm.engine is not None  # ZeRO-3: every rank runs every step
    step = batch_size * world  # a step: `batch_size` examples per rank
    bar = tqdm(total=len(examples), initial=state.n_examples, disable=not progress, desc="importance",
               unit="ex", leave=False)
    with Gates(lm.adapter, head_mask=head_mask, ffn_mask=ffn_mask, record=True) as gates:
        for s in range(state.n_examples, len(examples), step):
            todo = examples[s: s + step]
            if world > 1:  # this rank's token-balanced share of the step
                todo = [todo[i] for i in balanced_slices([len(x) for x, _ in todo], world, cap=batch_size)[rank]]
            delta = _batch_sums(lm, gates, todo, abs_mode) if todo or lockstep else None
            if world > 1:  # every rank ends the step with the same sums: the single process's
                delta = all_reduce_sum(delta if delta is not None else _zero_sums(state))
            if delta is not None:
                state.add(delta)
            state.n_examples += len(examples[s: s + step])
            bar.update(len(examples[s: s + step]))
            if on_batch is not None:
                on_batch(state)
    bar.close()
    return state


def _zero_sums(state: ImportanceState) -> torch.Tensor:
    return torch.zeros(state.heads.numel() + state.ffn.numel() + 2, dtype=torch.float64)


def _batch_sums(lm: LoadedModel, gates: Gates, chunk, abs_mode: str) -> torch.Tensor:
    """One forward + backward to the gate probes over `chunk`: the step's sums, flat (heads, FFN,
    input tokens, continuation tokens; float64). An empty chunk (a ZeRO-3 rank with no example
    left) runs one pad token with weight zero, so it still makes every call the others make."""
    idle = not chunk
    if idle:
        chunk = [([lm.tokenizer.pad_token_id], [lm.tokenizer.pad_token_id])]
    ids, mask, rows_t, pos_t, tgt_t, weight_t = importance_batch(lm, chunk)
    b, t = ids.shape
    gates.clear_probes()
    keep = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    keep[rows_t, pos_t] = True  # (rows, pos) are in row-major order, the order logits_to_keep returns
    with torch.enable_grad():
        # One call of the whole model (under ZeRO-3 its hooks run: a traced step, prefetched), the
        # unembedding only where the loss needs it.
        logits = lm.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()
        nll = -torch.log_softmax(logits, -1).gather(-1, tgt_t[:, None]).squeeze(-1)
        loss = (nll * weight_t).sum() * (0.0 if idle else 1.0)  # sum over examples of mean NLL
        head_c, ffn_c = gates.probe_grads(loss, (b, t))  # [L, b, t, H], [L, b, t]
    gates.clear_probes()
    # Rows never interact (causal attention, right padding), so row i holds example i's
    # contributions; pad positions get exactly zero gradient.
    if abs_mode == "per_token":
        heads, ffn = head_c.abs().sum(dim=(1, 2)), ffn_c.abs().sum(dim=(1, 2))
    else:
        heads, ffn = head_c.sum(dim=2).abs().sum(dim=1), ffn_c.sum(dim=2).abs().sum(dim=1)
    counts = torch.tensor([0.0, 0.0] if idle else [float(mask.sum()), float(len(tgt_t))], dtype=torch.float64)
    return torch.cat([heads.double().cpu().flatten(), ffn.double().cpu(), counts])
