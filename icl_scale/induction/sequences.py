"""What the scores read: the token pool (frequency-proxy order, both ends dropped), the per-seed
lengths, the random sequences, and the attention entries prefix matching sums."""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch

from .options import InductionConfigError


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


def make_sequences(pool: torch.Tensor, lengths: Sequence[int],
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


def expected_uniform_prefix(n: int, P: int = 1, original_indexing: bool = True) -> float:
    """Prefix-matching score of a head attending uniformly to all earlier tokens (the floor a
    random-init model sits near): mean over queries of (#targets / #attendable)."""
    rows, _, count = prefix_targets(n, P, original_indexing)
    return float((1.0 / (rows.double() + 1)).sum()) / count
