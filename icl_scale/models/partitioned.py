"""Partitioned loading under ZeRO-3: no rank ever holds the whole model in host memory.

`from_pretrained` under ZeRO-3 has every rank build the whole model, or (with transformers'
`HfDeepSpeedConfig` alive) has rank 0 read the whole checkpoint and broadcast it module by module: a
66B-parameter model in float16 is 131 GB on one rank, eight times over on an 8-GPU node in the first
case. Here instead:

1. the model is built from its config while a `HfDeepSpeedConfig` is alive, so transformers wraps
   the construction in `deepspeed.zero.Init`: each module's parameters are partitioned as soon as
   they exist, in the target dtype (the DeepSpeed config's fp16/bf16 flag), and a rank keeps only
   its partition. (Building the model normally and partitioning it afterwards, as
   `deepspeed.initialize` alone does, holds the whole model first.)
   Nothing is initialised and nothing is broadcast (`unbroadcast_init`): the checkpoint fills every
   partition.
2. every rank reads, from the safetensors shards, only the rows that cover its own partition of
   each tensor (`safe_open(...).get_slice`, memory-mapped) and copies them into the partition,
   converting the dtype on the way: nothing is broadcast, and the largest transient is one
   partition's rows.

ZeRO-3 splits each parameter flattened into `world` equal contiguous pieces (the last one padded
with zeros): rank r holds elements [r * n, (r + 1) * n) of the flattened tensor in `param.ds_tensor`,
n = ceil(numel / world). `tests/test_partitioned.py` gathers every parameter back and checks it
against the checkpoint bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class PartitionError(ValueError):
    """The checkpoint does not match the model it should fill: one line naming the file and the key."""


@contextlib.contextmanager
def zero3_construction(ds_config: dict):
    """transformers builds models under `deepspeed.zero.Init` while this is open (its
    HfDeepSpeedConfig is kept alive only here: models built afterwards in the process are whole)."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference: it lives while `keep` does
    try:
        yield keep
    finally:
        unset_hf_deepspeed_config()


