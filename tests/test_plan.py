"""The offline planner (icl_scale/plan.py): exact parameter counts against the real transformers
models built from the same numbers, hand-computed memory and FLOPs for a small config, and the
one-line errors."""

import pytest
import torch

from icl_scale import plan as P

from conftest import compose


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


def test_memory_and_flops_by_hand():
    a = P.Arch("llama", layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=1000, max_positions=256)
    # KV: 2 (k, v) x 2 layers x 2 kv heads x 16 head dim x 100 tokens x 3 docs x 2 bytes
    assert P.kv_bytes(a, batch=3, length=100, nbytes=2) == 2 * 2 * 2 * 16 * 100 * 3 * 2
    cfg = compose("model=tiny-llama", "eval.limit=10", "importance.n_examples=5", "knockout.split=heldout",
                  "knockout.limit=4", "pruning.levels=[0,50]", "pruning.combined_levels=[0,50]",
                  "sweep.tasks=[copa,rte]", "sweep.shots=[0,1,5]")
    assert P.evaluations(cfg) == 1 + 2 * 1 + 1  # unpruned, heads 50, FFN 50, the grid's (50, 50)
    cfg["plan"] = dict(gpus=1, gpu_mem_gb=80, offload="none", peak_tflops=100, utilization=0.5,
                       tokens_per_doc=200, scored_tokens=8, eval_docs=1000, out=None)
    pl = P.make_plan(cfg)
    n = P.n_params(P.Arch.from_spec(cfg["model"]))
    # importance 5 examples x 3 (forward + backward), 10 eval docs x 4 evaluations, 4 knock-out docs x 2 layers
    flops = 2 * n * 200 * (3 * 5 + 10 * 4 + 4 * 2)
    assert pl.shard_flops == pytest.approx(flops)
    assert pl.shard_hours == pytest.approx(flops / (100e12 * 0.5) / 3600)
    assert pl.sweep_shards == 6 and pl.sweep_hours == pytest.approx(6 * pl.shard_hours)
    assert pl.param_bytes_per_rank == n * 4  # float32, one GPU: the whole model
    # float32 logits at the 8 scored positions of each of 3 docs, logits + log-softmax (+ grad: 3)
    assert P.logits_bytes(a, batch=3, scored=8, copies=2) == 2 * 3 * 8 * 1000 * 4
    # eval at batch 8, 256 tokens (tiny-llama's max_length), float32: params + KV + one block + logits
    kv = 2 * 2 * 2 * 16 * 256 * 8 * 4
    block = 8 * 256 * (4 * 64 + 2 * 128 + (4 + 2 * 2) * 16) * 4
    assert pl.eval_bytes_per_rank == n * 4 + kv + block + 2 * 8 * 8 * 49152 * 4
    assert pl.fits


def test_cli_prints_the_plan_and_names_the_fix_when_it_does_not_fit(capsys):
    assert P.main(["experiment=paper", "gpus=8", "gpu_mem_gb=80"]) == 0  # OPT-66B, float16, its batch sizes
    out = capsys.readouterr().out
    assert "65,719,701,504 parameters" in out and "fits                 yes" in out
    assert P.main(["model=opt-66b", "gpus=1", "gpu_mem_gb=40", "model.dtype=float16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: a shard does not fit 1 x 40 GB") and "offload=cpu" in err[-1]
    assert P.main(["model=opt-66b", "offload=nvme"]) == 2
    assert "offload='nvme': use offload=none or offload=cpu" in capsys.readouterr().err
    assert P.main(["model=tiny-gpt2"]) == 2
    assert "add a model.arch block" in capsys.readouterr().err
