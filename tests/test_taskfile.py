"""Tasks from YAML files (icl_scale/tasks/taskfile.py): lm-eval 0.4.13's own arc_easy.yaml and piqa.yaml
(tests/data/tasks/, only dataset_path/dataset_kwargs pointed at the fixtures) score the same docs exactly as
the built-in arc_easy and piqa; each form of doc_to_target / doc_to_choice; the example task file through
a whole shard; unsupported keys and bad rows as one line naming the key."""

import json
import re
from pathlib import Path

import pytest

from icl_scale.scoring import score_requests
from icl_scale.shard import run_shard
from icl_scale.tasks import TaskDataError, TaskFileError, build_requests, compute_metrics, get_task, load_split

from conftest import REPO, data_dir, get_model, tiny_shard_cfg

TASKS = REPO / "tests" / "data" / "tasks"
EXAMPLE = REPO / "docs" / "examples" / "antonyms.yaml"


def _rendered(reqs):
    return [(r.contexts, r.continuations, r.gold, r.choice_texts) for r in reqs]


@pytest.mark.parametrize("name", ["arc_easy", "piqa"])
@pytest.mark.parametrize("shot", [0, 2])
def test_lm_eval_task_files_score_exactly_like_the_builtin_tasks(name, shot):
    builtin = build_requests(name, shot=shot, data_dir=data_dir())
    from_file = build_requests(str(TASKS / f"{name}.yaml"), shot=shot, data_dir=data_dir())
    assert len(from_file) == len(builtin) >= 40
    assert _rendered(from_file) == _rendered(builtin)
    # importance docs: the train split, each doc with other train docs as demonstrations
    assert _rendered(build_requests(str(TASKS / f"{name}.yaml"), split="train", shot=shot)) == \
        _rendered(build_requests(name, split="train", shot=shot, data_dir=data_dir()))
    lm = get_model("tiny-llama")
    a, b = score_requests(lm, builtin[:12]), score_requests(lm, from_file[:12])
    assert [[c.logprob for c in row] for row in a] == [[c.logprob for c in row] for row in b]
    lls = [[c.logprob for c in row] for row in a]
    assert compute_metrics(name, builtin[:12], lls) == compute_metrics(str(TASKS / f"{name}.yaml"), from_file[:12], lls)


def test_the_task_file_reads_its_own_data_files_whatever_data_dir_says(tmp_path):
    task = get_task(str(TASKS / "piqa.yaml"))
    assert (task.name, task.eval_split, task.metrics) == ("piqa", "validation", ("acc", "acc_norm"))
    rows = load_split(task, "validation", data_dir=tmp_path)  # an empty mirror: not read
    assert rows == load_split("piqa", "validation", data_dir=data_dir())
    assert get_task(str(TASKS / "arc_easy.yaml")).eval_split == "test"  # test_split set: lm-eval evaluates it


def _write(tmp_path: Path, spec: dict, rows: list[dict] | None = None) -> str:
    rows = rows if rows is not None else [{"q": f"q{i}", "a": "x", "b": "y", "label": i % 2} for i in range(4)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"task": "mine", "output_type": "multiple_choice", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"train": "rows.jsonl", "validation": "rows.jsonl"}},
            "training_split": "train", "validation_split": "validation", "doc_to_text": "{{q}}:",
            "doc_to_choice": "{{[a, b]}}", "doc_to_target": "label"}
    import yaml

    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in {**base, **spec}.items() if v is not None}))
    return str(path)


@pytest.mark.parametrize("target,choice,gold", [
    ("label", "{{[a, b]}}", [0, 1, 0, 1]),                     # a field name; a list template
    ("{{label}}", "{{[a, b]}}", [0, 1, 0, 1]),                 # a template rendering to an index
    (1, "{{[a, b]}}", [1, 1, 1, 1]),                           # a literal index
    ("{{b}}", "{{[a, b]}}", [1, 1, 1, 1]),                     # a template rendering to the gold text
    ("label", ["yes", "no"], [0, 1, 0, 1]),                    # a literal choice list
])
def test_each_form_of_target_and_choice(tmp_path, target, choice, gold):
    reqs = build_requests(_write(tmp_path, {"doc_to_target": target, "doc_to_choice": choice}), shot=1)
    assert [r.gold for r in reqs] == gold
    texts = ["x", "y"] if choice == "{{[a, b]}}" else ["yes", "no"]
    assert all(r.continuations == [f" {t}" for t in texts] and r.choice_texts == texts for r in reqs)
    # lm-eval's prompt: demo text + target_delimiter + gold choice + fewshot_delimiter, then the doc's text
    demo = reqs[0].contexts[0].split("\n\n")[0]
    assert re.fullmatch(r"q\d: (x|y|yes|no)", demo) and reqs[0].contexts[0].endswith("\n\nq0:")


