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

from .models.loading import document_start_ids
from .plan_data import TaskCounts, count_from_data, planning_tokenizer, task_counts
from .plan_machine import (
    BYTES,
    HOST_RUNTIME_GB,
    INTERCONNECTS,
    SAFETY,
    Arch,
    Plan,
    PlanError,
    host_bytes_per_rank,
    interconnect_bandwidth,
    kv_bytes,
    layer_params,
    logits_bytes,
    machine,
    make_plan,
    n_params,
    usable_gpu_bytes,
)
from .plan_passes import Calls, Schedule, ShardLists, Zero3, doc_counts, shard_lists, shard_schedule, table_lists

__all__ = ["BYTES", "HOST_RUNTIME_GB", "INTERCONNECTS", "SAFETY", "Arch", "Calls", "Plan", "PlanError", "Schedule",
           "ShardLists", "TaskCounts", "count_from_data", "host_bytes_per_rank", "interconnect_bandwidth", "kv_bytes",
           "layer_params", "logits_bytes", "make_plan", "n_params", "task_counts"]

# --- calls, bytes, FLOPs and seconds of one shard -----------------------------------------------------

PCIE_GBS = INTERCONNECTS["pcie"][0]  # offload=cpu: every gather streams the rank's partition from host memory
BACKWARD = 2.0  # importance: forward + backward to the activations only (no weight gradients) ~ 2 forwards


def forward_flops(a: Arch, tokens: float, scored: float) -> float:
    """One document's forward: 2 x block parameters per token, causal attention (2 x layers x T^2 x the
    query width), and the unembedding at the scored positions only."""
    blocks = a.layers * layer_params(a)
    return 2 * blocks * tokens + 2 * a.layers * tokens**2 * a.heads * a.head_dim + 2 * a.vocab * (
        a.embed_dim or a.hidden) * scored


def zero3(cfg: dict, gpus: int) -> bool:
    """The plan assumes ZeRO-3 whenever gpus > 1 (and with offload=cpu)."""
    return gpus > 1 or (cfg["plan"].get("offload") or "none") == "cpu"


def shard_flops(cfg: dict, c: TaskCounts, a: Arch, sched: Schedule, zero: bool) -> float:
    """A shard's FLOPs: the eval list under every mask the curves score, the knock-out list unpruned and
    once per FFN removed (a whole forward each under ZeRO-3; on one GPU a restart at layer l runs only
    the blocks after it: 1 + (layers + 1) / 2 models in all), the importance examples (forward and
    backward). Sequences longer than `model.max_length` are cut to it, as the scorer cuts them."""
    n_eval, n_imp, n_ko = doc_counts(cfg, c)
    cap = int(cfg["model"].get("max_length") or a.max_positions)
    fwd = forward_flops(a, min(c.eval_tokens, cap), c.eval_scored)
    knockouts = sched.knockout_runs if zero else 1 + (a.layers + 1) / 2
    return (sched.eval_runs * n_eval * fwd + BACKWARD * n_imp * forward_flops(a, min(c.imp_tokens, cap), c.imp_scored)
            + n_ko * knockouts * fwd)


@dataclass
class ShardTime:
    """One rank's seconds in a shard, by term (docs/plan.md defines each)."""

    start_s: float  # job start and end, the model's load, rendering and every tokenisation
    compute_s: float  # FLOPs at utilization x peak
    comm_s: float  # gathered bytes over the interconnect (and PCIe with offload=cpu)
    calls_s: float  # fixed cost per forward and backward pass and per block in it (Python, hooks, gather latency)
    schedule: Schedule
    gathered_bytes: float

    @property
    def total_s(self) -> float:
        return self.start_s + self.compute_s + self.comm_s + self.calls_s

    @property
    def hours(self) -> float:
        return self.total_s / 3600


def start_seconds(cfg: dict, c: TaskCounts, a: Arch, nb: int, sched: Schedule) -> float:
    """Job start and end (`startup_s`), reading the weights (`load_gbs`), and the tokens the shard
    tokenises (`tokenize_ktok_s`): its three lists once when rendered, the importance examples once
    more, and a list again for every scoring run of it (each run tokenises its list)."""
    p = cfg["plan"]
    n_eval, n_imp, n_ko = doc_counts(cfg, c)
    tokens = ((1 + sched.eval_scorings) * n_eval * c.eval_tokens + (1 + sched.knockout_scorings) * n_ko * c.eval_tokens
              + 2 * n_imp * c.imp_tokens)
    return (float(p["startup_s"]) + n_params(a) * nb / (float(p["load_gbs"]) * 1e9)
            + tokens / (float(p["tokenize_ktok_s"]) * 1e3))


