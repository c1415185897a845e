"""Check a shard's whole configuration before anything runs: before a model loads, before a store
folder is touched. Each problem is one line naming the setting and the fix.

`check_config` needs only the config (the sweep runs it for every shard before submitting);
`check_data` reads the task rows the shard will use (labels, an empty eval set, a missing split)
and returns their fingerprint, which enters the shard's config hash.
"""

from __future__ import annotations

import hashlib
import json
import re
from numbers import Integral, Real
from typing import Any

from . import pruning as P
from .schema import check_section
from .settings import ConfigError, Spec, check_value
from .tasks import get_task, load_split
from .tasks.data import resolve_source, splits_present
from .tasks.fewshot import demo_pool
from .tasks.taskfile import file_fingerprint

COMPARE = ("induction", "random")

# Settings whose check is more than type, range and option (their own code below); every other
# setting a shard reads is checked from its declaration in icl_scale/schema.py.
SPECIAL = ("eval.physical_below", "eval.masks_per_pass", "knockout.limit", "pruning.levels",
           "pruning.combined_levels", "pruning.compare")
# What a shard reads, in the order it is checked.
SHARD_SETTINGS = ("shot", "seed", "eval.", "importance.", "knockout.", "pruning.", "store.force",
                  "store.lease_timeout_s", "progress", "wandb.mode")

# A setting whose key names a credential, at any depth (+wandb.api_key=..., +hub.token=...): refused,
# because the command line and the config are recorded (Hydra's multirun folders, submitit's job
# payloads, the manifest, W&B). Special-token names (bos_token...) are not credentials.
SECRET_KEY = re.compile(r"(^|_)(api_?key|key|token|secret|password|passwd|credentials?)$", re.IGNORECASE)
NOT_SECRET = re.compile(r"^(bos|eos|pad|unk|sep|cls|mask)_token$", re.IGNORECASE)
SECRET_FIX = ("settings never hold credentials (they are recorded in the store and the job folders): "
              "export WANDB_API_KEY or run `wandb login` instead")


def is_secret_key(key: str) -> bool:
    """True for a dotted key with a part that names a credential (api_key, token, password, secret...)."""
    return any(SECRET_KEY.search(part) and not NOT_SECRET.match(part) for part in str(key).split("."))


def secret_keys(cfg: Any, prefix: str = "") -> list[str]:
    """The dotted keys of `cfg` (any depth) that name a credential."""
    if not isinstance(cfg, dict):
        return []
    out = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        out += [key] if is_secret_key(str(k)) else secret_keys(v, key + ".")
    return out


def check_no_secrets(cfg: dict) -> None:
    """No setting of the config names a credential."""
    found = secret_keys(cfg)
    if found:
        raise ConfigError(f"{found[0]} looks like a credential: {SECRET_FIX}")


