"""DeepSpeed ZeRO-Inference: shard a big model's parameters across the GPUs of a job (stage 3,
optionally offloaded to CPU memory) so that OPT-66B-sized models fit.

Enabled by `model.deepspeed.enabled=true` (the `paper` experiment does). The gates, the scorer and
importance keep working unchanged: ZeRO-3 gathers each submodule's parameters in that submodule's
forward, our hooks sit on the same submodules, and gate gradients come from
`torch.autograd.grad` on the gate probes (no `engine.backward`, no optimizer). The ranks score
different documents but make the same sequence of module calls (icl_scale/distributed.py,
scoring.Lockstep); rank 0 writes results.

How often the model is gathered: every forward call gathers each parameter once (persistent ones
never), so the scorer makes few, full calls under ZeRO-3 (icl_scale/packed.py, scoring.score_masks);
`stage3_knobs` sets what may be whole at once (model.deepspeed.max_live_parameters and the rest), and
`GatherCount` counts what was gathered.

Facts this relies on (measured with deepspeed 0.19 / transformers 5.x): `deepspeed.initialize` on
an already-built model partitions it correctly, whereas `zero.Init` during construction breaks
transformers 5.x weight initialisation; `engine.module(...)` + autograd.grad gives gate gradients
identical to plain torch.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from ..distributed import init_process_group

log = logging.getLogger(__name__)

OFFLOAD = ("none", "cpu")


def ds_config(dtype: torch.dtype, offload_param: str = "none", knobs: dict | None = None) -> dict:
    """DeepSpeed's config: stage 3, inference only; `knobs` (stage3_knobs) sets what is whole when."""
    if offload_param not in OFFLOAD:
        raise ValueError(f"model.deepspeed.offload_param={offload_param!r}; use one of {', '.join(OFFLOAD)}")
    zero = {"stage": 3, **(knobs or {})}
    if offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def free_memory_bytes() -> int:
    """Free memory of this rank's device: the GPU's, else this rank's share of the host's available memory."""
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    import psutil

    from ..distributed import ranks_on_this_node

    return int(psutil.virtual_memory().available) // max(1, ranks_on_this_node())


@functools.cache
def least_free_memory() -> int:
    """`free_memory_bytes` at its first call (while the model loads), the least over the ranks: every
    rank sizes its passes from the same number, so their schedules stay the same."""
    from ..distributed import max_over_ranks

    return -max_over_ranks(-free_memory_bytes())


def memory_beside_parameters(lm) -> int:
    """Device memory a pass's activations may take, the same on every rank: `least_free_memory`, less
    under ZeRO-3 (a partitioned `lm`, whose spec holds the resolved stage-3 knobs) the parameters that
    may be whole beside the module running."""
    live = int(lm.spec["deepspeed"]["stage3_max_live_parameters"]) if lm.engine is not None else 0
    return least_free_memory() - live * lm.dtype.itemsize


def model_numbers(model: torch.nn.Module) -> tuple[int, int, int]:
    """(parameters of the model, of its largest decoder block, of its largest tensor), each parameter
    once, whole or partitioned."""
    def numel(params):
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in params)

    blocks = [numel(b.parameters()) for m in model.modules() if isinstance(m, torch.nn.ModuleList) for b in m]
    return numel(model.parameters()), max(blocks, default=0), max(numel([p]) for p in model.parameters())


def stage3_knobs(model: torch.nn.Module, ds: dict, dtype: torch.dtype) -> dict:
    """The stage-3 inference knobs of `ds` (model.deepspeed), "auto" resolved from memory and the model,
    identical on every rank (prefetches are collectives: ranks that fetched different sets would wait
    on each other). `max_live_parameters` bounds what is whole at once: DeepSpeed always gathers the
    module about to run, whatever its budget, and bounds only what it keeps and prefetches beside it,
    so its budget is ours less the largest block, and less the largest tensor (a prefetch may pass its
    bound by one). That is also the reuse distance: a parameter needed again later in the same forward
    stays whole only within it (a small model's tied embedding)."""
    total, block, tensor = model_numbers(model)
    beside = live_beside(ds["max_live_parameters"], total, block, tensor, least_free_memory(), dtype.itemsize)
    if beside == 0 and ds["max_live_parameters"] != "auto":  # legal, but every module is gathered on demand
        log.warning("model.deepspeed.max_live_parameters=%s holds only the module running (largest block %d + "
                    "largest tensor %d parameters): nothing is prefetched; set it to %d or more (one block beside) "
                    "or auto", ds["max_live_parameters"], block, tensor, 2 * block + tensor)
    prefetch = block if ds["prefetch_bucket_size"] == "auto" else int(ds["prefetch_bucket_size"])
    persist = ds["persistence_threshold"]
    persist = int(getattr(model.config, "hidden_size", 0)) if persist == "auto" else persist
    return {"stage3_max_live_parameters": beside, "stage3_max_reuse_distance": beside,
            "stage3_prefetch_bucket_size": min(prefetch, beside), "stage3_param_persistence_threshold": int(persist)}


