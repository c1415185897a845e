"""Collecting a model's shards from the store for the reducer: each complete shard's files are
checked against the shape the tables and figures read (`check_manifest`, `check_curves`,
`check_importance`) before they are used; a shard whose files do not fit is reported as corrupt
with the file and the field, and never stops the reduction. Complete shards made with different
settings are still collected, but named in `warnings` (`mixed_settings`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .store import MANIFEST, Shard, StoreError, induction_dir, list_shards, safe_name, shard_seed


class ShardFormatError(StoreError):
    """A shard's file does not have the shape the reducer reads; the message is `file: field problem`."""


@dataclass
class ShardData:
    shard: Shard
    curves: dict
    importance: dict[str, torch.Tensor]
    manifest: dict

    @property
    def name(self) -> str:
        return shard_name(self.shard)


@dataclass
class Collected:
    ok: list[ShardData] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)  # {"shard", "status", "reason"}
    # Complete shards whose settings differ from the other shards': {"shard", "keys": {key: {value, others}}}
    mixed: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # one line each (mixed settings, unrecorded settings)


def shard_name(sh: Shard) -> str:
    return sh.name


# --- reading and checking a shard's files -----------------------------------------------------------

def _kind(x: Any) -> str:
    """How a JSON value is described in messages: `3`, `'abc'`, `a list of 2`, `an object`."""
    if isinstance(x, dict):
        return "an object"
    if isinstance(x, list):
        return f"a list of {len(x)}"
    return "null" if x is None else repr(x)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _get(obj: dict, key: str, where: str, ok, expected: str, file: str) -> Any:
    """obj[key], checked with `ok`; `where` is the path of obj inside `file` ('' = the top level)."""
    if key not in obj:
        _fail(file, f"{where} lacks {key!r}" if where else f"lacks {key!r}")
    v = obj[key]
    if not ok(v):
        path = f"{where}.{key}" if where else key
        _fail(file, f"{path} is {_kind(v)}, expected {expected}")
    return v


def _fail(file: str, what: str) -> NoReturn:
    raise ShardFormatError(f"{file}: {what}")


def read_shard_json(sh: Shard, name: str) -> Any:
    p = sh.file(name)
    if not p.is_file():
        _fail(name, "missing")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        _fail(name, f"not valid JSON ({e.msg} at line {e.lineno})")
    except (OSError, UnicodeDecodeError) as e:
        _fail(name, f"unreadable ({e})")


def read_shard_tensors(sh: Shard, name: str) -> dict[str, torch.Tensor]:
    p = sh.file(name)
    if not p.is_file():
        _fail(name, "missing")
    try:
        return load_file(str(p))
    except (SafetensorError, OSError) as e:
        _fail(name, f"not a readable safetensors file ({e})")


def check_manifest(m: Any, sh: Shard) -> None:
    """The manifest fields the reducer reads: an object; timings, resolved and config objects when
    present; config's task/shot those of the shard's folder (a copied or renamed folder is not trusted)."""
    f = MANIFEST
    if not isinstance(m, dict):
        _fail(f, f"is {_kind(m)}, expected an object")
    for key in ("timings", "resolved", "config"):
        if key in m and not isinstance(m[key], dict):
            _fail(f, f"{key} is {_kind(m[key])}, expected an object")
    cfg = m.get("config") or {}
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    _check_place(f"{f}: config", sh, model.get("name"), cfg.get("task"), cfg.get("shot"), cfg.get("seed"))


def _check_place(where: str, sh: Shard, model: Any, task: Any, shot: Any, seed: Any = None) -> None:
    """The model, task, shot and seed a file records (when it does) must be its folder's
    <model>/<task>/<shot>shot/seed<k>: a copied or renamed folder is not trusted. (A legacy
    folder has no seed in its path: it takes the seed its manifest records.)"""
    model = sh.model if model is None else safe_name(model)
    task = sh.task if task is None else safe_name(task)  # a task file's path is stored under its safe name
    shot = sh.shot if shot is None else shot
    seed = sh.seed if seed is None or sh.legacy or not isinstance(shot, int) else shard_seed(shot, seed)
    if (model, task, shot, seed) != (sh.model, sh.task, sh.shot, sh.seed):
        raise ShardFormatError(f"{where} is for {model}/{task}/{shot}shot/seed{seed} but the folder is "
                               f"{shard_name(sh)} (a copied or renamed shard?); rerun it with store.force=true")


