"""Importance equals an independent computation; pruning masks; FFN knock-out."""

import pytest
import torch

from icl_scale.evaluator import Evaluator
from icl_scale.importance import gradient_importance, importance_inputs
from icl_scale.models import Gates
from icl_scale.pruning import check_levels, curve, n_removed, prune_mask
from icl_scale.tasks import build_requests

from conftest import get_model
from reference_knockout import ffn_knockout


def reference_importance(lm, requests, abs_mode, normalize="paper"):
    """One example at a time, no Gates: capture every o_proj input and FFN output with hooks, take
    their gradients of HF's own label loss (mean NLL over the continuation), and form
    <activation, gradient> per token. Layers are divided by the input tokens, the last one (paper)
    by the continuation tokens."""
    g = lm.adapter.geometry
    heads = torch.zeros(g.n_layers, g.n_heads, dtype=torch.float64)
    ffn = torch.zeros(g.n_layers, dtype=torch.float64)
    n_tok = n_cont = 0
    for inp, cont in importance_inputs(lm, requests):
        ids = torch.tensor([inp])
        labels = torch.full_like(ids, -100)
        # HF shifts labels: label at position t+1 is predicted from t. Our inputs drop the final
        # continuation token, so append it and let HF do its own shift (an independent path).
        full = torch.tensor([inp + [cont[-1]]])
        labels = torch.full_like(full, -100)
        labels[0, len(inp) + 1 - len(cont):] = torch.tensor(cont)
        acts, hooks = {}, []

        def pre(l):
            def f(mod, args):
                x = args[0]
                if not x.requires_grad:
                    x = x.detach().requires_grad_(True)
                acts[("h", l)] = x  # noqa: B023 - hooks live only within this iteration
                return (x,)
            return f

        def post(l):
            def f(mod, args, out):
                acts[("f", l)] = out  # noqa: B023 - hooks live only within this iteration
                return out
            return f

        for l in range(g.n_layers):
            hooks.append(lm.adapter.o_proj(l).register_forward_pre_hook(pre(l)))
            hooks.append(lm.adapter.ffn(l).register_forward_hook(post(l)))
        try:
            with torch.enable_grad():
                loss = lm.model(input_ids=full, labels=labels).loss
                keys = list(acts)
                grads = dict(zip(keys, torch.autograd.grad(loss, [acts[k] for k in keys])))
        finally:
            for hk in hooks:
                hk.remove()
        T = len(inp)
        for l in range(g.n_layers):
            x = acts[("h", l)].detach()[0, :T].view(T, g.n_heads, g.head_dim)
            d = grads[("h", l)][0, :T].view(T, g.n_heads, g.head_dim)
            c = (x * d).sum(-1).double()  # [T, H]
            y = acts[("f", l)].detach().reshape(-1, g.hidden)[:T]
            dy = grads[("f", l)].reshape(-1, g.hidden)[:T]
            cf = (y * dy).sum(-1).double()
            if abs_mode == "per_token":
                heads[l] += c.abs().sum(0)
                ffn[l] += cf.abs().sum()
            else:
                heads[l] += c.sum(0).abs()
                ffn[l] += cf.sum().abs()
        n_tok += T
        n_cont += len(cont)
    den = torch.full((g.n_layers,), float(n_tok), dtype=torch.float64)
    if normalize == "paper":
        den[-1] = n_cont
    return heads / den[:, None], ffn / den


@pytest.mark.parametrize("model", ["tiny-opt", "tiny-llama"])
@pytest.mark.parametrize("abs_mode", ["per_token", "sum"])
def test_importance_matches_independent_computation(task_data, model, abs_mode):
    lm = get_model(model)
    reqs = build_requests("copa", split="train", shot=1, limit=5, data_dir=task_data)
    st = gradient_importance(lm, reqs, batch_size=3, abs_mode=abs_mode)  # batches with padding
    assert st.n_examples == 5
    for normalize in ("paper", "all_tokens"):
        got = st.result(normalize=normalize)
        ref_h, ref_f = reference_importance(lm, reqs, abs_mode, normalize)
        rel_h = ((got["heads"].double() - ref_h).abs().max() / ref_h.abs().max()).item()
        rel_f = ((got["ffn"].double() - ref_f).abs().max() / ref_f.abs().max()).item()
        assert rel_h < 1e-5 and rel_f < 1e-5, (normalize, rel_h, rel_f)
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())


