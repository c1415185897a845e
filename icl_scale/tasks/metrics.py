"""Metrics from per-choice log-likelihoods, as lm-eval 0.2.0 computes them, with n and 95% CIs.

Each metric is reported as {"value", "n", "ci95": [lo, hi], "ci_method"}:
* proportions (acc, acc_norm, ReCoRD em, MultiRC all-answers acc): Wilson score interval;
* means of non-0/1 scores and non-averages (ReCoRD token f1, CB macro-F1): percentile bootstrap
  over docs, 1000 resamples, fixed seed (deterministic).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest, bootstrap

from .base import Request
from .registry import Task
from .taskfile import get_task

BOOTSTRAP_ITERS = 1000
BOOTSTRAP_SEED = 1234
CONFIDENCE = 0.95


# --- SQuAD answer normalisation: transformers.data.metrics.squad_metrics (used by 0.2.0 ReCoRD) ---
def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _get_tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks, pred_toks = _get_tokens(a_gold), _get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)  # no-answer: 1 if both empty
    if num_same == 0:
        return 0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


# --- intervals ---------------------------------------------------------------------------------
def wilson_ci(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (scipy.stats.binomtest)."""
    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(int(successes), n).proportion_ci(CONFIDENCE, method="wilson")
    return (float(ci.low), float(ci.high))


