"""Task-agnostic induction-head scores: prefix matching and copying (Bansal et al. 2022, App. A;
Olsson et al. 2022), plus the helpers the reducer needs to relate them to task importance.

Definitions (docs/induction.md has the derivation from the original code, amazon-science/
llm-interpret, lm_eval/prefix_matching_copying.py, and every deviation):

* Token pool: tokens created by BPE merges, ranked by merge index (frequency proxy); the first
  and last `exclude_frac` of the ranks are dropped. Tokenizers without merges fall back to
  token-id order (the result says which proxy was used). Seed i uses n_i = 2*i + 25 distinct
  tokens drawn without replacement; all draws come from one torch.Generator(seed).
* Prefix matching: BOS + s repeated 4 times (T = P + 4n, P = number of BOS tokens). For every
  token of repeats 2-4 (3n positions), sum the attention to the tokens that followed its earlier
  occurrences; average over the 3n positions. `original_indexing=True` (default) keeps the original
  code's off-by-one for the last token of a repeat, which also counts the first token of repeat 1.
* Copying: BOS + 4n distinct tokens (no repeat). Per layer, per head, per position j: the head's
  OV logits over the tokens at positions 0..j, mean-centred, ReLU, and the share of the ReLU mass
  that falls on the most-attended position; averaged over positions P..T-1 (see CopyingOptions).

No Python loops over tokens or heads: one forward pass per (seed, score) with an attention probe
that reduces each layer's attention to [heads] numbers while the pass runs.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import store
from .models.adapters import Adapter, UnsupportedArchitecture
from .pruning import DEFAULT_LEVELS, prune_mask

SCORES = ("prefix_matching", "copying")


class InductionConfigError(ValueError):
    """Bad arguments for the induction scores (one line, says what to change)."""


# --- copying options ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CopyingOptions:
    """How the copying score reads a head's OV circuit.

    input: "embeddings" = every layer is applied to the token (+ learned position) embeddings, as
        the original code does (it never updates its hidden states across layers: the direct OV
        circuit W_U W_O W_V W_E of Olsson et al.); "residual" = the layer's real input.
    source: "output" = the head's output at j (attention-weighted values through its W_O slice);
        "query" = the OV image of the query token's own value, which is what the original code
        computes (`logits[head][j]` is built from value j, not from the attended tokens).
    final_norm: "fold" = the final norm's elementwise weight (and, for LayerNorm, its centring) is
        folded into the unembedding; its per-token 1/rms scale is dropped, which the ReLU ratio does
        not see. "none" = unembed the head output directly (original code).
    softmax: turn the logits into probabilities over the full vocabulary before centring (original
        code). The normaliser cancels in the ratio, so this costs no full-vocabulary product.
    o_bias: add the output projection's bias to every head's output (original code; not a per-head
        quantity, so off by default).
    """

    input: str = "embeddings"
    source: str = "output"
    final_norm: str = "fold"
    softmax: bool = False
    o_bias: bool = False

    @classmethod
    def paper(cls) -> CopyingOptions:
        """Exactly what llm-interpret's prefix_matching_copying.py computes."""
        return cls(input="embeddings", source="query", final_norm="none", softmax=True, o_bias=True)

    def check(self) -> CopyingOptions:
        allowed = {"input": ("embeddings", "residual"), "source": ("output", "query"),
                   "final_norm": ("fold", "none")}
        for k, ok in allowed.items():
            if getattr(self, k) not in ok:
                raise InductionConfigError(f"copying.{k}={getattr(self, k)!r}; use one of {', '.join(ok)}")
        return self


# --- result -------------------------------------------------------------------------------------------