def check_overrides(args: list[str]) -> None:
    """Command-line overrides (`key=value`, `+key=value`, `++key=value`), before Hydra or anything else
    records them: none may set a key that names a credential. Flags (`-m`, `--cfg job`) are skipped."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if is_secret_key(key):
            raise ConfigError(f"{key} looks like a credential: {SECRET_FIX}")


def get(cfg: dict, key: str) -> Any:
    v: Any = cfg
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def integer(cfg: dict, key: str, lo: int | None = None, none_ok: bool = False) -> int | None:
    """An int setting (not a bool, not 1.5, not "abc"), at least `lo`."""
    check_value(key, get(cfg, key), Spec(int, none_ok=none_ok, lo=lo))
    return get(cfg, key)


def check_config(cfg: dict) -> None:
    """Every setting a shard reads: types, ranges, option names (from the schema), and combinations
    that would quietly measure the wrong thing."""
    check_no_secrets(cfg)
    get_task(cfg["task"])  # unknown task: one line listing the valid ones
    for prefix in SHARD_SETTINGS:
        check_section(cfg, prefix, skip=SPECIAL)
        if prefix == "eval.":
            _check_eval(cfg)
    if get(cfg, "knockout.split") == "heldout":
        integer(cfg, "knockout.limit", lo=1)
    _check_pruning(cfg)
    root = get(cfg, "store.root")
    if root is None or not str(root).strip():
        raise ConfigError(f"store.root={root!r} must be a folder, e.g. store.root=store (an empty value would "
                          "write the store into the working directory)")
    check_model(cfg["model"])


def check_model(spec: dict) -> None:
    """The cheap part of loading: a local checkpoint folder's files, a hub id, the device and dtype
    (nothing is read from the hub and no weights load)."""
    from .models.loading import (
        RANDOM_FAMILIES,
        SOURCES,
        check_architecture,
        checkpoint_key,
        hub_id,
        is_local,
        local_checkpoint,
        model_spec,
        read_config_json,
        resolve_device,
        resolve_dtype,
    )

    spec = model_spec(spec)
    source = spec["source"]
    if source not in SOURCES:
        raise ConfigError(f"model.source={source!r} is not an option; use one of {', '.join(SOURCES)}")
    check_section({"model": spec}, "model.", skip=("model.source",))
    if source == "random" and not spec["family"]:
        raise ConfigError(f"model.family is required for model.source=random: use one of {', '.join(RANDOM_FAMILIES)}")
    if is_local(spec):
        config = read_config_json(local_checkpoint(spec))
        check_architecture(config.get("model_type"), f"{checkpoint_key(spec)}={spec['id'] or spec['path']}",
                           spec["attn_implementation"])
    elif source in ("hub", "hf"):
        hub_id(spec)
    resolve_dtype(spec["dtype"], resolve_device(spec["device"]))
    _check_deepspeed(spec["deepspeed"])


def _check_deepspeed(ds: dict) -> None:
    """ZeRO-3 settings, before any model loads: the offload choice, and DeepSpeed being installed."""
    import importlib.util

    if not ds["enabled"]:
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("model.deepspeed.enabled=true needs DeepSpeed: pip install deepspeed, or set "
                          "model.deepspeed.enabled=false")


def _check_eval(cfg: dict) -> None:
    below = get(cfg, "eval.physical_below")
    if below is not None and (isinstance(below, bool) or not isinstance(below, Real) or not below > 0):
        raise ConfigError(f"eval.physical_below={below!r} must be a number > 0 (the compute fraction at or "
                          "under which a mask is scored on a physically pruned copy, e.g. 0.9) or null (always gate)")
    per_pass = get(cfg, "eval.masks_per_pass")
    if per_pass != "auto" and (isinstance(per_pass, bool) or not isinstance(per_pass, int) or per_pass < 1):
        raise ConfigError(f"eval.masks_per_pass={per_pass!r} must be auto or an integer >= 1 (how many masks "
                          "share one batched forward; 1 = one mask per pass)")
    split = get(cfg, "eval.split")
    if split is not None and not isinstance(split, str):
        raise ConfigError(f"eval.split={split!r} must be a split name or null (the task's paper split)")
    if split == "train":
        raise ConfigError("eval.split=train would evaluate on the documents importance is computed on "
                          "(the train split); use the task's validation/test split (eval.split=null)")


def _check_pruning(cfg: dict) -> None:
    for key in ("pruning.levels", "pruning.combined_levels"):
        levels = get(cfg, key)
        if not isinstance(levels, list) or not levels:
            raise ConfigError(f"{key}={levels!r} must be a non-empty list of percentages, e.g. {key}=[0,50,90]")
        bad = [p for p in levels if isinstance(p, bool) or not isinstance(p, Real)]
        if bad:
            raise ConfigError(f"{key} contains {bad[0]!r}; every level is a percentage in 0..100")
        P.check_levels(levels, key)
        _check_level_list(key, levels)
    compare = get(cfg, "pruning.compare") or []
    if not isinstance(compare, list):
        raise ConfigError(f"pruning.compare={compare!r} must be a list, e.g. pruning.compare=[{compare}]")
    bad = sorted(set(compare) - set(COMPARE))
    if bad:
        raise ConfigError(f"pruning.compare has {bad}; use a list of induction and/or random")


def _check_level_list(key: str, levels: list) -> None:
    """Percentages, each once, with the unpruned 0 (every curve's first point and baseline)."""
    fix = ",".join(f"{p:g}" for p in sorted({float(p) * (100 if max(levels) <= 1 else 1) for p in levels} | {0.0}))
    if max(levels) <= 1 and any(0 < p < 1 for p in levels):
        raise ConfigError(f"{key}={levels} look like fractions; levels are percentages, e.g. {key}=[{fix}]")
    dup = sorted({p for p in levels if levels.count(p) > 1})
    if dup:
        raise ConfigError(f"{key}={levels} lists {dup} more than once; list each level once, e.g. {key}=[{fix}]")
    if 0 not in levels:
        raise ConfigError(f"{key}={levels} has no 0: the unpruned point is each curve's baseline; e.g. {key}=[{fix}]")


def _positive(cfg: dict, key: str, hi: float | None = None) -> float:
    """A number > 0 (and <= hi)."""
    v = get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, Real) or not v > 0 or (hi is not None and v > hi):
        span = f"in (0, {hi:g}]" if hi is not None else "> 0"
        raise ConfigError(f"{key}={v!r} must be a number {span}, e.g. {key}={hi or 1:g}")
    return float(v)


