"""Importance section: (i) `gradient_importance` time / forward-only time on the same batches;
(ii) speed-up over the original code's scheme (parameter gradients enabled, a differentiable head
mask, a Python loop over heads on stored o_proj inputs/grads), and agreement of the importance
numbers (bench/README.md, "Importance section")."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from bench.common import data_dir, run_alternating, stats
from icl_scale.importance import gradient_importance, importance_batch, importance_inputs
from icl_scale.models.gates import Gates
from icl_scale.models.loading import LoadedModel
from icl_scale.tasks import build_requests

TIMED = ("forward", "forward_hf", "ours", "original")


def _batches(lm: LoadedModel, examples, batch_size: int):
    """The exact batches `gradient_importance` builds: (ids, mask, rows, pos, targets, weights)."""
    for s in range(0, len(examples), batch_size):
        yield importance_batch(lm, examples[s: s + batch_size])


@torch.inference_mode()
def forward_only(lm: LoadedModel, examples, batch_size: int, full_logits: bool = False) -> float:
    """The importance pass's forward with no gradients: base model, unembedding at the loss
    positions only, the same loss (`full_logits=True`: the plain HF forward, logits everywhere)."""
    base = lm.model.base_model
    total = 0.0
    for ids, mask, rows, pos, tgt, w in _batches(lm, examples, batch_size):
        if full_logits:
            logits = lm.model(input_ids=ids, attention_mask=mask).logits
            lp = torch.log_softmax(logits[rows, pos].float(), -1)
        else:
            h = base(input_ids=ids, attention_mask=mask).last_hidden_state
            lp = torch.log_softmax(lm.adapter.logits(h[rows, pos]).float(), -1)
        total += float(-(lp.gather(-1, tgt[:, None]).squeeze(-1) * w).sum())
    return total


def _head_loop(store: dict[int, torch.Tensor], acc: dict[str, torch.Tensor], L: int, H: int, d: int) -> torch.Tensor:
    """The original code's Python loop over layers and heads on the stored o_proj inputs and their
    gradients: per-token <x, dL/dx> per head, added to acc["per_token"] (sum of |.|) and acc["sum"]
    (|sum over tokens| per example). Returns the signed sums [L, H] (= the head-mask gradient)."""
    signed = torch.zeros(L, H, dtype=torch.float64)
    for l in range(L):
        x, gx = store[l].detach(), store[l].grad
        for h in range(H):
            dot = (x[..., h * d:(h + 1) * d] * gx[..., h * d:(h + 1) * d]).sum(-1)  # [b, t]
            acc["per_token"][l, h] += float(dot.abs().sum())
            acc["sum"][l, h] += float(dot.sum(1).abs().sum())
            signed[l, h] = float(dot.sum())
    return signed


def original_importance(lm: LoadedModel, examples, batch_size: int) -> dict[str, torch.Tensor]:
    """The original code's scheme (llm-interpret's `calculate_importance`, HF bertology's head mask):

    * parameter gradients on (`requires_grad_(True)`; llm-interpret froze only the input embedding
      matrix, which we follow: with SmolLM2's tied embeddings that also spares the unembedding's
      weight gradient, so this is the cheaper variant of the original);
    * a differentiable head mask (ones, requires_grad) applied to every head's output;
    * the full HF forward (logits at every position, as the `labels=` loss computes them) and the
      loss = sum over examples of the mean NLL of the continuation (the same loss as ours);
    * `loss.backward()`: weight gradients + mask gradient + retained o_proj input gradients;
    * per-head importance with a Python loop over layers and heads on the stored o_proj inputs and
      their gradients (`_head_loop`); then `param.grad = None` for every parameter.

    Returns raw sums (not divided by tokens): per_token [L, H], sum [L, H] (|sum over tokens| per
    example), head_mask_grad_abs [L, H] (bertology: |mask grad| per batch), mask_grad_check."""
    g = lm.adapter.geometry
    L, H, d = g.n_layers, g.n_heads, g.head_dim
    model = lm.model
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    embed = model.get_input_embeddings().weight
    acc = {k: torch.zeros(L, H, dtype=torch.float64) for k in ("per_token", "sum", "head_mask_grad_abs")}
    check = 0.0
    store: dict[int, torch.Tensor] = {}

    def keep(l):
        def pre(mod, args):
            x = args[0]
            x.retain_grad()
            store[l] = x
        return pre

    try:
        model.requires_grad_(True)
        embed.requires_grad_(False)
        head_mask = torch.ones(L, H, device=lm.device, requires_grad=True)
        with torch.enable_grad(), Gates(lm.adapter, head_mask=head_mask):
            hooks = [lm.adapter.o_proj(l).register_forward_pre_hook(keep(l)) for l in range(L)]
            try:
                for ids, mask, rows, pos, tgt, w in _batches(lm, examples, batch_size):
                    store.clear()
                    logits = model(input_ids=ids, attention_mask=mask).logits
                    lp = torch.log_softmax(logits.float(), -1)  # over all positions, like HF's loss
                    loss = -(lp[rows, pos].gather(-1, tgt[:, None]).squeeze(-1) * w).sum()
                    loss.backward()
                    signed = _head_loop(store, acc, L, H, d)
                    mg = head_mask.grad.double().cpu()
                    acc["head_mask_grad_abs"] += mg.abs()
                    check = max(check, float((mg - signed).abs().max() / mg.abs().max().clamp_min(1e-30)))
                    head_mask.grad = None
                    for p in params:
                        p.grad = None
                    store.clear()
            finally:
                for hk in hooks:
                    hk.remove()
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)
            p.grad = None
    return {**acc, "mask_grad_check": check}


def _rel(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    scale = float(b.abs().max()) or 1.0
    big = b.abs() > 1e-3 * scale
    return {"max_abs_diff_over_max": float((a - b).abs().max()) / scale,
            "max_rel_diff_entries_above_1e-3_of_max":
                float(((a - b).abs()[big] / b.abs()[big]).max()) if big.any() else 0.0,
            "rank_identical": bool(torch.equal(a.flatten().argsort(), b.flatten().argsort()))}


def _warm_up(lm: LoadedModel, reqs, examples) -> None:
    """The first backward passes allocate: run one of each, untimed."""
    gradient_importance(lm, reqs[:1], batch_size=1)
    original_importance(lm, examples[:1], 1)
    forward_only(lm, examples[:1], 1)


def _row(lm: LoadedModel, task: str, shot: int, reqs, examples, batch_size: int, repeats: int, abs_mode: str) -> dict:
    """Time the four methods on one task's batches; agreement of ours and the original in both modes."""
    fns = {
        "forward": lambda: forward_only(lm, examples, batch_size),
        "forward_hf": lambda: forward_only(lm, examples, batch_size, full_logits=True),
        "ours": lambda: gradient_importance(lm, reqs, batch_size=batch_size, abs_mode=abs_mode),
        "original": lambda: original_importance(lm, examples, batch_size),
    }
    times, outs = run_alternating(fns, repeats)
    st = {m: stats(ts) for m, ts in times.items()}
    best = {m: s["best_s"] for m, s in st.items()}
    ours_sum = gradient_importance(lm, reqs, batch_size=batch_size, abs_mode="sum")  # untimed
    other = "sum" if abs_mode == "per_token" else "per_token"
    ours_other = gradient_importance(lm, reqs, batch_size=batch_size, abs_mode=other) if other != "sum" else ours_sum
    ours_modes = {abs_mode: outs["ours"].heads, other: ours_other.heads}
    orig = outs["original"]
    return {
        "task": task, "shot": shot, "examples": len(examples), "batch_size": batch_size,
        "input_tokens": sum(len(i) for i, _ in examples), "abs_mode_timed": abs_mode, "time": st,
        "ratio_importance_over_forward": best["ours"] / best["forward"],
        "ratio_importance_over_forward_hf": best["ours"] / best["forward_hf"],
        "ratio_importance_over_forward_per_round": [round(a / b, 3) for a, b in zip(times["ours"], times["forward"])],
        "speedup_vs_original": best["original"] / best["ours"],
        "speedup_vs_original_per_round": [round(a / b, 3) for a, b in zip(times["original"], times["ours"])],
        "ratio_original_over_forward": best["original"] / best["forward"],
        "agreement": {"sum": _rel(ours_modes["sum"], orig["sum"]),
                      "per_token": _rel(ours_modes["per_token"], orig["per_token"]),
                      "head_mask_grad_vs_loop_max_rel": orig["mask_grad_check"]},
    }


