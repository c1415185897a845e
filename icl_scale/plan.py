"""Will a shard fit, and what will the sweep cost? An offline planner (no download, no GPU).

    python -m icl_scale.plan model=opt-66b gpus=8 gpu_mem_gb=80
    python -m icl_scale.plan experiment=paper gpus=8 gpu_mem_gb=40 offload=cpu
    python -m icl_scale.plan model=smollm2-135m gpus=1 gpu_mem_gb=24 tokens_per_doc=300

Everything comes from the composed config (conf/plan.yaml on top of conf/config.yaml): the model
preset's `arch` block (layers, hidden, heads, kv_heads, ffn, vocab, max_positions, tied), its dtype,
`eval.batch_size`, `importance.batch_size`, `model.max_length`, and the shard's sizes (importance
examples, knock-out docs, pruning levels). The numbers are estimates of the dominant terms (stated
in docs/plan.md); the parameter count is exact.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

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

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_spec(cls, spec: dict) -> Arch:
        a = spec.get("arch")
        if not a:
            raise PlanError(f"model preset {spec.get('name')!r} has no architecture numbers: add a model.arch block "
                            f"(family, layers, hidden, heads, kv_heads, ffn, vocab, max_positions, tied) to its yaml")
        a = dict(a)
        a.setdefault("kv_heads", a.get("heads"))
        if a.get("family") not in ("opt", "llama"):
            raise PlanError(f"model.arch.family={a.get('family')!r}: the planner knows opt and llama")
        return cls(**a)


def layer_params(a: Arch) -> int:
    """One decoder block's parameters."""
    h, f, q, kv = a.hidden, a.ffn, a.heads * a.head_dim, a.kv_heads * a.head_dim
    if a.family == "opt":  # biased q/k/v/out and fc1/fc2, two LayerNorms (weight + bias)
        return (h * q + q) + 2 * (h * kv + kv) + (q * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
    return h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h  # Llama: no biases, gate/up/down, two RMSNorms


def n_params(a: Arch) -> int:
    """Exactly the model's parameter count (tied embeddings counted once)."""
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


def evaluations(cfg: dict) -> int:
    """Distinct evaluations of one shard: heads and FFN curves (the 0% point shared), the heads x FFN
    grid's interior cells, and the FFN knock-outs (one per layer plus the unpruned run)."""
    pr = cfg["pruning"]
    levels = [x for x in pr["levels"] if x > 0]
    grid = [x for x in pr["combined_levels"] if x > 0]
    return 1 + 2 * len(levels) + len(grid) ** 2


@dataclass
class Plan:
    model: str
    params: int
    dtype: str
    gpus: int
    offload: str
    param_bytes_per_rank: float
    eval_bytes_per_rank: float
    importance_bytes_per_rank: float
    fits: bool
    max_eval_batch: int
    max_importance_batch: int
    shard_flops: float
    shard_hours: float
    sweep_shards: int
    sweep_hours: float


def _gathered_bytes(a: Arch, nbytes: int) -> int:
    """ZeRO-3's working set: the block being run and the prefetched next one, gathered whole."""
    return 2 * layer_params(a) * nbytes + (a.vocab * (a.embed_dim or a.hidden)) * nbytes


def _resident(a: Arch, gpus: int, offload: str, nbytes: int) -> float:
    if gpus == 1:
        return n_params(a) * nbytes if offload == "none" else _gathered_bytes(a, nbytes)
    shard = n_params(a) * nbytes / gpus if offload == "none" else 0
    return shard + _gathered_bytes(a, nbytes)


# A rank's process before any weight: Python, torch, transformers, DeepSpeed and (on GPUs) the CUDA context.
HOST_RUNTIME_GB = 3.0


def host_bytes_per_rank(cfg: dict, ranks: int) -> float:
    """Peak host memory of one rank. Under ZeRO-3 (model.deepspeed.enabled, several ranks) the weights
    load straight into each rank's partition (models/loading.py): the partition (params x bytes / ranks,
    which stays in host memory with offload=cpu and moves to the GPU otherwise) plus the largest tensor
    being split (the embedding). Without ZeRO-3 every rank holds the whole model."""
    spec = cfg["model"]
    a = Arch.from_spec(spec)
    nb = BYTES.get(str(spec.get("dtype") or "auto"), 2)
    weights = n_params(a) * nb
    if (spec.get("deepspeed") or {}).get("enabled") and ranks > 1:
        weights = weights / ranks + a.vocab * (a.embed_dim or a.hidden) * nb
    return weights + HOST_RUNTIME_GB * 2**30


def make_plan(cfg: dict) -> Plan:
    spec, p = cfg["model"], cfg["plan"]
    a = Arch.from_spec(spec)
    gpus, mem = int(p["gpus"]), float(p["gpu_mem_gb"]) * 2**30 * SAFETY
    offload = p.get("offload") or "none"
    if offload not in ("none", "cpu"):
        raise PlanError(f"offload={offload!r}: use offload=none or offload=cpu")
    if gpus < 1:
        raise PlanError(f"gpus={gpus}: a shard needs at least one GPU (gpus=1 or more)")
    dtype = str(spec.get("dtype") or "auto")
    nb = BYTES.get(dtype, 2)
    length = int(spec.get("max_length") or a.max_positions)
    resident = _resident(a, gpus, offload, nb)
    eval_b, imp_b = int(cfg["eval"]["batch_size"]), int(cfg["importance"]["batch_size"])

    scored = int(p["scored_tokens"])

    def eval_mem(b):
        return (resident + kv_bytes(a, b, length, nb) + forward_activation_bytes(a, b, length, nb)
                + logits_bytes(a, b, scored, 2))

    def imp_mem(b):
        return resident + backward_activation_bytes(a, b, length, nb) + logits_bytes(a, b, scored, 3)

    fits = eval_mem(eval_b) <= mem and imp_mem(imp_b) <= mem
    tokens = float(p["tokens_per_doc"])
    n_eval = int(cfg["eval"]["limit"] or p["eval_docs"])
    n_ko = int(cfg["knockout"]["limit"] or n_eval) if cfg["knockout"]["split"] == "heldout" else n_eval
    fwd = 2 * n_params(a) * tokens
    flops = fwd * (3 * int(cfg["importance"]["n_examples"]) + n_eval * evaluations(cfg) + n_ko * a.layers)
    rate = gpus * float(p["peak_tflops"]) * 1e12 * float(p["utilization"])
    shards = len(cfg["sweep"]["tasks"]) * len(cfg["sweep"]["shots"]) * len(cfg["sweep"].get("seeds") or [0])
    hours = flops / rate / 3600
    return Plan(spec["name"], n_params(a), dtype, gpus, offload, resident, eval_mem(eval_b), imp_mem(imp_b), fits,
                _largest(eval_mem, mem), _largest(imp_mem, mem), flops, hours, shards, hours * shards)


def _largest(mem_at, budget: float, cap: int = 4096) -> int:
    """The largest batch (a power of two, up to `cap`) whose memory fits `budget`; 0 if none does."""
    b = 0
    while b * 2 <= cap and mem_at(max(1, b * 2)) <= budget:
        b = max(1, b * 2)
    return b


def _layout(pl: Plan, cfg: dict) -> str:
    # The plan assumes ZeRO-3 whenever gpus > 1; say so when the config would not turn it on.
    if pl.gpus == 1:
        return "one GPU"
    on = ((cfg["model"].get("deepspeed") or {}).get("enabled"))
    return "ZeRO-3 across them" + ("" if on else " (needs model.deepspeed.enabled=true)")


def render(pl: Plan, cfg: dict) -> str:
    gb = 2**30
    p = cfg["plan"]
    rows = [
        ("model", f"{pl.model}: {pl.params:,} parameters ({pl.params / 1e9:.2f} B), {pl.dtype}"),
        ("GPUs", f"{pl.gpus} x {p['gpu_mem_gb']} GB, " + _layout(pl, cfg) + f", offload={pl.offload}"),
        ("parameters per rank", f"{pl.param_bytes_per_rank / gb:.1f} GB (shard + gathered working set)"),
        ("evaluation", f"{pl.eval_bytes_per_rank / gb:.1f} GB per rank at eval.batch_size={cfg['eval']['batch_size']}, "
                       f"max_length={cfg['model'].get('max_length')}"),
        ("importance", f"{pl.importance_bytes_per_rank / gb:.1f} GB per rank at "
                       f"importance.batch_size={cfg['importance']['batch_size']}"),
        ("fits", "yes" if pl.fits else "no"),
        ("largest batches", f"eval.batch_size={pl.max_eval_batch}, importance.batch_size={pl.max_importance_batch}"),
        ("per shard", f"{pl.shard_flops:.2e} FLOP, {pl.shard_hours:.1f} h at {p['utilization']:.0%} of "
                      f"{p['peak_tflops']} TFLOP/s per GPU ({p['tokens_per_doc']} tokens per doc)"),
        ("per sweep", f"{pl.sweep_shards} shards, {pl.sweep_hours:.0f} h"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


PLAN_KEYS = ("gpus", "gpu_mem_gb", "offload", "peak_tflops", "utilization", "tokens_per_doc", "scored_tokens",
             "eval_docs", "out")


def compose(overrides: list[str]) -> dict:
    """conf/plan.yaml with Hydra-style overrides, resolved; the planner's own keys under `plan`."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from .models.loading import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(hcompose(config_name="plan", overrides=overrides), resolve=True)
    cfg["plan"] = {k: cfg.pop(k) for k in PLAN_KEYS}
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = compose(list(sys.argv[1:] if argv is None else argv))
        pl = make_plan(cfg)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(pl, cfg))
    if cfg["plan"].get("out"):

        from .store import write_json
        write_json(cfg["plan"]["out"], {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                       for k, v in asdict(pl).items()})
    if not pl.fits:
        fix = ("even batch size 1 does not fit: use more GPUs (gpus=) or offload=cpu"
               if min(pl.max_eval_batch, pl.max_importance_batch) == 0 else
               f"use eval.batch_size={pl.max_eval_batch} importance.batch_size={pl.max_importance_batch}, "
               f"more GPUs (gpus=) or offload=cpu")
        print(f"error: a shard does not fit {pl.gpus} x {cfg['plan']['gpu_mem_gb']} GB: {fix}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