def _check_row(r: Any, where: str, metric: str, level_keys: tuple[str, ...], file: str,
               with_metrics: bool = True) -> None:
    if not isinstance(r, dict):
        _fail(file, f"{where} is {_kind(r)}, expected an object")
    for k in level_keys:
        _get(r, k, where, _is_number, "a number (a pruning level in %)", file)
    _get(r, "value", where, _is_number, "a number", file)
    if not with_metrics:
        return
    metrics = _get(r, "metrics", where, lambda v: isinstance(v, dict), "an object", file)
    m = _get(metrics, metric, f"{where}.metrics", lambda v: isinstance(v, dict), "an object", file)
    at = f"{where}.metrics.{metric}"
    _get(m, "value", at, _is_number, "a number", file)
    _get(m, "ci95", at, lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)),
         "2 numbers [lo, hi]", file)
    _get(m, "n", at, _is_count, "a count", file)


def _check_rows(c: dict, key: str, metric: str, level_keys: tuple[str, ...], file: str, required: bool = True,
                with_metrics: bool = True, where: str | None = None, rows: Any = None) -> list:
    where = where or key
    if rows is None:
        if key not in c and not required:
            return []
        rows = _get(c, key, "", lambda v: isinstance(v, list), "a list of rows", file)
    elif not isinstance(rows, list):
        _fail(file, f"{where} is {_kind(rows)}, expected a list of rows")
    for i, r in enumerate(rows):
        _check_row(r, f"{where}[{i}]", metric, level_keys, file, with_metrics)
    return rows


def check_curves(c: Any, sh: Shard) -> None:
    """The keys and row shapes curve_table, summary_table and the plots read."""
    f = "curves.json"
    if not isinstance(c, dict):
        _fail(f, f"is {_kind(c)}, expected an object")
    _check_place(f, sh, c.get("model"), c.get("task"), c.get("shot"), c.get("seed"))
    metric = _get(c, "metric", "", lambda v: isinstance(v, str) and v, "a metric name", f)
    for key in ("n_eval", "n_importance"):
        _get(c, key, "", _is_count, "a count", f)
    _check_rows(c, "heads", metric, ("level",), f)
    _check_rows(c, "ffn", metric, ("level",), f)
    _check_rows(c, "combined", metric, ("head_level", "ffn_level"), f, required=False)
    for component in ("heads", "ffn"):
        _check_by(c, component, metric, f)


def _check_by(c: dict, component: str, metric: str, f) -> None:
    """heads_by / ffn_by: the other rankings' curves (induction, random seeds)."""
    by = c.get(f"{component}_by", {})
    if not isinstance(by, dict):
        _fail(f, f"{component}_by is {_kind(by)}, expected an object of curves")
    random_levels = None
    for name, rows in by.items():
        rows = _check_rows(c, name, metric, ("level",), f, with_metrics=False, where=f"{component}_by.{name}",
                           rows=rows)
        if name.startswith(f"{component}_random"):  # averaged point by point: the same levels in each
            levels = [r["level"] for r in rows]
            if random_levels is not None and levels != random_levels:
                _fail(f, f"{component}_by.{name} has levels {levels} but the other random curves {random_levels}")
            random_levels = levels


