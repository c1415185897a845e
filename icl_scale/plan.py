"""Will a shard fit, and what will the sweep cost? An offline planner (no download, no GPU).

    python -m icl_scale.plan model=opt-66b gpus=8 gpu_mem_gb=80
    python -m icl_scale.plan experiment=paper gpus=8 gpu_mem_gb=40 offload=cpu
    python -m icl_scale.plan model=smollm2-135m gpus=1 gpu_mem_gb=24 data.dir=/path/to/mirror

Everything comes from the composed config (conf/plan.yaml on top of conf/config.yaml): the model
preset's `arch` block (layers, hidden, heads, kv_heads, ffn, vocab, max_positions, tied), its dtype,
`eval.batch_size`, `importance.batch_size`, `model.max_length`, the shard's sizes (importance
examples, knock-out docs, pruning levels), the sweep's tasks and shots, `launcher.timeout_min`, and
per (task, shot) the docs and tokens of its request lists: counted from the data when a mirror has
the splits, else conf/plan_tasks.yaml (docs/make_plan_tasks.py). The numbers are estimates of the
dominant terms (stated in docs/plan.md; bench/plan_calibration.py checks them on a machine); the
parameter count is exact.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, replace

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


def _gathered_bytes(a: Arch, nbytes: int) -> int:
    """ZeRO-3's working set: the block being run and the prefetched next one, gathered whole."""
    return 2 * layer_params(a) * nbytes + (a.vocab * (a.embed_dim or a.hidden)) * nbytes


def _resident(a: Arch, gpus: int, offload: str, nbytes: int) -> float:
    if gpus == 1:
        return n_params(a) * nbytes if offload == "none" else _gathered_bytes(a, nbytes)
    shard = n_params(a) * nbytes / gpus if offload == "none" else 0
    return shard + _gathered_bytes(a, nbytes)


def _machine(cfg: dict) -> tuple[Arch, int, int, str]:
    """(architecture, GPUs, dtype bytes, offload), checked: bad values are one-line PlanErrors."""
    spec, p = cfg["model"], cfg["plan"]
    a = Arch.from_spec(spec)
    offload = p.get("offload") or "none"
    if offload not in ("none", "cpu"):
        raise PlanError(f"offload={offload!r}: use offload=none or offload=cpu")
    for key in ("gpus", "gpu_mem_gb", "peak_tflops", "utilization", "token_sample"):
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
    a, gpus, nb, offload = _machine(cfg)
    spec, p = cfg["model"], cfg["plan"]
    mem = float(p["gpu_mem_gb"]) * 2**30 * SAFETY
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
    host = host_bytes_per_rank(cfg, gpus) + (n_params(a) * nb / gpus if offload == "cpu" and gpus == 1 else 0)
    return Plan(spec["name"], n_params(a), str(spec.get("dtype") or "auto"), gpus, offload, resident, eval_mem(eval_b),
                imp_mem(imp_b), host, fits, _largest(eval_mem, mem), _largest(imp_mem, mem))


def _largest(mem_at, budget: float, cap: int = 4096) -> int:
    """The largest batch (a power of two, up to `cap`) whose memory fits `budget`; 0 if none does."""
    b = 0
    while b * 2 <= cap and mem_at(max(1, b * 2)) <= budget:
        b = max(1, b * 2)
    return b


# --- the data: docs and tokens per (task, shot) --------------------------------------------------------

TABLE = "plan_tasks.yaml"  # conf/plan_tasks.yaml: the full splits' sizes and tokens, with their sources


@dataclass(frozen=True)
class TaskCounts:
    """One (task, shot)'s request lists, as the planner prices them."""

    task: str
    shot: int
    eval_docs: int
    train_docs: int  # importance candidates (WSC: its positive rows)
    eval_tokens: float  # mean per eval doc: its context(s) + every continuation
    eval_scored: float  # mean continuation tokens per eval doc (the positions unembedded)
    imp_tokens: float  # mean per importance example: context + gold continuation
    imp_scored: float
    multi_token: bool  # a continuation longer than one token: a continuation pass after each context pass
    source: str  # "data: <where>" or "table: <source>"


