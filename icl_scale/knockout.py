"""FFN knock-out (the paper's FFN ranking: the accuracy drop when FFN l alone is removed, for every l),
with every knock-out restarted where it first differs from the unpruned model instead of rerun from
the embeddings.

Removing FFN l leaves everything before it unchanged. So per batch (one prefix pass of
scoring.score_requests with its continuation passes on the prefixes' KV cache, scoring.score_units):

1. the unpruned run of the batch (under the head mask, if any) scores it and keeps, at every
   base-model pass, each layer l's "entry", the tensor where knock-out l first differs from it (at
   every position of the pass), and the KV cache the pass starts from;
2. knock-out l runs the same batch, pass for pass, with the base model's layer list cut to
   layers[s:] (restored on exit), the input of the first module still run replaced by the pass's
   entry, and cache layers < s lent the recorded keys/values for that pass (the knock-out's own:
   those layers never see FFN l), so positions, cache lengths and masks are the model's own.

Where the entry is (`restart_mode`):

* "post_attention", pre-norm blocks (Llama family, Gemma 2/3, Phi-3, GPT-2, OPT with
  do_layer_norm_before, GPT-NeoX without parallel residual): block l's post-attention residual, the
  input of its pre-FFN norm. It is exactly block l's output once its FFN is removed (x + 0 = x; Gemma's
  post-FFN norm is inside the removed branch), so knock-out l restarts at block l + 1
  (at the final norm for the last layer) and never computes FFN l;
* "block", otherwise (OPT-350m's post-norm blocks, GPT-NeoX's parallel residual): block l's input;
  knock-out l restarts at block l with FFN l gated to zero.

Cost: knock-out l runs L - l - 1 blocks ("block": L - l) instead of L, on average (L - 1) / 2
((L + 1) / 2), plus the embedding and the unembedding at the scored positions, which every knock-out
still needs. Half the block passes of one full evaluation per knock-out, but on SmolLM2-135M (30 layers,
49k vocabulary, COPA 1-shot) one knock-out's unembedding (~100 rows per call, scoring.score_units)
costs about 3 blocks: ~1.8x faster, not 2x (bench/README.md, "Knock-out section"). One unembedding
GEMM for all knock-outs would change each row's rounding (a GEMM's depends on its row count), and
the shard relies on bit-identical results to reuse them for the pruning curves.

Results are score_requests' under the knock-out's FFN mask: the same batches and the same operations
on the same inputs (bit-identical on CPU in tests/test_knockout.py, which demands <= 1e-4 nats).

Memory: a batch keeps every layer's entry at every position of its passes, L x tokens x hidden
values (SmolLM2-135M, 8 one-shot COPA contexts: ~20 MB; OPT-30B, 8 five-shot contexts of ~500 tokens:
~2.8 GB in bfloat16), and every pass's starting KV cache, which the scorer holds for the batch
anyway; `eval.batch_size` bounds both.

Mode "full" scores every knock-out from the embeddings, several sharing passes (scoring.score_masks,
`masks_per_pass`); it is used under ZeRO-3 (one gather of the model per pass, whatever the masks, and
a module order that stays the one DeepSpeed traced) and for KV caches other than plain growing ones.
Left-truncated pairs are scored by score_naive per knock-out, as score_requests does.

Data-parallel ranks (icl_scale.distributed): each rank knocks out every FFN on its own token-balanced
slice of the docs, checkpointed in a file of its own (`checkpoint_name`), and the slices are gathered
at the end; under ZeRO-3 ("full" mode) the shared passes are data-parallel themselves.

The hooks here (entries read at a pre-FFN norm's or a block's input, replaced at a block's or the
final norm's input, the cache lent around each base-model pass) are points of the one hook system
(models/hooks.py: "ffn_input", "block", "final_norm", "model", "model_output"), installed for one
run and always removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import balanced_slices, dp_world, gather_objects
from .models.hooks import Hooks
from .models.loading import LoadedModel
from .scoring import (
    ChoiceScore,
    Tokenised,
    gates_for,
    length_groups,
    pass_cost_tokens,
    plan_units,
    regroupable,
    request_cost,
    score_masks,
    score_naive,
    score_units,
)
from .tasks.base import Request

log = logging.getLogger(__name__)

MODES = ("post_attention", "block", "full")


def knockout_mask(n_layers: int, layer: int) -> torch.Tensor | None:
    """The FFN mask that removes FFN `layer` alone (None for -1: no knock-out)."""
    if layer < 0:
        return None
    m = torch.ones(n_layers)
    m[layer] = 0
    return m


def knockout_drops(accuracy: dict[int, float], n_layers: int) -> tuple[float, torch.Tensor]:
    """(baseline, [L] accuracy drops) from accuracies keyed by knocked-out layer (-1: none)."""
    base = accuracy[-1]
    return base, torch.tensor([base - accuracy[l] for l in range(n_layers)], dtype=torch.float32)


def _offsets(requests: Sequence[Request]) -> list[int]:
    """Index of each request's first (request, choice) pair in the flat pair order."""
    out, k = [], 0
    for r in requests:
        out.append(k)
        k += r.n_choices
    return out