def live_beside(setting, total: int, block: int, tensor: int, free_bytes: int, width: int) -> int:
    """Parameters that may be whole beside the module running (stage3_knobs): model.deepspeed.
    max_live_parameters (auto: a quarter of the free memory, at least two blocks, at most the model)
    less the largest block and the largest tensor. The planner sizes ZeRO-3 passes with it too."""
    live = min(total, max(2 * block, free_bytes // 4 // width)) if setting == "auto" else int(setting)
    return max(0, live - block - tensor)


def zero_inference(model: torch.nn.Module, dtype: torch.dtype, offload_param: str = "none", ds: dict | None = None):
    """Partition `model` with ZeRO-3 across the job's ranks. Returns (engine, module, world size, knobs):
    the caller scores with `module` and keeps `engine` alive (it owns the partitioning hooks). `ds`:
    model.deepspeed, whose stage-3 knobs apply (None: DeepSpeed's own)."""
    import deepspeed

    de = init_process_group()
    if torch.cuda.is_available():
        torch.cuda.set_device(de.local_rank)
    knobs = stage3_knobs(model, ds, dtype) if ds is not None else {}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config(dtype, offload_param, knobs))
    module = engine.module
    module.eval()
    module.requires_grad_(False)
    log.info("ZeRO-3 inference: rank %d/%d, offload_param=%s, %s", de.rank, de.world_size, offload_param, knobs)
    return engine, module, de.world_size, knobs


@contextlib.contextmanager
def gathered(params):
    """Full parameter tensors under ZeRO-3 for the whole `with` block (a no-op otherwise), for code
    that reads weights directly (the induction copying score's OV circuit). They stay whole through
    forward passes too: marked persistent, so ZeRO does not release them after their module runs."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        before = [p.ds_persist for p in params]
        for p in params:
            p.ds_persist = True
        try:
            yield
        finally:
            for p, b in zip(params, before):
                p.ds_persist = b


# --- how much of the model ZeRO-3 gathers ----------------------------------------------------------

class GatherCount:
    """Parameters ZeRO-3 gathers on this rank: `params` all-gathered, `bytes` of their full tensors,
    and `gathers` = bytes / the model's bytes (full-model-equivalent gathers). Counted in DeepSpeed's
    parameter coordinator, where each forward (and backward) fetches a submodule's partitioned
    parameters before the submodule runs; parameters already whole (persistent, or still live) are
    not gathered again and not counted."""

    def __init__(self, model: torch.nn.Module):
        self.model_bytes = sum(_full_bytes(p) for p in model.parameters())
        self.params = 0
        self.bytes = 0

    @property
    def gathers(self) -> float:
        return self.bytes / self.model_bytes if self.model_bytes else 0.0

    def totals(self) -> dict:
        return {"gathers": round(self.gathers, 3), "gathered_gb": round(self.bytes / 2**30, 6), "params": self.params}

    def since(self, before: dict) -> dict:
        """The counts since `before` (an earlier `totals()`)."""
        now = self.totals()
        return {k: round(now[k] - before[k], 6) for k in now}


def _full_bytes(p) -> int:
    numel = getattr(p, "ds_numel", p.numel())
    return int(numel) * (p.ds_tensor.element_size() if hasattr(p, "ds_tensor") else p.element_size())


_COUNTS: list[GatherCount] = []


def count_gathers(model: torch.nn.Module) -> GatherCount:
    """A GatherCount for `model` (partitioned by ZeRO-3), counting from now on. The coordinator's
    private gather method is wrapped once per process; every GatherCount made since sees each gather."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C

    name = "_PartitionedParameterCoordinator__all_gather_params_"
    real = getattr(C, name)
    if not getattr(real, "_icl_scale_counted", False):
        def counted(self, params, forward, quantize=False):
            todo = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
            for c in _COUNTS:
                c.params += len(todo)
                c.bytes += sum(_full_bytes(p) for p in todo)
            return real(self, params, forward, quantize)

        counted._icl_scale_counted = True
        setattr(C, name, counted)
    count = GatherCount(model)
    _COUNTS.append(count)
    return count
