"""The per-layer reductions: one layer's attention (probabilities, or queries, keys and the
log-sum-exp) and OV circuit -> a [heads] score. Pure functions: the probes call them inside the
forward pass, the benchmark on captured inputs."""

from __future__ import annotations

import torch
from torch import nn

from ..models.adapters import Adapter


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


def unembedding_matrix(adapter: Adapter, fold_norm: bool = True, ids: torch.Tensor | None = None) -> torch.Tensor:
    """[V, hidden] map from a residual-stream vector to logits, with the final norm's linear part
    folded in (weight, and centring for LayerNorm; the per-token 1/rms scale and bias are dropped)
    and OPT's project_out applied. `ids`: only those rows ([len(ids), hidden]). Linear, so no
    final-logit soft-capping (Gemma 2): the copying score is the paper's linear OV circuit (defined
    on OPT, which has no cap), and one head's output lacks the logit scale the cap acts at
    (docs/induction.md)."""
    U = adapter.unembedding_weight().detach()
    U = (U if ids is None else U[ids]).float()  # every step below is row-wise: rows first saves memory
    decoder = getattr(getattr(adapter.model, "model", None), "decoder", None)
    proj = getattr(decoder, "project_out", None)
    if proj is not None:  # OPT-350m: final norm -> project_out -> lm_head
        U = U @ proj.weight.float()
    norm = adapter.final_norm() if fold_norm else None
    scale = adapter.final_norm_scale() if norm is not None else None
    if scale is not None:  # Gemma's RMS norm scales by 1 + weight
        U = U * scale.detach().float()
        if isinstance(norm, nn.LayerNorm):
            U = U - U.mean(-1, keepdim=True)
    return U