def test_delimiters_and_description(tmp_path):
    path = _write(tmp_path, {"description": "Pick {{a}} or {{b}}.\n", "target_delimiter": "=",
                             "fewshot_delimiter": " | "})
    req = build_requests(path, shot=1, seed=3)[2]
    assert re.fullmatch(r"Pick x or y\.\nq\d:=(x|y) \| q2:", req.contexts[0]), req.contexts[0]
    assert req.continuations == ["=x", "=y"]


BAD_FILES = [  # (changes to a good task file, the message after "task=<path>: ")
    ({"process_docs": "!function utils.process_docs"},
     "process_docs is `!function utils.process_docs` (Python code), which is not supported; write it as a "
     "Jinja template or a field name"),
    ({"output_type": "generate_until"},
     "output_type='generate_until' is not supported; only multiple_choice (log-likelihood of each choice) tasks run "
     "here"),
    ({"output_type": None}, "output_type='generate_until (the default)' is not supported"),
    ({"filter_list": [{"name": "x"}]}, "key 'filter_list' is not supported (the multiple-choice log-likelihood "
                                       "subset of lm-eval 0.4: "),
    ({"include": "base.yaml"}, "key 'include' is not supported"),
    ({"doc_to_choice": None}, "doc_to_choice is required; add it (see lm-eval's task guide)"),
    ({"doc_to_text": "{{q"}, "doc_to_text is not a valid Jinja template ("),
    ({"metric_list": [{"metric": "mcc"}]}, "metric_list has 'mcc'; the supported metrics are acc and acc_norm"),
    ({"training_split": None}, "training_split is required: demonstrations and importance docs come from the "
                               "training split"),
    ({"dataset_kwargs": {"data_files": {"train": "rows.jsonl"}, "trust_remote_code": True}},
     "dataset_kwargs supports only data_files: {<split>: <file>} (with dataset_path: json)"),
]


@pytest.mark.parametrize("change,message", BAD_FILES, ids=[next(iter(c)) for c, _ in BAD_FILES])
def test_bad_task_files_are_one_line(tmp_path, change, message):
    path = _write(tmp_path, {k: v for k, v in change.items() if not str(v).startswith("!function")})
    if str(next(iter(change.values()))).startswith("!function"):
        key, value = next(iter(change.items()))
        Path(path).write_text(Path(path).read_text() + f"{key}: {value}\n")
    with pytest.raises(TaskFileError) as e:
        get_task(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"task={Path(path).resolve()}: {message}"), msg


@pytest.mark.parametrize("rows,message", [
    ([{"q": "q", "a": "x", "b": "y", "label": 2}], "doc_to_target gives 2, not one of the 2 choices"),
    ([{"q": "q", "a": "x", "label": 0}],  # lm-eval, too, renders an undefined name in a list literal
     "the task file's templates fail on it (ValueError: doc_to_choice renders to \"['x', Undefined]\", not a list "
     "literal)"),
    ([{"a": "x", "b": "y", "label": 0}], "the task file's templates fail on it (UndefinedError: 'q' is undefined)"),
    ([{"q": "q", "a": "x", "b": 3, "label": 0}], "doc_to_choice gives ['x', 3], not a list of at least 2 strings"),
    ([{"q": "{{''.__class__}}", "a": "x", "b": "y", "label": 0}], None),  # data is never a template
])
def test_bad_rows_name_the_row(tmp_path, rows, message):
    path = _write(tmp_path, {}, rows)
    if message is None:
        assert build_requests(path)[0].contexts == ["{{''.__class__}}:"]
        return
    with pytest.raises(TaskDataError) as e:
        build_requests(path)
    assert str(e.value) == f"mine validation row 0: {message}; fix the row in the data file"


