"""A sweep over models (`sweep.models`): one config per model, each with its own resources.

An entry of `sweep.models` is a model preset of conf/model/ (`opt-1.3b`) or a mapping naming one with
model settings over it (`{preset: hf, id: Qwen/Qwen2.5-0.5B}`, `{preset: tiny-llama, name: tiny-b,
config: {num_hidden_layers: 4}}`); `sweep.model_settings` applies to every entry, between its preset
and its own keys. Each model's config is the sweep's config with that model in `model`.

With `launcher.gpus_per_node=auto` the planner (icl_scale.plan.make_plan) picks each model's GPUs:
the fewest of 1, 2, 4, ... up to `launcher.max_gpus` that its shard fits at the configured batch
sizes on GPUs of `launcher.gpu_mem_gb`, with ZeRO-3 across more than one (a 125m model: 1 GPU, no
ZeRO; 66B on 40 GB GPUs: 8 with ZeRO-3). `launcher.mem_gb=auto` is then the plan's host memory of
those ranks (icl_scale.sweep.job_resources).

The sweep's manifest (`<store.root>/_sweeps/<sweep.name>/manifest.json`) lists the models, their
resources and jobs; the cross-model summary is written beside it (icl_scale.scale).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from .config import CONF_DIR, to_dict
from .settings import ConfigError

SWEEPS = "_sweeps"  # under store.root: one folder per sweep name (no model is called that)


def sweep_dir(cfg: dict) -> Path:
    """<store.root>/_sweeps/<sweep.name>: the sweep's manifest and its cross-model summary."""
    return Path(cfg["store"]["root"]) / SWEEPS / str(cfg["sweep"]["name"])


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _entry(entry, i: int) -> tuple[str, dict]:
    """(preset name, its own model settings) of one sweep.models entry."""
    where = f"sweep.models[{i}]"
    if isinstance(entry, str) and entry:
        name, own = entry, {}
    elif isinstance(entry, dict) and isinstance(entry.get("preset"), str):
        name, own = entry["preset"], {k: v for k, v in entry.items() if k != "preset"}
    else:
        raise ConfigError(f"{where}={entry!r} must be a model preset name (e.g. opt-1.3b) or a mapping with a "
                          "preset, e.g. {preset: hf, id: Qwen/Qwen2.5-0.5B}")
    if name not in presets():
        raise ConfigError(f"{where}: unknown model preset {name!r}; the presets (conf/model/) are: "
                          f"{', '.join(presets())}")
    return name, own


def model_section(entry, i: int, common: dict) -> dict:
    """The resolved `model` section of one entry: schema defaults < preset < sweep.model_settings <
    the entry's own keys."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, InterpolationToMissingValueError, MissingMandatoryValue

    from .schema import ModelConfig

    name, own = _entry(entry, i)
    try:
        preset = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
        # A `???` of the preset does not survive the merge over the schema's default: look at the preset.
        missing = [k for k in preset if OmegaConf.is_missing(preset, k) and k not in own and k not in (common or {})]
        node = OmegaConf.merge(OmegaConf.structured(ModelConfig), preset, common or {}, own)
        model = to_dict(OmegaConf.create({"model": node}))["model"]
    except ConfigKeyError as e:
        raise ConfigError(f"sweep.models[{i}] ({name}): {getattr(e, 'key', None) or e!s} is not a model setting; "
                          "`python jobs/score.py --help` lists them (model.*)") from None
    except (MissingMandatoryValue, InterpolationToMissingValueError):
        missing = ["id"]
    if missing:
        raise ConfigError(f"sweep.models[{i}]: preset {name} needs {missing[0]}, e.g. {{preset: {name}, {missing[0]}: "
                          + ("org/name} (a hub id or a local folder)" if missing[0] == "id" else "...}"))
    return model


def model_sections(cfg: dict) -> list[dict]:
    """Every model of the sweep (`sweep.models`, else the one `model`), each checked, names distinct."""
    sw = cfg["sweep"]
    entries, common = sw["models"], sw["model_settings"]
    if not isinstance(entries, list):
        raise ConfigError(f"sweep.models={entries!r} must be a list of model presets, e.g. "
                          "sweep.models=[opt-125m,opt-1.3b]")
    if common is not None and not isinstance(common, dict):
        raise ConfigError(f"sweep.model_settings={common!r} must be a mapping of model settings, e.g. "
                          "{dtype: float16}")
    if not entries:
        return [cfg["model"]]
    models = [model_section(e, i, common) for i, e in enumerate(entries)]
    names = [m["name"] for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"sweep.models lists {dup[0]} more than once (the store keeps one folder per model "
                          f"name); drop the repeat or give one entry its own name, e.g. {{preset: ..., name: "
                          f"{dup[0]}-b}}")
    return models


def with_model(cfg: dict, model: dict) -> dict:
    out = copy.deepcopy(cfg)
    out["model"] = copy.deepcopy(model)
    return out


def model_cfgs(cfg: dict) -> list[dict]:
    """One config per model of the sweep, each with its GPUs and ZeRO-3 chosen (`plan_gpus`)."""
    return [plan_gpus(with_model(cfg, m)) for m in model_sections(cfg)]


# --- GPUs per model from the planner --------------------------------------------------------------

def _gpu_counts(most: int) -> list[int]:
    counts, g = [], 1
    while g < most:
        counts.append(g)
        g *= 2
    return counts + [most]


def plan_at(cfg: dict, gpus: int):
    """The planner's Plan of the model's shard on `gpus` GPUs of launcher.gpu_mem_gb (ZeRO-3 across
    more than one), the planner's other machine settings at their defaults."""
    from .plan import PLAN_KEYS, make_plan
    from .schema import PlanConfig
    from .settings import defaults

    declared = defaults(PlanConfig)
    machine = {k: declared[k] for k in PLAN_KEYS}
    offload = cfg["model"]["deepspeed"]["offload_param"]
    machine.update(gpus=gpus, gpu_mem_gb=float(cfg["launcher"]["gpu_mem_gb"]), offload=offload)
    zero = gpus > 1 or offload == "cpu"
    model = {**cfg["model"], "deepspeed": {**cfg["model"]["deepspeed"], "enabled": zero}}
    return make_plan({**cfg, "model": model, "plan": machine})