def _mean_tokens(tokenizer, requests) -> tuple[float, float, bool]:
    """(mean context + continuation tokens, mean continuation tokens, any continuation > 1 token)."""
    tot = scored = 0
    multi = False
    for r in requests:
        ctx = {r.pair(i)[0] for i in range(r.n_choices)}
        conts = [len(tokenizer(r.pair(i)[1], add_special_tokens=False)["input_ids"]) for i in range(r.n_choices)]
        tot += sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in ctx) + sum(conts)
        scored += sum(conts)
        multi |= max(conts) > 1
    n = max(1, len(requests))
    return tot / n, scored / n, multi


def count_from_data(task: str, shot: int, data_dir, tokenizer, sample: int) -> TaskCounts:
    """Docs counted from the split files; tokens from the first `sample` docs rendered as the shard
    renders them (seed 0), with `tokenizer`."""
    from .tasks import build_requests, get_task, load_split
    from .tasks.data import data_source
    from .tasks.fewshot import demo_pool

    t = get_task(task)
    evals = build_requests(task, shot=shot, limit=sample, data_dir=data_dir)
    imps = build_requests(task, split="train", shot=shot, limit=sample, data_dir=data_dir)
    e_tok, e_sc, multi = _mean_tokens(tokenizer, evals)
    imps = [replace(r, contexts=[r.pair(r.gold_index())[0]], continuations=[r.pair(r.gold_index())[1]], gold=0)
            for r in imps]
    i_tok, i_sc, _ = _mean_tokens(tokenizer, imps)
    train = load_split(t, "train", data_dir)
    return TaskCounts(task, shot, len(load_split(t, t.eval_split, data_dir)), len(demo_pool(t, train)), e_tok, e_sc,
                      i_tok, i_sc, multi, f"data: {data_source(t, t.eval_split, data_dir)}")


def count_from_table(task: str, shot: int, table: dict) -> TaskCounts:
    row = (table["tasks"] or {}).get(task)
    if row is None or shot not in row["tokens"]:
        raise PlanError(f"no task data for {task} {shot}-shot and conf/{TABLE} has no row for it: set data.dir to a "
                        f"mirror <dir>/<task>/<split>.jsonl (or add the row with docs/make_plan_tasks.py)")
    tok = row["tokens"][shot]
    return TaskCounts(task, shot, int(row["eval_docs"]), int(row["train_docs"]), float(tok["eval"]),
                      float(tok["eval_scored"]), float(tok["importance"]), float(tok["importance_scored"]),
                      bool(tok["multi_token"]), f"table: {row['source']}")


def _has_data(cfg: dict, task: str) -> bool:
    from .tasks import get_task
    from .tasks.data import resolve_source

    t = get_task(task)
    src = [resolve_source(t, s, cfg["data"]["dir"]) for s in (t.eval_split, "train")]
    return all(s.kind == "mirror" and (s.root / task / f"{split}.jsonl").is_file()
               for s, split in zip(src, (t.eval_split, "train")))


def task_counts(cfg: dict) -> list[TaskCounts]:
    """Every (task, shot) of the sweep: counted from the data when its splits are in a mirror, else
    from conf/plan_tasks.yaml (the full splits, with their sources)."""
    import yaml

    from .models.loading import CONF_DIR

    table = yaml.safe_load((CONF_DIR / TABLE).read_text(encoding="utf-8"))
    tokenizer = None
    out = []
    for task in cfg["sweep"]["tasks"]:
        for shot in cfg["sweep"]["shots"]:
            if _has_data(cfg, task):
                tokenizer = tokenizer or _tokenizer(cfg)
                sample = int(cfg["plan"]["token_sample"])
                out.append(count_from_data(task, int(shot), cfg["data"]["dir"], tokenizer, sample))
            else:
                out.append(count_from_table(task, int(shot), table))
    return out


def _tokenizer(cfg: dict):
    """The model's tokenizer when it loads without a download; else SmolLM2's (embedded), a byte-level
    BPE of a similar vocabulary (49,152 vs OPT's 50,272) standing in for it."""
    from .models.loading import load_tokenizer, preset

    spec = cfg["model"]
    return load_tokenizer(spec if spec.get("source") in ("local", "gguf_wheel", "random") else preset("smollm2-135m"))


