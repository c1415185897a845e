"""The machine side of the planner (icl_scale/plan.py): the architecture's exact parameter count,
what one rank holds in GPU and host memory at the configured batch sizes, and the interconnect the
ranks' ZeRO-3 all-gathers cross."""

from __future__ import annotations

import math
from dataclasses import dataclass

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "auto": 2}
SAFETY = 0.9  # of each GPU's memory usable: the CUDA context, allocator fragmentation, NCCL buffers


class PlanError(ValueError):
    """A plan that cannot be made or cannot fit: one line naming the fix."""


@dataclass(frozen=True)
class Arch:
    family: str  # opt | llama
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    max_positions: int
    tied: bool = True
    embed_dim: int | None = None  # OPT-350m: word embeddings narrower than the hidden size
    final_norm: bool = True  # OPT-350m (post-norm) has none
    head_size: int | None = None  # Gemma, Qwen3: head_dim is not hidden / heads
    params: int | None = None  # the exact count, when it was counted on the model itself (config.json)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @classmethod
    def from_spec(cls, spec: dict) -> Arch:
        a = {k: v for k, v in (spec.get("arch") or {}).items() if v is not None}  # (null: not given)
        if spec.get("source") == "random" and spec.get("config"):  # its model.config overrides decide
            a = arch_of_random(spec)
        elif not a and spec.get("source") in ("hf", "local"):
            a = arch_from_config(spec)
        if not a:
            raise PlanError(f"model preset {spec.get('name')!r} has no architecture numbers: add a model.arch block "
                            f"(family, layers, hidden, heads, kv_heads, ffn, vocab, max_positions, tied) to its yaml")
        a = dict(a)
        a.setdefault("kv_heads", a.get("heads"))
        if a.get("family") not in ("opt", "llama"):
            raise PlanError(f"model.arch.family={a.get('family')!r}: the planner knows opt and llama")
        return cls(**a)


# model_types whose blocks the planner's Llama formulas describe (gated FFN: gate, up, down), and those
# its OPT formulas describe (biased projections, one FFN matrix in and one out, two LayerNorms)
GATED_FFN = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
PLAIN_FFN = ("opt", "gpt2", "gpt_neox")


def arch_from_config(spec: dict) -> dict:
    """The arch block of model=hf / model=local from the checkpoint's config.json (a local folder, or a hub
    id already in the Hugging Face cache; nothing is downloaded), with the exact parameter count of the
    model built on the meta device (no memory, no weights)."""
    from transformers import AutoConfig

    from .models.loading import checkpoint_key, is_local, local_checkpoint

    try:
        if is_local(spec):
            where = f"{checkpoint_key(spec)}={spec.get('id') or spec.get('path')}"
            cfg = AutoConfig.from_pretrained(str(local_checkpoint(spec)))
        else:
            where = f"model.id={spec.get('id')}"
            cfg = AutoConfig.from_pretrained(str(spec.get("id")), revision=spec.get("revision"), local_files_only=True)
    except (OSError, ValueError) as e:
        raise PlanError(f"{where}: no readable config.json ({type(e).__name__}); download the model first or add a "
                        "model.arch block") from None
    return arch_of_config(cfg, where)


def arch_of_random(spec: dict) -> dict:
    """The arch block of a random model (model.source=random) from the config it is built with."""
    from .models.loading import load_tokenizer
    from .models.sources import random_config

    cfg = random_config(spec["family"], len(load_tokenizer(spec)), **spec["config"])
    return arch_of_config(cfg, f"model.family={spec['family']}")