def bootstrap_ci(values, stat=np.mean, iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED):
    """95% percentile bootstrap of `stat` over the rows of `values` (resampling docs; scipy.stats.
    bootstrap over row indices, so `stat` may take 2-D rows such as CB's (gold, pred) pairs)."""
    values = np.asarray(values)
    n = len(values)
    if n < 2:  # scipy needs two rows; one row resamples to itself
        v = float(stat(values)) if n else float("nan")
        return (v, v)
    res = bootstrap((np.arange(n),), lambda idx: stat(values[idx]), n_resamples=iters, vectorized=False,
                    confidence_level=CONFIDENCE, method="percentile", random_state=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def _prop(correct: Sequence[bool]) -> dict:
    n = len(correct)
    k = sum(bool(c) for c in correct)
    return {"value": k / n if n else float("nan"), "n": n, "ci95": list(wilson_ci(k, n)), "ci_method": "wilson"}


def _boot(values, stat, value: float) -> dict:
    return {"value": value, "n": len(values), "ci95": list(bootstrap_ci(values, stat)), "ci_method": "bootstrap"}


def macro_f1(pairs: np.ndarray, n_classes: int = 3) -> float:
    """0.2.0 CB f1: mean over classes of the binary F1 (class c vs rest); 0 where undefined
    (sklearn's zero_division behaviour)."""
    preds, golds = pairs[:, 0], pairs[:, 1]
    f1s = []
    for c in range(n_classes):
        tp = int(np.sum((preds == c) & (golds == c)))
        fp = int(np.sum((preds == c) & (golds != c)))
        fn = int(np.sum((preds != c) & (golds == c)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / n_classes


def _argmax(xs: Sequence[float]) -> int:
    # first maximum, like np.argmax
    best = 0
    for j in range(1, len(xs)):
        if xs[j] > xs[best]:
            best = j
    return best


# --- main ----------------------------------------------------------------------------------------
def compute_metrics(
    task: str | Task, requests: Sequence[Request], loglikelihoods: Sequence[Sequence[float]]
) -> tuple[dict, list[dict]]:
    """`loglikelihoods[i][j]`: summed log P(continuation | context) of request i's choice j.

    Returns ({metric: {"value", "n", "ci95", "ci_method"}}, per_doc rows).
    """
    t = get_task(task)
    if len(requests) != len(loglikelihoods):
        raise ValueError(f"{len(requests)} requests but {len(loglikelihoods)} loglikelihood rows")
    per_doc = []
    for req, lls in zip(requests, loglikelihoods):
        lls = [float(x) for x in lls]
        if len(lls) != req.n_choices:
            raise ValueError(f"doc {req.doc_id}: {req.n_choices} choices but {len(lls)} loglikelihoods")
        if any(math.isnan(x) for x in lls):
            raise ValueError(f"doc {req.doc_id}: NaN loglikelihood")
        pred = _argmax(lls)
        row = {"doc": req.doc_id, "pred": pred, "gold": req.gold}
        if isinstance(req.gold, list):  # ReCoRD: any gold entity
            row["correct"] = pred in req.gold
        else:
            row["correct"] = pred == req.gold
        if "acc_norm" in t.metrics:
            # 0.2.0 divides by len(choice) in characters, without the leading space
            lens = [len(s) for s in (req.choice_texts or [req.pair(j)[1] for j in range(req.n_choices)])]
            row["pred_norm"] = _argmax([ll / max(n, 1) for ll, n in zip(lls, lens)])
            row["correct_norm"] = row["pred_norm"] == req.gold
        if "em" in t.metrics:  # ReCoRD: score the predicted entity against every gold answer
            pred_text = req.choice_texts[pred]
            row["pred_text"] = pred_text
            row["em"] = max(compute_exact(a, pred_text) for a in req.answers) if req.answers else 0
            row["f1"] = max(compute_f1(a, pred_text) for a in req.answers) if req.answers else 0.0
        if req.group is not None:
            row["group"] = req.group
        per_doc.append(row)
    return _aggregate(t, per_doc), per_doc


def unit_scores(task: str | Task, per_doc: Sequence[dict], primary: str | None = None) -> dict[str, float]:
    """{unit: 0/1} of the task's primary metric, one unit per doc (MultiRC: per question, right only
    if all its answers are; ReCoRD: exact match): the units whose mean is the metric, so pruned and
    unpruned runs on the same docs can be paired (icl_scale.paired). `primary`: the metric a shard
    recorded (curves.json), for a task known only by its store folder (a task file's safe name)."""
    t = None if primary is not None and not isinstance(task, Task) else get_task(task)
    primary = primary or t.metrics[0]
    if (t.name if t is not None else task) == "multirc" and (t is None or t.source_file is None):
        groups: dict[str, bool] = {}
        for r in per_doc:
            groups[str(r["group"])] = groups.get(str(r["group"]), True) and bool(r["correct"])
        return {k: float(v) for k, v in groups.items()}
    key = {"acc": "correct", "acc_norm": "correct_norm", "em": "em"}[primary]
    return {str(r["doc"]): float(r[key] == 1 if key == "em" else bool(r[key])) for r in per_doc}


def _aggregate(t: Task, per_doc: list[dict]) -> dict:
    out = {}
    for m in t.metrics:
        if t.name == "multirc" and t.source_file is None and m == "acc":  # not a task file named multirc
            # 0.2.0 acc_all: a question is right only if every one of its answers is right
            groups: dict[str, list[bool]] = {}
            for r in per_doc:
                groups.setdefault(r["group"], []).append(r["correct"])
            out[m] = _prop([all(v) for v in groups.values()])
        elif m == "acc":
            out[m] = _prop([r["correct"] for r in per_doc])
        elif m == "acc_norm":
            out[m] = _prop([r["correct_norm"] for r in per_doc])
        elif m == "em":
            out[m] = _prop([r["em"] == 1 for r in per_doc])
        elif m == "f1" and "em" in t.metrics:
            vals = [float(r["f1"]) for r in per_doc]
            out[m] = _boot(vals, np.mean, sum(vals) / len(vals) if vals else float("nan"))
        elif m == "f1":  # CB macro-F1
            pairs = np.array([[r["pred"], r["gold"]] for r in per_doc], dtype=int).reshape(-1, 2)
            out[m] = _boot(pairs, macro_f1, macro_f1(pairs) if len(pairs) else float("nan"))
        else:  # pragma: no cover - a task declared a metric this module does not know
            raise ValueError(f"{t.name}: unknown metric {m!r}")
    return out