def check_importance(imp: dict[str, torch.Tensor]) -> None:
    """heads [L, H], ffn [L], ffn_knockout [L], floating point, L and H >= 1."""
    f = "importance.safetensors"
    for key, dims in (("heads", 2), ("ffn", 1), ("ffn_knockout", 1)):
        if key not in imp:
            _fail(f, f"lacks {key!r}")
        t = imp[key]
        if t.dim() != dims or not t.dtype.is_floating_point or t.numel() == 0:
            _fail(f, f"{key!r} is a {t.dim()}-d {str(t.dtype).replace('torch.', '')} tensor of shape "
                     f"{tuple(t.shape)}, expected a non-empty {dims}-d float tensor")
    L = imp["heads"].shape[0]
    if imp["ffn"].shape != (L,) or imp["ffn_knockout"].shape != (L,):
        _fail(f, f"inconsistent shapes: heads {tuple(imp['heads'].shape)}, ffn {tuple(imp['ffn'].shape)}, "
                 f"ffn_knockout {tuple(imp['ffn_knockout'].shape)} (one layer count expected)")


def load_shard(sh: Shard, manifest: dict) -> ShardData:
    """A complete shard's files, checked; raises ShardFormatError naming the file and the field."""
    imp = read_shard_tensors(sh, "importance.safetensors")
    check_importance(imp)
    curves = read_shard_json(sh, "curves.json")
    check_curves(curves, sh)
    return ShardData(sh, curves, imp, manifest)


def collect(root: Path | str, model: str | None = None, expected: list[tuple] | None = None) -> Collected:
    """Load every complete shard; classify the others as failed / incomplete / corrupt / missing
    (`expected`: (task, shot) or (task, shot, seed) tuples); name the complete shards whose settings
    differ from the others' (`mixed`, `warnings`)."""
    out = Collected()
    shards = [sh for sh in list_shards(root) if model is None or sh.model == model]
    present = {(sh.task, sh.shot, sh.seed) for sh in shards if not sh.legacy}
    seen = set(present)
    for sh in shards:
        name = shard_name(sh)
        try:
            m = read_shard_json(sh, MANIFEST) if sh.file(MANIFEST).exists() else None
            if m is not None:
                check_manifest(m, sh)
        except ShardFormatError as e:
            out.problems.append({"shard": name, "status": "corrupt", "reason": str(e)})
            continue
        if m is None:
            out.problems.append({"shard": name, "status": "incomplete", "reason": "no manifest"})
            continue
        if sh.legacy:  # written before the seed axis: the seed is the one its config records
            sh.seed = shard_seed(sh.shot, (m.get("config") or {}).get("seed") or 0)
            if (sh.task, sh.shot, sh.seed) in present:
                out.warnings.append(f"{name}: a shard from before the seed axis, superseded by "
                                    f"{name}/seed{sh.seed} (not aggregated)")
                continue
            seen.add((sh.task, sh.shot, sh.seed))
        if m.get("status") != "complete":
            reason = m.get("error") or f"status {m.get('status')!r} (still running, killed, or preempted)"
            out.problems.append({"shard": name, "status": str(m.get("status", "unknown")), "reason": str(reason)})
            continue
        try:
            out.ok.append(load_shard(sh, m))
        except ShardFormatError as e:
            out.problems.append({"shard": name, "status": "corrupt", "reason": str(e)})
    for task, shot, *seed in expected or []:
        key = (safe_name(task), shot, shard_seed(shot, seed[0] if seed else 0))  # a task file: its folder name
        if key not in seen:
            out.problems.append({"shard": Shard(root, model or "?", *key).name, "status": "missing",
                                 "reason": "no shard folder (job never started or failed before writing)"})
    out.mixed, warnings = mixed_settings(out.ok)
    out.warnings += warnings
    return out


# --- shards made with different settings ------------------------------------------------------------

UNSET = "(unset)"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _source_kind(s: Any) -> str:
    """A data source as comparable across tasks: 'mirror /path', 'embedded slice', 'hub'."""
    s = str(s)
    return s if s.startswith("mirror ") else s.split(" ")[0].replace("embedded", "embedded slice")


def shard_settings(d: ShardData) -> dict[str, Any] | None:
    """What must agree across a model's shards: the manifest's hashed config without task, shot and
    the per-task data fingerprints, the model name, and where the data came from. None if unrecorded."""
    cfg = d.manifest.get("config")
    if not isinstance(cfg, dict):
        return None
    flat = _flatten({k: v for k, v in cfg.items() if k not in ("task", "shot", "data")})
    flat.setdefault("model.name", d.curves.get("model", d.shard.model))
    sources = d.manifest.get("data_sources")
    if isinstance(sources, dict) and sources:
        flat["data.source"] = " + ".join(sorted({_source_kind(s) for s in sources.values()}))
    return flat


