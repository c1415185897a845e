"""The offline planner (icl_scale/plan.py): exact parameter counts against the real transformers
models built from the same numbers, hand-computed memory and FLOPs for a small config, and the
one-line errors."""

import math
import re

import pytest
import torch

from icl_scale import plan as P

from conftest import compose, data_dir


def model_params(arch: P.Arch, device: str = "meta") -> int:
    """The parameter count of the transformers model with these numbers (meta device: no memory;
    "cpu": a real randomly initialised model)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    if arch.family == "opt":
        cfg = OPTConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                        num_attention_heads=arch.heads, ffn_dim=arch.ffn, max_position_embeddings=arch.max_positions,
                        word_embed_proj_dim=arch.embed_dim or arch.hidden, do_layer_norm_before=arch.final_norm,
                        tie_word_embeddings=arch.tied)
    else:
        cfg = LlamaConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                          num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
                          intermediate_size=arch.ffn, max_position_embeddings=arch.max_positions,
                          tie_word_embeddings=arch.tied)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-llama", "smollm2-135m", "opt-125m", "opt-350m", "opt-1.3b"])
def test_parameter_count_equals_the_model(preset):
    arch = P.Arch.from_spec(compose(f"model={preset}")["model"])
    assert P.n_params(arch) == model_params(arch)
    if preset.startswith("tiny-"):  # small enough to build for real, random init
        assert P.n_params(arch) == model_params(arch, "cpu")


def test_parameter_count_by_hand_and_the_loaded_tiny_models():
    from conftest import get_model

    # tiny-llama: 49152 x 64 embeddings (tied); per block q 64x64, k/v 64x32 each, o 64x64, gate/up/down
    # 64x128 each, 2 norms of 64; final norm 64.
    block = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert P.n_params(P.Arch.from_spec(compose("model=tiny-llama")["model"])) == 49152 * 64 + 2 * block + 64
    for preset in ("tiny-opt", "tiny-llama"):
        real = sum(p.numel() for p in get_model(preset).model.parameters())
        assert P.n_params(P.Arch.from_spec(compose(f"model={preset}")["model"])) == real, preset
    opt66 = P.n_params(P.Arch.from_spec(compose("model=opt-66b")["model"]))
    assert abs(opt66 - 65.7e9) / 65.7e9 < 0.01


def plan_cfg(*overrides: str, **plan) -> dict:
    """The planner's config (conf/plan.yaml) with these overrides and `plan` keys."""
    cfg = P.compose(list(overrides))
    cfg["plan"].update(plan)
    return cfg


def test_memory_by_hand():
    a = P.Arch("llama", layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=1000, max_positions=256)
    # KV: 2 (k, v) x 2 layers x 2 kv heads x 16 head dim x 100 tokens x 3 docs x 2 bytes
    assert P.kv_bytes(a, batch=3, length=100, nbytes=2) == 2 * 2 * 2 * 16 * 100 * 3 * 2
    cfg = plan_cfg("model=tiny-llama", gpus=1, gpu_mem_gb=80, offload="none", scored_tokens=8)
    pl = P.make_plan(cfg)
    n = P.n_params(P.Arch.from_spec(cfg["model"]))
    assert pl.param_bytes_per_rank == n * 4  # float32, one GPU: the whole model
    # float32 logits at the 8 scored positions of each of 3 docs, logits + log-softmax (+ grad: 3)
    assert P.logits_bytes(a, batch=3, scored=8, copies=2) == 2 * 3 * 8 * 1000 * 4
    # eval at batch 8, 256 tokens (tiny-llama's max_length), float32: params + KV + one block + logits
    kv = 2 * 2 * 2 * 16 * 256 * 8 * 4
    block = 8 * 256 * (4 * 64 + 2 * 128 + (4 + 2 * 2) * 16) * 4
    assert pl.eval_bytes_per_rank == n * 4 + kv + block + 2 * 8 * 8 * 49152 * 4
    assert pl.fits
    # host: one GPU, no ZeRO: the whole model plus the runtime; 8 ZeRO-3 ranks: an eighth plus the embedding
    assert pl.host_bytes_per_rank == n * 4 + P.HOST_RUNTIME_GB * 2**30
    z = plan_cfg("model=tiny-llama", "model.deepspeed.enabled=true")
    assert P.host_bytes_per_rank(z, 8) == n * 4 / 8 + 49152 * 64 * 4 + P.HOST_RUNTIME_GB * 2**30


COUNTS = P.TaskCounts("copa", 1, eval_docs=10, train_docs=30, eval_tokens=200, eval_scored=8, imp_tokens=150,
                      imp_scored=4, multi_token=True, source="by hand")


def _by_hand_cfg(*extra: str, **plan) -> dict:
    return plan_cfg("model=tiny-llama", "model.deepspeed.enabled=true", "eval.batch_size=4", "importance.batch_size=3",
                    "importance.n_examples=5", "knockout.split=heldout", "knockout.limit=4", "pruning.levels=[0,50]",
                    "pruning.combined_levels=[0,50]", *extra, gpus=2, peak_tflops=100, utilization=0.5,
                    interconnect="pcie", layer_call_ms=2.0, pass_call_ms=0.5, startup_s=30.0, load_gbs=1.0,
                    tokenize_ktok_s=10.0, **plan)


