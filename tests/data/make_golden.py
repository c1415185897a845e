"""Generate tests/data/golden/<task>.json with lm-eval 0.2.0's OWN task classes (no network).

How the golden files were made (from the repo root):

    python -m pip install --no-deps --target /tmp/lm02 /tmp/lmeval02/lm_eval-0.2.0-py3-none-any.whl \
        sqlitedict==1.6.0 sacrebleu==1.5.0 portalocker scikit-learn joblib threadpoolctl narwhals
    ICL_SCALE_DATA_DIR=<full mirror> .venv/bin/python tests/data/make_golden.py --lm02 /tmp/lm02

(the wheel is the PyPI release `lm-eval==0.2.0`; `pip download --no-deps lm-eval==0.2.0` fetches it.)

What it does, per task:
* imports 0.2.0's task module directly (its `lm_eval.tasks` package __init__ imports every task
  and their many dependencies, so a bare package module stands in for it; ReCoRD's
  `transformers.data.metrics.squad_metrics`, gone from transformers 5, is stubbed with a copy of
  its SQuAD normalisation -- only used by the metric check, not by any prompt);
* builds the task object with `object.__new__` (no `download()`), converts mirror rows with the
  class's own `_convert_standard` / `_process_doc` (RTE: super_glue rows renamed to glue's
  sentence1/sentence2, which is the schema 0.2.0's glue.RTE reads);
* for each chosen eval doc and shot 0/1/2, patches `fewshot_examples` to return the chosen train
  rows, calls 0.2.0's `fewshot_context` and `construct_requests`, and records every
  (context, continuation) pair plus `doc_to_text` / `doc_to_target`;
* metric check: fixed pseudo-random log-likelihoods for the first N eval docs, scored with 0.2.0's
  `process_results` + `aggregation` (sklearn F1 for CB, acc_all for MultiRC).

Row ids in the JSON are row numbers of the mirror's jsonl files (= our doc_ids). The tests run on
the fixtures, which hold those rows: tests/data/fixtures/rows.json maps the numbers.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import random
import re
import string
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "golden"

# task -> (0.2.0 module, class, eval split, eval doc ids, train demo ids, metric-check doc count)
SPEC = {
    "hellaswag": ("hellaswag", "HellaSwag", "validation", [0, 913], [0, 1], 40),  # 913: WikiHow [title]
    "piqa": ("piqa", "PiQA", "validation", [0, 1], [0, 1], 40),
    "arc_easy": ("arc", "ARCEasy", "test", [0, 14, 93], [4, 0], 40),  # 14: key "1".., 93: not 4 choices
    "arc_challenge": ("arc", "ARCChallenge", "test", [0, 44, 121], [16, 0], 40),
    "openbookqa": ("openbookqa", "OpenBookQA", "test", [0, 1], [0, 1], 40),
    "winogrande": ("winogrande", "Winogrande", "validation", [0, 1], [0, 1], 40),
    "boolq": ("superglue", "BoolQ", "validation", [0, 1], [0, 1], 40),
    "cb": ("superglue", "CommitmentBank", "validation", [0, 1, 8], [0, 1], 56),
    "copa": ("superglue", "Copa", "validation", [0, 4], [0, 1], 40),
    "wic": ("superglue", "WordsInContext", "validation", [0, 3], [0, 1], 40),
    "wsc": ("superglue", "SGWinogradSchemaChallenge", "validation", [0, 2], [3, 4], 40),  # positives only
    "multirc": ("superglue", "MultiRC", "validation", [0, 1], [0, 1], 60),
    "rte": ("glue", "RTE", "validation", [0, 1], [0, 1], 40),
    "record": ("superglue", "ReCoRD", "validation", [0, 1], [0, 2], 11),
}
SHOTS = (0, 1, 2)


def _squad_stub() -> types.ModuleType:
    """transformers.data.metrics.squad_metrics (transformers 4.x) compute_exact / compute_f1."""
    m = types.ModuleType("transformers.data.metrics.squad_metrics")

    def normalize_answer(s):
        def remove_articles(text):
            return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

        def white_space_fix(text):
            return " ".join(text.split())

        def remove_punc(text):
            exclude = set(string.punctuation)
            return "".join(ch for ch in text if ch not in exclude)

        return white_space_fix(remove_articles(remove_punc(s.lower())))

    def get_tokens(s):
        return normalize_answer(s).split() if s else []

    def compute_exact(a_gold, a_pred):
        return int(normalize_answer(a_gold) == normalize_answer(a_pred))

    def compute_f1(a_gold, a_pred):
        gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
        common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
        num_same = sum(common.values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision = 1.0 * num_same / len(pred_toks)
        recall = 1.0 * num_same / len(gold_toks)
        return (2 * precision * recall) / (precision + recall)

    m.compute_exact, m.compute_f1 = compute_exact, compute_f1
    return m


def import_lm02(target: str):
    sys.path.insert(0, target)
    import lm_eval.base

    pkg = types.ModuleType("lm_eval.tasks")
    pkg.__path__ = [str(Path(target) / "lm_eval" / "tasks")]
    sys.modules["lm_eval.tasks"] = pkg
    import transformers  # noqa: F401

    for n in ["transformers.data", "transformers.data.metrics"]:
        sys.modules.setdefault(n, types.ModuleType(n))
    sq = _squad_stub()
    sys.modules[sq.__name__] = sq
    sys.modules["transformers.data.metrics"].squad_metrics = sq
    import importlib

    import lm_eval

    assert Path(lm_eval.__file__).resolve().is_relative_to(Path(target).resolve()), lm_eval.__file__
    return {m: importlib.import_module(f"lm_eval.tasks.{m}") for m in {s[0] for s in SPEC.values()}}


def read_rows(data_dir: Path, task: str, split: str) -> list[dict]:
    with open(data_dir / task / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def to_02_doc(task: str, obj, row: dict) -> dict:
    row = copy.deepcopy(row)  # ARC's _convert_standard mutates its input
    if task == "record":
        return obj._process_doc(row)
    if task == "rte":  # 0.2.0 reads glue/rte
        return {"sentence1": row["premise"], "sentence2": row["hypothesis"], "idx": row["idx"], "label": row["label"]}
    return obj._convert_standard(row)  # HFTask default is identity


def request_pairs(reqs) -> list[list[str]]:
    if not isinstance(reqs, (list, tuple)):
        reqs = [reqs]
    out = []
    for r in reqs:
        assert r.request_type == "loglikelihood", r
        ctx, cont = r.args
        out.append([ctx, cont])
    return out


def golden_for(task: str, mods: dict, data_dir: Path) -> dict:
    mod, cls_name, split, doc_ids, demo_ids, n_metric = SPEC[task]
    cls = getattr(mods[mod], cls_name)
    obj = object.__new__(cls)  # bypass __init__ -> download()
    obj.data, obj._training_docs, obj._fewshot_docs = None, None, None
    eval_rows, train_rows = read_rows(data_dir, task, split), read_rows(data_dir, task, "train")
    if task == "wsc":
        assert all(train_rows[i]["label"] for i in demo_ids), "0.2.0 WSC demos are positives only"
    cases = []
    for doc_id in doc_ids:
        doc = to_02_doc(task, obj, eval_rows[doc_id])
        for shot in SHOTS:
            demos = [to_02_doc(task, obj, train_rows[i]) for i in demo_ids[:shot]]
            obj.fewshot_examples = lambda k, rnd, _d=demos: (_d if k == len(_d) else 1 / 0)
            ctx = obj.fewshot_context(doc=doc, num_fewshot=shot, rnd=random.Random(0))
            cases.append({
                "split": split, "doc_id": doc_id, "shot": shot,
                "demo_split": "train", "demo_ids": demo_ids[:shot],
                "doc_to_text": obj.doc_to_text(doc), "doc_to_target": obj.doc_to_target(doc),
                "pairs": request_pairs(obj.construct_requests(doc, ctx)),
            })  # fmt: skip

    # metric check: first n docs, 0-shot (only the number of choices matters)
    rnd = random.Random(f"golden-metrics-{task}")
    lls, per_doc, items = [], [], collections.defaultdict(list)
    for row in eval_rows[:n_metric]:
        doc = to_02_doc(task, obj, row)
        n = len(request_pairs(obj.construct_requests(doc, "ctx")))
        ll = [round(rnd.uniform(-40.0, -0.5), 6) for _ in range(n)]
        if task == "record" and rnd.random() < 0.6:  # random picks almost never hit a gold entity
            ll[doc["entities"].index(doc["answers"][0])] = -0.1
        lls.append(ll)
        res = obj.process_results(doc, [(x, False) for x in ll] if task == "record" else ll)
        if task == "multirc":  # per doc 0.2.0 keeps (pred, doc); pred = ll_yes > ll_no
            per_doc.append({"pred_yes": bool(res["acc"][0])})
        else:  # CB's per-doc f1 is a (pred, gold) pair, only meaningful aggregated
            per_doc.append({k: v for k, v in res.items() if not (task == "cb" and k == "f1")})
        for k, v in res.items():
            items[k].append(v)
    agg = {k: float(fn(items[k])) for k, fn in obj.aggregation().items()}
    per_doc = [{k: (float(v) if not isinstance(v, bool) else v) for k, v in d.items()} for d in per_doc]
    return {
        "task": task,
        "generated_by": f"lm-eval 0.2.0 lm_eval.tasks.{mod}.{cls_name} (tests/data/make_golden.py)",
        "cases": cases,
        "metric_check": {"split": split, "n_docs": n_metric, "loglikelihoods": lls,
                         "per_doc": per_doc, "metrics": agg},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm02", default="/tmp/lm02", help="pip --target dir holding lm_eval 0.2.0 and its deps")
    env = os.environ.get("ICL_SCALE_DATA_DIR")
    ap.add_argument("--data-dir", default=env, help="full mirror (default $ICL_SCALE_DATA_DIR)")
    ap.add_argument("--tasks", nargs="*", default=list(SPEC))
    a = ap.parse_args()
    if not a.data_dir:
        ap.error("no mirror: pass --data-dir DIR or set ICL_SCALE_DATA_DIR")
    mods = import_lm02(a.lm02)
    OUT.mkdir(parents=True, exist_ok=True)
    for task in a.tasks:
        g = golden_for(task, mods, Path(a.data_dir))
        (OUT / f"{task}.json").write_text(json.dumps(g, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{task}: {len(g['cases'])} cases, metrics {g['metric_check']['metrics']}")


if __name__ == "__main__":
    main()