def shard_time(cfg: dict, c: TaskCounts, gpus: int, lists: ShardLists | None = None) -> ShardTime:
    """One rank's seconds for one shard on `gpus` ranks, from the scorer's pass schedule."""
    a, _, nb, offload = machine(cfg)
    p = cfg["plan"]
    lists = lists or request_lists(cfg, c, a)
    device = "cpu" if str(cfg["model"].get("device")) == "cpu" else "cuda"  # the scorer's pass cost depends on it
    zero = zero3(cfg, gpus)
    z = zero_sizes(cfg, a, nb) if zero else None
    sched = shard_schedule(cfg, lists, a, gpus, device, z)
    compute = shard_flops(cfg, c, a, sched, zero) / (gpus * float(p["peak_tflops"]) * 1e12 * float(p["utilization"]))
    calls = sched.total
    model_bytes = n_params(a) * nb
    unembed_bytes = a.vocab * (a.embed_dim or a.hidden) * nb
    base_bytes = model_bytes - (0 if a.tied else unembed_bytes)  # an untied head is the unembedding's own
    # a whole-model call's tied unembedding is its embedding, still whole (counted: bench/plan_calibration.py)
    unembeds = calls.unembed - (calls.model if a.tied else 0)
    whole = (calls.forwards + calls.backward) * base_bytes + (unembeds + calls.backward) * unembed_bytes
    gathered = whole * (gpus - 1) / gpus if zero else 0.0
    comm = gathered / (interconnect_bandwidth(p) * 1e9)
    if offload == "cpu":
        comm += whole / gpus / (PCIE_GBS * 1e9)
    per_pass = float(p["pass_call_ms"]) + (a.layers + 1) * float(p["layer_call_ms"])
    overhead = (calls.forwards + calls.backward) * per_pass / 1e3
    return ShardTime(start_seconds(cfg, c, a, nb, sched), compute, comm, overhead, sched, gathered)


def zero_sizes(cfg: dict, a: Arch, nb: int) -> Zero3:
    """What sizes the scorer's ZeRO-3 passes, as a rank sees it: its GPU's usable memory free
    (`usable_gpu_bytes`) and `model.deepspeed.max_live_parameters`."""
    return Zero3.of(a, int(usable_gpu_bytes(cfg)), nb, cfg["model"]["deepspeed"]["max_live_parameters"])


def request_lists(cfg: dict, c: TaskCounts, a: Arch) -> ShardLists:
    """The shard's lists: rendered from the data when the counts came from it, else the table's."""
    max_length = int(cfg["model"].get("max_length") or a.max_positions)
    if not c.source.startswith("data:"):
        return table_lists(cfg, c, max_length)
    tok = planning_tokenizer(cfg)
    return shard_lists(cfg, c.task, c.shot, tok, document_start_ids(tok, cfg["model"]["doc_start"]), max_length)


@dataclass
class ShardPlan:
    task: str
    shot: int
    eval_docs: int
    source: str
    tokens_per_doc: float
    passes: int  # one rank's forward passes (base-model and whole-model calls)
    gathered_gb: float  # per rank
    start_h: float
    compute_h: float
    comm_h: float
    calls_h: float
    hours: float
    gpu_gb: float
    host_gb: float
    fits_memory: bool
    over_limit: bool
    advice: str = ""


def time_limit_h(cfg: dict) -> float:
    return float(cfg["launcher"]["timeout_min"]) / 60


def limited(cfg: dict, lists: ShardLists, limit: int) -> tuple[dict, ShardLists]:
    """The config and lists of the shard with `eval.limit=limit`."""
    trial = {**cfg, "eval": {**cfg["eval"], "limit": limit}}
    ev = lists.eval[:limit]
    return trial, replace(lists, eval=ev, knockout=ev if lists.knockout_on_eval else lists.knockout)


def _advice(cfg: dict, c: TaskCounts, gpus: int, hours: float, lists: ShardLists) -> str:
    """What to do about a shard over the job's time limit: requeues, more GPUs, or a smaller eval.limit."""
    limit = time_limit_h(cfg)
    fixes = [f"{math.ceil(hours / limit) - 1} requeues (its checkpoints resume it)"]
    more = next((g for g in (gpus * 2, gpus * 4, gpus * 8) if shard_time(cfg, c, g, lists).hours <= limit), None)
    if more:
        fixes.append(f"gpus={more}")
    def hours_at(n: int) -> float:
        trial, trial_lists = limited(cfg, lists, n)
        return shard_time(trial, c, gpus, trial_lists).hours

    lo = largest_fitting(hours_at, doc_counts(cfg, c)[0], hours, limit)
    if lo:
        fixes.append(f"eval.limit={lo}")
    return f"over the {limit:g} h limit: " + ", or ".join(fixes)


