"""Induction-head scores: a trained induction model, slow reference implementations (the original
code's per-head/per-token loops), determinism, bad input and the reducer helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from icl_scale.induction import (
    CopyingOptions,
    InductionConfigError,
    expected_uniform_prefix,
    induction_scores,
    make_sequences,
    mask_from_ranking,
    prefix_targets,
    ranking_masks,
    retained_capacity,
    run_job,
    token_pool,
)
from icl_scale.induction.job import CONFIG_KEYS, induction_key
from icl_scale.induction.reference import reference_copying, reference_prefix_matching
from icl_scale.models import Adapter, Gates, UnsupportedArchitecture, load_model
from icl_scale.pruning import random_ranking

from conftest import compose

ROOT = Path(__file__).resolve().parents[1]

# Random init attends almost uniformly, which gives ~expected_uniform_prefix(n) (0.06-0.1 for the
# lengths below); a real induction head scores > 0.5. Threshold between the two:
RANDOM_INIT_MAX_PREFIX = 0.2
V = 64  # trained model's vocabulary
TEST_LENGTHS = [8, 10, 12, 14]  # 4n distinct tokens must fit the 59-token pool


# --- a model that really has induction heads ----------------------------------------------------

def _llama(V: int, heads: int, kv: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def _repeated_batch(gen, B: int, n: int):
    s = torch.stack([torch.randperm(V - 1, generator=gen)[:n] + 1 for _ in range(B)])
    return torch.cat([torch.zeros(B, 1, dtype=torch.long), s, s], 1)


def _second_half_loss(model, ids, n):
    logits = model(ids).logits[:, n:-1]
    return F.cross_entropy(logits.reshape(-1, V), ids[:, n + 1:].reshape(-1))


@pytest.fixture(scope="module")
def trained():
    """2-layer llama (RoPE, GQA 4 query / 2 KV heads), BOS + s + s with the loss on the second copy:
    the only way to lower it is an induction circuit (previous-token head in layer 0, induction
    head(s) in layer 1). ~350 steps, fixed seeds, one thread for reproducibility."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _llama(V, heads=4, kv=2, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        for _ in range(350):
            n = int(torch.randint(8, 25, (1,), generator=gen))
            loss = _second_half_loss(model, _repeated_batch(gen, 32, n), n)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().requires_grad_(False)
    return model


