"""Task registry: golden prompts from lm-eval 0.2.0, sampler, data errors, metrics, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icl_scale.tasks import (
    TASKS,
    DemoSampler,
    Request,
    TaskDataError,
    build_requests,
    compute_metrics,
    demo_ids,
    get_task,
    load_split,
    sample_demos,
)
from icl_scale.tasks import data as task_data_mod
from icl_scale.tasks.data import data_source
from icl_scale.tasks.metrics import bootstrap_ci, compute_f1, macro_f1, wilson_ci

from conftest import FIXTURES, compose, data_dir, fixture_row, fixture_rows, mirror_size

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


def _pairs(req: Request) -> list[list[str]]:
    return [list(req.pair(i)) for i in range(req.n_choices)]


# ---------------------------------------------------------------------------------------------
# golden prompts: strings produced by lm-eval 0.2.0's own task classes (tests/data/make_golden.py)
# ---------------------------------------------------------------------------------------------
def test_golden_files_cover_every_task():
    for name in TASKS:
        g = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))
        for shot in (0, 1):
            docs = {c["doc_id"] for c in g["cases"] if c["shot"] == shot}
            assert len(docs) >= 2, (name, shot)


@pytest.mark.parametrize("name", TASKS)
def test_golden_prompts_match_lm_eval_020(name, task_data):
    """The golden files name mirror rows; the fixtures hold them (rows.json maps the numbers)."""
    g = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))
    t = get_task(name)
    for c in g["cases"]:
        assert c["split"] == t.eval_split
        doc = load_split(name, c["split"], task_data)[fixture_row(name, c["split"], c["doc_id"])]
        demo_rows = load_split(name, c["demo_split"], task_data)
        demos = [demo_rows[fixture_row(name, c["demo_split"], i)] for i in c["demo_ids"]]
        assert t.doc_to_text(doc) == c["doc_to_text"]
        assert t.doc_to_target(doc) == c["doc_to_target"]
        req = t.make_request(doc, c["doc_id"], demos)
        assert _pairs(req) == c["pairs"], (name, c["doc_id"], c["shot"])
        assert req.doc_id == c["doc_id"] and req.task == name


@pytest.mark.parametrize("name", TASKS)
def test_golden_metrics_match_lm_eval_020(name, task_data):
    mc = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))["metric_check"]
    assert fixture_rows(name, mc["split"])[: mc["n_docs"]] == list(range(mc["n_docs"]))  # the same first docs
    reqs = build_requests(name, split=mc["split"], limit=mc["n_docs"], data_dir=task_data)
    metrics, per_doc = compute_metrics(name, reqs, mc["loglikelihoods"])
    assert set(metrics) == set(mc["metrics"]) == set(get_task(name).metrics)
    for m, v in mc["metrics"].items():
        assert metrics[m]["value"] == pytest.approx(v, abs=1e-12), m
        lo, hi = metrics[m]["ci95"]
        assert lo <= metrics[m]["value"] + 1e-12 and metrics[m]["value"] <= hi + 1e-12
    for ours, theirs in zip(per_doc, mc["per_doc"]):
        if "acc" in theirs:
            assert ours["correct"] == bool(theirs["acc"])
        if "acc_norm" in theirs:
            assert ours["correct_norm"] == bool(theirs["acc_norm"])
        if "pred_yes" in theirs:  # MultiRC
            assert (ours["pred"] == 0) == theirs["pred_yes"]
        if name == "record":
            assert ours["em"] == theirs["em"] and ours["f1"] == pytest.approx(theirs["f1"])


# ---------------------------------------------------------------------------------------------
# few-shot sampler
# ---------------------------------------------------------------------------------------------
def test_sampler_deterministic_and_order_independent(task_data):
    a = build_requests("copa", shot=3, limit=20, seed=7, data_dir=task_data)
    b = build_requests("copa", shot=3, limit=5, seed=7, data_dir=task_data)
    assert [r.contexts for r in a[:5]] == [r.contexts for r in b]  # limit does not change demos
    c = build_requests("copa", shot=3, limit=5, seed=8, data_dir=task_data)
    assert [r.contexts for r in c] != [r.contexts for r in b]  # the seed does
    pool = list(range(400))
    fwd = [sample_demos("copa", i, 4, pool, seed=1, split="validation") for i in range(50)]
    rev = [sample_demos("copa", i, 4, pool, seed=1, split="validation") for i in reversed(range(50))][::-1]
    assert fwd == rev and all(len(set(d)) == 4 for d in fwd)
    assert len({tuple(d) for d in fwd}) > 40  # docs do get different demos


def test_sampler_excludes_the_doc_on_its_own_split(task_data):
    rows = load_split("cb", "train", task_data)
    s = DemoSampler("cb", rows, k=len(rows) - 1, split="train", same_split=True)
    for i in (0, 17, len(rows) - 1):
        d = s(i, rows[i])
        assert i not in d and len(d) == len(rows) - 1
    with pytest.raises(ValueError, match="remain"):
        DemoSampler("cb", rows, k=len(rows), split="train", same_split=True)(0, rows[0])
    # rendering train docs with train demos (importance scoring): no doc is its own demo
    reqs = build_requests("rte", split="train", shot=2, limit=30, data_dir=task_data)
    train = load_split("rte", "train", task_data)
    for r in reqs:
        demos = demo_ids("rte", r.doc_id, split="train", shot=2, data_dir=task_data)
        assert r.doc_id not in demos
        own = get_task("rte").doc_to_text(train[r.doc_id])
        assert r.contexts[0].count(own) == 1


def _multirc_paragraph_excluded(rows, docs):
    s = DemoSampler("multirc", rows, k=8, split="train", same_split=True)
    for i in docs:
        para = rows[i]["idx"]["paragraph"]
        assert all(rows[j]["idx"]["paragraph"] != para for j in s(i, rows[i]))


def test_multirc_same_split_excludes_the_paragraph(task_data):
    rows = load_split("multirc", "train", task_data)
    first = {}  # the first row of each paragraph
    for i, r in enumerate(rows):
        first.setdefault(r["idx"]["paragraph"], i)
    assert len(first) >= 3
    _multirc_paragraph_excluded(rows, sorted({5, len(rows) - 1, *first.values()}))


@pytest.mark.mirror
def test_multirc_same_split_excludes_the_paragraph_full(full_mirror):
    _multirc_paragraph_excluded(load_split("multirc", "train", full_mirror), (0, 5, 1000))


def test_wsc_demos_are_positive_only(task_data):
    train = load_split("wsc", "train", task_data)
    n_pos = sum(1 for r in train if r["label"])
    for doc_id in range(10):
        ids = demo_ids("wsc", doc_id, shot=5, data_dir=task_data)
        assert len(ids) == 5 and all(train[i]["label"] == 1 for i in ids)
    for r in build_requests("wsc", shot=3, limit=5, data_dir=task_data):
        demos = r.contexts[0].split("\n\n")[:-1]
        assert len(demos) == 3 and all(d.endswith("Answer: yes") for d in demos)
    with pytest.raises(ValueError, match=f"only {n_pos} rows"):
        build_requests("wsc", shot=n_pos + 1, limit=1, data_dir=task_data)


def test_shot_errors(task_data):
    n = len(load_split("cb", "train", task_data))
    with pytest.raises(ValueError, match=f"only {n} rows"):
        build_requests("cb", shot=n + 1, limit=1, data_dir=task_data)
    build_requests("cb", shot=n, limit=1, data_dir=task_data)  # the whole pool is fine
    with pytest.raises(ValueError, match=">= 0"):
        build_requests("cb", shot=-1, limit=1, data_dir=task_data)


@pytest.mark.mirror
def test_shot_errors_full_size(full_mirror):
    """The real demo pool: CB has 250 train rows."""
    with pytest.raises(ValueError, match="only 250 rows"):
        build_requests("cb", shot=251, limit=1, data_dir=full_mirror)


# ---------------------------------------------------------------------------------------------
# registry and data errors
# ---------------------------------------------------------------------------------------------
def test_registry():
    assert len(TASKS) == 14 and set(TASKS) == {
        "hellaswag", "piqa", "arc_easy", "arc_challenge", "openbookqa", "winogrande", "boolq", "cb",
        "copa", "wic", "wsc", "multirc", "rte", "record",
    }  # fmt: skip
    splits = {n: get_task(n).eval_split for n in TASKS}
    assert {n for n, s in splits.items() if s == "test"} == {"arc_easy", "arc_challenge", "openbookqa"}
    assert set(splits.values()) == {"test", "validation"}
    with pytest.raises(ValueError) as e:
        get_task("hellaswagg")
    msg = str(e.value)
    assert "\n" not in msg and "hellaswagg" in msg and all(n in msg for n in TASKS)


def test_missing_file_error(task_data, tmp_path):
    with pytest.raises(TaskDataError) as e:
        load_split("cb", "test", task_data)
    msg = str(e.value)
    assert "\n" not in msg and "cb/test.jsonl" in msg and "train, validation" in msg
    with pytest.raises(TaskDataError, match="none"):
        load_split("cb", "validation", tmp_path)


def test_malformed_rows(tmp_path):
    d = tmp_path / "cb"
    d.mkdir()
    good = {"premise": "p", "hypothesis": "h", "idx": 0, "label": 0}
    bad = {"premise": "p", "idx": 1, "label": 0}
    (d / "validation.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(TaskDataError) as e:
        load_split("cb", "validation", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "cb" in msg and "validation" in msg and "row 1" in msg and "'hypothesis'" in msg
    (d / "validation.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    with pytest.raises(TaskDataError, match=r"cb validation row 2 .*malformed JSON"):
        load_split("cb", "validation", tmp_path)
    # nested required fields (MultiRC question id)
    m = tmp_path / "multirc"
    m.mkdir()
    row = {"paragraph": "p", "question": "q", "answer": "a", "idx": {"paragraph": 0}, "label": 1}
    (m / "train.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(TaskDataError, match=r"multirc train row 0: missing field 'idx.question'"):
        load_split("multirc", "train", tmp_path)
    # env var resolution
    (d / "validation.jsonl").write_text(json.dumps(good) + "\n")
    os.environ["ICL_SCALE_DATA_DIR"], old = str(tmp_path), os.environ.get("ICL_SCALE_DATA_DIR")
    try:
        assert load_split("cb", "validation") == [good]
    finally:
        if old is None:
            del os.environ["ICL_SCALE_DATA_DIR"]
        else:
            os.environ["ICL_SCALE_DATA_DIR"] = old


# ---------------------------------------------------------------------------------------------
# where the rows come from: data_dir > $ICL_SCALE_DATA_DIR > embedded demo slice > hub
# ---------------------------------------------------------------------------------------------
ENV = "ICL_SCALE_DATA_DIR"


def _write_split(root: Path, task: str, split: str, rows: list[dict]) -> list[dict]:
    (root / task).mkdir(parents=True, exist_ok=True)
    (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def _copa(n: int, tag: str) -> list[dict]:
    return [{"premise": f"{tag} {i}", "choice1": "a", "choice2": "b", "question": "cause", "idx": i, "label": 0}
            for i in range(n)]


def test_data_dir_is_a_real_folder():
    """The fixtures folder, never None (a Hydra override data.dir=None would be the string "None")."""
    assert data_dir() == FIXTURES and FIXTURES.is_dir()


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    a = _write_split(tmp_path / "a", "copa", "train", _copa(2, "a"))
    b = _write_split(tmp_path / "b", "copa", "train", _copa(3, "b"))
    # nothing set: the embedded slice for the splits it has, the hub for everything else
    emb = load_split("copa", "train")
    assert len(emb) == 200 and emb[:40] == load_split("copa", "train", FIXTURES)  # verbatim first rows
    assert data_source("copa", "train") == "embedded slice (icl_scale/tasks/embedded, 200 rows)"
    assert data_source("copa", "validation") == "embedded slice (icl_scale/tasks/embedded, 100 rows)"
    assert data_source("arc_easy", "test") == "embedded slice (icl_scale/tasks/embedded, 100 rows)"
    assert len(load_split("arc_easy", "test")) == 100 and len(load_split("arc_easy", "train")) == 200
    assert data_source("arc_easy", "validation") == "hub allenai/ai2_arc/ARC-Easy"  # not embedded
    assert data_source("cb", "validation") == "hub aps/super_glue/cb"
    assert data_source("hellaswag", "validation") == "hub Rowan/hellaswag"
    for unset in (None, "", "None", "null", "NULL", " none "):
        assert data_source("copa", "train", unset).startswith("embedded"), unset
        monkeypatch.setenv(ENV, unset or "")
        assert data_source("copa", "train").startswith("embedded"), unset
    # $ICL_SCALE_DATA_DIR beats the embedded slice
    monkeypatch.setenv(ENV, str(tmp_path / "b"))
    assert load_split("copa", "train") == b and data_source("copa", "train") == f"mirror {(tmp_path / 'b').resolve()}"
    # data_dir beats $ICL_SCALE_DATA_DIR; unset values fall through to it
    assert load_split("copa", "train", tmp_path / "a") == a and load_split("copa", "train", str(tmp_path / "a")) == a
    assert data_source("copa", "train", tmp_path / "a") == f"mirror {(tmp_path / 'a').resolve()}"
    assert load_split("copa", "train", "None") == b
    # hub, asked for explicitly, beats both (by argument or by the variable)
    assert data_source("copa", "train", "hub") == "hub aps/super_glue/copa"
    monkeypatch.setenv(ENV, "hub")
    assert data_source("copa", "train") == "hub aps/super_glue/copa"
    assert load_split("copa", "train", tmp_path / "a") == a


def test_hub_is_the_last_resort(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    calls, row = [], {"premise": "p", "hypothesis": "h", "idx": 0, "label": 0}
    monkeypatch.setattr(task_data_mod, "_load_hub", lambda task, split: calls.append((task, split)) or (row,))
    assert load_split("cb", "validation") == [row]
    assert len(load_split("copa", "train")) == 200  # embedded: no hub call
    load_split("copa", "train", "hub")
    assert calls == [("cb", "validation"), ("copa", "train")]


def test_embedded_slice_is_announced_once_per_task(monkeypatch, caplog):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(task_data_mod, "_announced", set())
    with caplog.at_level("INFO", logger="icl_scale.tasks.data"):
        for _ in range(2):
            build_requests("copa", shot=1, limit=3)  # validation docs, train demos
            load_split("arc_easy", "test")
    msgs = [r.getMessage() for r in caplog.records if "embedded" in r.getMessage()]
    tail = "; set ICL_SCALE_DATA_DIR or data.dir for the full data"
    assert msgs == [f"copa: using the embedded demo slice (200 train, 100 validation rows){tail}",
                    f"arc_easy: using the embedded demo slice (100 test, 200 train rows){tail}"]


def test_data_dir_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    missing, afile = tmp_path / "nope", tmp_path / "file.txt"
    afile.write_text("x")
    calls = (lambda d: load_split("copa", "train", d), lambda d: data_source("copa", "train", d),
             lambda d: build_requests("copa", shot=1, limit=1, data_dir=str(d)))
    for d, what in ((missing, "does not exist"), (afile, "is not a folder")):
        for call in calls:
            with pytest.raises(TaskDataError) as e:
                call(d)  # never the embedded slice or the hub instead
            msg = str(e.value)
            assert "\n" not in msg and msg.startswith(f"data.dir={d} {what}: ") and "data.dir=hub" in msg, msg
    monkeypatch.setenv(ENV, str(missing))
    with pytest.raises(TaskDataError) as e:
        load_split("copa", "train")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{ENV}={missing} does not exist: ") and "unset it" in msg, msg
    with pytest.raises(TaskDataError, match=rf"data.dir={missing} \(from {ENV}\) does not exist"):
        load_split("copa", "train", str(missing))  # data.dir's default is ${oc.env:ICL_SCALE_DATA_DIR,null}
    # the CLI: one line on stderr, exit 2
    env = {k: v for k, v in os.environ.items() if k != ENV}
    p = _cli("render", "--task", "copa", "--data-dir", str(missing), env=env)
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"data.dir={missing} does not exist" in p.stderr


def test_hydra_data_dir_values(monkeypatch):
    """What `data.dir=...` on a command line turns into: null, the string None, the empty string."""
    monkeypatch.delenv(ENV, raising=False)
    for v in ("null", "None", "''"):
        d = compose(f"data.dir={v}")["data"]["dir"]
        assert data_source("copa", "train", d).startswith("embedded"), (v, d)
    assert data_source("copa", "train", compose("data.dir=hub")["data"]["dir"]) == "hub aps/super_glue/copa"


# ---------------------------------------------------------------------------------------------
# the fixtures against the full mirror
# ---------------------------------------------------------------------------------------------
def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


@pytest.mark.mirror
def test_fixtures_are_verbatim_mirror_rows(full_mirror):
    """Every fixture line is the mirror's line, byte for byte, at the row rows.json names; the
    fixtures cover every split the mirror has; the embedded slice is the mirror's first rows."""
    for name in TASKS:
        splits = sorted(p.stem for p in (full_mirror / name).glob("*.jsonl"))
        assert splits == sorted(p.stem for p in (FIXTURES / name).glob("*.jsonl")), name
        for split in splits:
            full = _lines(full_mirror / name / f"{split}.jsonl")
            fix = _lines(FIXTURES / name / f"{split}.jsonl")
            assert len(full) == mirror_size(name, split), (name, split)
            assert fix == [full[i] for i in fixture_rows(name, split)], (name, split)
    for f in sorted(task_data_mod.EMBEDDED_DIR.glob("*/*.jsonl")):
        emb = _lines(f)
        assert emb == _lines(full_mirror / f.parent.name / f.name)[: len(emb)], f


