"""Loading task splits: a local JSONL mirror, the embedded demo slice, or the HF hub.

Where a split's rows come from, first match wins:

1. the explicit `data_dir` argument (`data.dir` in the configs, `--data-dir` on the command line):
   a mirror folder `<data_dir>/<task>/<split>.jsonl`, or the word `hub` for the Hugging Face hub;
2. `$ICL_SCALE_DATA_DIR` (a mirror folder, or `hub`);
3. the embedded demo slice shipped inside the package (`icl_scale/tasks/embedded/<task>/<split>.jsonl`:
   the first rows of copa and arc_easy, enough for the demo), for the splits it has;
4. the Hugging Face hub.

None, "", "None" and "null" mean "not set" (never a folder of that name). A folder that is set but
does not exist is an error, not a silent fall-through. `data_source()` says in one short string
which of these a split uses (for logs and shard manifests).

Rows are in the Hugging Face `datasets` schema of the task's hub dataset. Required fields are
checked at load time so a broken mirror fails here, with the row number, and not deep inside a
prompt template.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .registry import Task
from .taskfile import get_task

log = logging.getLogger(__name__)

ENV_DATA_DIR = "ICL_SCALE_DATA_DIR"
HUB = "hub"
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
_UNSET = ("", "none", "null")


class TaskDataError(ValueError):
    """A split could not be loaded or a row is unusable. The message is one line."""


@dataclass(frozen=True)
class Source:
    """Where one split's rows come from: kind "mirror" | "embedded" | "hub" | "files" (a task file's own
    data_files); `root` holds `<task>/<split>.jsonl` (None for the hub and files); `setting` names what
    chose it."""

    kind: str
    root: Path | None
    setting: str  # "data.dir", ENV_DATA_DIR, or "default"


def is_unset(value) -> bool:
    """None, "", "None", "null" (any case, surrounding blanks ignored): no data folder was given."""
    return value is None or str(value).strip().lower() in _UNSET


def _setting(kind: str, value) -> Source:
    """A set data_dir / $ICL_SCALE_DATA_DIR value: `hub`, or a folder that must exist."""
    if str(value).strip().lower() == HUB:
        return Source("hub", None, kind)
    root = Path(value).expanduser()
    if root.is_dir():
        return Source("mirror", root, kind)
    what = "is not a folder" if root.exists() else "does not exist"
    mirror = "a local mirror folder <dir>/<task>/<split>.jsonl"
    unset = f"the embedded demo slice ({', '.join(embedded_tasks()) or 'none'}) or the hub"
    env = os.environ.get(ENV_DATA_DIR)
    if kind == ENV_DATA_DIR:
        msg = (f"{ENV_DATA_DIR}={value} {what}: point {ENV_DATA_DIR} at {mirror}, set it to hub for the "
               f"Hugging Face hub, or unset it for {unset}")
    elif env is not None and env.strip() == str(value).strip():  # data.dir's default is the variable
        msg = (f"data.dir={value} (from {ENV_DATA_DIR}) {what}: point {ENV_DATA_DIR} or data.dir at {mirror}, "
               f"use hub for the Hugging Face hub, or unset both for {unset}")
    else:
        msg = (f"data.dir={value} {what}: point data.dir (--data-dir on the command line) at {mirror}, use "
               f"data.dir=hub for the Hugging Face hub, or leave it unset (null) for {unset}")
    raise TaskDataError(msg)


def resolve_source(task: str | Task, split: str, data_dir: str | os.PathLike | None = None) -> Source:
    """The source `load_split(task, split, data_dir)` reads (see the module docstring for the order)."""
    t = get_task(task)
    if getattr(t, "data_files", None):  # a task file naming its own local files (tasks/taskfile.py)
        return Source("files", None, "task file")
    if not is_unset(data_dir):
        return _setting("data.dir", data_dir)
    env = os.environ.get(ENV_DATA_DIR)
    if not is_unset(env):
        return _setting(ENV_DATA_DIR, env)
    if t.source_file is None and (EMBEDDED_DIR / t.name / f"{split}.jsonl").is_file():
        return Source("embedded", EMBEDDED_DIR, "default")
    return Source("hub", None, "default")


def embedded_tasks() -> list[str]:
    """Tasks with an embedded demo slice."""
    return sorted(p.name for p in EMBEDDED_DIR.iterdir() if p.is_dir() and any(p.glob("*.jsonl"))) \
        if EMBEDDED_DIR.is_dir() else []


@functools.cache
def _count_rows(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def data_source(task: str | Task, split: str, data_dir: str | os.PathLike | None = None) -> str:
    """A short description of where `load_split(task, split, data_dir)` gets its rows, e.g.
    "mirror /data/icl", "embedded slice (icl_scale/tasks/embedded, 200 rows)", "hub aps/super_glue/copa".
    Raises TaskDataError for a data folder that is set but does not exist. Reads no rows."""
    t = get_task(task)
    src = resolve_source(t, split, data_dir)
    if src.kind == "files":
        return f"task file data {t.data_files.get(t.split_name(split), '(none)')}"
    if src.kind == "mirror":
        return f"mirror {src.root.resolve()}"
    if src.kind == "embedded":
        n = _count_rows(str(src.root / t.name / f"{split}.jsonl"))
        return f"embedded slice (icl_scale/tasks/embedded, {n} rows)"
    path, name = t.hub
    return f"hub {path}/{name}" if name else f"hub {path}"


_announced: set[str] = set()


def _announce_embedded(task: str) -> None:
    """Once per task and process: say that the rows are the small demo slice, and how to get all."""
    if task in _announced:
        return
    _announced.add(task)
    counts = ", ".join(f"{_count_rows(str(p))} {p.stem}" for p in sorted((EMBEDDED_DIR / task).glob("*.jsonl")))
    log.info("%s: using the embedded demo slice (%s rows); set %s or data.dir for the full data",
             task, counts, ENV_DATA_DIR)


def splits_present(root: Path, task: str) -> list[str]:
    """The splits a mirror folder has for a task (<root>/<task>/<split>.jsonl)."""
    return sorted(p.stem for p in (root / task).glob("*.jsonl")) if (root / task).is_dir() else []


def load_split(task: str | Task, split: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """All rows of one split, in order; row i is doc_id i. The rows are shared (cached): don't mutate."""
    t = get_task(task)
    src = resolve_source(t, split, data_dir)
    split = t.split_name(split)  # a task file's name for it ("train": its training_split)
    if src.kind == "files":
        return _load_file(t, split)
    if src.kind == "hub":
        return list(_load_hub(t if t.source_file else t.name, split))
    root = src.root
    path = root / t.name / f"{split}.jsonl"
    if path.is_dir():
        raise TaskDataError(f"{path} is a folder, not a data file; a split is one JSONL file <task>/<split>.jsonl")
    if not path.is_file():
        have = splits_present(root, t.name)
        raise TaskDataError(
            f"missing data file {path}; {t.name} splits present in {root}: {', '.join(have) or 'none'}"
        )
    if src.kind == "embedded":
        _announce_embedded(t.name)
    st = path.stat()
    return list(_load_jsonl(t, split, str(path), st.st_mtime_ns, st.st_size))