def check_plan(cfg: dict) -> None:
    """The planner's inputs (python -m icl_scale.plan): its own keys (`cfg["plan"]`, named as typed:
    gpus=...) and the shard and sweep sizes it counts, before anything is computed or written."""
    from pathlib import Path

    plan = cfg["plan"]
    integer(plan, "gpus", lo=1)
    for key in ("gpu_mem_gb", "peak_tflops", "layer_call_ms", "pass_call_ms", "startup_s", "load_gbs",
                "tokenize_ktok_s"):
        _positive(plan, key)
    _positive(plan, "utilization", hi=1)
    integer(plan, "scored_tokens", lo=1)
    integer(plan, "token_sample", lo=1)
    out = plan.get("out")
    if out is not None and (not isinstance(out, str) or not out.strip() or Path(out).is_dir()):
        raise ConfigError(f"out={out!r} must be a file name for the plan's JSON (not a folder), e.g. out=plan.json")
    for prefix in ("eval.", "importance.", "knockout.", "model.max_length"):
        check_section(cfg, prefix, skip=SPECIAL)
    _check_eval(cfg)
    if get(cfg, "knockout.split") == "heldout":
        integer(cfg, "knockout.limit", lo=1)
    _check_pruning(cfg)
    check_sweep(cfg)


# --- the data a shard will read -----------------------------------------------------------------

def fingerprint(rows: list[dict]) -> str:
    """A hash of the rows' content: the config hash changes when the data does."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def check_data(cfg: dict) -> dict[str, str]:
    """Load the splits the shard reads (rows and labels are checked on load) and return
    {split: fingerprint of the rows used}. An empty eval set is an error, not acc=NaN."""
    task = get_task(cfg["task"])
    data_dir = get(cfg, "data.dir")
    split = get(cfg, "eval.split") or task.eval_split
    if get(cfg, "eval.split") and resolve_source(task, split, data_dir).kind in ("mirror", "embedded"):
        src = resolve_source(task, split, data_dir)
        if not (src.root / task.name / f"{split}.jsonl").is_file():
            have = splits_present(src.root, task.name)
            raise ConfigError(f"eval.split={split}: {task.name} has no {split} split in {src.root} (present: "
                              f"{', '.join(have) or 'none'}); use eval.split=null (the paper's split, "
                              f"{task.eval_split})")
    eval_rows = load_split(task, split, data_dir)[:get(cfg, "eval.limit")]
    if not eval_rows:
        raise ConfigError(f"{task.name} {split} has no rows (data file empty?): there is nothing to evaluate")
    train = load_split(task, "train", data_dir)  # demonstrations, importance and knock-out docs
    if not train:
        raise ConfigError(f"{task.name} train has no rows: importance and demonstrations need it")
    _check_sizes(cfg, task, train)
    return {"train": fingerprint(train), split: fingerprint(eval_rows), **file_fingerprint(task)}


def _check_sizes(cfg: dict, task, train: list[dict]) -> None:
    """Settings that only make sense for the train split's size: checked here, before the model loads."""
    pool = len(demo_pool(task, train))
    if cfg["shot"] > pool - 1:  # a train doc is never its own demonstration
        raise ConfigError(f"shot={cfg['shot']}: {task.name} train has {pool} rows that can be demonstrations, so at "
                          f"most {pool - 1} per doc; use shot<={pool - 1} or a bigger train split (data.dir)")
    if get(cfg, "knockout.split") == "heldout" and not 1 <= cfg["knockout"]["limit"] < len(train):
        raise ConfigError(f"knockout.limit={cfg['knockout']['limit']} must be in 1..{len(train) - 1} for "
                          f"{task.name} ({len(train)} train docs; the rest are importance docs)")


