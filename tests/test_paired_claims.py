"""Paired intervals over docs (icl_scale.paired) and the claims table (icl_scale.claims) on a synthetic
store whose per-doc samples are written here, so every difference is known by construction."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import bootstrap
from test_paper_figures import IMP, LEVELS, MODEL, make_shard

from icl_scale import claims as C
from icl_scale import paired, report
from icl_scale.collect import collect
from icl_scale.store import write_jsonl, write_tensors
from icl_scale.tasks.metrics import unit_scores


def write_samples(sh, key, correct):
    write_jsonl(sh.file(f"samples/{key}.jsonl"), [{"doc": i, "pred": 0, "gold": 0 if c else 1, "correct": bool(c)}
                                                 for i, c in enumerate(correct)])


def shard_with_samples(root, task, shot, n, flips, curve=(0.6, 0.6, 0.6, 0.6), combined=None):
    """A shard whose unpruned run gets the first 60% of n docs right; at each curve level the docs
    in `flips[level]` change (right -> wrong for positive counts, wrong -> right for negative)."""
    sh = make_shard(root, task, shot, 0, list(curve), list(curve), IMP[("copa", 1, 0)])
    base = [i < int(0.6 * n) for i in range(n)]
    runs = {}
    for kind in ("heads", "ffn"):
        for p in [0.0, *LEVELS[1:], 70.0]:
            k = flips.get((kind, p), 0)
            c = list(base)
            idx = range(k) if k > 0 else range(int(0.6 * n), int(0.6 * n) - k)
            for i in idx:
                c[i] = not c[i]
            write_samples(sh, paired.sample_key(kind, p), c)
            runs[(kind, p)] = c
    for (ph, pf), k in (combined or {}).items():
        c = [i < int(0.6 * n) - k for i in range(n)]
        write_samples(sh, paired.sample_key("heads", ph, pf), c)
    return sh, base, runs


def test_paired_interval_is_the_bootstrap_of_per_doc_differences():
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.6
    pruned = base.copy()
    pruned[:10] = False  # the first docs, some right before, become wrong: only drops
    d = pruned.astype(float) - base.astype(float)
    iv = paired.paired_interval([d])
    assert iv["value"] == pytest.approx(-base[:10].sum() / 200) and iv["value"] < 0 and iv["n"] == 200
    ref = bootstrap((d,), np.mean, n_resamples=1000, method="percentile",
                    random_state=np.random.default_rng(1234)).confidence_interval
    assert iv["ci95"] == pytest.approx([ref.low, ref.high])
    assert iv["ci95"][1] <= 0  # no doc got better: the whole interval is at or below 0
    # Unpaired, the same two runs' intervals overlap widely; paired, the difference is resolved.
    width_unpaired = 2 * 1.96 * math.sqrt(0.6 * 0.4 / 200)
    assert iv["ci95"][1] - iv["ci95"][0] < width_unpaired / 2
    # Two cells: the mean of the cells' means, docs resampled within each cell.
    two = paired.paired_interval([d, np.zeros(50)])
    assert two["value"] == pytest.approx(iv["value"] / 2) and two["n"] == 250 and two["cells"] == 2
    assert math.isnan(paired.paired_interval([np.array([1.0])])["ci95"][0])


def test_units_are_the_primary_metric_per_doc_and_per_multirc_question():
    rows = [{"doc": 0, "correct": True, "group": "q1"}, {"doc": 1, "correct": False, "group": "q1"},
            {"doc": 2, "correct": True, "group": "q2"}]
    assert unit_scores("multirc", rows) == {"q1": 0.0, "q2": 1.0}
    assert unit_scores("copa", rows) == {"0": 1.0, "1": 0.0, "2": 1.0}
    rec = [{"doc": 0, "correct": True, "em": 0}, {"doc": 1, "correct": True, "em": 1}]
    assert unit_scores("record", rec) == {"0": 0.0, "1": 1.0}  # ReCoRD's primary metric is em, not acc


def test_prunable_carries_n_and_the_paired_interval_or_says_too_small(tmp_path):
    # 400 docs, heads: 2 docs lost at 10% (within 1 point), 20 lost at 20%: prunable 10%.
    sh, base, runs = shard_with_samples(tmp_path / "big", "copa", 1, 400,
                                        {("heads", 10.0): 2, ("heads", 20.0): 20, ("heads", 30.0): 30},
                                        curve=(0.6, 0.595, 0.55, 0.525))
    d = next(x for x in collect(tmp_path / "big", MODEL).ok)
    p = paired.prunable(d, "heads")
    assert p["level"] == 10 and p["n"] == 400 and p["diff"] == pytest.approx(-2 / 400)
    assert p["ci95"][0] <= p["diff"] <= p["ci95"][1] <= 0
    assert p["text"].startswith("10% (n=400; pruned - unpruned there -0.5 points, 95% paired CI [")
    # 20 docs: one doc is 5 points, so "within 1 point" cannot be told apart from a 5-point change.
    shard_with_samples(tmp_path / "small", "copa", 1, 20, {})
    d = next(x for x in collect(tmp_path / "small", MODEL).ok)
    small = paired.prunable(d, "heads")
    assert small["n"] == 20 and small["text"] == (
        "too few docs to tell (n=20: one doc is 5.0 points, more than the 1-point tolerance)")
    row = report.summary_table(collect(tmp_path / "small", MODEL))[0]
    assert row["heads_prunable"] == small["text"] and row["heads_prunable_n"] == 20


def test_verdicts():
    assert C.verdict([-0.005, 0.01], -0.01, 1.0) == C.SUPPORTED
    assert C.verdict([-0.2, -0.1], -0.01, 1.0) == C.CONTRADICTED
    assert C.verdict([-0.05, 0.01], -0.01, 1.0) == C.UNCLEAR
    assert C.verdict([-0.09, -0.03], -0.08, -0.02) == C.UNCLEAR  # overlaps the range and its outside
    assert C.verdict([-0.07, -0.03], -0.08, -0.02) == C.SUPPORTED
    assert C.verdict([math.nan, math.nan], -0.01, 1.0) == "no interval"


def test_claims_from_a_store(tmp_path):
    """Heads at 70% cost nothing on 1000 docs (supported); FFNs at 10% cost 20 points at 1 shot
    (contradicted); the 70%+20% grid point is 5 points down (inside -8..-2: supported)."""
    n = 1000
    shard_with_samples(tmp_path, "copa", 1, n, {("ffn", 10.0): 200}, combined={(70.0, 20.0): 50})
    res = report.reduce_store(tmp_path, MODEL, out_dir=tmp_path / "out", figures=False)
    by = {r["claim"]: r for r in res["claims"]}
    heads = by["heads 70% prunable"]
    assert heads["this_model"] == 0 and heads["verdict"] == C.SUPPORTED and heads["n_docs"] == n
    ffn = by["FFN 10% prunable at 1+ shots"]
    assert ffn["this_model"] == pytest.approx(-0.2) and ffn["verdict"] == C.CONTRADICTED
    assert by["FFN 20% prunable at 0 shots"]["verdict"] == "no data"  # no 0-shot shard
    both = by["70% heads + 20% FFN"]
    assert both["this_model"] == pytest.approx(-0.05) and both["verdict"] == C.SUPPORTED
    saved = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert [r["claim"] for r in saved] == [r["claim"] for r in res["claims"]]
    md = (tmp_path / "out" / "claims.md").read_text()
    assert "| 70% heads + 20% FFN | about -5 points (taken as -8 to -2) | -5.0 points |" in md
    assert "## The paper's claims on this model" in (tmp_path / "out" / "report.md").read_text()


def test_cross_shot_agreement_is_tested_against_the_depth_trend(tmp_path):
    """Two shots whose rankings share only a strong depth trend (independent within each layer) have a
    high true Spearman, but no more than the within-layer permutation null: not distinguishable.
    The same ranking at both shots is above the null: supported."""
    rng = np.random.default_rng(0)
    depth = np.repeat(np.arange(6)[:, None] * 10.0, 8, axis=1)
    a, b = depth + rng.random((6, 8)), depth + rng.random((6, 8))
    for root, second in ((tmp_path / "depth", b), (tmp_path / "same", a)):
        for shot, heads in ((0, a), (1, second)):
            sh = make_shard(root, "copa", shot, 0, [0.6] * 4, [0.6] * 4, IMP[("copa", 1, 0)])
            write_tensors(sh.file("importance.safetensors"), {"heads": torch.tensor(heads, dtype=torch.float32),
                                                             "ffn": torch.ones(6), "ffn_knockout": torch.zeros(6)})
    depth_only = C.cross_shot_depth_claim(collect(tmp_path / "depth", MODEL))
    assert depth_only["this_model"] > 0.8 and depth_only["verdict"] == C.UNCLEAR
    assert depth_only["ci95"][0] <= depth_only["this_model"] <= depth_only["ci95"][1]
    same = C.cross_shot_depth_claim(collect(tmp_path / "same", MODEL))
    assert same["this_model"] == pytest.approx(1.0) and same["verdict"] == C.SUPPORTED