def test_passes_gathers_flops_and_seconds_by_hand():
    cfg = _by_hand_cfg(gpu_mem_gb=0.001)  # ~1 MB per GPU: one mask per pass, prefix and continuation passes
    a = P.Arch.from_spec(cfg["model"])
    assert P.doc_counts(cfg, COUNTS) == (10, 5, 4)
    t = P.shard_time(cfg, COUNTS, 2)  # no data: the table's documents, every one 192 + 8 tokens
    s = t.schedule
    # curves: the unpruned list (knock-out ran on train docs), heads 50% (4 of 8), FFN 50% (1 of 2), the
    # grid's (50, 50): 4 scorings of 10 docs, 5 per rank: 2 prefix passes + 2 continuation passes each
    assert (s.eval_runs, s.eval_scorings, s.curves.forwards, s.curves.unembed) == (4, 4, 16, 8)
    # knock-out: unpruned + one per FFN (ZeRO-3: whole scorings) of 4 docs, 2 per rank: 1 + 1 passes
    assert (s.knockout_runs, s.knockout_scorings, s.knockout.forwards) == (3, 3, 6)
    assert (s.importance.forwards, s.importance.backward) == (1, 1)  # ceil(5 / (3 x 2)) steps
    blocks = 2 * P.layer_params(a)
    fwd = 2 * blocks * 200 + 2 * 2 * 200**2 * 64 + 2 * 49152 * 64 * 8
    assert P.forward_flops(a, 200, 8) == fwd
    imp = 2 * blocks * 150 + 2 * 2 * 150**2 * 64 + 2 * 49152 * 64 * 4
    flops = 4 * 10 * fwd + 2 * 5 * imp + 3 * 4 * fwd
    assert t.compute_s == pytest.approx(flops / (2 * 100e12 * 0.5))
    model, unembed = P.n_params(a) * 4, 49152 * 64 * 4  # tied: the base pass gathers the embedding too
    # the other rank's half; the unembedding again for each of its own calls and the backward, not
    # for the importance's whole-model call (tied: its embedding, still whole)
    assert t.gathered_bytes == pytest.approx(((23 + 1) * model + (12 - 1 + 1) * unembed) / 2)
    assert t.comm_s == pytest.approx(t.gathered_bytes / 32e9)  # PCIe 4.0 x16
    assert t.calls_s == pytest.approx((23 + 1) * (0.5e-3 + 3 * 2e-3))  # forwards + backward: a pass, 2 blocks + 1
    tokens = (1 + 4) * 10 * 200 + (1 + 3) * 4 * 200 + 2 * 5 * 150
    assert t.start_s == pytest.approx(30 + model / 1e9 + tokens / 10e3)
    assert t.total_s == pytest.approx(t.start_s + t.compute_s + t.comm_s + t.calls_s)
    assert P.shard_time(cfg, COUNTS, 1).comm_s == 0  # one rank, no offload: nothing to gather


def test_zero3_passes_share_masks_and_pack_as_memory_allows():
    """The scorer's ZeRO-3 schedule (evaluator.zero3_masks_per_pass, packed.packable) from the plan's
    GPU memory: with room, a step is one whole-model call, and masks share passes."""
    one_mask = P.shard_time(_by_hand_cfg("eval.masks_per_pass=1", gpu_mem_gb=80), COUNTS, 2)
    s = one_mask.schedule  # packed: each scoring of 5 docs per rank at batch 4 is 2 whole-model calls
    assert (s.curves.base, s.curves.model, s.curves.unembed, s.eval_scorings) == (0, 8, 8, 4)
    assert (s.knockout.base, s.knockout.model, s.knockout_scorings) == (0, 3, 3)  # 2 docs per rank: 1 call each
    shared = P.shard_time(_by_hand_cfg(gpu_mem_gb=80), COUNTS, 2)
    s = shared.schedule  # auto: the 4 curve masks in one scoring (20 units per rank at batch 4 x 4: 2 calls),
    assert (s.curves.model, s.eval_scorings, s.knockout.model, s.knockout_scorings) == (2, 1, 1, 1)  # 3 knock-outs: 1
    a = P.Arch.from_spec(_by_hand_cfg()["model"])
    model, unembed = P.n_params(a) * 4, 49152 * 64 * 4
    calls = 2 + 1 + 1  # curves, knock-out, importance: whole-model calls, each with its unembedding; + 1 backward
    assert shared.gathered_bytes == pytest.approx(((calls + 1) * model + 1 * unembed) / 2)  # the backward's
    assert shared.compute_s == pytest.approx(one_mask.compute_s)  # the same FLOPs in fewer calls
    assert shared.total_s < one_mask.total_s