def largest_fitting(hours_at, n: int, hours_n: float, limit: float) -> int:
    """The largest eval.limit in [0, n) whose hours are within `limit`, given `hours_at` (increasing in
    it) and hours_n = hours_at(n) > limit: an interpolation search (hours are nearly linear in the
    docs: a few probes, each a whole schedule), halving whenever a probe did not halve the interval."""
    lo, hi, h_lo, h_hi, halve = 0, n, None, hours_n, False
    while hi - lo > 1:
        if halve or h_lo is None and lo > 0:
            mid = (lo + hi) // 2
        else:
            base = 0.0 if h_lo is None else h_lo
            mid = lo + int((limit - base) / max(h_hi - base, 1e-12) * (hi - lo))
        mid = min(max(mid, lo + 1), hi - 1)
        width, h = hi - lo, hours_at(mid)
        lo, hi, h_lo, h_hi = (mid, hi, h, h_hi) if h <= limit else (lo, mid, h_lo, h)
        halve = not halve and hi - lo > width // 2
    return lo


def plan_shards(cfg: dict, pl: Plan, counts: list[TaskCounts]) -> list[ShardPlan]:
    out = []
    a = machine(cfg)[0]
    for c in counts:
        lists = request_lists(cfg, c, a)
        t = shard_time(cfg, c, pl.gpus, lists)
        over = t.hours > time_limit_h(cfg)
        gpu_gb = max(pl.eval_bytes_per_rank, pl.importance_bytes_per_rank) / 2**30
        out.append(ShardPlan(c.task, c.shot, doc_counts(cfg, c)[0], c.source, c.eval_tokens, t.schedule.total.forwards,
                             t.gathered_bytes / 1e9, t.start_s / 3600, t.compute_s / 3600, t.comm_s / 3600,
                             t.calls_s / 3600, t.hours, gpu_gb, pl.host_bytes_per_rank / 2**30, pl.fits, over,
                             _advice(cfg, c, pl.gpus, t.hours, lists) if over else ""))
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
                       f"importance.batch_size={pl.importance_batch}"
                       + (" (auto)" if cfg["importance"]["batch_size"] == "auto" else "")),
        ("host memory", f"{pl.host_bytes_per_rank / gb:.1f} GB per rank (partitioned loading), "
                        f"{pl.host_bytes_per_rank * pl.gpus / gb:.0f} GB per job"),
        ("fits", "yes" if pl.fits else "no"),
        ("largest batches", f"eval.batch_size={pl.max_eval_batch}, importance.batch_size={pl.max_importance_batch}"),
        ("speed", f"{p['utilization']:.0%} of {p['peak_tflops']} TFLOP/s per GPU; all-gathers over {p['interconnect']} "
                  f"at {bw:g} GB/s" + ("" if p.get("bandwidth_gbs") else f" ({INTERCONNECTS[p['interconnect']][1]})")),
        ("fixed costs", f"{p['pass_call_ms']:g} ms per pass + {p['layer_call_ms']:g} ms per block, "
                        f"{p['startup_s']:g} s to start a job, weights read at {p['load_gbs']:g} GB/s, "
                        f"{p['tokenize_ktok_s']:g}k tokens/s tokenised"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def render_shards(shards: list[ShardPlan], cfg: dict) -> str:
    """The per-shard table, the sweep's totals and a line per shard over the job's time limit."""
    head = ("task", "shot", "eval docs", "tok/doc", "passes", "gathered GB", "start h", "compute h", "comm h",
            "calls h", "hours", "GPU GB", "host GB", "fits")
    rows = [(s.task, str(s.shot), f"{s.eval_docs:,}", f"{s.tokens_per_doc:.0f}", f"{s.passes:,}",
             f"{s.gathered_gb:,.0f}", f"{s.start_h:.1f}", f"{s.compute_h:.1f}", f"{s.comm_h:.1f}", f"{s.calls_h:.1f}",
             f"{s.hours:.1f}", f"{s.gpu_gb:.1f}",
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
             "bandwidth_gbs", "layer_call_ms", "pass_call_ms", "startup_s", "load_gbs", "tokenize_ktok_s",
             "token_sample", "out")


def compose(overrides: list[str]) -> dict:
    """conf/plan.yaml with Hydra-style overrides, resolved; the planner's own keys under `plan`."""
    from .config import compose as compose_config

    cfg = compose_config("plan", overrides)
    cfg["plan"] = {k: cfg.pop(k) for k in PLAN_KEYS}
    return cfg


def _finite(d: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException

    from .validation import check_overrides, check_plan

    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return 0
    try:
        check_overrides(args)
        cfg = compose(args)
        check_plan(cfg)
        pl = make_plan(cfg)
        shards = plan_shards(cfg, pl, task_counts(cfg))
    except HydraException as e:  # model=nope, foo=1: Hydra's message (and hint, options) on one line
        options = getattr(e, "options", None)
        hint = f": use one of {', '.join(options)}" if options else ""
        lines = [line.strip() for line in str(e).strip().splitlines()[:2] if line.strip()]
        print("error: " + " ".join(lines) + hint, file=sys.stderr)
        return 2
    except (PlanError, ValueError) as e:  # ConfigError is a ValueError
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