@dataclass
class KnockoutState:
    """Per-choice log-likelihoods with no knock-out and with each FFN removed, filled batch by batch;
    checkpointable (all tensors). Row 0: no knock-out; row l + 1: FFN l removed."""

    logprobs: torch.Tensor  # [L + 1, pairs] float64
    n_tokens: torch.Tensor  # [pairs] int64: continuation tokens scored
    done: torch.Tensor  # [L + 1, pairs] bool

    @classmethod
    def empty(cls, n_layers: int, n_pairs: int) -> KnockoutState:
        return cls(torch.zeros(n_layers + 1, n_pairs, dtype=torch.float64), torch.zeros(n_pairs, dtype=torch.int64),
                   torch.zeros(n_layers + 1, n_pairs, dtype=torch.bool))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"logprobs": self.logprobs, "n_tokens": self.n_tokens, "done": self.done.to(torch.uint8)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> KnockoutState:
        return cls(t["logprobs"].double(), t["n_tokens"].long(), t["done"].bool())

    def fits(self, n_layers: int, n_pairs: int) -> bool:
        shape = (n_layers + 1, n_pairs)
        return tuple(self.logprobs.shape) == shape and tuple(self.done.shape) == shape and len(self.n_tokens) == n_pairs

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def put(self, row: int, pairs: torch.Tensor, logprobs: torch.Tensor, n_tokens: torch.Tensor) -> None:
        self.logprobs[row, pairs] = logprobs.detach().double().cpu()
        self.n_tokens[pairs] = n_tokens
        self.done[row, pairs] = True

    def scores(self, requests: Sequence[Request], layer: int) -> list[list[ChoiceScore]]:
        """score_requests' result for knock-out `layer` (-1: none)."""
        if not bool(self.done[layer + 1].all()):
            raise RuntimeError(f"knock-out of layer {layer} is not finished")
        lp, nt = self.logprobs[layer + 1].tolist(), self.n_tokens.tolist()
        return [[ChoiceScore(lp[k + j], nt[k + j]) for j in range(r.n_choices)]
                for r, k in zip(requests, _offsets(requests))]


def _new_cache(lm: LoadedModel):
    from transformers import DynamicCache

    return DynamicCache(config=lm.model.config)


def restart_mode(lm: LoadedModel) -> str:
    """How knock-outs restart on this model (see the module docstring): post_attention, block or full."""
    if lm.engine is not None:
        return "full"  # ZeRO-3
    cache = _new_cache(lm)
    if not regroupable(cache) or len(cache.layers) != lm.adapter.geometry.n_layers:
        return "full"
    cfg, fam = lm.model.config, lm.adapter.family.name
    pre_norm = {"llama": True, "gemma": True, "phi3": True, "gpt2": True,
                "opt": bool(getattr(cfg, "do_layer_norm_before", True)),
                "gpt_neox": not getattr(cfg, "use_parallel_residual", True)}.get(fam, False)
    return "post_attention" if pre_norm else "block"