def test_sum_mode_matches_finite_differences(task_data):
    """|sum over tokens| of one example equals |dL/dg| by central differences on a real gate."""
    lm = get_model("tiny-llama")
    req = build_requests("copa", split="train", shot=0, limit=1, data_dir=task_data)
    got = gradient_importance(lm, req, abs_mode="sum").result(normalize="all_tokens")  # every layer / n tokens
    ((inp, cont),) = importance_inputs(lm, req)
    n = len(inp)
    g = lm.adapter.geometry

    def loss_at(l, h, v):
        m = torch.ones(g.n_layers, g.n_heads, dtype=torch.float32)
        m[l, h] = v
        with Gates(lm.adapter, head_mask=m), torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=torch.tensor([inp])).logits[0].double(), -1)
        pos = torch.arange(n - len(cont), n)
        return -(logp[pos, torch.tensor(cont)]).mean().item()

    for (l, h) in [(0, 1), (1, 3)]:
        eps = 1e-2
        fd = abs(loss_at(l, h, 1 + eps) - loss_at(l, h, 1 - eps)) / (2 * eps)
        assert got["heads"][l, h].item() * n == pytest.approx(fd, rel=2e-2, abs=1e-6)


def test_iterative_masked_heads_get_zero_importance(task_data):
    lm = get_model("tiny-opt")
    reqs = build_requests("copa", split="train", shot=0, limit=3, data_dir=task_data)
    m = torch.ones(2, 4)
    m[1, 2] = 0
    got = gradient_importance(lm, reqs, head_mask=m).result()["heads"]
    assert got[1, 2] == 0 and (got.flatten().nonzero().numel() == 7)


def test_prune_mask_removes_exactly_the_lowest():
    imp = torch.tensor([[0.5, 0.1, 0.9], [0.3, 0.2, 0.8]])
    assert torch.equal(prune_mask(imp, 0), torch.ones(2, 3))
    assert torch.equal(prune_mask(imp, 100), torch.zeros(2, 3))
    m = prune_mask(imp, 50)  # 3 of 6: 0.1, 0.2, 0.3
    assert torch.equal(m, torch.tensor([[1.0, 0, 1], [0, 0, 1]]))
    # Global ranking across layers, not per layer.
    assert m[1].sum() == 1
    # Ties: lower flat index first.
    assert torch.equal(prune_mask(torch.ones(4), 50), torch.tensor([0.0, 0, 1, 1]))
    assert n_removed(10, 270) == 27 and n_removed(90, 30) == 27
    # Iterative: already-removed entries stay removed and count.
    keep = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    m2 = prune_mask(imp, 50, keep=keep)
    assert m2[0, 2] == 0 and int((m2 == 0).sum()) == 3
    with pytest.raises(ValueError, match="outside 0..100"):
        prune_mask(imp, 120)
    with pytest.raises(ValueError, match="pruning.levels contains -5"):
        check_levels([0, -5])


def test_curve_levels_nest_and_iterative_rescore():
    imp = torch.arange(10.0)
    seen = {}
    curve(imp, [0, 30, 60], lambda m: {"kept": int(m.sum())}, on_level=lambda p, m, r: seen.update({p: m}))
    assert [int(seen[p].sum()) for p in (0, 30, 60)] == [10, 7, 4]
    calls = []
    res = curve(imp, [0, 50], lambda m: {"kept": int(m.sum())},
                rescore=lambda m: calls.append(m.clone()) or -imp)
    assert res[50.0]["kept"] == 5 and len(calls) == 1


def test_knockout_equals_ffn_gate_zero(task_data):
    lm = get_model("tiny-llama")
    reqs = build_requests("copa", shot=1, limit=10, data_dir=task_data)
    ev = Evaluator(lm, "copa", 4)
    seen = {}

    def evaluate(hm, fm):
        metrics, per_doc = ev(reqs, hm, fm)
        seen[None if fm is None else int((fm == 0).nonzero()[0])] = per_doc
        return metrics["acc"]["value"]

    base, drop = ffn_knockout(lm, evaluate)
    for l in range(2):
        m = torch.ones(2)
        m[l] = 0
        metrics, per_doc = ev(reqs, None, m)
        assert drop[l].item() == pytest.approx(base - metrics["acc"]["value"])
        assert [d["logprobs"] for d in per_doc] == [d["logprobs"] for d in seen[l]]
        # and the knocked-out model really differs from the unpruned one
        assert [d["logprobs"] for d in per_doc] != [d["logprobs"] for d in seen[None]]