# ---------------------------------------------------------------------------------------------
# metrics on hand-made log-likelihoods
# ---------------------------------------------------------------------------------------------
def _req(i, conts, gold, **kw):
    return Request(doc_id=i, contexts=["c"], continuations=conts, gold=gold, **kw)


def test_acc_vs_acc_norm():
    # choice 0 "a": ll -2 (per char -2); choice 1 "bbbbbbbbbb": ll -5 (per char -0.5)
    r = _req(0, [" a", " bbbbbbbbbb"], 1, choice_texts=["a", "bbbbbbbbbb"])
    m, per = compute_metrics("piqa", [r], [[-2.0, -5.0]])
    assert per[0]["pred"] == 0 and per[0]["pred_norm"] == 1
    assert m["acc"]["value"] == 0.0 and m["acc_norm"]["value"] == 1.0 and m["acc"]["n"] == 1
    # 0.2.0 normalises by len(choice) WITHOUT the leading space: -3/2 < -5.5/4 picks choice 1,
    # while dividing by len(" ab") = 3 and len(" abcd") = 5 would pick choice 0 (-1.0 > -1.1)
    r = _req(0, [" ab", " abcd"], 1, choice_texts=["ab", "abcd"])
    _, per = compute_metrics("arc_easy", [r], [[-3.0, -5.5]])
    assert per[0]["pred"] == 0 and per[0]["pred_norm"] == 1 and per[0]["correct_norm"]