# --- passes, bytes, FLOPs and hours of one shard -------------------------------------------------------

# GB/s per GPU and direction that ZeRO-3's all-gathers reach at best (`interconnect=`).
INTERCONNECTS = {
    "nvlink": (300.0, "NVIDIA A100 SXM datasheet: NVLink 3, 600 GB/s per GPU both directions together"),
    "pcie": (32.0, "PCI Express 4.0 x16: 16 GT/s x 16 lanes, ~32 GB/s per direction"),
    "ib": (25.0, "InfiniBand HDR, 200 Gb/s per port (NVIDIA ConnectX-6): 25 GB/s per direction"),
}
PCIE_GBS = INTERCONNECTS["pcie"][0]  # offload=cpu: every pass streams the rank's partition from host memory
BACKWARD = 2.0  # importance: forward + backward to the activations only (no weight gradients) ~ 2 forwards


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


def doc_counts(cfg: dict, c: TaskCounts) -> tuple[int, int, int]:
    """(eval docs, importance examples, knock-out docs) of a shard, as ShardRun cuts its lists."""
    n_eval = min(int(cfg["eval"]["limit"] or c.eval_docs), c.eval_docs)
    ko = cfg["knockout"]
    if ko["split"] == "paper":
        n_ko, pool = n_eval, c.train_docs
    else:
        n_ko, pool = int(ko["limit"]), c.train_docs - int(ko["limit"])
    return n_eval, min(int(cfg["importance"]["n_examples"]), max(pool, 0)), n_ko


def pass_schedule(cfg: dict, c: TaskCounts, ranks: int, layers: int) -> dict[str, float]:
    """Forward passes one rank makes in a shard, and the whole-model all-gathers they cost under ZeRO-3,
    from the request lists: every rank makes the same calls (lockstep), so a list of n docs at batch b
    takes ceil(n / (b x ranks)) batches. A scoring batch is one context pass plus, when a continuation
    has more than one token, one continuation pass (the scorer's lower bound: it may split a batch's
    continuations by length). Every evaluation (`evaluations`) scores the eval list; an importance step
    is a forward and a backward, each gathering the model; a knock-out batch is an unpruned pass and a
    restart at every layer l, which runs (and gathers) only layers l.. : (layers + 1) / 2 models."""
    n_eval, n_imp, n_ko = doc_counts(cfg, c)
    per_batch = 1 + int(c.multi_token)
    b_eval, b_imp = int(cfg["eval"]["batch_size"]), int(cfg["importance"]["batch_size"])
    eval_batches = math.ceil(n_eval / (b_eval * ranks)) * evaluations(cfg)
    imp_steps = math.ceil(n_imp / (b_imp * ranks))
    ko_batches = math.ceil(n_ko / (b_eval * ranks))
    return {"eval_passes": eval_batches * per_batch, "importance_passes": 2 * imp_steps,
            "knockout_passes": ko_batches * per_batch * (1 + layers),
            "gathers": eval_batches * per_batch + 2 * imp_steps + ko_batches * per_batch * (1 + (layers + 1) / 2)}


def forward_flops(a: Arch, tokens: float, scored: float) -> float:
    """One document's forward: 2 x block parameters per token, causal attention (2 x layers x T^2 x the
    query width), and the unembedding at the scored positions only."""
    blocks = a.layers * layer_params(a)
    return 2 * blocks * tokens + 2 * a.layers * tokens**2 * a.heads * a.head_dim + 2 * a.vocab * (
        a.embed_dim or a.hidden) * scored


def shard_flops(cfg: dict, c: TaskCounts, a: Arch) -> float:
    """A shard's FLOPs: every evaluation over the eval docs, the importance examples (forward and
    backward), the knock-out docs (the unpruned pass and a restart per layer). Sequences longer than
    `model.max_length` are cut to it, as the scorer cuts them."""
    n_eval, n_imp, n_ko = doc_counts(cfg, c)
    cap = int(cfg["model"].get("max_length") or a.max_positions)
    fwd = forward_flops(a, min(c.eval_tokens, cap), c.eval_scored)
    restart = 1 + (a.layers + 1) / 2  # knock-out: the unpruned pass and a restart per layer, in models
    return (evaluations(cfg) * n_eval * fwd + BACKWARD * n_imp * forward_flops(a, min(c.imp_tokens, cap), c.imp_scored)
            + n_ko * restart * fwd)


