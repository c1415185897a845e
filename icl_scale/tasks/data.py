"""Loading task splits: a local JSONL mirror (`<data_dir>/<task>/<split>.jsonl`) or the HF hub.

Rows are in the Hugging Face `datasets` schema of the task's hub dataset. Required fields are
checked at load time so a broken mirror fails here, with the row number, and not deep inside a
prompt template.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from .registry import Task, get_task

ENV_DATA_DIR = "ICL_SCALE_DATA_DIR"


class TaskDataError(ValueError):
    """A split could not be loaded or a row is unusable. The message is one line."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Explicit argument, else $ICL_SCALE_DATA_DIR, else None (= the Hugging Face hub).
    `hub` asks for the hub explicitly, even when $ICL_SCALE_DATA_DIR is set."""
    if str(data_dir) == "hub":
        return None
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env) if env else None


def load_split(task: str | Task, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """All rows of one split, in order; row i is doc_id i. The rows are shared (cached): don't mutate."""
    t = get_task(task)
    root = resolve_data_dir(data_dir)
    if root is None:
        return list(_load_hub(t.name, split))
    path = root / t.name / f"{split}.jsonl"
    if not path.is_file():
        have = sorted(p.stem for p in (root / t.name).glob("*.jsonl")) if (root / t.name).is_dir() else []
        raise TaskDataError(
            f"missing data file {path}; {t.name} splits present in {root}: {', '.join(have) or 'none'}"
        )
    st = path.stat()
    return list(_load_jsonl(t.name, split, str(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=16)
def _load_jsonl(task: str, split: str, path: str, _mtime: int, _size: int) -> tuple[dict, ...]:
    # mtime/size in the cache key: an edited file is re-read
    t = get_task(task)
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()  # trailing newline(s) only; a blank line inside the file is an error
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{task} {split} row {i} (line {i + 1} of {path}): malformed JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{task} {split} row {i} (line {i + 1} of {path}): not a JSON object")
        _check_row(t, split, i, row)
        rows.append(row)
    return tuple(rows)


@functools.lru_cache(maxsize=16)
def _load_hub(task: str, split: str) -> tuple[dict, ...]:
    t = get_task(task)
    path, name = t.hub
    try:
        import datasets

        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one actionable line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TaskDataError(
            f"could not load {task} {split} from the hub ({path}, {name}): {type(e).__name__}: {msg}; "
            f"set {ENV_DATA_DIR} or pass data_dir to use a local mirror"
        ) from None
    rows = [dict(r) for r in ds]
    for i, row in enumerate(rows):
        _check_row(t, split, i, row)
    return tuple(rows)


def _check_row(t: Task, split: str, i: int, row: dict) -> None:
    for f in t.required_fields:
        # dotted names reach into nested dicts (MultiRC idx.paragraph)
        v = row
        for part in f.split("."):
            if not isinstance(v, dict) or part not in v or v[part] is None:
                raise TaskDataError(f"{t.name} {split} row {i}: missing field {f!r}")
            v = v[part]