def _canon(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _show(v: Any) -> str:
    return v if isinstance(v, str) else _canon(v)


def _deviations(group: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, tuple[Any, Any, int, int]]]:
    """For each shard of the group, the keys whose value is not the group's most common one:
    {shard: {key: (value, majority value, shards with the majority value, other shards)}}."""
    out: dict[str, dict[str, tuple[Any, Any, int, int]]] = {}
    if len(group) < 2:
        return out
    keys = sorted({k for _, s in group for k in s})
    for key in keys:
        values = [(name, s.get(key, UNSET)) for name, s in group]
        counts = Counter(_canon(v) for _, v in values)
        if len(counts) == 1:
            continue
        ref_canon, n_ref = counts.most_common(1)[0]
        ref = next(v for _, v in values if _canon(v) == ref_canon)
        for name, v in values:
            if _canon(v) != ref_canon:
                out.setdefault(name, {})[key] = (v, ref, n_ref, len(group) - 1)
    return out


def mixed_settings(ok: list[ShardData]) -> tuple[list[dict], list[str]]:
    """Complete shards whose settings differ from the majority of the model's shards (and, for the
    data fingerprints, of the same task's shards). They are still aggregated: this only says so."""
    group, warnings = [], []
    by_task: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for d in ok:
        s = shard_settings(d)
        if s is None:
            warnings.append(f"{d.name}: manifest.json records no config: its settings cannot be compared")
            continue
        group.append((d.name, s))
        data = d.manifest["config"].get("data")
        if isinstance(data, dict):
            by_task.setdefault(d.shard.task, []).append((d.name, _flatten(data, "data.")))
    dev = _deviations(group)
    for rows in by_task.values():  # the same task's rows must be the same at every shot
        for name, keys in _deviations(rows).items():
            dev.setdefault(name, {}).update(keys)
    mixed = []
    for name in sorted(dev):
        keys = dev[name]
        parts = []
        for key, (v, ref, n_ref, n_other) in sorted(keys.items()):
            if n_ref < n_other:
                where = f"{n_ref} of the other {n_other} shards"
            else:
                where = "the other shard" if n_other == 1 else f"the other {n_other} shards"
            parts.append(f"{key}={_show(v)} vs {_show(ref)} in {where}")
        warnings.append(f"{name}: different settings: {'; '.join(parts)} (aggregated all the same)")
        mixed.append({"shard": name, "keys": {k: {"value": v, "others": ref} for k, (v, ref, _, _) in keys.items()}})
    return mixed, warnings


# --- the model's induction scores -----------------------------------------------------------------

def read_induction(root: Path | str, model: str) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """The model's induction scores, checked (prefix_matching and copying, one [L, H] float shape):
    (scores, None), (None, None) if the job has not run, or (None, a corrupt problem entry)."""
    p = induction_dir(root, model) / "scores.safetensors"
    if not p.exists():
        return None, None
    try:
        t = load_file(str(p))
        shape = None
        for key in ("prefix_matching", "copying"):
            if key not in t:
                _fail(p.name, f"lacks {key!r}")
            v = t[key]
            if v.dim() != 2 or not v.dtype.is_floating_point or (shape is not None and v.shape != shape):
                _fail(p.name, f"{key!r} is a {str(v.dtype).replace('torch.', '')} tensor of shape "
                              f"{tuple(v.shape)}, expected one float [layers, heads] shape for both scores")
            shape = v.shape
    except (SafetensorError, OSError) as e:
        return None, _induction_problem(model, f"{p.name}: not a readable safetensors file ({e})")
    except ShardFormatError as e:
        return None, _induction_problem(model, str(e))
    return t, None


def _induction_problem(model: str, reason: str) -> dict:
    return {"shard": f"{model}/induction", "status": "corrupt",
            "reason": f"{reason}; rerun `python jobs/induction.py model={model}` (reduced without induction scores)"}
