"""Reading offline W&B runs back, for tests (tests/test_tracking.py, tests/test_sweep.py).

    info = read_offline_run("outputs/wandb/offline-run-20261127_120000-abc123")
    info["config"], info["history"], info["summary"], info["tables"]["ranking"]["data"]

Parses the run's ``.wandb`` transaction log with icl_scale.tracking.iter_records (the record-file
reader the library keeps for TrackedRun.finish), without wandb's servers or private modules.
Import it as `from wandb_offline import ...` (tests/ is on pytest's path, like conftest).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from icl_scale.tracking import iter_records


def find_offline_runs(root: str | os.PathLike) -> list[Path]:
    """Offline run folders under ``root`` (a ``wandb`` dir, or the dir given to start_run), oldest first."""
    root = Path(root)
    found = [Path(p) for p in glob.glob(str(root / "offline-run-*"))]
    found += [Path(p) for p in glob.glob(str(root / "wandb" / "offline-run-*"))]
    return sorted({p for p in found if p.is_dir()}, key=lambda p: p.name)


def _resolve_wandb_file(run_dir: str | os.PathLike) -> Path:
    p = Path(run_dir)
    if p.is_file():
        return p.resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"no such run folder: {p}")
    files = sorted(p.glob("run-*.wandb"))
    if not files:
        runs = find_offline_runs(p)
        if runs:
            files = sorted(runs[-1].glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {p} (pass the offline-run-* folder)")
    return files[-1].resolve()


def _item_key(item: Any) -> str:
    return item.key if item.key else ".".join(item.nested_key)


def _item_value(item: Any) -> Any:
    return json.loads(item.value_json) if item.value_json else None


def _set_nested(d: dict[str, Any], item: Any, value: Any) -> None:
    if item.key or len(item.nested_key) <= 1:
        d[_item_key(item)] = value
        return
    *parents, last = list(item.nested_key)
    for k in parents:
        d = d.setdefault(k, {})
    d[last] = value


def _del_nested(d: dict[str, Any], item: Any) -> None:
    keys = [item.key] if item.key else list(item.nested_key)
    for k in keys[:-1]:
        d = d.get(k, {})
    if isinstance(d, dict):
        d.pop(keys[-1], None)


def _media_refs(values: Mapping[str, Any], kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for key, v in values.items():
        if isinstance(v, dict) and v.get("_type") == kind and v.get("path"):
            yield key, v


def read_offline_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse an offline run: ``run_dir`` is the ``offline-run-*`` folder (or its ``.wandb`` file, or a
    folder holding offline runs, in which case the newest is read).

    Returns a dict with ``run_id``, ``name``, ``project``, ``entity``, ``group``, ``job_type``,
    ``tags``, ``config`` (wandb's internal ``_wandb`` key removed), ``history`` (list of row dicts,
    including ``_step``), ``summary`` (final values), ``tables`` (key -> {"columns", "data", "path"},
    the last table logged under that key), ``images`` (key -> list of absolute paths, in log order),
    ``exit_code`` (None if the run did not finish), ``files_dir`` and ``wandb_file``.
    """
    wfile = _resolve_wandb_file(run_dir)
    files_dir = wfile.parent / "files"
    out: dict[str, Any] = {
        "run_id": None, "name": None, "project": None, "entity": None, "group": None,
        "job_type": None, "tags": [], "config": {}, "history": [], "summary": {},
        "tables": {}, "images": {}, "exit_code": None,
        "files_dir": str(files_dir), "wandb_file": str(wfile),
    }
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for rec in iter_records(wfile):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(run_id=r.run_id or out["run_id"], name=r.display_name or out["name"],
                       project=r.project or out["project"], entity=r.entity or out["entity"],
                       group=r.run_group or out["group"], job_type=r.job_type or out["job_type"],
                       tags=list(r.tags) or out["tags"])
            for item in r.config.update:
                _set_nested(config, item, _item_value(item))
        elif kind == "config":
            for item in rec.config.update:
                _set_nested(config, item, _item_value(item))
            for item in rec.config.remove:
                _del_nested(config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _set_nested(row, item, _item_value(item))
            if rec.history.HasField("step") and "_step" not in row:
                row["_step"] = rec.history.step.num
            out["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _set_nested(summary, item, _item_value(item))
            for item in rec.summary.remove:
                _del_nested(summary, item)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    config.pop("_wandb", None)
    # The runtime writes wandb-summary.json at the end; it agrees with the records and fills gaps.
    summary_file = files_dir / "wandb-summary.json"
    if summary_file.is_file():
        try:
            summary = {**summary, **json.loads(summary_file.read_text())}
        except (OSError, json.JSONDecodeError):
            pass
    summary.pop("_wandb", None)
    out["config"], out["summary"] = config, summary

    for source in [*out["history"], summary]:
        for key, ref in _media_refs(source, "table-file"):
            path = files_dir / ref["path"]
            if path.is_file():
                t = json.loads(path.read_text())
                out["tables"][key] = {"columns": t.get("columns", []), "data": t.get("data", []), "path": str(path)}
    for row in out["history"]:
        for key, ref in _media_refs(row, "image-file"):
            out["images"].setdefault(key, []).append(str(files_dir / ref["path"]))
    return out