def test_record_em_f1():
    ents = ["Barack Obama", "Obama", "the White House"]
    r = _req(0, ["  - x"] * 3, [1], answers=["Obama"], choice_texts=ents)
    m, per = compute_metrics("record", [r, r], [[-1.0, -2.0, -3.0], [-3.0, -1.0, -2.0]])
    assert per[0]["pred_text"] == "Barack Obama" and per[0]["em"] == 0
    assert per[0]["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # P = 1/2, R = 1
    assert per[1]["em"] == 1 and per[1]["f1"] == 1.0
    assert m["em"]["value"] == 0.5 and m["f1"]["value"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["f1"]["ci_method"] == "bootstrap" and m["em"]["ci_method"] == "wilson"
    # SQuAD normalisation: case, punctuation and articles are ignored
    assert compute_f1("The  White House!", "white house") == 1.0


def test_multirc_all_answers():
    reqs = [
        _req(0, [" a yes", " a no"], 0, group="0-0"),
        _req(1, [" b yes", " b no"], 1, group="0-0"),
        _req(2, [" c yes", " c no"], 0, group="0-1"),
        _req(3, [" d yes", " d no"], 1, group="0-1"),
    ]
    lls = [[-1, -2], [-2, -1], [-1, -2], [-1, -2]]  # question 0-0 all right, 0-1 one answer wrong
    m, per = compute_metrics("multirc", reqs, lls)
    assert [p["correct"] for p in per] == [True, True, True, False]
    assert m["acc"]["value"] == 0.5 and m["acc"]["n"] == 2


def test_cb_macro_f1_by_hand():
    golds = [0, 0, 0, 1, 1, 2, 2, 2]
    preds = [0, 0, 1, 1, 2, 2, 0, 2]
    reqs = [_req(i, [" True", " False", " Neither"], g) for i, g in enumerate(golds)]
    lls = [[0.0 if j == p else -5.0 for j in range(3)] for p in preds]
    m, _ = compute_metrics("cb", reqs, lls)
    # class 0: tp 2 fp 1 fn 1 -> 2/3; class 1: tp 1 fp 1 fn 1 -> 1/2; class 2: tp 2 fp 1 fn 1 -> 2/3
    assert m["f1"]["value"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert m["acc"]["value"] == 5 / 8
    # a class never gold nor predicted scores 0 (sklearn's zero_division), as in 0.2.0
    import numpy as np

    assert macro_f1(np.array([[0, 0], [1, 1]])) == pytest.approx(2 / 3)


def test_wilson_and_input_checks():
    lo, hi = wilson_ci(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_ci(0, 0))
    z = 1.959963984540054  # the closed form, for many (k, n)
    for n in (1, 7, 100):
        for k in range(n + 1):
            p, d = k / n, 1 + z * z / n
            c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
            assert wilson_ci(k, n) == pytest.approx((max(0, c - h), min(1, c + h)), abs=1e-12)
    r = _req(0, [" a", " b"], 0)
    with pytest.raises(ValueError, match="2 choices but 3"):
        compute_metrics("boolq", [r], [[-1, -2, -3]])
    with pytest.raises(ValueError, match="1 requests but 2"):
        compute_metrics("boolq", [r], [[-1, -2], [-1, -2]])


def test_bootstrap_is_the_percentile_bootstrap_over_docs():
    import numpy as np

    values = np.random.default_rng(3).random(40)
    rng = np.random.default_rng(1234)  # the reference: resample docs 1000 times, 2.5/97.5 percentiles
    stats = [values[rng.integers(0, 40, 40)].mean() for _ in range(1000)]
    assert bootstrap_ci(values) == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])), abs=1e-12)
    pairs = np.array([[0, 0], [1, 1], [2, 0], [1, 1], [0, 2]])  # 2-D rows (CB's gold, pred) resample whole
    lo, hi = bootstrap_ci(pairs, macro_f1)
    assert 0 <= lo <= macro_f1(pairs) <= hi <= 1
    assert bootstrap_ci(np.array([0.25])) == (0.25, 0.25) and all(math.isnan(x) for x in bootstrap_ci([]))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "icl_scale.tasks", *args], check=False, capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=60)


def test_cli_render(task_data):
    p = _cli("render", "--task", "winogrande", "--shot", "1", "--limit", "3", "--data-dir", str(task_data))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        rec = json.loads(line)
        assert list(rec) == ["doc", "contexts", "continuations", "gold"] and rec["doc"] == i
        assert len(rec["contexts"]) == 2 and len(rec["continuations"]) == 1
    reqs = build_requests("winogrande", shot=1, limit=3, data_dir=task_data)
    assert [json.loads(x)["contexts"] for x in lines] == [r.contexts for r in reqs]


@pytest.mark.slow
def test_cli_help_and_errors(tmp_path):
    assert _cli("--help").returncode == 0
    h = _cli("render", "--help")
    assert h.returncode == 0 and "--shot" in h.stdout
    for args in (["render", "--task", "nope"], ["render", "--task", "cb", "--data-dir", str(tmp_path)],
                 ["render", "--task", "cb", "--shot", "x"]):
        p = _cli(*args)
        assert p.returncode == 2 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