def knockout_scores(lm: LoadedModel, requests: Sequence[Request], head_mask: torch.Tensor | None = None,
                    batch_size: int = 8, state: KnockoutState | None = None,
                    on_batch: Callable[[KnockoutState], None] | None = None, mode: str | None = None,
                    progress: bool = False, masks_per_pass: int = 1) -> KnockoutState:
    """Per-choice log-likelihoods of `requests` with no knock-out and with each FFN knocked out, all
    under `head_mask` (see the module docstring). `batch_size` = distinct contexts per pass, as in
    score_requests. `state` resumes: finished work is skipped; `on_batch(state)` runs after every batch
    (checkpointing). `mode`: post_attention, block or full (default: restart_mode(lm)); `masks_per_pass`:
    knock-outs sharing passes in mode full."""
    mode = mode or restart_mode(lm)
    if mode not in MODES:
        raise ValueError(f"knock-out mode {mode!r}; use one of {', '.join(MODES)}")
    rank, world = dp_world()
    if world > 1 and mode != "full":  # "full" is score_requests per knock-out, data-parallel itself
        return _data_parallel(lm, requests, head_mask, batch_size, state, on_batch, mode, progress, rank, world)
    return _knockout_scores(lm, requests, head_mask, batch_size, state, on_batch, mode, progress,
                            per_pass=masks_per_pass)


def checkpoint_name(lm: LoadedModel) -> str:
    """The knock-out checkpoint's file name: one per rank when the ranks knock out their own slices
    (each rank writes its own; a requeue with the same world size resumes every slice)."""
    rank, world = dp_world()
    if world == 1 or restart_mode(lm) == "full":
        return "knockout_state.safetensors"
    return f"knockout_state.rank{rank}of{world}.safetensors"


def _knockout_scores(lm, requests, head_mask, batch_size, state, on_batch, mode, progress, tk=None,
                     per_pass: int = 1) -> KnockoutState:
    n = lm.adapter.geometry.n_layers
    n_pairs = sum(r.n_choices for r in requests)
    if state is not None and not state.fits(n, n_pairs):
        log.warning("discarding a knock-out checkpoint of shape %s (this run needs %s)",
                    tuple(state.logprobs.shape), (n + 1, n_pairs))
        state = None
    state = state or KnockoutState.empty(n, n_pairs)
    on_batch = on_batch or (lambda s: None)
    if mode == "full":
        _full(lm, requests, head_mask, batch_size, state, on_batch, progress, per_pass)
    else:
        _restarted(lm, requests, head_mask, batch_size, state, on_batch, mode, progress, tk)
    return state


def _data_parallel(lm, requests, head_mask, batch_size, state, on_batch, mode, progress, rank, world):
    """Restarted knock-outs of this rank's token-balanced slice of the requests (`state`/`on_batch`:
    this slice's, see `checkpoint_name`), then every slice gathered into the whole state on every rank."""
    tk = Tokenised(lm, requests)
    mine = balanced_slices([request_cost(tk, r) for r in requests], world)[rank]
    local = _knockout_scores(lm, [requests[i] for i in mine], head_mask, batch_size, state, on_batch, mode,
                             progress, tk)
    whole = KnockoutState.empty(lm.adapter.geometry.n_layers, sum(r.n_choices for r in requests))
    offsets = _offsets(requests)
    for idx, logprobs, n_tokens in gather_objects((mine, local.logprobs.tolist(), local.n_tokens.tolist())):
        pairs = [offsets[i] + j for i in idx for j in range(requests[i].n_choices)]
        for row, lp in enumerate(logprobs):
            whole.put(row, torch.tensor(pairs, dtype=torch.long), torch.tensor(lp, dtype=torch.float64),
                      torch.tensor(n_tokens, dtype=torch.long))
    return whole