def check_transfer(cfg: dict) -> None:
    """The transfer job's settings: lists of known tasks, each once."""
    for key in ("transfer.sources", "transfer.rankings_from"):
        v = get(cfg, key)
        if not isinstance(v, list):
            raise ConfigError(f"{key}={v!r} must be a list of tasks, e.g. {key}=[copa,rte]")
        for t in v:
            try:
                get_task(t)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ConfigError(f"{key} lists {dup} more than once; list each task once")
    if not get(cfg, "transfer.sources") and not get(cfg, "transfer.rankings_from"):
        raise ConfigError("transfer.sources and transfer.rankings_from are both empty: there is no ranking to "
                          "transfer; e.g. transfer.sources=[copa,rte]")
    _check_high_low(get(cfg, "transfer.high_low"))


def _check_high_low(high_low) -> None:
    """transfer.high_low: null, or {shot: {task: {high: task, low: task}}} with known tasks, shots >= 0."""
    fix = "e.g. transfer.high_low={1:{copa:{high:wsc,low:record}}}"
    if high_low is None:
        return
    if not isinstance(high_low, dict):
        raise ConfigError(f"transfer.high_low={high_low!r} must be a mapping {{shot: {{task: {{high: task, "
                          f"low: task}}}}}}, {fix}")
    for shot, by_task in high_low.items():
        if isinstance(shot, bool) or not str(shot).isdigit() or not isinstance(by_task, dict):
            raise ConfigError(f"transfer.high_low.{shot}: keys are shots (whole numbers >= 0) mapping tasks to "
                              f"{{high: task, low: task}}, {fix}")
        for task, roles in by_task.items():
            where = f"transfer.high_low.{shot}.{task}"
            if not isinstance(roles, dict) or not roles or set(roles) - {"high", "low"}:
                raise ConfigError(f"{where}={roles!r} must be {{high: task, low: task}} (either or both), {fix}")
            for t in (task, *roles.values()):
                try:
                    get_task(t)
                except ValueError as e:
                    raise ConfigError(f"{where}: {e}") from None


def check_sweep(cfg: dict) -> None:
    """The sweep's own settings (each shard's are checked by check_config)."""
    for key in ("sweep.tasks", "sweep.shots"):
        v = get(cfg, key)
        if not isinstance(v, list) or not v:
            raise ConfigError("sweep.tasks and sweep.shots must be non-empty lists, e.g. sweep.tasks=[copa,rte] "
                              f"sweep.shots=[0,1] (got {key}={v!r})")
    bad = [s for s in get(cfg, "sweep.shots") if isinstance(s, bool) or not isinstance(s, Integral) or s < 0]
    if bad:
        raise ConfigError(f"sweep.shots contains {bad[0]!r}; every shot is a whole number >= 0, "
                          "e.g. sweep.shots=[0,1,5]")
    seeds = get(cfg, "sweep.seeds")
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, Integral) or s < 0
                                                       for s in seeds):
        raise ConfigError(f"sweep.seeds={seeds!r} must be a non-empty list of whole numbers >= 0 (demonstration "
                          "seeds), e.g. sweep.seeds=[0,1,2]")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        fix = ",".join(str(s) for s in sorted(set(seeds)))
        raise ConfigError(f"sweep.seeds={seeds} lists {dup} more than once; list each seed once, e.g. "
                          f"sweep.seeds=[{fix}]")
    check_section(cfg, "sweep.", skip=("sweep.tasks", "sweep.shots", "sweep.seeds"))
    if get(cfg, "sweep.transfer"):
        check_transfer(cfg)
    check_section(cfg, "launcher.", skip=("launcher.name",))