@dataclass
class InductionResult:
    prefix_matching: torch.Tensor | None  # [L, H] mean over seeds
    copying: torch.Tensor | None
    prefix_matching_var: torch.Tensor | None  # [L, H] unbiased variance over seeds (0 if 1 seed)
    copying_var: torch.Tensor | None
    per_seed: dict[str, torch.Tensor]  # score -> [n_seeds, L, H]
    n_seeds: int
    seed: int
    lengths: list[int]
    frequency_proxy: str  # "bpe_merge_rank" or "token_id"
    pool_size: int
    exclude_frac: float
    bos_ids: list[int]
    bos_source: str
    original_indexing: bool
    copying_options: dict
    runtime_s: dict[str, float] = field(default_factory=dict)
    model: str = ""

    def scores(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in SCORES:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
                out[name + "_var"] = getattr(self, name + "_var")
        return out

    def metadata(self, k: int = 10) -> dict:
        d = {f: getattr(self, f) for f in ("model", "n_seeds", "seed", "frequency_proxy", "pool_size",
                                             "exclude_frac", "bos_ids", "bos_source", "original_indexing",
                                             "copying_options", "runtime_s")}
        d["lengths"] = {"min": min(self.lengths), "max": max(self.lengths), "rule": "2*i+25"
                        if self.lengths == [2 * i + 25 for i in range(self.n_seeds)] else "custom"}
        d["top_heads"] = {name: top_heads(getattr(self, name), k) for name in SCORES
                          if getattr(self, name) is not None}
        d["head_index_base"] = 0
        return d


def top_heads(scores: torch.Tensor, k: int = 10) -> list[dict]:
    """The k highest entries of an [L, H] score as [{"layer", "head", "score"}] (0-based)."""
    flat = scores.flatten()
    vals, idx = flat.topk(min(k, flat.numel()))
    H = scores.shape[1]
    return [{"layer": int(i) // H, "head": int(i) % H, "score": round(float(v), 6)} for v, i in zip(vals, idx)]


# --- token pool and sequences ---------------------------------------------------------------------------

def ranked_vocabulary(tokenizer, vocab_size: int) -> tuple[torch.Tensor, str]:
    """Token ids in frequency-proxy order (most frequent first) and the proxy's name.

    BPE: the merge that creates a token gives its rank (the slow tokenizers' bpe_ranks; the fast
    ones keep the merges in rank order in their serialized model). Otherwise token-id order."""
    if tokenizer is not None and hasattr(tokenizer, "backend_tokenizer"):
        model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {})
        merges, vocab = model.get("merges") or [], model.get("vocab") or {}
        if merges and isinstance(vocab, dict):
            ids, seen = [], set()
            for m in merges:
                a, b = m.split(" ", 1) if isinstance(m, str) else m
                tid = vocab.get(a + b)
                if tid is not None and tid < vocab_size and tid not in seen:
                    seen.add(tid)
                    ids.append(tid)
            if ids:
                return torch.tensor(ids, dtype=torch.long), "bpe_merge_rank"
    return torch.arange(vocab_size), "token_id"


def token_pool(tokenizer, vocab_size: int, exclude_frac: float = 0.04,
               exclude_ids: Sequence[int] = ()) -> tuple[torch.Tensor, str]:
    """Ranked tokens without the most and least frequent `exclude_frac` (and without BOS/special ids)."""
    if not 0 <= exclude_frac < 0.5:
        raise InductionConfigError(f"exclude_frac={exclude_frac} must be in [0, 0.5)")
    ranked, proxy = ranked_vocabulary(tokenizer, vocab_size)
    drop = {int(i) for i in exclude_ids}
    if tokenizer is not None:
        drop |= set(getattr(tokenizer, "all_special_ids", []) or [])
    if proxy == "token_id" and drop:  # merges never create special tokens; ids do include them
        ranked = ranked[~torch.isin(ranked, torch.tensor(sorted(drop)))]
    e = int(exclude_frac * len(ranked))  # the original: int(ratio * ranked_vocab_size), both ends
    pool = ranked[e:len(ranked) - e]
    if proxy == "bpe_merge_rank" and drop:
        pool = pool[~torch.isin(pool, torch.tensor(sorted(drop)))]
    return pool, proxy


def default_lengths(n_seeds: int) -> list[int]:
    return [2 * i + 25 for i in range(n_seeds)]


def make_sequences(pool: torch.Tensor, lengths: Sequence[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per seed: (n distinct tokens for prefix matching, 4n distinct tokens for copying), all drawn
    from one torch.Generator(seed). Both draws always happen, so neither score's sequences depend
    on whether the other score runs."""
    gen = torch.Generator().manual_seed(int(seed))
    return [(pool[torch.randperm(len(pool), generator=gen)[:n]], pool[torch.randperm(len(pool), generator=gen)[:4 * n]])
            for n in lengths]


def prefix_targets(n: int, P: int, original_indexing: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(rows, cols, count): attention entries summed by prefix matching on BOS^P + s*4, |s| = n.

    Query (repeat r in 1..3, offset i) -> the successor of each earlier occurrence, position
    P + r'*n + i + 1 for r' < r. The original code's indexing (j//n earlier repeats, j%n + 1)
    also adds position P (first token of repeat 1) for i = n-1. The score divides by 3n."""
    i = torch.arange(n)
    rows, cols = [], []
    for r in range(1, 4):
        for rp in range(r):
            rows.append(P + r * n + i)
            cols.append(P + rp * n + i + 1)
        if original_indexing:
            rows.append(torch.tensor([P + r * n + n - 1]))
            cols.append(torch.tensor([P]))
    return torch.cat(rows), torch.cat(cols), 3 * n


# --- attention probe ------------------------------------------------------------------------------------

_PROBE = "icl_scale_probe"


def _family_eager(module: nn.Module) -> Callable:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedArchitecture(f"{type(module).__name__} has no eager_attention_forward; the "
                                      f"induction probe needs the transformers AttentionInterface")
    return fn


def _additive_causal(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The mask as eager attention wants it (sdpa gets None for plain causal, or a bool mask)."""
    if mask is not None and mask.dtype != torch.bool:
        return mask
    tq, tk = q.shape[-2], k.shape[-2]
    keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq) if mask is None else mask
    return torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, torch.finfo(q.dtype).min)


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered attention function: computes the layer's output like its original implementation
    and hands the pieces the scores need to the probe attached to the module."""
    probe = module.__dict__.get("_icl_probe")
    orig = module.config._attn_implementation.removeprefix(_PROBE + "_")
    if probe is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        fn = _family_eager(module) if orig == "eager" else ALL_ATTENTION_FUNCTIONS[orig]
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if orig == "sdpa" and query.device.type == "cpu" and attention_mask is None:
        # The flash kernel sdpa uses on CPU also returns the log-sum-exp: prefix matching gets its few
        # probabilities from q.k and the lse, copying its argmax from q.k, and neither pays for
        # eager attention's softmax and [T, T] @ V.
        g = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(g, dim=1)
        v = value.repeat_interleave(g, dim=1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, k, v, 0.0, True, scale=scaling)
        probe.take_flash(module, query, k, v, out, lse, scaling)
        return out.transpose(1, 2).contiguous(), None
    mask = attention_mask if orig == "eager" else _additive_causal(attention_mask, query, key)
    out, weights = _family_eager(module)(module, query, key, value, mask, scaling=scaling, dropout=0.0)
    probe.take_probs(module, weights, out, value)
    return out, weights


def _register_probe(orig: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = f"{_PROBE}_{orig}"
    AttentionInterface.register(name, _probe_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[orig])
    return name


class _Probe:
    """Installs the probe attention on a model for one `with` block, restoring everything after."""

    def __init__(self, adapter: Adapter, embeddings_input: bool = False):
        self.adapter = adapter
        self.model = adapter.model
        self.embeddings_input = embeddings_input
        self.layer_of = {id(adapter.attn(l)): l for l in range(adapter.geometry.n_layers)}
        self._handles = []

    def __enter__(self):
        model = self.model
        self._orig = model.config._attn_implementation
        if self._orig not in ("sdpa", "eager"):
            raise InductionConfigError(f"attn_implementation={self._orig!r}: the probe supports sdpa and eager")
        model.set_attn_implementation(_register_probe(self._orig))
        for l in range(self.adapter.geometry.n_layers):
            self.adapter.attn(l).__dict__["_icl_probe"] = self
        if self.embeddings_input:  # every block reads what block 0 reads (the original code's choice)
            layers = self.adapter.layers()
            self._emb = None

            def keep(mod, args, kwargs):
                self._emb = args[0]

            def swap(mod, args, kwargs):
                return (self._emb, *args[1:]), kwargs

            self._handles.append(layers[0].register_forward_pre_hook(keep, with_kwargs=True))
            for layer in list(layers)[1:]:
                self._handles.append(layer.register_forward_pre_hook(swap, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for l in range(self.adapter.geometry.n_layers):
            self.adapter.attn(l).__dict__.pop("_icl_probe", None)
        self.model.set_attn_implementation(self._orig)


# --- the reductions (pure functions: the probes call them per layer, the benchmark directly) ----------

def prefix_from_probs(P: torch.Tensor, rows, cols, count: int) -> torch.Tensor:
    """[H] prefix-matching score from attention probabilities P [H, T, T]."""
    return P[:, rows, cols].float().sum(-1) / count


def prefix_from_lse(q, k, lse, scaling: float, rows, cols, count: int) -> torch.Tensor:
    """The same from queries/keys [H, T, D] (keys repeated per query head) and the log-sum-exp [H, T]."""
    s = (q[:, rows] * k[:, cols]).sum(-1) * scaling
    return torch.exp(s.float() - lse[:, rows].float()).sum(-1) / count


def most_attended(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[H, T] argmax over attendable keys of q.k (= argmax of the attention probabilities)."""
    T = q.shape[-2]
    upper = torch.zeros(T, T, dtype=q.dtype, device=q.device).masked_fill_(
        torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    return torch.baddbmm(upper.expand(q.shape[0], T, T), q, k.transpose(-1, -2)).argmax(-1)


def copying_from(att: torch.Tensor, x: torch.Tensor, Uids: torch.Tensor, W_o: torch.Tensor,
                 b_o: torch.Tensor | None, softmax: bool, first: int) -> torch.Tensor:
    """[H] copying score of one layer.

    att [H, T]: most-attended position per query; x [H, T, D]: the vector each head's OV map reads at
    each query (head output or value); Uids [T, hidden]: the (folded) unembedding rows of the
    sequence's tokens; W_o [hidden, H*D]; b_o: output bias to add, or None; first: first scored
    position (after BOS). logit[h, j, k] = Uids[k] . (W_o^h x[h, j] + b_o) for attendable k <= j."""
    H, T, D = x.shape
    x = x.float()
    B = (Uids.float() @ W_o.float()).view(T, H, D).transpose(0, 1)  # [H, T, D]: token k seen through W_o^h
    c = (Uids.float() @ b_o.float()) if b_o is not None else None  # [T] bias logit per token
    count = torch.arange(1, T + 1, device=x.device, dtype=torch.float64)
    logits = x @ B.transpose(1, 2)  # [H, T(query), T(token)]
    if c is not None:
        logits += c.float()
    if not softmax:
        # mean over the attendable tokens without a pass over [H, T, T]: x_j . cumsum(B)_j / (j+1)
        mean = (x.double() * B.double().cumsum(1)).sum(-1)
        if c is not None:
            mean = mean + c.double().cumsum(0)
        logits.sub_((mean / count).float()[..., None])
    else:
        # softmax over the vocabulary = exp(logit) / Z, with Z shared by every attendable token of a
        # row: Z cancels in relu(p - mean p)[k] / sum relu(p - mean p), so exp of the attendable logits
        # is exact. expm1 after subtracting the row max keeps precision (the +1 cancels in centring).
        upper = torch.ones(T, T, dtype=torch.bool, device=x.device).triu_(1)
        logits.masked_fill_(upper, float("-inf"))
        logits = torch.expm1(logits - logits.amax(-1, keepdim=True)).masked_fill_(upper, 0.0)
        logits.sub_((logits.sum(-1, dtype=torch.float64) / count).float()[..., None])
    relu = logits.clamp_(min=0).tril_()  # ReLU; tokens after j are not attendable
    den = relu.sum(-1)
    num = relu.gather(-1, att[..., None])[..., 0]
    ratio = torch.where(den != 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    return ratio[:, first:].mean(-1)


class _PrefixProbe(_Probe):
    def start(self, rows, cols, count):
        self.rows, self.cols, self.count = rows, cols, count
        self.out = torch.zeros(self.adapter.geometry.n_layers, self.adapter.geometry.n_heads)

    def take_flash(self, module, q, k, v, out, lse, scaling):
        self.out[self.layer_of[id(module)]] = prefix_from_lse(
            q[0], k[0], lse[0], scaling, self.rows, self.cols, self.count).cpu()

    def take_probs(self, module, weights, out, value):
        self.out[self.layer_of[id(module)]] = prefix_from_probs(weights[0], self.rows, self.cols, self.count).cpu()


class _CopyingProbe(_Probe):
    def __init__(self, adapter: Adapter, opts: CopyingOptions):
        super().__init__(adapter, embeddings_input=opts.input == "embeddings")
        self.opts = opts

    def start(self, ids: torch.Tensor, first: int):
        self.Uids = unembedding_matrix(self.adapter, self.opts.final_norm == "fold", ids)  # [T, hidden]
        self.first = first
        self.out = torch.zeros(self.adapter.geometry.n_layers, self.adapter.geometry.n_heads)

    def _score(self, module, att, x):
        l = self.layer_of[id(module)]
        b_o = self.adapter.o_proj(l).bias if self.opts.o_bias else None
        self.out[l] = copying_from(att, x, self.Uids, self.adapter.o_proj_weight(l), b_o, self.opts.softmax,
                                   self.first).cpu()

    def take_probs(self, module, weights, out, value):
        x = out[0].transpose(0, 1) if self.opts.source == "output" else \
            value[0][self.adapter.kv_head_of().to(value.device)]
        self._score(module, weights[0].argmax(-1), x)

    def take_flash(self, module, q, k, v, out, lse, scaling):
        self._score(module, most_attended(q[0], k[0]), out[0] if self.opts.source == "output" else v[0])


def _unembedding_weight(adapter: Adapter) -> torch.Tensor:
    # transformers 5.x renamed GPT-NeoX's embed_out to lm_head; the adapter still says embed_out.
    try:
        return adapter.unembedding_weight()
    except AttributeError:
        return adapter.model.get_output_embeddings().weight


def unembedding_matrix(adapter: Adapter, fold_norm: bool = True, ids: torch.Tensor | None = None) -> torch.Tensor:
    """[V, hidden] map from a residual-stream vector to logits, with the final norm's linear part
    folded in (weight, and centring for LayerNorm; the per-token 1/rms scale and bias are dropped)
    and OPT's project_out applied. `ids`: only those rows ([len(ids), hidden])."""
    U = _unembedding_weight(adapter).detach()
    U = (U if ids is None else U[ids]).float()  # every step below is row-wise: rows first saves memory
    decoder = getattr(getattr(adapter.model, "model", None), "decoder", None)
    proj = getattr(decoder, "project_out", None)
    if proj is not None:  # OPT-350m: final norm -> project_out -> lm_head
        U = U @ proj.weight.float()
    norm = adapter.final_norm() if fold_norm else None
    if norm is not None and getattr(norm, "weight", None) is not None:
        U = U * norm.weight.float()
        if isinstance(norm, nn.LayerNorm):
            U = U - U.mean(-1, keepdim=True)
    return U


# --- the scores -------------------------------------------------------------------------------------------

def _resolve(lm, tokenizer, bos):
    """(model, adapter, tokenizer, bos_ids, bos_source, name, max_positions)."""
    if hasattr(lm, "adapter") and hasattr(lm, "model"):  # LoadedModel
        model, adapter, tok, name = lm.model, lm.adapter, tokenizer or lm.tokenizer, lm.name
        doc_start, max_len = list(lm.doc_start_ids), lm.max_length
    else:
        model, tok, name, doc_start = lm, tokenizer, getattr(lm.config, "name_or_path", ""), []
        adapter = Adapter(model)
        max_len = None
    cfg_max = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_pos = min(x for x in (max_len, cfg_max) if x) if (max_len or cfg_max) else None
    if bos is None or bos == "auto":
        if doc_start:
            bos_ids, src = doc_start, "doc_start_ids"
        elif tok is not None and tok.bos_token_id is not None:
            bos_ids, src = [int(tok.bos_token_id)], "tokenizer.bos_token"
        else:
            bos_ids, src = [], "none"
    elif bos == "none":
        bos_ids, src = [], "none"
    elif isinstance(bos, str):
        tid = tok.convert_tokens_to_ids(bos) if tok is not None else None
        if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id and bos != tok.unk_token):
            raise InductionConfigError(f"bos={bos!r} is not a token of this tokenizer; use auto, none or a token")
        bos_ids, src = [int(tid)], f"explicit:{bos}"
    else:
        bos_ids, src = [int(b) for b in bos], "explicit_ids"
    return model, adapter, tok, bos_ids, src, name, max_pos


def induction_scores(
    lm,
    *,
    tokenizer=None,
    bos=None,
    n_seeds: int = 100,
    seed: int = 0,
    lengths: Sequence[int] | None = None,
    exclude_frac: float = 0.04,
    scores: Sequence[str] = SCORES,
    original_indexing: bool = True,
    copying: CopyingOptions | None = None,
    progress: bool = False,
) -> InductionResult:
    """Prefix-matching and copying scores of every head, mean and variance over seeds.

    lm: a LoadedModel, or a bare transformers causal LM of a supported family (then pass the
    tokenizer, or none for token-id order, and bos ids). bos: None/"auto" = the model's
    doc_start_ids, else the tokenizer's BOS; "none"; a token string; or a list of ids.
    lengths: sequence length n per seed (default 2*i+25, i < n_seeds)."""
    t_start = time.perf_counter()
    if lengths is None:
        if int(n_seeds) < 1:
            raise InductionConfigError(f"n_seeds={n_seeds}; it must be >= 1")
        lengths = default_lengths(int(n_seeds))
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 2:
        raise InductionConfigError(f"lengths must be a non-empty list of ints >= 2, got {lengths[:5]}")
    scores = tuple(scores)
    if not scores or set(scores) - set(SCORES):
        raise InductionConfigError(f"scores={list(scores)}; choose from {', '.join(SCORES)}")
    opts = (copying or CopyingOptions()).check()
    model, adapter, tok, bos_ids, bos_src, name, max_pos = _resolve(lm, tokenizer, bos)
    vocab = _unembedding_weight(adapter).shape[0]
    pool, proxy = token_pool(tok, vocab, exclude_frac, exclude_ids=bos_ids)
    P = len(bos_ids)
    need = max(lengths) * (4 if "copying" in scores else 1)
    if need > len(pool):
        per = 4 if "copying" in scores else 1
        fit = len(pool) // per
        raise InductionConfigError(
            f"the token pool has {len(pool)} tokens ({proxy} order, {exclude_frac:.0%} excluded at each end) but "
            f"length {max(lengths)} needs {need} distinct tokens; the largest possible length is {fit}"
            + (f" (n_seeds <= {(fit - 25) // 2 + 1})" if fit >= 25 else ""))
    if max_pos is not None and P + 4 * max(lengths) > max_pos:
        fit = (max_pos - P) // 4
        raise InductionConfigError(
            f"length {max(lengths)} gives {P + 4 * max(lengths)} tokens but the model takes {max_pos}; the "
            f"largest possible length is {fit}" + (f" (n_seeds <= {(fit - 25) // 2 + 1})" if fit >= 25 else ""))

    dev = next(model.parameters()).device
    seqs = make_sequences(pool, lengths, seed)
    bos_t = torch.tensor(bos_ids, dtype=torch.long)
    per_seed = {s: [] for s in scores}
    runtime = {s: 0.0 for s in scores}
    base = model.base_model  # the scores need hidden states, not the LM head's logits
    it = range(len(lengths))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"induction {name}", unit="seed")
    pm_probe = _PrefixProbe(adapter)
    cp_probe = _CopyingProbe(adapter, opts) if "copying" in scores else None
    was_training = model.training
    model.eval()  # no dropout
    try:
        with torch.no_grad():
            for i in it:
                n, (s_pref, s_copy) = lengths[i], seqs[i]
                if "prefix_matching" in scores:
                    t0 = time.perf_counter()
                    ids = torch.cat([bos_t, s_pref.repeat(4)])[None].to(dev)
                    with pm_probe:
                        pm_probe.start(*prefix_targets(n, P, original_indexing))
                        base(input_ids=ids, use_cache=False)
                    per_seed["prefix_matching"].append(pm_probe.out)
                    runtime["prefix_matching"] += time.perf_counter() - t0
                if cp_probe is not None:
                    t0 = time.perf_counter()
                    ids = torch.cat([bos_t, s_copy])[None].to(dev)
                    with cp_probe:
                        cp_probe.start(ids[0], P)
                        base(input_ids=ids, use_cache=False)
                    per_seed["copying"].append(cp_probe.out)
                    runtime["copying"] += time.perf_counter() - t0
    finally:
        model.train(was_training)

    stacked = {s: torch.stack(v) for s, v in per_seed.items()}
    mean = {s: v.mean(0) for s, v in stacked.items()}
    var = {s: (v.var(0) if len(v) > 1 else torch.zeros_like(v[0])) for s, v in stacked.items()}
    runtime = {k: round(v, 3) for k, v in runtime.items()}
    runtime["total"] = round(time.perf_counter() - t_start, 3)
    return InductionResult(
        prefix_matching=mean.get("prefix_matching"), copying=mean.get("copying"),
        prefix_matching_var=var.get("prefix_matching"), copying_var=var.get("copying"),
        per_seed=stacked, n_seeds=len(lengths), seed=int(seed), lengths=lengths, frequency_proxy=proxy,
        pool_size=len(pool), exclude_frac=exclude_frac, bos_ids=bos_ids, bos_source=bos_src,
        original_indexing=original_indexing, copying_options=asdict(opts), runtime_s=runtime, model=name,
    )


# --- analysis helpers for the reducer ---------------------------------------------------------------------

PRUNE_LEVELS = DEFAULT_LEVELS  # 0..90 step 10, as task-importance pruning


def mask_from_ranking(values: torch.Tensor, p: float, lowest_first: bool = True) -> torch.Tensor:
    """[L, H] float mask (1 keep, 0 pruned) removing p% of heads, lowest `values` first (or highest);
    the same rule as task-importance pruning (icl_scale.pruning.prune_mask: round(p/100 * N) heads,
    ties to the lower layer-major index)."""
    return prune_mask(values if lowest_first else -values.double(), p)


def retained_capacity(scores: torch.Tensor, ranking_importance: torch.Tensor,
                      levels: Sequence[float] = PRUNE_LEVELS) -> list[float]:
    """Fraction of the total induction score (sum over heads) kept when heads are pruned p% at a time
    by a task's importance, least important first (Bansal et al. Fig. 11)."""
    if scores.shape != ranking_importance.shape:
        raise InductionConfigError(f"scores {tuple(scores.shape)} and importance "
                                   f"{tuple(ranking_importance.shape)} must have the same [L, H] shape")
    total = float(scores.sum())
    return [float((scores * mask_from_ranking(ranking_importance, p)).sum()) / total if total else float("nan")
            for p in levels]


def ranking_masks(scores: torch.Tensor, p: float, n_random: int = 5, seed: int = 0,
                  lowest_first: bool = True) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Pruning masks at p%: from the induction-score ranking (lowest scores pruned first unless
    lowest_first=False) and from `n_random` random rankings (torch.Generator(seed)), to compare
    against task-importance pruning at the same p."""
    gen = torch.Generator().manual_seed(int(seed))
    rand = [mask_from_ranking(torch.rand(scores.shape, generator=gen), p) for _ in range(n_random)]
    return {"induction": mask_from_ranking(scores, p, lowest_first), "random": rand}


# --- outputs ----------------------------------------------------------------------------------------------

def heatmap(scores: torch.Tensor, title: str, path: Path, cmap: str = "viridis") -> None:
    """Layers x heads heatmap (layer 0 at the bottom, 0-based labels), small PNG, written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = scores.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.28 * H, 1.2 + 0.16 * L), dpi=80)
    im = ax.imshow(scores.numpy(), origin="lower", aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, H, max(1, H // 8)))
    ax.set_yticks(range(0, L, max(1, L // 10)))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    store.write_bytes(path, buf.getvalue())


def save_result(result: InductionResult, out_dir: Path, k: int = 10) -> dict[str, Path]:
    """scores.safetensors ([L, H] float32 each), heatmaps (mean, variance) and scores.json, each
    written to a temporary file in out_dir and renamed into place (icl_scale.store)."""
    out_dir = Path(out_dir)
    tensors = {k_: v.float().contiguous() for k_, v in result.scores().items()}
    meta = result.metadata(k)
    paths = {"scores": out_dir / "scores.safetensors", "json": out_dir / "scores.json"}
    store.write_tensors(paths["scores"], tensors, metadata={"json": json.dumps(meta)})
    for key, t in tensors.items():
        label = key.replace("_var", " (variance)").replace("_", " ")
        paths[key] = out_dir / f"{key}.png"
        heatmap(t, f"{result.model} {label}, {result.n_seeds} seeds", paths[key],
                cmap="magma" if key.endswith("_var") else "viridis")
    store.write_json(paths["json"], meta)
    return paths


def expected_uniform_prefix(n: int, P: int = 1, original_indexing: bool = True) -> float:
    """Prefix-matching score of a head attending uniformly to all earlier tokens (the floor a
    random-init model sits near): mean over queries of (#targets / #attendable)."""
    rows, _, count = prefix_targets(n, P, original_indexing)
    return float((1.0 / (rows.double() + 1)).sum()) / count


# --- job entry (jobs/induction.py) -------------------------------------------------------------------

def copying_options_from(cfg) -> CopyingOptions:
    """CopyingOptions from the `induction.copying` config block (preset paper|default + fields)."""
    cfg = dict(cfg or {})
    if cfg.pop("preset", "default") == "paper":
        return CopyingOptions.paper()
    known = {f: cfg[f] for f in ("input", "source", "final_norm", "softmax", "o_bias") if f in cfg}
    return CopyingOptions(**known).check()


def run_job(cfg) -> dict:
    """Load cfg.model, score every head, write <store.root>/<model.name>/induction/. Returns the paths."""
    from omegaconf import OmegaConf

    from .models import load_model

    ind = OmegaConf.to_container(cfg.induction, resolve=True)
    lm = load_model(cfg.model)
    result = induction_scores(
        lm, bos=ind.get("bos", "auto"), n_seeds=int(ind["n_seeds"]), seed=int(ind.get("seed", 0)),
        exclude_frac=float(ind.get("exclude_frac", 0.04)), scores=tuple(ind.get("scores", SCORES)),
        original_indexing=bool(ind.get("original_indexing", True)),
        copying=copying_options_from(ind.get("copying")), progress=bool(ind.get("progress", True)))
    out_dir = Path(cfg.store.root) / lm.name / "induction"
    paths = save_result(result, out_dir, k=int(ind.get("top_k", 10)))
    return {k: str(v) for k, v in paths.items()}


__all__ = [
    "PRUNE_LEVELS", "SCORES", "CopyingOptions", "InductionConfigError", "InductionResult", "copying_from",
    "copying_options_from", "default_lengths", "expected_uniform_prefix", "heatmap", "induction_scores",
    "make_sequences", "mask_from_ranking", "most_attended", "prefix_from_lse", "prefix_from_probs",
    "prefix_targets", "ranked_vocabulary", "ranking_masks", "retained_capacity", "run_job", "save_result",
    "token_pool", "top_heads", "unembedding_matrix",
]
