"""induction_scores: every head's prefix-matching and copying score, mean and variance over seeds.

Per seed, one forward pass of the base model (no LM head) per score, with a probe (probes.py)
that reduces each layer's attention while the pass runs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..models.adapters import Adapter
from ..models.hooks import Hooks
from .options import SCORES, CopyingOptions, InductionConfigError
from .probes import CopyingProbe, PrefixProbe
from .sequences import default_lengths, make_sequences, prefix_targets, token_pool


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


# --- the model, its BOS and what fits ----------------------------------------------------------------

def _resolve_model(lm, tokenizer):
    """(model, adapter, tokenizer, name, doc_start_ids, max_positions) of a LoadedModel or a bare LM."""
    if hasattr(lm, "adapter") and hasattr(lm, "model"):  # LoadedModel
        model, adapter, tok, name = lm.model, lm.adapter, tokenizer or lm.tokenizer, lm.name
        doc_start, max_len = list(lm.doc_start_ids), lm.max_length
    else:
        model, tok, name, doc_start = lm, tokenizer, getattr(lm.config, "name_or_path", ""), []
        adapter = Adapter(model)
        max_len = None
    cfg_max = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_pos = min(x for x in (max_len, cfg_max) if x) if (max_len or cfg_max) else None
    return model, adapter, tok, name, doc_start, max_pos


def _bos_ids(bos, tok, doc_start: list[int]) -> tuple[list[int], str]:
    """(BOS ids, where they came from) for bos = None/"auto", "none", a token string or a list of ids."""
    if bos is None or bos == "auto":
        if doc_start:
            return doc_start, "doc_start_ids"
        if tok is not None and tok.bos_token_id is not None:
            return [int(tok.bos_token_id)], "tokenizer.bos_token"
        return [], "none"
    if bos == "none":
        return [], "none"
    if isinstance(bos, str):
        tid = tok.convert_tokens_to_ids(bos) if tok is not None else None
        if tid is None or (tok.unk_token_id is not None and tid == tok.unk_token_id and bos != tok.unk_token):
            raise InductionConfigError(f"bos={bos!r} is not a token of this tokenizer; use auto, none or a token")
        return [int(tid)], f"explicit:{bos}"
    return [int(b) for b in bos], "explicit_ids"


def _check_lengths(n_seeds: int, lengths: Sequence[int] | None) -> list[int]:
    if lengths is None:
        if int(n_seeds) < 1:
            raise InductionConfigError(f"n_seeds={n_seeds}; it must be >= 1")
        lengths = default_lengths(int(n_seeds))
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 2:
        raise InductionConfigError(f"lengths must be a non-empty list of ints >= 2, got {lengths[:5]}")
    return lengths


def _check_fits(lengths: list[int], scores: tuple[str, ...], pool: torch.Tensor, proxy: str,
                exclude_frac: float, P: int, max_pos: int | None) -> None:
    """The longest sequence needs enough distinct pool tokens and must fit the model's context;
    the error names the largest length (and n_seeds) that would."""
    per = 4 if "copying" in scores else 1
    need = max(lengths) * per
    if need > len(pool):
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


# --- the scores -----------------------------------------------------------------------------------------

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
    lengths = _check_lengths(n_seeds, lengths)
    scores = tuple(scores)
    if not scores or set(scores) - set(SCORES):
        raise InductionConfigError(f"scores={list(scores)}; choose from {', '.join(SCORES)}")
    opts = (copying or CopyingOptions()).check()
    model, adapter, tok, name, doc_start, max_pos = _resolve_model(lm, tokenizer)
    bos_ids, bos_src = _bos_ids(bos, tok, doc_start)
    pool, proxy = token_pool(tok, adapter.unembedding_weight().shape[0], exclude_frac, exclude_ids=bos_ids)
    _check_fits(lengths, scores, pool, proxy, exclude_frac, len(bos_ids), max_pos)

    probes = {"prefix_matching": PrefixProbe(adapter)}
    if "copying" in scores:
        probes["copying"] = CopyingProbe(adapter, opts)
    per_seed, runtime = _run_seeds(model, adapter, probes, make_sequences(pool, lengths, seed), lengths, bos_ids,
                                   scores, original_indexing, f"induction {name}" if progress else None)

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


def _run_seeds(model, adapter: Adapter, probes: dict, seqs, lengths: list[int], bos_ids: list[int],
               scores: tuple[str, ...], original_indexing: bool, progress_desc: str | None):
    """Per seed and score, one probed forward pass in eval mode (no dropout, no gradients).
    progress_desc: a tqdm bar with that title, or None.
    Returns ({score: [[L, H] per seed]}, {score: seconds})."""
    dev = next(model.parameters()).device
    bos_t = torch.tensor(bos_ids, dtype=torch.long)
    P = len(bos_ids)
    base = model.base_model  # the scores need hidden states, not the LM head's logits
    per_seed = {s: [] for s in scores}
    runtime = {s: 0.0 for s in scores}
    seeds = range(len(lengths))
    if progress_desc:
        from tqdm import tqdm
        seeds = tqdm(seeds, desc=progress_desc, unit="seed")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in seeds:
                n, (s_pref, s_copy) = lengths[i], seqs[i]
                if "prefix_matching" in scores:
                    t0 = time.perf_counter()
                    probes["prefix_matching"].start(*prefix_targets(n, P, original_indexing))
                    ids = torch.cat([bos_t, s_pref.repeat(4)])[None].to(dev)
                    per_seed["prefix_matching"].append(
                        _probed_pass(adapter, base, probes["prefix_matching"], ids))
                    runtime["prefix_matching"] += time.perf_counter() - t0
                if "copying" in scores:
                    t0 = time.perf_counter()
                    ids = torch.cat([bos_t, s_copy])[None].to(dev)
                    probes["copying"].start(ids[0], P)
                    per_seed["copying"].append(_probed_pass(adapter, base, probes["copying"], ids))
                    runtime["copying"] += time.perf_counter() - t0
    finally:
        model.train(was_training)
    return per_seed, runtime


def _probed_pass(adapter: Adapter, base, probe, ids: torch.Tensor) -> torch.Tensor:
    """One forward pass with the probe's hooks installed; its [L, H] result."""
    with Hooks(adapter, probe.hooks()):
        base(input_ids=ids, use_cache=False)
    return probe.out
