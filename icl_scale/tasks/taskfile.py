"""Tasks from YAML files in lm-eval 0.4's task-config vocabulary: `task=path/to/task.yaml`.

The multiple-choice log-likelihood subset, with lm-eval 0.4.13's meaning for each key
(lm_eval/api/task.py, ConfigurableTask):

* `task` (its name), `output_type: multiple_choice` (the only output type);
* data: `dataset_path` a hub dataset (with `dataset_name`; `data.dir` / $ICL_SCALE_DATA_DIR mirrors
  `<dir>/<task>/<split>.jsonl` are read first, as for the built-in tasks), or `json` with
  `dataset_kwargs: {data_files: {<split>: <file>}}` (JSON Lines; a relative path is relative to the
  task file's folder); `training_split` (demonstrations and importance docs),
  `validation_split`, `test_split` (evaluated: test when set, else validation, as lm-eval does);
* prompt: `doc_to_text`, `doc_to_target`, `doc_to_choice`, `description`, `target_delimiter`
  (default " "), `fewshot_delimiter` (default "\\n\\n"). A value naming a field of the row is that
  field; any other string is a Jinja template rendered in Jinja's immutable sandbox (StrictUndefined,
  lm-eval's `regex_replace` filter). A target that renders to digits is a choice index, to text the
  gold choice's text; a choice template renders to a Python list literal (`{{[sol1, sol2]}}`);
* `metric_list`: acc and/or acc_norm (per character of the bare choice, as lm-eval);
* accepted and ignored, because they do not change log-likelihood scoring: `tag`, `task_alias`,
  `metadata`, `should_decontaminate`, `doc_to_decontamination_query`.

The prompt is lm-eval's: description + for each demonstration text + target_delimiter + answer +
fewshot_delimiter, then the doc's text; choice j is scored as target_delimiter + choice j. The
demonstrations are the project's sampler's (tasks/fewshot.py: seeded per doc, never the doc itself),
so lm-eval's own arc_easy.yaml and piqa.yaml render exactly the built-in arc_easy and piqa prompts.

Anything else (`!function` Python code, `include`, `process_docs`, generation tasks, other metrics, a
multiple-input doc_to_text) is one line naming the key. No code from a task file ever runs.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
from pathlib import Path
from typing import Any

from .registry import Task
from .registry import get_task as builtin_task

SUFFIXES = (".yaml", ".yml")
TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice", "description")
USED = {"task", "output_type", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
        "validation_split", "test_split", "target_delimiter", "fewshot_delimiter", "metric_list", *TEMPLATE_KEYS}
IGNORED = {"tag", "task_alias", "metadata", "should_decontaminate", "doc_to_decontamination_query"}
METRICS = ("acc", "acc_norm")


class TaskFileError(ValueError):
    """A task file is unusable: the message names the file, the key and the fix (one line)."""


class _Function(str):
    """A `!function module.name` value (lm-eval runs that Python; we refuse it)."""


class _Loader:
    """yaml.SafeLoader that reads `!function` as a marker instead of failing on the unknown tag."""

    @staticmethod
    @functools.cache
    def cls():
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
        return Loader


def is_task_file(name) -> bool:
    return isinstance(name, (str, Path)) and str(name).lower().endswith(SUFFIXES)


def get_task(name) -> Task:
    """A built-in task by name, a task file by path (`*.yaml`), or a Task itself."""
    if is_task_file(name):
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise TaskFileError(f"task={name}: no such task file; give the path of an lm-eval style task YAML")
        return _load(str(path), path.stat().st_mtime_ns)
    return builtin_task(name)


@functools.lru_cache(maxsize=32)
def _load(path: str, _mtime: int) -> YamlTask:
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    try:
        spec = yaml.load(text, Loader=_Loader.cls())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise TaskFileError(f"task={path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise TaskFileError(f"task={path}: a task file is a mapping of lm-eval task keys (task, doc_to_text, ...)")
    return YamlTask(Path(path), spec, hashlib.sha256(text.encode()).hexdigest()[:16])


@functools.cache
def _sandbox():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


class YamlTask(Task):
    """One task file, checked at load (keys, templates, data files); rows are checked as they load."""

    def __init__(self, path: Path, spec: dict, digest: str):
        self.source_file, self.digest, self.spec = path, digest, spec
        self._where = f"task={path}"
        self._check_keys(spec)
        self.name = str(spec["task"])
        self.target_delimiter = self._string("target_delimiter", " ")
        self.fewshot_delimiter = self._string("fewshot_delimiter", "\n\n")
        self.metrics = self._metrics(spec.get("metric_list"))
        self.training_split = self._split("training_split", required=True)
        self.eval_split = self._split("test_split") or self._split("validation_split", required=True)
        self.hub = (str(spec["dataset_path"]), spec.get("dataset_name"))
        self.data_files = self._data_files(spec)
        self.templates = {k: self._compile(k, spec[k]) for k in TEMPLATE_KEYS if isinstance(spec.get(k), str)}

    # --- the file's keys ------------------------------------------------------------------------
    def _fail(self, msg: str):
        raise TaskFileError(f"{self._where}: {msg}")

    def _check_keys(self, spec: dict) -> None:
        for key, value in spec.items():
            if isinstance(value, _Function):
                self._fail(f"{key} is `!function {value}` (Python code), which is not supported; write it as a "
                           "Jinja template or a field name")
        unknown = sorted(set(spec) - USED - IGNORED)
        if unknown:
            self._fail(f"key {unknown[0]!r} is not supported (the multiple-choice log-likelihood subset of lm-eval "
                       f"0.4: {', '.join(sorted(USED))}); remove it")
        for key in ("task", "dataset_path", "doc_to_text", "doc_to_target", "doc_to_choice"):
            if spec.get(key) in (None, ""):
                self._fail(f"{key} is required; add it (see lm-eval's task guide)")
        if spec.get("output_type") != "multiple_choice":
            self._fail(f"output_type={spec.get('output_type', 'generate_until (the default)')!r} is not supported; "
                       "only multiple_choice (log-likelihood of each choice) tasks run here")

    def _string(self, key: str, default: str) -> str:
        value = self.spec.get(key, default)
        if not isinstance(value, str):
            self._fail(f"{key}={value!r} must be a string")
        return value

    def _split(self, key: str, required: bool = False) -> str | None:
        value = self.spec.get(key)
        if value is None and required:
            self._fail(f"{key} is required: demonstrations and importance docs come from the training split, and "
                       "a task is evaluated on test_split or validation_split")
        if value is not None and not isinstance(value, str):
            self._fail(f"{key}={value!r} must be a split name")
        return value

    def _metrics(self, metric_list) -> tuple[str, ...]:
        if metric_list is None:
            return METRICS
        names = [m.get("metric") if isinstance(m, dict) else m for m in metric_list or []]
        bad = [m for m in names if m not in METRICS]
        if bad or not names:
            self._fail(f"metric_list has {bad[0] if bad else 'no metric'!r}; the supported metrics are acc and "
                       "acc_norm")
        return tuple(dict.fromkeys(names))

    def _data_files(self, spec: dict) -> dict[str, Path] | None:
        kwargs = spec.get("dataset_kwargs") or {}
        if not isinstance(kwargs, dict) or set(kwargs) - {"data_files"}:
            self._fail("dataset_kwargs supports only data_files: {<split>: <file>} (with dataset_path: json)")
        if spec["dataset_path"] != "json":
            if kwargs:
                self._fail("dataset_kwargs.data_files needs dataset_path: json (local files)")
            return None
        files = kwargs.get("data_files")
        if not isinstance(files, dict) or not files:
            self._fail("dataset_path: json needs dataset_kwargs: {data_files: {<split>: <file>}}")
        out = {}
        for split, file in files.items():
            file = file[0] if isinstance(file, list) and len(file) == 1 else file
            if not isinstance(file, str):
                self._fail(f"dataset_kwargs.data_files.{split} must be one file path")
            out[str(split)] = (self.source_file.parent / Path(file).expanduser()).resolve()
        return out

    def _compile(self, key: str, value: str):
        from jinja2 import TemplateSyntaxError

        try:
            return _sandbox().from_string(value)
        except TemplateSyntaxError as e:
            self._fail(f"{key} is not a valid Jinja template ({e.message}, line {e.lineno})")

    # --- lm-eval's meaning of each key on one row ------------------------------------------------
    def _render(self, key: str, doc: dict) -> str:
        return self.templates[key].render(**doc)

    def _value(self, key: str, doc: dict):
        """A field name -> the field; an int or list -> itself; else the rendered template."""
        raw = self.spec[key]
        if not isinstance(raw, str):
            return raw
        return doc[raw] if raw in doc else self._render(key, doc)

    def choices(self, doc: dict) -> list:
        value = self._value("doc_to_choice", doc)
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (SyntaxError, ValueError):
                raise ValueError(f"doc_to_choice renders to {value!r}, not a list literal") from None
        return list(value.values()) if isinstance(value, dict) else value

    def gold(self, doc: dict):
        value = self._value("doc_to_target", doc)
        if isinstance(value, str):
            if value.isdigit():
                return ast.literal_eval(value)
            if len(value) >= 2 and value[0] == "[" and value[-1] == "]":
                try:
                    return ast.literal_eval(value)
                except (SyntaxError, ValueError):
                    return value
        return value

    def doc_to_text(self, doc: dict) -> str:
        return self._value("doc_to_text", doc)

    def doc_to_target(self, doc: dict) -> str:
        choices, gold = self.choices(doc), self.gold(doc)
        return self.target_delimiter + (choices[gold] if isinstance(gold, int) else gold)

    def _gold_index(self, doc: dict) -> int:
        choices, gold = self.choices(doc), self.gold(doc)
        return choices.index(gold) if isinstance(gold, str) else gold

    def _choices(self, doc: dict):
        choices = self.choices(doc)
        return [self.target_delimiter + c for c in choices], self._gold_index(doc), list(choices)

    def fewshot_context(self, doc: dict, demos: list[dict]) -> str:
        description = self.spec.get("description") or ""
        if description:  # lm-eval's resolve_field: a field of the row, else a template
            description = doc[description] if description in doc else self._render("description", doc)
        shots = "".join(self.doc_to_text(d) + self.doc_to_target(d) + self.fewshot_delimiter for d in demos)
        return description + shots + self.doc_to_text(doc)

    # --- rows -------------------------------------------------------------------------------------
    def row_problem(self, doc: dict) -> str | None:
        """Why lm-eval could not score this row as a multiple-choice doc, or None."""
        from jinja2 import TemplateError

        try:
            text, choices, gold = self.doc_to_text(doc), self.choices(doc), self.gold(doc)
        except (TemplateError, SyntaxError, ValueError, TypeError, KeyError) as e:
            return f"the task file's templates fail on it ({type(e).__name__}: {str(e).splitlines()[0]})"
        if not isinstance(text, str):
            return f"doc_to_text gives {text!r}; multiple-input tasks (a choice index as text) are not supported"
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            return f"doc_to_choice gives {choices!r}, not a list of at least 2 strings"
        if isinstance(gold, bool) or not isinstance(gold, (int, str)):
            return f"doc_to_target gives {gold!r}; it must be a choice index or the gold choice's text"
        if isinstance(gold, int) and not 0 <= gold < len(choices) or isinstance(gold, str) and gold not in choices:
            return f"doc_to_target gives {gold!r}, not one of the {len(choices)} choices"
        return None

    def split_name(self, split: str) -> str:
        """The file's name of a split: "train" is training_split (what the shard reads as train)."""
        return self.training_split if split == "train" else split

    def __repr__(self) -> str:
        return f"<Task {self.name} from {self.source_file}>"


def file_fingerprint(task: Task) -> dict[str, Any]:
    """{"task_file": hash of the file's text} for a task file (enters the shard's config hash), else {}."""
    return {"task_file": task.digest} if isinstance(task, YamlTask) else {}
