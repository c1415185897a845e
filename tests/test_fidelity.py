"""Fidelity to the paper's code (amazon-science/llm-interpret @ 9e09daa): each default against the
original's definition, on a small case worked by hand or by an independent reimplementation of the
original's formula written here (docs/fidelity.md lists every choice and its switch).

The reference sides use no package helper beyond task rendering and loading a model."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from icl_scale.config import CONF_DIR
from icl_scale.importance import gradient_importance, importance_inputs
from icl_scale.induction import CopyingOptions, copying_options_from
from icl_scale.models import load_model
from icl_scale.models.loading import document_start_ids, preset
from icl_scale.pruning import curve, n_removed, prune_mask
from icl_scale.rankings import aggregate, argsort_spearman, spearman
from icl_scale.scoring import Tokenised
from icl_scale.shard import ShardRun
from icl_scale.tasks import build_requests, get_task, load_split
from icl_scale.tasks.build import demo_ids

from conftest import compose, data_dir, tiny_shard_cfg


@pytest.fixture(scope="module")
def opt_lm():
    """The 2-layer, 4-head random tiny OPT with no document-start token (as the OPT presets)."""
    lm = load_model({**preset("tiny-opt"), "doc_start": "none"})
    g = lm.adapter.geometry
    assert (g.n_layers, g.n_heads) == (2, 4) and lm.doc_start_ids == []
    return lm


# --- 1. importance: the original's calculate_importance, last-layer normalisation ---------------

def original_importance(lm, requests):
    """`lm_eval/base.py::BaseLM.calculate_importance` at batch size 1 (main.py's default), as in the
    original: input = ctx_enc + cont_enc (no special tokens, `utils.get_input_from_ctx_cont`), labels
    -100 except the continuation, HF's own shifted label loss, the gradient of the attention output
    before out_proj (`context_layer_val`), per head |<x, grad>| summed over positions and examples;
    layers[:-1] / sum(N - 1), layers[-1] / sum(len(continuation))."""
    model, tok = lm.model, lm.tokenizer
    layers = model.model.decoder.layers
    n_layers, n_heads = len(layers), model.config.num_attention_heads
    score = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    tot_tokens = eff_tokens = 0
    for r in requests:
        ctx, cont = r.pair(r.gold_index())
        ctx_enc = tok.encode(ctx, add_special_tokens=False)
        cont_enc = tok.encode(cont, add_special_tokens=False)
        ids = torch.tensor([ctx_enc + cont_enc])
        labels = torch.full_like(ids, -100)
        labels[0, len(ctx_enc):] = torch.tensor(cont_enc)
        saved = {}

        def pre_hook(layer):
            def hook(mod, args):
                x = args[0]
                saved[layer] = {"x": x}  # noqa: B023 - hooks live only within this example
                x.register_hook(lambda g: saved[layer].__setitem__("grad", g))  # noqa: B023
            return hook

        hooks = [layers[l].self_attn.out_proj.register_forward_pre_hook(pre_hook(l)) for l in range(n_layers)]
        try:
            with torch.enable_grad():
                # The weights are frozen here: a leaf embedding makes every activation need a grad.
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                loss = model(inputs_embeds=emb, attention_mask=torch.ones_like(ids), labels=labels).loss
                loss.backward()
        finally:
            for h in hooks:
                h.remove()
        for l in range(n_layers):
            x, g = saved[l]["x"].detach()[0], saved[l]["grad"][0]  # [N, H*D]
            n = x.shape[0]
            dot = (x.view(n, n_heads, -1) * g.view(n, n_heads, -1)).sum(-1).double()  # [N, H]
            score[l] += dot.abs().sum(0)
        tot_tokens += ids.shape[1] - 1  # N tokens: gradients over N - 1 positions
        eff_tokens += len(cont_enc)  # the last layer reaches the loss only at the label positions
    score[:-1] /= tot_tokens
    score[-1] /= eff_tokens
    return score, tot_tokens, eff_tokens


def test_importance_default_is_the_originals_calculate_importance(opt_lm):
    reqs = build_requests("copa", split="train", shot=1, limit=5, data_dir=data_dir())
    ref, tot, eff = original_importance(opt_lm, reqs)
    st = gradient_importance(opt_lm, reqs, batch_size=3)  # per-example mean loss: batch size does not matter
    assert (st.n_tokens, st.n_cont_tokens) == (tot, eff) and eff < tot
    got = st.result()["heads"].double()  # default normalize="paper"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)
    one = gradient_importance(opt_lm, reqs, batch_size=1).result()["heads"].double()
    torch.testing.assert_close(one, got, rtol=1e-5, atol=0)
    # all_tokens (our option): the same layers 0..L-2; the last layer divided by input tokens instead.
    alt = st.result(normalize="all_tokens")["heads"].double()
    torch.testing.assert_close(alt[:-1], got[:-1], rtol=1e-6, atol=0)
    torch.testing.assert_close(alt[-1], got[-1] * eff / tot, rtol=1e-6, atol=0)
    assert not torch.allclose(alt[-1], got[-1])


# The original's doc_to_cont per task: its `get_dataloader` passes `self.doc_to_cont` (arc.py,
# hellaswag.py, piqa.py, openbookqa.py: `doc['choices'][doc['gold']]`, no leading space) or
# `self.doc_to_target` (every other task), to `utils.create_dataloader`.
BARE_CHOICE = {"arc_easy", "arc_challenge", "hellaswag", "piqa", "openbookqa"}
ALL_TASKS = ["hellaswag", "piqa", "arc_easy", "arc_challenge", "openbookqa", "winogrande", "boolq", "cb",
             "copa", "wic", "wsc", "multirc", "rte", "record"]


def original_doc_to_cont(task, row):
    t = get_task(task)
    if task in BARE_CHOICE:
        d = t.convert(row)  # the original's _process_doc: {"query", "choices", "gold"}
        return d["choices"][d["gold"]]
    return t.doc_to_target(row)


def get_input_from_ctx_cont(ctx, continuation, tokenizer):
    """`lm_eval/utils.py::get_input_from_ctx_cont`, without the padding to 2,048: (ids, len ctx, len cont)."""
    ctx_enc = [tokenizer.eos_token_id] if ctx == "" else tokenizer.encode(ctx, add_special_tokens=False)
    continuation_enc = tokenizer.encode(continuation, add_special_tokens=False)
    return ctx_enc + continuation_enc, len(ctx_enc), len(continuation_enc)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_importance_input_is_get_input_from_ctx_cont(task, opt_lm):
    """The default importance input (`importance.continuation=paper`) is the original's, token for
    token: fewshot_context(doc, k) and the task's doc_to_cont, tokenised apart and concatenated.
    `scoring` is the gold pair as scored; the two differ exactly for the bare-choice tasks."""
    t, tok = get_task(task), opt_lm.tokenizer
    rows = load_split(t, "train", data_dir())
    reqs = build_requests(task, split="train", shot=1, limit=4, data_dir=data_dir())
    paper, scoring = importance_inputs(opt_lm, reqs), importance_inputs(opt_lm, reqs, "scoring")
    for r, got, alt in zip(reqs, paper, scoring):
        demos = [rows[j] for j in demo_ids(task, r.doc_id, split="train", shot=1, data_dir=data_dir())]
        cont = original_doc_to_cont(task, rows[r.doc_id])
        ids, _, n_cont = get_input_from_ctx_cont(t.fewshot_context(rows[r.doc_id], demos), cont, tok)
        ids = ids[-(opt_lm.max_length + 1):]  # ours cuts long inputs from the left (docs/fidelity.md)
        assert got == (ids[:-1], ids[-n_cont:])  # the last token is only a target
        assert (alt == got) == (task not in BARE_CHOICE)
        if task in BARE_CHOICE:
            assert not cont.startswith(" ") and r.pair(r.gold_index())[1] == " " + cont
    with pytest.raises(ValueError, match="importance.continuation='bare'"):
        importance_inputs(opt_lm, reqs, "bare")


@pytest.mark.parametrize("task", ["copa", "winogrande", "multirc", "record", "wsc"])
def test_importance_pair_is_fewshot_context_and_doc_to_target(task):
    """The original's importance example (`utils.create_dataloader`) is (fewshot_context(doc),
    doc_to_target(doc)); ours is the request's gold pair: the same strings (ReCoRD: the first sorted
    answer, winogrande: the context ending in the right option)."""
    t = get_task(task)
    rows = load_split(t, "train", data_dir())
    for r in build_requests(task, split="train", shot=1, limit=6, data_dir=data_dir()):
        demos = [rows[j] for j in demo_ids(task, r.doc_id, split="train", shot=1, data_dir=data_dir())]
        assert r.pair(r.gold_index()) == (t.fewshot_context(rows[r.doc_id], demos), t.doc_to_target(rows[r.doc_id]))
        assert r.importance_pair() == r.pair(r.gold_index())  # doc_to_cont is doc_to_target here


# --- 2. the paper's rank statistic --------------------------------------------------------------

def test_argsort_spearman_is_the_papers_statistic():
    a = torch.tensor([0.1, 0.4, 0.2, 0.3])
    b = torch.tensor([0.4, 0.1, 0.2, 0.3])
    # By hand. argsort(a) = [0, 2, 3, 1], argsort(b) = [1, 2, 3, 0]; their ranks [1, 3, 4, 2] and
    # [2, 3, 4, 1], d = [-1, 0, 0, 1], sum d^2 = 2: rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    # True Spearman: ranks of a [1, 4, 2, 3], of b [4, 1, 2, 3], d = [-3, 3, 0, 0], sum d^2 = 18:
    # rho = 1 - 6 * 18 / 60 = -0.8.
    assert argsort_spearman(a, b) == pytest.approx(0.8)
    assert spearman(a, b) == pytest.approx(-0.8)
    # The original (scripts/plotting/spearman_rankings.py): spearmanr over torch.sort(scores)[1] rows.
    rows = np.stack([torch.sort(x.view(-1))[1].numpy() for x in (a, b)])
    assert stats.spearmanr(rows, rows, axis=1).correlation[0, 1] == pytest.approx(0.8)
    # [layers, heads] tensors are flattened layer-major, as the original's .view(-1).
    assert argsort_spearman(a.view(2, 2), b.view(2, 2)) == pytest.approx(0.8)
    assert argsort_spearman(a, a) == 1.0 and spearman(a, a) == pytest.approx(1.0)


def test_aggregate_is_the_raw_mean_over_tasks():
    """`spearman_rankings.py --aggregate`: sum of the tasks' raw scores / number of tasks."""
    imp = {"x": torch.tensor([[0.1, 4.0], [0.2, 0.3]]), "y": torch.tensor([[0.4, 0.0], [0.2, 0.3]]),
           "z": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    ref = (imp["x"] + imp["y"] + imp["z"]) / 3
    torch.testing.assert_close(aggregate(imp), ref)
    torch.testing.assert_close(aggregate(imp, leave_out=["z"]), (imp["x"] + imp["y"]) / 2)


# --- 3. number removed: floor, as lm_eval/models/opt.py ---------------------------------------------

def test_number_removed_is_the_originals_floor():
    # OPT-66B: 64 layers x 72 heads = 4,608 heads, 64 FFNs; the original: int(p) * n // 100.
    for n in (4608, 64, 8, 10, 2):
        for p in range(0, 101):
            assert n_removed(p, n) == int(p) * n // 100, (p, n)
    # The paper's levels on 4,608 heads (p * 46.08, rounded down by hand).
    assert [n_removed(p, 4608) for p in range(0, 100, 10)] == [0, 460, 921, 1382, 1843, 2304, 2764, 3225,
                                                               3686, 4147]
    # Fractional levels are ours only (the original parses int(head_percent_mask)): still floor.
    assert n_removed(7.5, 4608) == 345  # 345.6
    # count="round" (our option) differs where the fraction is >= .5: FFNs 64 * 0.9 = 57.6,
    # 64 * 0.2 = 12.8, heads 4608 * 0.1 = 460.8; and agrees at 64 * 0.3 = 19.2.
    assert (n_removed(90, 64), n_removed(90, 64, count="round")) == (57, 58)
    assert (n_removed(20, 64), n_removed(20, 64, count="round")) == (12, 13)
    assert (n_removed(10, 4608), n_removed(10, 4608, count="round")) == (460, 461)
    assert n_removed(30, 64) == n_removed(30, 64, count="round") == 19


@pytest.mark.parametrize("p", [10, 33, 50, 90])
def test_head_mask_removes_the_originals_heads(p):
    imp = torch.rand(64, 72, generator=torch.Generator().manual_seed(p))
    # lm_eval/models/opt.py::HFLM.__init__, verbatim in meaning:
    head_indices = list(torch.sort(imp.view(-1))[1].numpy())[: int(p) * 4608 // 100]
    ref = torch.ones(4608)
    ref[head_indices] = 0.0
    mask = prune_mask(imp, p)
    assert mask.shape == (64, 72) and int((mask == 0).sum()) == int(p) * 4608 // 100
    assert torch.equal(mask.view(-1), ref)
    removed, kept = imp[mask == 0], imp[mask == 1]
    assert removed.max() < kept.min()  # the lowest ones


@pytest.mark.parametrize("p", [10, 30, 50, 90])
def test_ffn_mask_from_knockout_drops_is_the_originals(p):
    """`scripts/plotting/fc_importance.py --dump_fc_importance`: FFN ids sorted by accuracy drop
    (Python's stable sort: ties keep the lower layer first); `mask_iterative_fc` removes the first
    int(p) * 64 // 100 of them. Knock-out drops tie often (accuracies are multiples of 1/n_docs)."""
    g = torch.Generator().manual_seed(p)
    drops = (torch.randint(-3, 4, (64,), generator=g).float() / 200) * 100  # many ties
    order = [i for i, _ in sorted(zip(range(64), drops.tolist()), key=lambda x: x[1])]
    ref = torch.ones(64)
    ref[order[: int(p) * 64 // 100]] = 0.0
    assert torch.equal(prune_mask(drops, p), ref)


# --- 4. one ranking, nested masks (the paper's "iterative" pruning) -------------------------------

def test_default_curve_nests_masks_from_one_ranking():
    imp = torch.rand(4, 6, generator=torch.Generator().manual_seed(1))
    levels = list(range(0, 100, 10))
    seen = {}

    def evaluate(mask):
        seen[len(seen)] = mask.clone()
        return {"removed": int((mask == 0).sum())}

    out = curve(imp, levels, evaluate)  # default: rescore=None
    masks = [seen[i] for i in range(len(levels))]
    for p, m in zip(levels, masks):
        # The original: each level is a fresh run masking the first int(p) * n // 100 of one sort.
        ref = torch.ones(24)
        ref[torch.sort(imp.view(-1))[1][: p * 24 // 100]] = 0.0
        assert torch.equal(m.view(-1), ref) and out[float(p)]["removed"] == p * 24 // 100
    for lo, hi in zip(masks, masks[1:]):
        assert bool((hi <= lo).all())  # nested: a removed head stays removed

    calls = []

    def rescore(mask):  # our option: a new ranking after each level, removed heads kept removed
        calls.append(mask.clone())
        return torch.rand(4, 6, generator=torch.Generator().manual_seed(len(calls) + 10))

    seen.clear()
    curve(imp, levels, evaluate, rescore=rescore)
    assert len(calls) == len(levels) - 1
    masks = [seen[i] for i in range(len(levels))]
    assert all(bool((hi <= lo).all()) for lo, hi in zip(masks, masks[1:]))
    assert any(not torch.equal(a, b) for a, b in zip(masks, [prune_mask(imp, p) for p in levels]))


def test_config_has_rescore_each_level_off_and_no_iterative_key():
    cfg = compose()
    assert cfg["pruning"]["rescore_each_level"] is False and "iterative" not in cfg["pruning"]
    assert cfg["pruning"]["count"] == "floor" and cfg["pruning"]["ffn_ranking"] == "knockout"
    assert cfg["pruning"]["levels"] == list(range(0, 100, 10))
    assert cfg["importance"]["normalize"] == "paper" and cfg["importance"]["docs"] == "training_docs"
    assert cfg["importance"]["n_examples"] == 2500 and cfg["importance"]["abs"] == "per_token"
    assert cfg["importance"]["normalize_layers"] is False and cfg["importance"]["continuation"] == "paper"
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("pruning.iterative=true")  # the old name is gone, not silently ignored


# --- 5. copying score: the original's definition by default ------------------------------------------

# lm_eval/prefix_matching_copying.py: every layer reads the token + position embeddings, the OV image
# of the query token's own value, out_proj bias added, no final LayerNorm, softmax over the vocabulary.
ORIGINAL_COPYING = {"input": "embeddings", "source": "query", "final_norm": "none", "softmax": True, "o_bias": True}


def test_copying_default_is_the_originals():
    assert asdict(CopyingOptions()) == ORIGINAL_COPYING
    assert CopyingOptions() == CopyingOptions.paper()
    assert copying_options_from({}) == copying_options_from(None) == CopyingOptions.paper()
    block = compose()["induction"]["copying"]
    assert block["preset"] == "paper" and copying_options_from(block) == CopyingOptions.paper()
    # The shipped fields are the original's too, so preset=custom with them changes nothing.
    assert copying_options_from({**block, "preset": "custom"}) == CopyingOptions.paper()
    other = copying_options_from(compose("induction.copying.preset=head_output")["induction"]["copying"])
    assert other == CopyingOptions.head_output() != CopyingOptions.paper()
    assert asdict(other) == {"input": "embeddings", "source": "output", "final_norm": "fold", "softmax": False,
                             "o_bias": False}


# --- 6. no </s> prefix for OPT ----------------------------------------------------------------------

class OptLikeTokenizer:
    """What OPT's tokenizer does: add_special_tokens=True prepends </s> (id 2)."""

    def __call__(self, text, add_special_tokens=True):
        ids = [100 + ord(c) for c in text]
        return {"input_ids": ([2] if add_special_tokens else []) + ids}


def test_opt_presets_add_no_document_start_token():
    presets = sorted((CONF_DIR / "model").glob("opt-*.yaml"))
    assert len(presets) == 8
    for path in presets:
        spec = yaml.safe_load(path.read_text())
        assert spec["doc_start"] == "none", path.name
        assert document_start_ids(OptLikeTokenizer(), spec["doc_start"]) == []
    assert document_start_ids(OptLikeTokenizer(), "auto") == [2]  # the option that would add </s>


def test_scored_ids_are_ctx_enc_plus_cont_enc(opt_lm):
    """The original: ctx_enc + cont_enc, each tokenised with add_special_tokens=False; the scorer's
    input is all but the last token (`BaseLM._loglikelihood_tokens`)."""
    tok = opt_lm.tokenizer
    reqs = build_requests("copa", split="validation", shot=1, limit=4, data_dir=data_dir())
    tk = Tokenised(opt_lm, reqs)
    for r in reqs:
        for i in range(r.n_choices):
            ctx, cont = r.pair(i)
            full = tok.encode(ctx, add_special_tokens=False) + tok.encode(cont, add_special_tokens=False)
            assert tk.pair(ctx, cont) == (full[:-1], tok.encode(cont, add_special_tokens=False))
    pairs = importance_inputs(opt_lm, reqs)
    for r, (inp, cont) in zip(reqs, pairs):
        ctx, c = r.pair(r.gold_index())
        assert inp + cont[-1:] == tok.encode(ctx, add_special_tokens=False) + tok.encode(c, add_special_tokens=False)


# --- 7. WSC importance docs are its positive train rows ------------------------------------------------

def _train_labels(task):
    path = data_dir() / task / "train.jsonl"
    return [json.loads(line)["label"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _render(tmp_path, lm, task, *overrides):
    run = ShardRun(tiny_shard_cfg(tmp_path, task, 1, "tiny-opt", *overrides), lm)
    return run.render()


def test_wsc_importance_docs_are_positive_train_rows(tmp_path, opt_lm):
    labels = _train_labels("wsc")
    positives = [i for i, y in enumerate(labels) if y]
    assert 0 < len(positives) < len(labels)
    # SGWinogradSchemaChallenge.training_docs: the train rows with label true; the first n of them.
    reqs = _render(tmp_path / "a", opt_lm, "wsc", "importance.n_examples=5")
    assert [r.doc_id for r in reqs.importance] == positives[:5]
    reqs = _render(tmp_path / "b", opt_lm, "wsc", "importance.n_examples=1000")
    assert [r.doc_id for r in reqs.importance] == positives
    assert all(r.continuations[r.gold_index()] == " yes" for r in reqs.importance)
    # importance.docs=all_train (our option): every train row, negatives included.
    reqs = _render(tmp_path / "c", opt_lm, "wsc", "importance.n_examples=1000", "importance.docs=all_train")
    assert [r.doc_id for r in reqs.importance] == list(range(len(labels)))
    assert any(not labels[r.doc_id] for r in reqs.importance)


# --- 8. FFN knock-out on the eval split -----------------------------------------------------------------

def test_knockout_default_is_the_eval_split(tmp_path, opt_lm):
    assert compose()["knockout"]["split"] == "paper"
    n_train = len(_train_labels("copa"))
    reqs = _render(tmp_path / "a", opt_lm, "copa")
    # scripts/get_fc_ranking.py ranks FFNs by the drop of the evaluation results: the eval docs.
    assert reqs.knockout is reqs.eval
    assert [r.doc_id for r in reqs.importance] == list(range(8))  # the first train docs
    # knockout.split=heldout (our option): the last knockout.limit train docs, cut from the pool.
    reqs = _render(tmp_path / "b", opt_lm, "copa", "knockout.split=heldout", "importance.n_examples=1000")
    assert [r.doc_id for r in reqs.knockout] == list(range(n_train - 6, n_train))
    assert [r.doc_id for r in reqs.importance] == list(range(n_train - 6))


# --- 8. the paper preset: induction in float32, evaluation and importance in float16 ------------------

def test_paper_preset_runs_induction_in_float32():
    """`lm_eval/prefix_matching_copying.py` loads OPT with no torch_dtype (float32); `lm_eval/models/opt.py`
    (importance, evaluation) with torch_dtype=torch.float16."""
    from icl_scale.induction.job import induction_model_spec, induction_settings

    cfg = compose("experiment=paper")
    assert cfg["model"]["dtype"] == "float16" and cfg["induction"]["dtype"] == "float32"
    spec = induction_model_spec(cfg, induction_settings(cfg))
    assert spec["dtype"] == "float32" and {k: v for k, v in spec.items() if k != "dtype"} == {
        k: v for k, v in cfg["model"].items() if k != "dtype"}
    plain = compose()  # null: the model's own dtype
    assert induction_model_spec(plain, induction_settings(plain)) == plain["model"]