@pytest.mark.slow
def test_trained_model_has_induction_heads_and_detector_finds_them(trained):
    gen = torch.Generator().manual_seed(123)
    n = 16
    ids = _repeated_batch(gen, 16, n)
    ad = Adapter(trained)
    L, H = ad.geometry.n_layers, ad.geometry.n_heads
    with torch.no_grad():
        base = float(_second_half_loss(trained, ids, n))
        assert base < 1.0, "training did not produce an induction circuit"  # chance is ln(63) = 4.1
        # Independent criterion: a layer-1 head is an induction head if, with every other layer-1 head
        # zeroed, it alone keeps the second-copy loss far below the all-zeroed loss.
        all_off = torch.ones(L, H)
        all_off[1] = 0
        with Gates(ad, head_mask=all_off):
            none = float(_second_half_loss(trained, ids, n))
        alone = []
        for h in range(H):
            m = all_off.clone()
            m[1, h] = 1
            with Gates(ad, head_mask=m):
                alone.append(float(_second_half_loss(trained, ids, n)))
    induction = {(1, h) for h in range(H) if alone[h] < none - 1.0}
    assert induction, (none, alone)

    r = induction_scores(trained, bos=[0], lengths=TEST_LENGTHS, seed=0)
    pm = r.prefix_matching
    ranked = [(int(i) // H, int(i) % H) for i in pm.flatten().argsort(descending=True)]
    # Training grows redundant induction heads (each alone keeps most of the effect), so "its induction
    # head first" is checked as: the top head is one of them and all of them rank above every other head.
    assert ranked[0] in induction and set(ranked[:len(induction)]) == induction, (pm, none, alone)
    assert min(float(pm[h]) for h in induction) > 0.5
    others = [float(pm[h]) for h in ranked[len(induction):]]
    assert max(others) < RANDOM_INIT_MAX_PREFIX, pm  # the previous-token heads of layer 0 do not match prefixes
    assert r.frequency_proxy == "token_id" and r.bos_ids == [0]


def test_random_init_has_no_induction_head():
    model = _llama(V, heads=4, kv=2, seed=1).eval()
    r = induction_scores(model, bos=[0], lengths=TEST_LENGTHS, scores=("prefix_matching",))
    floor = max(expected_uniform_prefix(n) for n in TEST_LENGTHS)
    assert floor < RANDOM_INIT_MAX_PREFIX
    assert r.prefix_matching.max() < RANDOM_INIT_MAX_PREFIX, r.prefix_matching


def test_same_seed_same_scores(trained):
    a = induction_scores(trained, bos=[0], lengths=TEST_LENGTHS, seed=7)
    b = induction_scores(trained, bos=[0], lengths=TEST_LENGTHS, seed=7)
    c = induction_scores(trained, bos=[0], lengths=TEST_LENGTHS, seed=8)
    for k in ("prefix_matching", "copying", "prefix_matching_var", "copying_var"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert not torch.equal(a.copying, c.copying)


# --- slow references: the original code's loops (icl_scale.bench_induction) ---------------------------

OPTION_SETS = [CopyingOptions.head_output(), CopyingOptions.paper(),
               CopyingOptions(input="residual", source="query", final_norm="fold", o_bias=True)]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])  # learned positions + LayerNorm; RoPE + GQA
def test_matches_reference_loops(preset):
    lm = load_model(preset)
    lm.model.set_attn_implementation("eager")  # the reference reads output_attentions
    model, bos = lm.model, [0]
    lengths = [6, 9]
    pool, _ = token_pool(lm.tokenizer, 49152, 0.04, exclude_ids=bos)
    seqs = make_sequences(pool, lengths, seed=3)
    with torch.no_grad():
        ref_pm = torch.stack([reference_prefix_matching(model, torch.cat([torch.tensor(bos), s.repeat(4)])[None], n)
                              for n, (s, _) in zip(lengths, seqs)]).mean(0)
        for opts in OPTION_SETS:
            ref_cp = torch.stack([reference_copying(model, torch.cat([torch.tensor(bos), c])[None], opts)
                                  for _, c in seqs]).mean(0)
            for impl in ("eager", "sdpa"):
                model.set_attn_implementation(impl)
                r = induction_scores(lm, bos=bos, lengths=lengths, seed=3, copying=opts)
                tol = 1e-6 if impl == "eager" else 2e-5  # sdpa's forward differs from eager by ~1e-6
                assert (r.prefix_matching - ref_pm).abs().max() < tol, (impl, r.prefix_matching, ref_pm)
                assert (r.copying - ref_cp).abs().max() < tol, (impl, opts, r.copying, ref_cp)
                assert model.config._attn_implementation == impl  # restored after probing
            model.set_attn_implementation("eager")


def test_prefix_targets_strict_and_original():
    n, P = 5, 1
    rows, cols, c = prefix_targets(n, P, original_indexing=False)
    assert c == 3 * n and len(rows) == 6 * n
    seq = torch.arange(n).repeat(4)
    tokens = torch.cat([torch.tensor([-1]), seq])
    # every target is the successor of an earlier occurrence of the query's token
    assert torch.equal(tokens[cols - 1], tokens[rows]) and bool((cols < rows).all())
    r2, c2, _ = prefix_targets(n, P, original_indexing=True)
    extra = set(zip(r2.tolist(), c2.tolist())) - set(zip(rows.tolist(), cols.tolist()))
    assert extra == {(P + r * n + n - 1, P) for r in (1, 2, 3)}


# --- bad input -----------------------------------------------------------------------------------------

def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and isinstance(exc.value, ValueError)
    return msg


def test_bad_input():
    model = _llama(V, heads=4, kv=2, seed=1).eval()
    with pytest.raises(InductionConfigError) as e:
        induction_scores(model, bos=[0], n_seeds=0)
    assert "n_seeds" in _one_line(e)
    with pytest.raises(InductionConfigError) as e:
        induction_scores(model, bos=[0], n_seeds=3)  # lengths 25..29 need 116 of 59 tokens
    msg = _one_line(e)
    assert "59 tokens" in msg and "largest possible length is 14" in msg
    with pytest.raises(InductionConfigError) as e:
        induction_scores(model, bos=[0], lengths=[10], copying=CopyingOptions(source="keys"))
    assert "copying.source" in _one_line(e)

    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitecture) as e:
        induction_scores(bloom, bos=[0], lengths=[10])
    assert "bloom" in _one_line(e)


def test_context_too_short():
    lm = load_model("tiny-gpt2")  # 256 positions
    with pytest.raises(InductionConfigError) as e:
        induction_scores(lm, n_seeds=30)  # length 83 -> 333 tokens
    assert "largest possible length is 63" in _one_line(e)


