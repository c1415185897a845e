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
from icl_scale.tasks.metrics import compute_f1, macro_f1, wilson_ci

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


def _mirror() -> Path | None:
    env = os.environ.get("ICL_SCALE_DATA_DIR")
    p = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return p if p.is_dir() else None


@pytest.fixture(scope="module")
def data():
    p = _mirror()
    if p is None:
        pytest.skip("no task data mirror: set ICL_SCALE_DATA_DIR or place it at ../shared/data")
    return p


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
def test_golden_prompts_match_lm_eval_020(name, data):
    g = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))
    t = get_task(name)
    for c in g["cases"]:
        assert c["split"] == t.eval_split
        doc = load_split(name, c["split"], data)[c["doc_id"]]
        demo_rows = load_split(name, c["demo_split"], data)
        demos = [demo_rows[i] for i in c["demo_ids"]]
        assert t.doc_to_text(doc) == c["doc_to_text"]
        assert t.doc_to_target(doc) == c["doc_to_target"]
        req = t.make_request(doc, c["doc_id"], demos)
        assert _pairs(req) == c["pairs"], (name, c["doc_id"], c["shot"])
        assert req.doc_id == c["doc_id"] and req.task == name


@pytest.mark.parametrize("name", TASKS)
def test_golden_metrics_match_lm_eval_020(name, data):
    mc = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))["metric_check"]
    reqs = build_requests(name, split=mc["split"], limit=mc["n_docs"], data_dir=data)
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
def test_sampler_deterministic_and_order_independent(data):
    a = build_requests("copa", shot=3, limit=20, seed=7, data_dir=data)
    b = build_requests("copa", shot=3, limit=5, seed=7, data_dir=data)
    assert [r.contexts for r in a[:5]] == [r.contexts for r in b]  # limit does not change demos
    c = build_requests("copa", shot=3, limit=5, seed=8, data_dir=data)
    assert [r.contexts for r in c] != [r.contexts for r in b]  # the seed does
    pool = list(range(400))
    fwd = [sample_demos("copa", i, 4, pool, seed=1, split="validation") for i in range(50)]
    rev = [sample_demos("copa", i, 4, pool, seed=1, split="validation") for i in reversed(range(50))][::-1]
    assert fwd == rev and all(len(set(d)) == 4 for d in fwd)
    assert len({tuple(d) for d in fwd}) > 40  # docs do get different demos


def test_sampler_excludes_the_doc_on_its_own_split(data):
    rows = load_split("cb", "train", data)
    s = DemoSampler("cb", rows, k=len(rows) - 1, split="train", same_split=True)
    for i in (0, 17, len(rows) - 1):
        d = s(i, rows[i])
        assert i not in d and len(d) == len(rows) - 1
    with pytest.raises(ValueError, match="remain"):
        DemoSampler("cb", rows, k=len(rows), split="train", same_split=True)(0, rows[0])
    # rendering train docs with train demos (importance scoring): no doc is its own demo
    reqs = build_requests("rte", split="train", shot=2, limit=30, data_dir=data)
    train = load_split("rte", "train", data)
    for r in reqs:
        demos = demo_ids("rte", r.doc_id, split="train", shot=2, data_dir=data)
        assert r.doc_id not in demos
        own = get_task("rte").doc_to_text(train[r.doc_id])
        assert r.contexts[0].count(own) == 1


def test_multirc_same_split_excludes_the_paragraph(data):
    rows = load_split("multirc", "train", data)
    s = DemoSampler("multirc", rows, k=8, split="train", same_split=True)
    for i in (0, 5, 1000):
        para = rows[i]["idx"]["paragraph"]
        assert all(rows[j]["idx"]["paragraph"] != para for j in s(i, rows[i]))


def test_wsc_demos_are_positive_only(data):
    train = load_split("wsc", "train", data)
    n_pos = sum(1 for r in train if r["label"])
    for doc_id in range(10):
        ids = demo_ids("wsc", doc_id, shot=5, data_dir=data)
        assert len(ids) == 5 and all(train[i]["label"] == 1 for i in ids)
    for r in build_requests("wsc", shot=3, limit=5, data_dir=data):
        demos = r.contexts[0].split("\n\n")[:-1]
        assert len(demos) == 3 and all(d.endswith("Answer: yes") for d in demos)
    with pytest.raises(ValueError, match=f"only {n_pos} rows"):
        build_requests("wsc", shot=n_pos + 1, limit=1, data_dir=data)


def test_shot_errors(data):
    with pytest.raises(ValueError, match="only 250 rows"):
        build_requests("cb", shot=251, limit=1, data_dir=data)
    with pytest.raises(ValueError, match=">= 0"):
        build_requests("cb", shot=-1, limit=1, data_dir=data)


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


def test_missing_file_error(data, tmp_path):
    with pytest.raises(TaskDataError) as e:
        load_split("cb", "test", data)
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
    r = _req(0, [" a", " b"], 0)
    with pytest.raises(ValueError, match="2 choices but 3"):
        compute_metrics("boolq", [r], [[-1, -2, -3]])
    with pytest.raises(ValueError, match="1 requests but 2"):
        compute_metrics("boolq", [r], [[-1, -2], [-1, -2]])


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "icl_scale.tasks", *args], check=False, capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=60)


def test_cli_render(data):
    p = _cli("render", "--task", "winogrande", "--shot", "1", "--limit", "3", "--data-dir", str(data))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        rec = json.loads(line)
        assert list(rec) == ["doc", "contexts", "continuations", "gold"] and rec["doc"] == i
        assert len(rec["contexts"]) == 2 and len(rec["continuations"]) == 1
    reqs = build_requests("winogrande", shot=1, limit=3, data_dir=data)
    assert [json.loads(x)["contexts"] for x in lines] == [r.contexts for r in reqs]


def test_cli_help_and_errors(tmp_path):
    assert _cli("--help").returncode == 0
    h = _cli("render", "--help")
    assert h.returncode == 0 and "--shot" in h.stdout
    for args in (["render", "--task", "nope"], ["render", "--task", "cb", "--data-dir", str(tmp_path)],
                 ["render", "--task", "cb", "--shot", "x"]):
        p = _cli(*args)
        assert p.returncode == 2 and p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