def test_a_shard_over_the_time_limit_is_flagged_with_what_to_do():
    cfg = plan_cfg("model=tiny-llama", "model.deepspeed.enabled=true", "launcher.timeout_min=1",
                   "importance.n_examples=5", "pruning.levels=[0,50]", "pruning.combined_levels=[0,50]", gpus=2,
                   peak_tflops=1e-3, utilization=1.0, startup_s=1.0)
    big = P.TaskCounts("rte", 5, eval_docs=400, train_docs=30, eval_tokens=500, eval_scored=2, imp_tokens=500,
                       imp_scored=1, multi_token=False, source="by hand")
    pl = P.make_plan(cfg)
    [small, over] = P.plan_shards(cfg, pl, [COUNTS, big])
    hours = P.shard_time(cfg, big, 2).hours
    assert not small.over_limit and over.over_limit and over.hours == pytest.approx(hours) and hours > 1 / 60
    requeues, gpus, limit = re.fullmatch(r"over the 0.0166667 h limit: (\d+) requeues \(its checkpoints resume it\)"
                                         r"(?:, or gpus=(\d+))?, or eval.limit=(\d+)", over.advice).groups()
    assert int(requeues) == math.ceil(hours * 60) - 1
    if gpus:
        assert P.shard_time(cfg, big, int(gpus)).hours <= 1 / 60
    at = {**cfg, "eval": {**cfg["eval"], "limit": int(limit)}}
    beyond = {**cfg, "eval": {**cfg["eval"], "limit": int(limit) + 1}}
    assert P.shard_time(at, big, 2).hours <= 1 / 60 < P.shard_time(beyond, big, 2).hours
    text = P.render_shards([small, over], cfg)
    assert f"rte 5-shot: {hours:.1f} h, over the" in text


def test_docs_and_tokens_are_counted_from_the_data_or_come_from_the_table():
    from icl_scale.models.loading import load_tokenizer, preset
    from icl_scale.tasks import build_requests

    tok = load_tokenizer(preset("smollm2-135m"))
    c = P.count_from_data("copa", 1, data_dir(), tok, sample=5)
    rows = (data_dir() / "copa" / "validation.jsonl").read_text().splitlines()
    assert c.eval_docs == len(rows) and c.source.startswith("data: mirror")

    def n(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    reqs = build_requests("copa", shot=1, limit=5, data_dir=data_dir())
    want = sum(n(r.contexts[0]) + sum(n(x) for x in r.continuations) for r in reqs) / 5
    assert c.eval_tokens == pytest.approx(want)
    assert c.eval_scored == pytest.approx(sum(n(x) for r in reqs for x in r.continuations) / 5)
    counts = P.task_counts(plan_cfg(f"data.dir={data_dir()}", "sweep.tasks=[copa]", "sweep.shots=[1]",
                                    token_sample=5))
    assert counts == [c]
    # no data at hand: the full split from the table, with its source
    [h] = P.task_counts(plan_cfg("data.dir=hub", "sweep.tasks=[hellaswag]", "sweep.shots=[5]"))
    assert h.eval_docs == 10042 and h.source == "table: Rowan/hellaswag (Zellers et al. 2019)"


@pytest.mark.slow  # the paper's 42 shards through the scorer's schedule: ~35 s on one core
def test_cli_prints_the_plan_and_names_the_fix_when_it_does_not_fit(capsys):
    # OPT-66B, float16, its batch sizes; one task (the 42 shards' schedules take minutes with a mirror; the
    # table and the over-time advice are tested above)
    assert P.main(["experiment=paper", "gpus=8", "gpu_mem_gb=80", "sweep.tasks=[copa]"]) == 0
    out = capsys.readouterr().out
    assert "65,719,701,504 parameters" in out and "fits                 yes" in out
    assert P.main(["model=opt-66b", "gpus=1", "gpu_mem_gb=40", "model.dtype=float16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: a shard does not fit 1 x 40 GB") and "offload=cpu" in err[-1]
    assert P.main(["model=opt-66b", "offload=nvme"]) == 2
    assert "offload='nvme': use offload=none or offload=cpu" in capsys.readouterr().err
    assert P.main(["model=tiny-gpt2"]) == 2
    assert "add a model.arch block" in capsys.readouterr().err


def test_largest_fitting_limit_is_the_bisections_in_fewer_probes():
    """The eval.limit advice: the largest limit within the hours (as a bisection finds it), in a few probes
    when the hours are nearly linear in the docs, never in more than about twice a bisection's."""
    for n, fixed, slope, curve, limit in [(10_000, 0.5, 0.01, 0.0, 40.0), (4848, 1.7, 0.012, 1e-6, 48.0),
                                          (100, 0.0, 1.0, 0.0, 0.5), (7, 2.0, 1.0, 0.5, 2.9)]:
        def hours(x, probes=(probes := []), fixed=fixed, slope=slope, curve=curve):
            probes.append(x)
            return fixed + slope * x + curve * x * x
        got = P.largest_fitting(hours, n, fixed + slope * n + curve * n * n, limit)
        want = max([0] + [x for x in range(1, n) if fixed + slope * x + curve * x * x <= limit])
        assert got == want
        assert len(probes) <= 2 * n.bit_length() + 2
        if curve == 0 and n > 1000:
            assert len(probes) <= 4  # linear: the interpolation lands at once