@dataclass
class ShardPlan:
    task: str
    shot: int
    eval_docs: int
    source: str
    tokens_per_doc: float
    passes: int
    gathered_gb: float  # per rank
    compute_h: float
    comm_h: float
    hours: float
    gpu_gb: float
    host_gb: float
    fits_memory: bool
    over_limit: bool
    advice: str = ""


def shard_hours(cfg: dict, c: TaskCounts, gpus: int) -> tuple[float, float, dict]:
    """(compute hours, communication hours, the pass schedule) of one shard on `gpus` ranks."""
    a, _, nb, offload = _machine(cfg)
    p = cfg["plan"]
    sched = pass_schedule(cfg, c, gpus, a.layers)
    compute = shard_flops(cfg, c, a) / (gpus * float(p["peak_tflops"]) * 1e12 * float(p["utilization"]))
    zero = gpus > 1 or offload == "cpu"
    gathered = sched["gathers"] * n_params(a) * nb * (gpus - 1) / gpus if zero else 0.0
    comm = gathered / (interconnect_bandwidth(p) * 1e9)
    if offload == "cpu":
        comm += sched["gathers"] * n_params(a) * nb / gpus / (PCIE_GBS * 1e9)
    sched["gathered_bytes"] = gathered
    return compute / 3600, comm / 3600, sched


def time_limit_h(cfg: dict) -> float:
    return float(cfg["launcher"]["timeout_min"]) / 60


def _advice(cfg: dict, c: TaskCounts, gpus: int, hours: float) -> str:
    """What to do about a shard over the job's time limit: requeues, more GPUs, or a smaller eval.limit."""
    limit = time_limit_h(cfg)
    fixes = [f"{math.ceil(hours / limit) - 1} requeues (its checkpoints resume it)"]
    more = next((g for g in (gpus * 2, gpus * 4, gpus * 8) if sum(shard_hours(cfg, c, g)[:2]) <= limit), None)
    if more:
        fixes.append(f"gpus={more}")
    lo, hi = 0, doc_counts(cfg, c)[0]
    while lo < hi:  # the largest eval.limit that fits the limit
        mid = (lo + hi + 1) // 2
        trial = {**cfg, "eval": {**cfg["eval"], "limit": mid}}
        lo, hi = (mid, hi) if sum(shard_hours(trial, c, gpus)[:2]) <= limit else (lo, mid - 1)
    if lo:
        fixes.append(f"eval.limit={lo}")
    return f"over the {limit:g} h limit: " + ", or ".join(fixes)


def plan_shards(cfg: dict, pl: Plan, counts: list[TaskCounts]) -> list[ShardPlan]:
    out = []
    for c in counts:
        compute, comm, sched = shard_hours(cfg, c, pl.gpus)
        hours = compute + comm
        over = hours > time_limit_h(cfg)
        out.append(ShardPlan(c.task, c.shot, doc_counts(cfg, c)[0], c.source, c.eval_tokens,
                             int(sched["eval_passes"] + sched["importance_passes"] + sched["knockout_passes"]),
                             sched["gathered_bytes"] / 1e9, compute, comm, hours,
                             max(pl.eval_bytes_per_rank, pl.importance_bytes_per_rank) / 2**30,
                             pl.host_bytes_per_rank / 2**30, pl.fits, over,
                             _advice(cfg, c, pl.gpus, hours) if over else ""))
    return out


def _layout(pl: Plan, cfg: dict) -> str:
    # The plan assumes ZeRO-3 whenever gpus > 1; say so when the config would not turn it on.
    if pl.gpus == 1:
        return "one GPU"
    on = ((cfg["model"].get("deepspeed") or {}).get("enabled"))
    return "ZeRO-3 across them" + ("" if on else " (needs model.deepspeed.enabled=true)")