def bench_importance(lm: LoadedModel, tasks: Sequence[str], shot: int, n_examples: int, batch_size: int = 4,
                     repeats: int = 3, data: Path | str | None = None, abs_mode: str = "per_token",
                     log=print) -> dict:
    """The importance section: one row per task, totals over tasks, the targets.
    `data`: the task mirror (default: bench.common.data_dir(), i.e. $ICL_SCALE_DATA_DIR)."""
    data = data if data is not None else data_dir()
    rows = []
    for k, task in enumerate(tasks):
        reqs = build_requests(task, shot=shot, limit=n_examples, data_dir=data)
        examples = importance_inputs(lm, reqs)
        if k == 0:
            _warm_up(lm, reqs, examples)
        row = _row(lm, task, shot, reqs, examples, batch_size, repeats, abs_mode)
        rows.append(row)
        log(f"[importance] {task} {shot}-shot {len(examples)} ex: "
            f"importance/forward {row['ratio_importance_over_forward']:.2f}, "
            f"vs original {row['speedup_vs_original']:.2f}x, |sum| agreement "
            f"{row['agreement']['sum']['max_abs_diff_over_max']:.1e}")
    tot = {m: sum(r["time"][m]["best_s"] for r in rows) for m in TIMED}
    summary = {"ratio_importance_over_forward": tot["ours"] / tot["forward"],
               "ratio_importance_over_forward_hf": tot["ours"] / tot["forward_hf"],
               "speedup_vs_original": tot["original"] / tot["ours"],
               "max_rel_disagreement_sum_mode": max(r["agreement"]["sum"]["max_abs_diff_over_max"] for r in rows),
               "max_rel_disagreement_per_token_mode":
                   max(r["agreement"]["per_token"]["max_abs_diff_over_max"] for r in rows)}
    targets = {"importance_over_forward<=2.5": summary["ratio_importance_over_forward"] <= 2.5,
               "speedup_vs_original>=1.3": summary["speedup_vs_original"] >= 1.3,
               "agree_sum_mode<=1e-4": summary["max_rel_disagreement_sum_mode"] <= 1e-4}
    return {"settings": {"tasks": list(tasks), "shot": shot, "n_examples": n_examples, "batch_size": batch_size,
                         "repeats": repeats, "abs_mode_timed": abs_mode, "model": lm.name},
            "rows": rows, "summary": summary, "targets": targets}