def arch_of_config(cfg, where: str, count: bool = True) -> dict:
    """The arch block of a transformers config, with (`count`) the exact parameter count of the model
    built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    family = "opt" if cfg.model_type in PLAIN_FFN else "llama" if cfg.model_type in GATED_FFN else None
    if family is None:
        raise PlanError(f"{where}: model_type={cfg.model_type!r}; the planner knows "
                        f"{', '.join(PLAIN_FFN + GATED_FFN)}")
    params = None
    if count:
        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    text = cfg.get_text_config()
    heads = text.num_attention_heads
    return dict(family=family, layers=text.num_hidden_layers, hidden=text.hidden_size, heads=heads,
                kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                ffn=(getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None)  # GPT-2: n_inner
                     or getattr(text, "n_inner", None) or 4 * text.hidden_size), vocab=text.vocab_size,
                max_positions=text.max_position_embeddings, tied=bool(text.tie_word_embeddings),
                head_size=getattr(text, "head_dim", None) or text.hidden_size // heads,
                embed_dim=getattr(text, "word_embed_proj_dim", None),  # OPT: may be narrower than hidden
                final_norm=bool(getattr(text, "do_layer_norm_before", True)), params=params)


def layer_params(a: Arch) -> int:
    """One decoder block's parameters."""
    h, f, q, kv = a.hidden, a.ffn, a.heads * a.head_dim, a.kv_heads * a.head_dim
    if a.family == "opt":  # biased q/k/v/out and fc1/fc2, two LayerNorms (weight + bias)
        return (h * q + q) + 2 * (h * kv + kv) + (q * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
    return h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h  # Llama: no biases, gate/up/down, two RMSNorms


def n_params(a: Arch) -> int:
    """Exactly the model's parameter count (tied embeddings counted once)."""
    if a.params is not None:
        return a.params
    e = a.embed_dim or a.hidden
    total = a.vocab * e + a.layers * layer_params(a)
    if a.family == "opt":
        total += (a.max_positions + 2) * a.hidden  # learned positions, OPT's offset of 2
        total += 2 * e * a.hidden if e != a.hidden else 0  # project_in / project_out (no bias)
        total += 2 * a.hidden if a.final_norm else 0
    else:
        total += a.hidden  # final RMSNorm
    return total + (0 if a.tied else a.vocab * e)


def kv_bytes(a: Arch, batch: int, length: int, nbytes: int) -> int:
    """The prefix KV cache the scorer keeps for a batch: keys and values of every layer."""
    return 2 * a.layers * a.kv_heads * a.head_dim * length * batch * nbytes


def forward_activation_bytes(a: Arch, batch: int, length: int, nbytes: int) -> int:
    """Live activations of one block's forward (inference: blocks run one after another)."""
    per_token = 4 * a.hidden + 2 * a.ffn + (a.heads + 2 * a.kv_heads) * a.head_dim
    return batch * length * per_token * nbytes


def logits_bytes(a: Arch, batch: int, scored: int, copies: int) -> int:
    """float32 logits over the vocabulary, only at the scored (continuation) positions: the scorer
    and the importance loss unembed just those. `copies`: logits + log-softmax (2), + their grad (3)."""
    return copies * batch * scored * a.vocab * 4


def backward_activation_bytes(a: Arch, batch: int, length: int, nbytes: int) -> int:
    """The importance pass keeps every block's activations for the backward to the gate probes:
    per token and block ~ the norms' outputs, q/k/v, the attention output, the FFN's hidden units
    (two for Llama's gated FFN) and the residual; plus the probes' float32 gradients [L, b, t, H+1]."""
    ffn_units = (2 if a.family == "llama" else 1) * a.ffn
    per_token = 3 * a.hidden + (a.heads + 2 * a.kv_heads) * a.head_dim + a.heads * a.head_dim + ffn_units
    probes = a.layers * batch * length * (a.heads + 1) * 4
    return a.layers * batch * length * per_token * nbytes + probes


@dataclass
class Plan:
    """What one rank of a shard job holds (bytes) and the largest batches that fit."""

    model: str
    params: int
    dtype: str
    gpus: int
    offload: str
    param_bytes_per_rank: float
    eval_bytes_per_rank: float
    importance_bytes_per_rank: float
    host_bytes_per_rank: float
    fits: bool
    max_eval_batch: int
    max_importance_batch: int
    importance_batch: int  # importance.batch_size, auto resolved (planned_importance_batch)


def _gathered_bytes(a: Arch, nbytes: int) -> int:
    """ZeRO-3's working set: the block being run and the prefetched next one, gathered whole."""
    return 2 * layer_params(a) * nbytes + (a.vocab * (a.embed_dim or a.hidden)) * nbytes


def _resident(a: Arch, gpus: int, offload: str, nbytes: int) -> float:
    if gpus == 1:
        return n_params(a) * nbytes if offload == "none" else _gathered_bytes(a, nbytes)
    shard = n_params(a) * nbytes / gpus if offload == "none" else 0
    return shard + _gathered_bytes(a, nbytes)


def machine(cfg: dict) -> tuple[Arch, int, int, str]:
    """(architecture, GPUs, dtype bytes, offload), checked: bad values are one-line PlanErrors."""
    spec, p = cfg["model"], cfg["plan"]
    a = Arch.from_spec(spec)
    offload = p.get("offload") or "none"
    if offload not in ("none", "cpu"):
        raise PlanError(f"offload={offload!r}: use offload=none or offload=cpu")
    for key in ("gpus", "gpu_mem_gb", "peak_tflops", "utilization", "token_sample", "layer_call_ms", "pass_call_ms",
                "startup_s", "load_gbs", "tokenize_ktok_s"):
        v = p.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (key == "utilization" and v > 1):
            rng = "a number in (0, 1]" if key == "utilization" else "a number > 0"
            raise PlanError(f"{key}={v!r} must be {rng}" + (": a shard needs at least one GPU (gpus=1 or more)"
                                                             if key == "gpus" else ""))
    if int(p["gpus"]) != p["gpus"]:
        raise PlanError(f"gpus={p['gpus']} must be a whole number")
    interconnect_bandwidth(p)
    return a, int(p["gpus"]), BYTES.get(str(spec.get("dtype") or "auto"), 2), offload


# A rank's process before any weight: Python, torch, transformers, DeepSpeed and (on GPUs) the CUDA context.
HOST_RUNTIME_GB = 3.0


def host_bytes_per_rank(cfg: dict, ranks: int) -> float:
    """Peak host memory of one rank. Under ZeRO-3 (model.deepspeed.enabled, several ranks) the weights
    load straight into each rank's partition (models/partitioned.py): the partition (params x bytes /
    ranks; in host memory with offload=cpu or on CPUs, on the GPU otherwise, where this is an upper
    bound) plus the largest tensor built whole before it is split (the embedding). Without ZeRO-3
    every rank holds the whole model."""
    spec = cfg["model"]
    a = Arch.from_spec(spec)
    nb = BYTES.get(str(spec.get("dtype") or "auto"), 2)
    weights = n_params(a) * nb
    if (spec.get("deepspeed") or {}).get("enabled") and ranks > 1:
        weights = weights / ranks + a.vocab * (a.embed_dim or a.hidden) * nb
    return weights + HOST_RUNTIME_GB * 2**30


def make_plan(cfg: dict) -> Plan:
    """Memory per rank at the configured batch sizes (worst case: `model.max_length` tokens)."""
    a, gpus, nb, offload = machine(cfg)
    spec, p = cfg["model"], cfg["plan"]
    mem, resident, length, _ = _rank_memory(cfg, a, gpus)
    eval_b, imp_b = int(cfg["eval"]["batch_size"]), planned_importance_batch(cfg, a, gpus)
    scored = int(p["scored_tokens"])

    def eval_mem(b):
        return (resident + kv_bytes(a, b, length, nb) + forward_activation_bytes(a, b, length, nb)
                + logits_bytes(a, b, scored, 2))

    def imp_mem(b):
        return resident + importance_step_bytes(a, b, length, scored, nb)

    fits = eval_mem(eval_b) <= mem and imp_mem(imp_b) <= mem
    host = host_bytes_per_rank(cfg, gpus) + (n_params(a) * nb / gpus if offload == "cpu" and gpus == 1 else 0)
    return Plan(spec["name"], n_params(a), str(spec.get("dtype") or "auto"), gpus, offload, resident, eval_mem(eval_b),
                imp_mem(imp_b), host, fits, largest_batch(eval_mem, mem), largest_batch(imp_mem, mem), imp_b)


def usable_gpu_bytes(cfg: dict) -> float:
    """One GPU's memory a rank may use: `gpu_mem_gb` less the SAFETY margin."""
    return float(cfg["plan"]["gpu_mem_gb"]) * 2**30 * SAFETY


def _rank_memory(cfg: dict, a: Arch, gpus: int) -> tuple[float, float, int, int]:
    """(usable bytes of one GPU, the bytes its parameters hold, a row's tokens at worst, dtype bytes) on
    `gpus` ranks."""
    spec, p = cfg["model"], cfg["plan"]
    nb = BYTES.get(str(spec.get("dtype") or "auto"), 2)
    resident = _resident(a, gpus, p.get("offload") or "none", nb)
    return usable_gpu_bytes(cfg), resident, int(spec.get("max_length") or a.max_positions), nb


def largest_batch(mem_at, budget: float, cap: int = 4096) -> int:
    """The largest batch (a power of two, up to `cap`) whose memory fits `budget`; 0 if none does."""
    b = 0
    while b * 2 <= cap and mem_at(max(1, b * 2)) <= budget:
        b = max(1, b * 2)
    return b


def importance_step_bytes(a: Arch, batch: int, length: int, scored: int, nbytes: int) -> int:
    """One importance step beside the parameters: `batch` examples of `length` tokens, `scored` of them
    each in the loss: the activations the backward keeps and the loss's float32 logits, log-softmax
    and gradient."""
    return backward_activation_bytes(a, batch, length, nbytes) + logits_bytes(a, batch, scored, 3)


def auto_importance_batch(a: Arch, budget: float, length: int, scored: int, nbytes: int, per_rank: int) -> int:
    """`importance.batch_size=auto`: the largest batch whose step (`importance_step_bytes`) fits `budget`
    bytes beside the parameters, at most `per_rank` (a rank's share of the examples: one step does
    them all), at least 1. A shard sizes it from its device's free memory and longest example
    (importance.importance_batch_size), the planner from the plan's GPU (`planned_importance_batch`)."""
    fits = largest_batch(lambda b: importance_step_bytes(a, b, length, scored, nbytes), budget)
    return max(1, min(fits, per_rank))


def planned_importance_batch(cfg: dict, a: Arch, gpus: int) -> int:
    """importance.batch_size as a shard on `gpus` of the plan's GPUs resolves it: an int as it is; auto
    (`auto_importance_batch`) from the memory beside the rank's parameters, at `model.max_length`
    tokens and `plan.scored_tokens` scored, over `importance.n_examples` examples."""
    imp = cfg["importance"]
    if imp["batch_size"] != "auto":
        return int(imp["batch_size"])
    mem, resident, length, nb = _rank_memory(cfg, a, gpus)
    return auto_importance_batch(a, mem - resident, length, int(cfg["plan"]["scored_tokens"]), nb,
                                 math.ceil(int(imp["n_examples"]) / gpus))


INTERCONNECTS = {
    "nvlink": (300.0, "NVIDIA A100 SXM datasheet: NVLink 3, 600 GB/s per GPU both directions together"),
    "pcie": (32.0, "PCI Express 4.0 x16: 16 GT/s x 16 lanes, ~32 GB/s per direction"),
    "ib": (25.0, "InfiniBand HDR, 200 Gb/s per port (NVIDIA ConnectX-6): 25 GB/s per direction"),
}


def interconnect_bandwidth(p: dict) -> float:
    """GB/s of the ranks' all-gathers: `bandwidth_gbs` when set (calibration), else the interconnect's."""
    name = p.get("interconnect")
    if name not in INTERCONNECTS:
        raise PlanError(f"interconnect={name!r}: use one of {', '.join(INTERCONNECTS)}")
    bw = p.get("bandwidth_gbs")
    if bw is None:
        return INTERCONNECTS[name][0]
    if isinstance(bw, bool) or not isinstance(bw, (int, float)) or bw <= 0:
        raise PlanError(f"bandwidth_gbs={bw!r} must be a number > 0 (GB/s) or null (the interconnect's)")
    return float(bw)