def _full(lm, requests, head_mask, batch_size, state, on_batch, progress, per_pass: int) -> None:
    """Every request scored per knock-out, fixed groups of `per_pass` knock-outs sharing passes (scoring.
    score_masks; a resumed job scores each beside the same others: the same bits); checkpointed per group."""
    n, pairs = state.logprobs.shape[0] - 1, torch.arange(state.logprobs.shape[1])
    for start in tqdm(range(0, n + 1, per_pass), disable=not progress, desc="ffn knock-out", leave=False):
        rows = list(range(start, min(n + 1, start + per_pass)))
        if bool(state.done[rows].all()):
            continue
        masks = [(head_mask, knockout_mask(n, row - 1)) for row in rows]
        for row, scores in zip(rows, score_masks(lm, requests, masks, batch_size=batch_size)):
            state.put(row, pairs, torch.tensor([c.logprob for s in scores for c in s], dtype=torch.float64),
                      torch.tensor([c.n_tokens for s in scores for c in s]))
        on_batch(state)


# --- restarted knock-outs ---------------------------------------------------------------------------
#
# A batch is one prefix pass of score_requests with its continuation passes (scoring.score_units).
# The unpruned run of a batch records, at every base-model pass k, each layer's entry and the KV cache
# it starts from; knock-out l's run of the same batch, pass for pass, feeds entry l of pass k to its
# first module and lends cache layers < s the recorded keys/values for the pass (and takes them back
# after it, so the scorer's cache handling sees a cache whose layers < s were never run).

def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _cache_of(kwargs, output=None):
    """The KV cache a base-model pass was given (or, with `output`, the one it returned)."""
    for name in ("cache", "past_key_values"):  # transformers 5.24 renamed past_key_values to cache
        for source in (kwargs, output if output is not None else {}):  # a ModelOutput is a dict
            if source.get(name) is not None:
                return source[name]
    return None


def _entry_point(mode: str) -> str:
    """The hook point whose input is knock-out l's entry: the pre-FFN norm's or the block's input."""
    return "ffn_input" if mode == "post_attention" else "block"


@contextmanager
def _record(lm: LoadedModel, mode: str, entries: list[list[torch.Tensor]], kv: list):
    """The unpruned run: entries[l] gets layer l's entry at every pass, kv[k] the (keys, values) per
    layer that pass k starts from (None for a pass that starts without a cache)."""

    def keep(store):
        return lambda module, args, kwargs: store.append(_hidden(args, kwargs))

    def start(module, args, kwargs):
        cache = _cache_of(kwargs)
        kv.append(None if cache is None else [(layer.keys, layer.values) for layer in cache.layers])

    n = lm.adapter.geometry.n_layers
    with Hooks(lm.adapter, [("model", None, start)] + [(_entry_point(mode), l, keep(entries[l])) for l in range(n)]):
        yield


@contextmanager
def _layers_from(lm: LoadedModel, start: int):
    """The base model runs only decoder blocks start.. (the full list is restored on exit)."""
    if start == 0:
        yield
        return
    path, _, name = lm.adapter.family.layers.rpartition(".")
    parent = lm.model.get_submodule(path)
    full = getattr(parent, name)
    setattr(parent, name, nn.ModuleList(list(full)[start:]))
    try:
        yield
    finally:
        setattr(parent, name, full)