def render(pl: Plan, cfg: dict) -> str:
    gb = 2**30
    p = cfg["plan"]
    bw = interconnect_bandwidth(p)
    rows = [
        ("model", f"{pl.model}: {pl.params:,} parameters ({pl.params / 1e9:.2f} B), {pl.dtype}"),
        ("GPUs", f"{pl.gpus} x {p['gpu_mem_gb']} GB, " + _layout(pl, cfg) + f", offload={pl.offload}"),
        ("parameters per rank", f"{pl.param_bytes_per_rank / gb:.1f} GB (shard + gathered working set)"),
        ("evaluation", f"{pl.eval_bytes_per_rank / gb:.1f} GB per rank at eval.batch_size={cfg['eval']['batch_size']}, "
                       f"max_length={cfg['model'].get('max_length')}"),
        ("importance", f"{pl.importance_bytes_per_rank / gb:.1f} GB per rank at "
                       f"importance.batch_size={cfg['importance']['batch_size']}"),
        ("host memory", f"{pl.host_bytes_per_rank / gb:.1f} GB per rank (partitioned loading), "
                        f"{pl.host_bytes_per_rank * pl.gpus / gb:.0f} GB per job"),
        ("fits", "yes" if pl.fits else "no"),
        ("largest batches", f"eval.batch_size={pl.max_eval_batch}, importance.batch_size={pl.max_importance_batch}"),
        ("speed", f"{p['utilization']:.0%} of {p['peak_tflops']} TFLOP/s per GPU; all-gathers over {p['interconnect']} "
                  f"at {bw:g} GB/s" + ("" if p.get("bandwidth_gbs") else f" ({INTERCONNECTS[p['interconnect']][1]})")),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def render_shards(shards: list[ShardPlan], cfg: dict) -> str:
    """The per-shard table, the sweep's totals and a line per shard over the job's time limit."""
    head = ("task", "shot", "eval docs", "tok/doc", "passes", "gathered GB", "compute h", "comm h", "hours",
            "GPU GB", "host GB", "fits")
    rows = [(s.task, str(s.shot), f"{s.eval_docs:,}", f"{s.tokens_per_doc:.0f}", f"{s.passes:,}",
             f"{s.gathered_gb:,.0f}", f"{s.compute_h:.1f}", f"{s.comm_h:.1f}", f"{s.hours:.1f}", f"{s.gpu_gb:.1f}",
             f"{s.host_gb:.1f}", ("yes" if s.fits_memory else "no: memory") + (", over time" if s.over_limit else ""))
            for s in shards]
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(r)) for r in [head, *rows]]
    seeds = len(cfg["sweep"].get("seeds") or [0])
    total = sum(s.hours * (seeds if s.shot else 1) for s in shards)
    n = sum(seeds if s.shot else 1 for s in shards)
    lines.append(f"sweep: {n} shards, {total:,.0f} h of {shards[0] and cfg['plan']['gpus']}-GPU jobs "
                 f"({total * cfg['plan']['gpus']:,.0f} GPU hours); job time limit {time_limit_h(cfg):g} h "
                 "(launcher.timeout_min)")
    lines += [f"sources: {src}" for src in sorted({s.source for s in shards})]
    lines += [f"{s.task} {s.shot}-shot: {s.hours:.1f} h, {s.advice}" for s in shards if s.over_limit]
    return "\n".join(lines)


PLAN_KEYS = ("gpus", "gpu_mem_gb", "offload", "peak_tflops", "utilization", "scored_tokens", "interconnect",
             "bandwidth_gbs", "token_sample", "out")


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


def _finite(d: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = compose(list(sys.argv[1:] if argv is None else argv))
        pl = make_plan(cfg)
        shards = plan_shards(cfg, pl, task_counts(cfg))
    except (PlanError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else e}", file=sys.stderr)
        return 2
    print(render(pl, cfg))
    print()
    print(render_shards(shards, cfg))
    if cfg["plan"].get("out"):
        from .store import write_json

        write_json(cfg["plan"]["out"], {**_finite(asdict(pl)), "shards": [_finite(asdict(s)) for s in shards]})
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