def test_templates_run_in_the_sandbox(tmp_path):
    path = _write(tmp_path, {"doc_to_text": "{{ q.__class__.__mro__[1].__subclasses__() }}"})
    with pytest.raises(TaskDataError, match=r"^mine validation row 0: the task file's templates fail on it "
                                            r"\(SecurityError: .*\); fix the row in the data file$"):
        build_requests(path)


def test_a_missing_task_file_or_data_file_is_one_line(tmp_path):
    with pytest.raises(TaskFileError, match=r"^task=nope/task.yaml: no such task file; give the path of an lm-eval "
                                            r"style task YAML$"):
        get_task("nope/task.yaml")
    path = _write(tmp_path, {"dataset_kwargs": {"data_files": {"train": "rows.jsonl", "validation": "gone.jsonl"}}})
    with pytest.raises(TaskDataError, match=r"^task=.*task.yaml: data file .*gone.jsonl \(validation\) does not exist; "
                                            r"fix dataset_kwargs.data_files"):
        build_requests(path)


def test_the_example_task_file_runs_through_a_shard(tmp_path):
    """task=docs/examples/antonyms.yaml through the shard (importance, knock-out, curves), stored under the
    path's safe name; the task file's text enters the config hash."""
    task = str(EXAMPLE.relative_to(REPO))
    import os

    cwd = os.getcwd()
    os.chdir(REPO)  # the path as a user gives it, from the repository root
    try:
        cfg = tiny_shard_cfg(tmp_path, task, 2, "tiny-llama", "knockout.limit=4", "importance.n_examples=6")
        run_shard(cfg, lm=get_model("tiny-llama"))
    finally:
        os.chdir(cwd)
    shard = tmp_path / "tiny-llama" / "docs_examples_antonyms.yaml" / "2shot" / "seed0"
    manifest = json.loads((shard / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["config"]["data"]) == {"train", "test", "task_file"}
    curves = json.loads((shard / "curves.json").read_text())
    assert (curves["task"], curves["metric"], curves["n_eval"]) == (task, "acc", 8)
    assert set(curves["heads"][0]["metrics"]) == {"acc", "acc_norm"} and curves["heads"][0]["metrics"]["acc"]["n"] == 8
    # the reducer reads it like any shard
    from icl_scale.report import reduce_store

    res = reduce_store(tmp_path, "tiny-llama", expected=[(task, 2, 0)], figures=False)  # the sweep's expectation
    assert not res["collected"].problems
    assert [(r["task"], r["shot"]) for r in res["curves_rows"]][:1] == [("docs_examples_antonyms.yaml", 2)]


@pytest.mark.slow
def test_a_local_sweep_with_a_task_file_and_a_builtin_task(tmp_path, monkeypatch):
    """sweep.tasks=[docs/examples/antonyms.yaml,copa]: one shard each on the local executor, then the reducer
    names both and no problem."""
    from icl_scale.sweep import submit

    from conftest import compose

    monkeypatch.chdir(REPO)  # the task file's path as a user gives it, from the repository root
    cfg = compose("model=tiny-opt", "eval.limit=8", "importance.n_examples=6", "importance.batch_size=4",
                  "knockout.limit=4", "pruning.levels=[0,50]", "pruning.combined_levels=[0,50]", "progress=false",
                  f"store.root={tmp_path}", f"data.dir={data_dir()}", "wandb.mode=disabled",
                  "sweep.tasks=[docs/examples/antonyms.yaml,copa]", "sweep.shots=[1]", "sweep.induction=false",
                  f"launcher.folder={tmp_path / 'submitit'}")
    sub = submit(cfg)
    assert len(sub.shard_jobs) == 2 and sub.reduce_job.done()
    res = sub.reduce_job.result()
    assert res["n_complete"] == 2 and res["problems"] == [], res["problems"]
    summary = (tmp_path / "tiny-opt" / "summary" / "summary.csv").read_text()
    assert "docs_examples_antonyms.yaml" in summary and "copa" in summary