def test_merge_rank_pool_excludes_both_ends():
    lm = load_model("tiny-gpt2")
    pool, proxy = token_pool(lm.tokenizer, 49152, 0.04)
    merges = json.loads(lm.tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert proxy == "bpe_merge_rank"
    e = int(0.04 * len(merges))
    first = lm.tokenizer.convert_tokens_to_ids("".join(merges[e]))
    assert int(pool[0]) == first and len(pool) <= len(merges) - 2 * e


# --- reducer helpers -------------------------------------------------------------------------------------

def test_retained_capacity_and_masks():
    scores = torch.tensor([[0.0, 1.0], [2.0, 7.0], [0.0, 0.0]])  # [L=3, H=2], total 10
    importance = torch.tensor([[5.0, 4.0], [3.0, 6.0], [1.0, 2.0]])
    # prune order by importance: (2,0) (2,1) (1,0) (0,1) (0,0) (1,1); 6 heads: 10% -> 0, 50% -> 3
    assert retained_capacity(scores, importance, levels=[0, 30, 50, 70, 90]) == \
        pytest.approx([1.0, 1.0, 0.8, 0.7, 0.7])
    m = mask_from_ranking(scores, 50)
    assert m.tolist() == [[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]  # the three zero scores go first
    masks = ranking_masks(scores, 50, n_random=4, seed=0)
    assert torch.equal(masks["induction"], m)
    assert len(masks["random"]) == 4 and all(int(r.sum()) == 3 for r in masks["random"])
    assert torch.equal(masks["random"][0], ranking_masks(scores, 50, n_random=4, seed=0)["random"][0])
    # the k-th random mask prunes by pruning.random_ranking(shape, seed + k), as a shard's heads_random<k>
    for k, r in enumerate(ranking_masks(scores, 50, n_random=3, seed=5)["random"]):
        assert torch.equal(r, mask_from_ranking(random_ranking(scores.shape, 5 + k), 50))
    with pytest.raises(InductionConfigError):
        retained_capacity(scores, importance[:2])


# --- the job ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_job_writes_store(tmp_path):
    """Run from another folder with the store named by ICL_SCALE_STORE: files in the store, none in the cwd."""
    cwd, root = tmp_path / "cwd", tmp_path / "store"
    cwd.mkdir()
    cmd = [sys.executable, str(ROOT / "jobs" / "induction.py"), "model=tiny-llama", "induction.n_seeds=2",
           "induction.progress=false"]
    env = {**os.environ, "ICL_SCALE_STORE": str(root)}
    subprocess.run(cmd, check=True, cwd=cwd, env=env, capture_output=True, timeout=300)
    assert not list(cwd.iterdir())  # no outputs/, .hydra/ or log file
    out = root / "tiny-llama" / "induction"
    from safetensors.torch import load_file

    t = load_file(out / "scores.safetensors")
    assert set(t) == {"prefix_matching", "copying", "prefix_matching_var", "copying_var"}
    assert all(v.shape == (2, 4) and v.dtype == torch.float32 for v in t.values())
    meta = json.loads((out / "scores.json").read_text())
    assert meta["n_seeds"] == 2 and len(meta["top_heads"]["prefix_matching"]) == 8
    assert all((out / f"{k}.png").stat().st_size > 0 for k in t)
    assert sorted(p.name for p in out.iterdir()) == sorted(["scores.safetensors", "scores.json",
                                                            *(f"{k}.png" for k in t)])


def test_a_rerun_with_the_same_settings_loads_nothing_and_a_changed_setting_recomputes(tmp_path, monkeypatch):
    """scores.json records the settings' hash: the same settings again are done (no model loaded, the
    files untouched, the sweep submits nothing), another n_seeds or store.force=true computes anew."""
    from icl_scale import models
    from icl_scale.sweep import induction_done

    cfg = _compose_induction("model=tiny-llama", "induction.n_seeds=2", "induction.progress=false",
                             f"store.root={tmp_path}")
    assert not induction_done(cfg)
    paths = run_job(cfg)
    meta = json.loads(Path(paths["json"]).read_text())
    assert meta["config_hash"] == induction_key(cfg) and induction_done(cfg)
    stamps = {k: Path(v).stat().st_mtime_ns for k, v in paths.items()}
    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda spec: loads.append(spec) or real(spec))
    again = run_job(cfg)
    assert loads == [] and again == paths and {k: Path(v).stat().st_mtime_ns for k, v in again.items()} == stamps
    more = _compose_induction("model=tiny-llama", "induction.n_seeds=3", "induction.progress=false",
                              f"store.root={tmp_path}")
    assert induction_key(more) != induction_key(cfg) and not induction_done(more)
    assert json.loads(Path(run_job(more)["json"]).read_text())["n_seeds"] == 3 and len(loads) == 1
    forced = _compose_induction("model=tiny-llama", "induction.n_seeds=3", "induction.progress=false",
                                f"store.root={tmp_path}", "store.force=true")
    assert not induction_done(forced)
    run_job(forced)
    assert len(loads) == 2


def _compose_induction(*overrides: str) -> dict:
    from icl_scale.config import compose

    return compose("induction", overrides)


def test_job_config_is_the_shared_config(monkeypatch):
    """conf/induction.yaml composes config.yaml: the same induction block the sweep's induction job
    gets, the same store (ICL_SCALE_STORE), model and experiment overrides; no code defaults."""
    monkeypatch.setenv("ICL_SCALE_STORE", "/somewhere/store")
    shared = compose()
    job = _compose_induction()
    assert job["induction"] == shared["induction"] and set(shared["induction"]) == set(CONFIG_KEYS)
    assert job["store"]["root"] == shared["store"]["root"] == "/somewhere/store"
    demo = _compose_induction("experiment=demo", "model=tiny-opt")
    assert demo["induction"] == compose("experiment=demo")["induction"] and demo["induction"]["n_seeds"] == 10
    assert demo["model"]["name"] == "tiny-opt"
    incomplete = {**shared, "induction": {k: v for k, v in shared["induction"].items() if k != "top_k"}}
    with pytest.raises(InductionConfigError, match="lacks induction.top_k"):
        run_job(incomplete)  # fails before loading the model