@contextmanager
def _restart(lm: LoadedModel, start: int, entries: list[torch.Tensor], kv: list):
    """Knock-out runs from decoder block `start` (the final norm when start = L): pass k's first module
    gets entries[k] as input; cache layers < start hold kv[k] during pass k only."""
    n = lm.adapter.geometry.n_layers
    first = ("block", start) if start < n else ("final_norm", None)
    k = [0]

    def begin(module, args, kwargs):
        cache = _cache_of(kwargs)
        if cache is not None and kv[k[0]] is not None:
            for layer, (keys, values) in zip(cache.layers[:start], kv[k[0]][:start]):
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values

    def end(module, args, kwargs, output):
        cache = _cache_of(kwargs, output)
        for layer in cache.layers[:start] if cache is not None else ():
            layer.reset()
        k[0] += 1

    def feed(module, args, kwargs):
        old, new = _hidden(args, kwargs), entries[k[0]]
        if new.numel() != old.numel():
            raise RuntimeError(f"knock-out restart: a stored input of shape {tuple(new.shape)} does not fit "
                               f"{type(module).__name__}'s input {tuple(old.shape)}")
        new = new.reshape(old.shape)  # OPT's pre-FFN residual is flat
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    with Hooks(lm.adapter, [("model", None, begin), (*first, feed), ("model_output", None, end)]), \
            _layers_from(lm, start):
        yield


def _score_chunk(lm: LoadedModel, tk: Tokenised, requests, chunk) -> list[tuple[int, int, ChoiceScore]]:
    base, dev = lm.model.base_model, lm.device
    return score_units(base, lm.adapter.logits, tk, requests, chunk, lm.tokenizer.pad_token_id, dev,
                        pass_cost_tokens(dev))


def _knock_chunk(lm: LoadedModel, tk, requests, chunk, head_mask, mode: str, todo: list[int], state, offsets) -> None:
    """The unpruned run of one prefix pass's units, then every knock-out row in `todo` restarted."""
    n = lm.adapter.geometry.n_layers
    entries: list[list[torch.Tensor]] = [[] for _ in range(n)]
    kv: list = []

    def put(row, res):
        state.put(row, torch.tensor([offsets[i] + j for i, j, _ in res]),
                  torch.tensor([sc.logprob for _, _, sc in res], dtype=torch.float64),
                  torch.tensor([sc.n_tokens for _, _, sc in res]))

    with gates_for(lm, head_mask, None), _record(lm, mode, entries, kv):
        put(0, _score_chunk(lm, tk, requests, chunk))
    for row in todo:
        if row == 0:
            continue
        layer = row - 1
        start = layer + 1 if mode == "post_attention" else layer  # post_attention never runs FFN l
        ffn_mask = knockout_mask(n, layer) if mode == "block" else None
        with gates_for(lm, head_mask, ffn_mask), _restart(lm, start, entries[layer], kv):
            put(row, _score_chunk(lm, tk, requests, chunk))


@torch.inference_mode()
def _restarted(lm, requests, head_mask, batch_size, state, on_batch, mode, progress, tk=None) -> None:
    n = lm.adapter.geometry.n_layers
    tk = tk or Tokenised(lm, requests)  # the caller's tokens of a superset, or these requests
    units, overflow = plan_units(tk, requests)
    offsets = _offsets(requests)
    chunks = [[units[k] for k in g] for g in length_groups([len(u[0]) for u in units], pass_cost_tokens(lm.device),
                                                            max_size=batch_size)]  # score_requests' prefix passes
    for chunk in tqdm(chunks, disable=not progress, desc="ffn knock-out", unit="batch", leave=False):
        pairs = torch.tensor([offsets[i] + j for _, ijs in chunk for i, j, *_ in ijs])
        todo = [row for row in range(n + 1) if not bool(state.done[row, pairs].all())]
        if todo:
            _knock_chunk(lm, tk, requests, chunk, head_mask, mode, todo, state, offsets)
            on_batch(state)
    if overflow:  # left-truncated pairs: the exact naive path, per knock-out (as score_requests does)
        idx = sorted({i for i, _ in overflow})
        pairs = torch.tensor([offsets[i] + j for i, j in overflow])
        for row in range(n + 1):
            if bool(state.done[row, pairs].all()):
                continue
            nv = dict(zip(idx, score_naive(lm, [requests[i] for i in idx], head_mask, knockout_mask(n, row - 1))))
            state.put(row, pairs, torch.tensor([nv[i][j].logprob for i, j in overflow], dtype=torch.float64),
                      torch.tensor([nv[i][j].n_tokens for i, j in overflow]))
        on_batch(state)