def _load_file(t: Task, split: str) -> list[dict]:
    """A split of a task file's own data_files (JSON Lines)."""
    path = t.data_files.get(split)
    if path is None:
        raise TaskDataError(f"task={t.source_file}: no data file for split {split!r} (data_files has "
                            f"{', '.join(t.data_files)}); add it to dataset_kwargs.data_files")
    if not path.is_file():
        raise TaskDataError(f"task={t.source_file}: data file {path} ({split}) does not exist; fix "
                            "dataset_kwargs.data_files (relative paths start at the task file's folder)")
    st = path.stat()
    return list(_load_jsonl(t, split, str(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=16)
def _load_jsonl(task: str | Task, split: str, path: str, _mtime: int, _size: int) -> tuple[dict, ...]:
    # mtime/size in the cache key: an edited file is re-read
    t = get_task(task)
    task = t.name
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{task} {split} ({path}) is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                            f"{e.start}); save it as UTF-8") from None
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
def _load_hub(task: str | Task, split: str) -> tuple[dict, ...]:
    t = get_task(task)
    task = t.name
    path, name = t.hub
    try:
        import datasets

        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one actionable line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TaskDataError(
            f"could not load {task} {split} from the hub ({path}, {name}): {type(e).__name__}: {msg}; "
            f"set {ENV_DATA_DIR} or data.dir to a local mirror folder"
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
    problem = t.row_problem(row)
    if problem:
        raise TaskDataError(f"{t.name} {split} row {i}: {problem}; fix the row in the data file")