def safetensors_files(path: Path) -> dict[str, str] | None:
    """tensor name -> shard file name of a checkpoint folder (its index, or the one model.safetensors);
    None when the folder has no safetensors weights."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    single = path / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single.name for k in f.keys()}


def _checkpoint_key(names: list[str], keys: dict[str, str], prefix: str) -> str | None:
    """The checkpoint's key for a parameter known by `names` (tied parameters have several), as
    saved by transformers or without/with the base model's prefix (e.g. OPT's hub files: `decoder.`)."""
    for name in names:
        for key in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}"):
            if key in keys:
                return key
    return None


def copy_partition(sliced, param: torch.nn.Parameter) -> None:
    """Fill this rank's ZeRO-3 partition of `param` from a safetensors slice of the full tensor,
    reading only the rows that cover it."""
    import torch.distributed as td

    group = param.ds_process_group
    rank, world = td.get_rank(group=group), td.get_world_size(group=group)
    part = param.ds_tensor
    size = math.ceil(param.ds_numel / world)
    start, end = rank * size, min((rank + 1) * size, param.ds_numel)
    with torch.no_grad():
        part.zero_()  # the padding at the end of the last rank's piece
        if start >= end:
            return
        shape = list(sliced.get_shape())
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        first, last = start // cols, math.ceil(end / cols)
        rows = sliced[first:last].reshape(-1)
        part.narrow(0, 0, end - start).copy_(rows[start - first * cols: end - first * cols])


def load_partitions(model: torch.nn.Module, path: Path, label: str) -> int:
    """Copy a safetensors checkpoint into a model built under zero.Init: parameters into each rank's
    partition, buffers whole. Returns the number of tensors read. `label` names the checkpoint in errors."""
    keys = safetensors_files(path)
    prefix = getattr(model, "base_model_prefix", "")
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        names.setdefault(id(t), []).append(name)
        tensors[id(t)] = t
    by_file: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for tid, known in names.items():
        key = _checkpoint_key(known, keys, prefix)
        if key is None and isinstance(tensors[tid], torch.nn.Parameter):
            raise PartitionError(f"{label}: the checkpoint has no tensor for {known[0]}; use a complete checkpoint")
        if key is not None:  # buffers the checkpoint lacks (e.g. rotary frequencies) keep their computed values
            by_file.setdefault(keys[key], []).append((key, tensors[tid]))
    for file, items in sorted(by_file.items()):
        _load_file(path / file, items, label)
    return sum(len(v) for v in by_file.values())


def _load_file(file: Path, items: list[tuple[str, torch.Tensor]], label: str) -> None:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        for key, target in items:
            sliced = f.get_slice(key)
            want = tuple(target.ds_shape) if hasattr(target, "ds_tensor") else tuple(target.shape)
            if tuple(sliced.get_shape()) != want:
                raise PartitionError(f"{label}: {file.name} holds {key} of shape {list(sliced.get_shape())} but the "
                                     f"model built from config.json needs {list(want)}; the weights and config.json "
                                     "differ")
            if hasattr(target, "ds_tensor"):
                copy_partition(sliced, target)
            else:
                with torch.no_grad():
                    target.copy_(f.get_tensor(key))


def unbroadcast_init(ds_config: dict):
    """`deepspeed.zero.Init` without its broadcast of every new parameter from rank 0.

    zero.Init broadcasts each parameter as its module is built, so that every rank partitions the
    same random initialisation; gloo's broadcast makes a receive copy, so each rank but 0 briefly
    holds a full tensor twice (the untied 49,152 x 1,024 unembedding, tied only after construction:
    0.91x the model's bytes at peak on rank 1 of 2, against 0.68x on rank 0). Here nothing is
    initialised (no_init_weights) and every partition is then filled from the checkpoint
    (`load_partitions`), so the broadcast copies values nobody reads: each rank partitions its own
    tensor as it is. The override is of DeepSpeed's per-parameter hook (deepspeed 0.19:
    `Init._zero_init_param`: convert, broadcast, partition); without it, plain zero.Init."""
    import deepspeed

    base = deepspeed.zero.Init
    if not all(hasattr(base, name) for name in ("_zero_init_param", "_convert_to_deepspeed_param")):
        log.warning("deepspeed.zero.Init has no _zero_init_param: every new parameter is broadcast from rank 0")
        return base(config_dict_or_path=ds_config)

    class Unbroadcast(base):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return Unbroadcast(config_dict_or_path=ds_config)


def build_partitioned(path: Path, dtype: torch.dtype, attn: str, ds_config: dict, label: str) -> torch.nn.Module:
    """The model of a safetensors checkpoint folder, built under zero.Init without weight
    initialisation and filled partition by partition (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(path))
    config._attn_implementation = attn
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    # zero.Init takes the dtype from the config's fp16/bf16 flags (ds_config sets them from `dtype`); its
    # own `dtype=` argument is overridden by the accelerator's half type on CPUs (deepspeed 0.19).
    with zero3_construction(ds_config), no_init_weights(), unbroadcast_init(ds_config):
        model = model_class(config)
    # zero.Init's broadcasts kept the ranks together while they built the model; without them the ranks
    # meet here, before any other collective (DeepSpeed's CPU shared-memory ops abort on a late rank)
    import deepspeed.comm

    deepspeed.comm.barrier()
    bad = {str(p.ds_tensor.dtype) for p in model.parameters()} - {str(dtype)}
    if bad:
        raise PartitionError(f"{label}: zero.Init built {sorted(bad)} partitions instead of {dtype}; check the "
                             "DeepSpeed config's fp16/bf16 flags (icl_scale/models/zero.ds_config)")
    model.tie_weights()  # no_init_weights skips it: the tied unembedding then shares the embedding's partition
    n = load_partitions(model, path, label)
    log.info("partitioned loading: %d tensors from %s into this rank's ZeRO-3 partitions", n, label)
    return model