def plan_gpus(cfg: dict) -> dict:
    """`launcher.gpus_per_node=auto`: the fewest GPUs the planner fits one shard of the model on, and
    ZeRO-3 (model.deepspeed.enabled) when that is more than one; any other value is left as it is."""
    from .plan import PlanError
    from .schema import check_section

    la = cfg["launcher"]
    if la["gpus_per_node"] != "auto":
        return cfg
    check_section(cfg, "launcher.", skip=("launcher.name",))
    name = cfg["model"]["name"]
    if la["gpu_mem_gb"] is None:
        raise ConfigError("launcher.gpus_per_node=auto needs launcher.gpu_mem_gb, the memory of one GPU of the "
                          "nodes (e.g. launcher.gpu_mem_gb=80), or set launcher.gpus_per_node to a number")
    most = int(la["max_gpus"])
    try:
        fits = next((g for g in _gpu_counts(most) if plan_at(cfg, g).fits), None)
    except PlanError as e:
        raise ConfigError(f"launcher.gpus_per_node=auto for {name}: {str(e).splitlines()[0]}") from None
    if fits is None:
        raise ConfigError(f"{name} does not fit {most} GPUs of {la['gpu_mem_gb']:g} GB at eval.batch_size="
                          f"{cfg['eval']['batch_size']} importance.batch_size={cfg['importance']['batch_size']} "
                          f"(python -m icl_scale.plan model={name} gpus={most} gpu_mem_gb={la['gpu_mem_gb']:g}); "
                          "raise launcher.max_gpus, lower the batch sizes or set model.deepspeed.offload_param=cpu")
    out = copy.deepcopy(cfg)
    out["launcher"]["gpus_per_node"] = fits
    out["model"]["deepspeed"]["enabled"] = fits > 1 or cfg["model"]["deepspeed"]["offload_param"] == "cpu"
    return out


# --- the sweep's manifest -----------------------------------------------------------------------

def manifest_entry(c: dict, labels: list[str], jobs: dict) -> dict:
    """A model's entry in the sweep's manifest: its size, resources, shards and jobs."""
    from .scale import planned_parameters

    la = c["launcher"]
    return {"name": c["model"]["name"], "parameters": planned_parameters(c["model"]),
            "gpus_per_node": la["gpus_per_node"], "zero3": bool(c["model"]["deepspeed"]["enabled"]),
            "offload_param": c["model"]["deepspeed"]["offload_param"], "mem_gb": la["mem_gb"],
            "cpus_per_task": la["cpus_per_task"], "shards": labels, "jobs": jobs}


def write_manifest(cfg: dict, models: list[dict]) -> Path:
    """One manifest for the whole sweep: its tasks, shots, seeds, launcher and every model's entry."""
    from .store import write_json

    sw = cfg["sweep"]
    path = sweep_dir(cfg) / "manifest.json"
    write_json(path, {"name": sw["name"], "launcher": cfg["launcher"]["name"], "tasks": sw["tasks"],
                      "shots": sw["shots"], "seeds": sw["seeds"], "submitted": time.time(), "models": models})
    return path
