"""The reducer's figures on a synthetic store with known numbers: the data behind each figure (means
over seeds and tasks, the grid, both rank statistics, the aggregate, cross-shot, retained capacity),
report.md, and the two reducer bugs (per-panel metric label, "prunable within 1 point" with a dip)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from scipy.stats import t as student_t

from icl_scale import paper, plots, report
from icl_scale.collect import collect
from icl_scale.pruning import random_ranking
from icl_scale.store import Shard, induction_dir, write_json, write_tensors

MODEL = "synth"
LEVELS = [0.0, 10.0, 20.0, 30.0]


def _row(level_keys: dict, value: float, metric: str) -> dict:
    return {**level_keys, "value": value, "metrics": {metric: {"value": value, "ci95": [value - 0.1, value + 0.1],
                                                               "n": 10}}}


def make_shard(root, task, shot, seed, heads_curve, ffn_curve, heads_imp, grid=None, knockout=(0.0, 0.0),
               metric="acc", status="complete"):
    sh = Shard(root, MODEL, task, shot, seed)
    write_tensors(sh.file("importance.safetensors"), {
        "heads": torch.tensor(heads_imp, dtype=torch.float32), "ffn": torch.ones(2),
        "ffn_knockout": torch.tensor(knockout, dtype=torch.float32)})
    curves = {"model": MODEL, "task": task, "shot": shot, "seed": sh.seed, "metric": metric, "n_eval": 10,
              "n_importance": 4, "knockout_baseline": heads_curve[0],
              "heads": [_row({"level": p}, v, metric) for p, v in zip(LEVELS, heads_curve)],
              "ffn": [_row({"level": p}, v, metric) for p, v in zip(LEVELS, ffn_curve)],
              "combined": [_row({"head_level": h, "ffn_level": f}, v, metric) for (h, f), v in (grid or {}).items()],
              "heads_by": {}}
    write_json(sh.file("curves.json"), curves)
    write_json(sh.file("manifest.json"), {"status": status, "config_hash": f"{task}{shot}{seed}",
                                          "config": {"model": {"name": MODEL}, "task": task, "shot": shot,
                                                     "seed": sh.seed, "pruning": {"count": "floor"}}})
    return sh


IMP = {  # head importance [2 layers, 3 heads] per (task, shot, seed)
    ("copa", 1, 0): [[1, 2, 3], [4, 5, 6]], ("copa", 1, 1): [[3, 2, 1], [4, 5, 6]],
    ("rte", 1, 0): [[6, 5, 4], [3, 2, 1]], ("copa", 0, 0): [[1, 3, 2], [6, 5, 4]],
    ("rte", 0, 0): [[2, 1, 3], [5, 6, 4]],
}
HEADS = {("copa", 1, 0): [0.6, 0.6, 0.5, 0.4], ("copa", 1, 1): [0.8, 0.7, 0.6, 0.5],
         ("rte", 1, 0): [0.55, 0.5, 0.5, 0.45], ("copa", 0, 0): [0.5, 0.5, 0.5, 0.5],
         ("rte", 0, 0): [0.52, 0.51, 0.5, 0.5]}
GRID = {(0.0, 0.0): 0.6, (0.0, 50.0): 0.5, (50.0, 0.0): 0.4, (50.0, 50.0): 0.3}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for (task, shot, seed), imp in IMP.items():
        grid = {k: v + 0.1 * seed + (0.05 if task == "rte" else 0) for k, v in GRID.items()}
        make_shard(root, task, shot, seed, HEADS[(task, shot, seed)], [0.6, 0.5, 0.4, 0.3], imp, grid,
                   knockout=(0.1 * (seed + 1), 0.3))
    make_shard(root, "boolq", 1, 0, [0.5] * 4, [0.5] * 4, [[1] * 3] * 2, status="failed")  # named, skipped
    scores = {"prefix_matching": torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]),
              "copying": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])}
    write_tensors(induction_dir(root, MODEL) / "scores.safetensors", scores)
    return root, scores


def test_curves_average_seeds_then_tasks(synth):
    root, _ = synth
    fig5 = paper.fig56_curves(collect(root, MODEL), "heads")
    copa1 = next(c for c in fig5["cells"] if (c["task"], c["shot"]) == ("copa", 1))
    a, b = HEADS[("copa", 1, 0)], HEADS[("copa", 1, 1)]
    half = student_t.ppf(0.975, 1) * np.std([a[2], b[2]], ddof=1) / math.sqrt(2)
    p20 = next(p for p in copa1["points"] if p["level"] == 20)
    assert p20["value"] == pytest.approx((a[2] + b[2]) / 2) and p20["n_seeds"] == 2
    assert p20["seed_ci"] == [pytest.approx(0.55 - half), pytest.approx(0.55 + half)]
    assert p20["doc_ci"] == [pytest.approx(0.45), pytest.approx(0.65)]  # mean of the seeds' doc intervals
    mean1 = next(m for m in fig5["mean"] if m["shot"] == 1)
    assert mean1["tasks"] == ["copa", "rte"]  # boolq failed: not in the mean
    at30 = next(p for p in mean1["points"] if p["level"] == 30)
    assert at30["value"] == pytest.approx(((0.4 + 0.5) / 2 + 0.45) / 2)
    assert (at30["min"], at30["max"]) == (pytest.approx(0.45), pytest.approx(0.45))


def test_grid_knockout_and_importance(synth):
    root, _ = synth
    col = collect(root, MODEL)
    grid = next(c for c in paper.fig7_grid(col)["cells"] if (c["task"], c["shot"]) == ("copa", 1))
    assert grid["head_levels"] == [0.0, 50.0] and grid["ffn_levels"] == [0.0, 50.0]
    assert grid["value"][1][0] == pytest.approx(0.5 + 0.05)  # ffn 50, heads 0: mean of seeds 0 (0.5) and 1 (0.6)
    mean = next(m for m in paper.fig7_grid(col)["mean"] if m["shot"] == 1)["value"]
    assert mean[1][1] == pytest.approx(((0.3 + 0.4) / 2 + 0.35) / 2)
    ko = next(r for r in paper.fig4_knockout(col) if (r["task"], r["shot"]) == ("copa", 1))
    assert ko["drop"] == [pytest.approx(0.15), pytest.approx(0.3)] and ko["n_seeds"] == 2
    fig3 = paper.fig3_importance(col)
    agg1 = next(a for a in fig3["aggregate"] if a["shot"] == 1)
    copa = (torch.tensor(IMP[("copa", 1, 0)]) + torch.tensor(IMP[("copa", 1, 1)])) / 2
    assert torch.allclose(torch.tensor(agg1["heads"]), (copa + torch.tensor(IMP[("rte", 1, 0)])) / 2)


def _argsort_rho(a, b):
    """The original's statistic, independently: spearmanr over torch.sort(...)[1] vectors."""
    return spearmanr(torch.sort(torch.tensor(a, dtype=torch.float64).flatten())[1].numpy(),
                     torch.sort(torch.tensor(b, dtype=torch.float64).flatten())[1].numpy()).statistic


def test_rank_correlations_both_statistics(synth):
    root, _ = synth
    col = collect(root, MODEL)
    c1 = next(c for c in paper.fig8_correlation(col) if c["shot"] == 1)
    assert c1["rows"] == ["copa", "rte", "aggregate", "random"]
    copa = ((torch.tensor(IMP[("copa", 1, 0)]) + torch.tensor(IMP[("copa", 1, 1)])) / 2).tolist()
    rte = IMP[("rte", 1, 0)]
    assert c1["argsort_spearman"][0][1] == pytest.approx(_argsort_rho(copa, rte))
    assert c1["spearman"][0][1] == pytest.approx(spearmanr(np.ravel(copa), np.ravel(rte)).statistic)
    rnd = random_ranking((2, 3), 0)
    assert c1["spearman"][0][3] == pytest.approx(spearmanr(np.ravel(copa), rnd.flatten().numpy()).statistic)
    t1 = paper.table1_cross_shot(col)
    rows = {r["task"]: r for r in t1["per_task"]}
    assert rows["rte"]["shots"] == "0-1"
    assert rows["rte"]["argsort_spearman"] == pytest.approx(_argsort_rho(IMP[("rte", 0, 0)], rte))
    true_rho = spearmanr(np.ravel(IMP[("copa", 0, 0)]), np.ravel(copa)).statistic
    assert rows["copa"]["spearman"] == pytest.approx(true_rho)
    (mean,) = t1["mean_over_tasks"]
    both = [rows[t]["argsort_spearman"] for t in ("copa", "rte")]
    assert mean["argsort_spearman"] == pytest.approx(sum(both) / 2)


def test_retained_capacity_under_task_aggregate_and_random(synth):
    root, scores = synth
    rows = paper.fig11_retained(collect(root, MODEL), scores, levels=[0, 50])
    by = {(r["ranking"], r["shot"]): r for r in rows}
    # rte 1-shot ranks [[6,5,4],[3,2,1]]: pruning 50% (floor(3) heads) removes layer 1's three heads,
    # which hold half the prefix score and none of the copying score.
    assert by[("rte", 1)]["retained_prefix_matching"] == {"0": 1.0, "50": 0.5}
    assert by[("rte", 1)]["retained_copying"] == {"0": 1.0, "50": 1.0}
    # copa 1-shot (seed mean [[2,2,2],[4,5,6]]) removes layer 0: copying loses everything.
    assert by[("copa", 1)]["retained_copying"]["50"] == 0.0
    # The aggregate [[4,3.5,3],[3.5,3.5,3.5]] removes (0,2), then the ties at 3.5 by lower index: (0,1), (1,0).
    assert by[("aggregate", 1)]["retained_prefix_matching"]["50"] == 0.5
    assert by[("aggregate", 1)]["retained_copying"]["50"] == 1.0
    assert 0.0 <= by[("random", 1)]["retained_prefix_matching"]["50"] <= 1.0
    assert "spearman_prefix_matching" in by[("aggregate", 1)] and "spearman_prefix_matching" not in by[("random", 1)]


def test_prunable_within_one_point_stops_at_a_dip(tmp_path):
    """Bug: the highest level within 1 point was taken even when the curve dipped below before it
    (the old summary said 30 for this curve)."""
    make_shard(tmp_path, "copa", 1, 0, [0.60, 0.595, 0.55, 0.60], [0.6, 0.6, 0.6, 0.6], IMP[("copa", 1, 0)])
    (row,) = report.summary_table(collect(tmp_path, MODEL))
    assert row["heads_prunable_1pt"] == 10 and row["ffn_prunable_1pt"] == 30


def test_each_panel_is_labelled_with_its_own_metric(synth, tmp_path, monkeypatch):
    """Bug: every panel of the curves figure carried the first shard's metric (ReCoRD said acc)."""
    root, _ = synth
    make_shard(tmp_path, "copa", 1, 0, [0.6] * 4, [0.6] * 4, IMP[("copa", 1, 0)])
    make_shard(tmp_path, "record", 1, 0, [0.3] * 4, [0.3] * 4, IMP[("rte", 1, 0)], metric="em")
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    plots.fig56_curves(paper.fig56_curves(collect(tmp_path, MODEL), "heads"), tmp_path / "x.png")
    labels = {ax.get_title(): ax.get_ylabel() for ax in figs[0].axes if ax.get_title()}
    assert labels["copa"] == "acc" and labels["record"] == "em"


def test_report_names_what_is_missing_and_renders_the_rest(synth, tmp_path):
    root, _ = synth
    res = report.reduce_store(root, MODEL, expected=[("copa", 1), ("wic", 1)], out_dir=tmp_path / "out")
    status = {p["shard"]: p["status"] for p in res["problems"]}
    assert status == {f"{MODEL}/boolq/1shot/seed0": "failed", f"{MODEL}/wic/1shot/seed0": "missing"}
    assert {"fig3_importance.png", "fig4_ffn_knockout.png", "fig5_curves_heads.png", "fig6_curves_ffn.png",
            "fig7_grid.png", "fig8_argsort_spearman_1shot.png", "fig10_induction.png",
            "fig11_retained.png"} <= set(res["figures"])
    assert any("Fig. 9 needs transfer results" in w for w in res["not_drawn"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"- {MODEL}/boolq/1shot/seed0: failed" in md and "missing" in md
    t1 = res["cross_shot"]["mean_over_tasks"][0]
    assert f"| mean (2 tasks) | 0-1 | {t1['argsort_spearman']:.3f} | {t1['spearman']:.3f} |" in md
    assert "## Fig. 7: heads x FFNs pruned, mean over 2 tasks, 1-shot" in md
    assert (tmp_path / "out" / "figures.json").is_file()


def test_random_band_beside_each_curve_and_heatmaps_with_colour_bars(tmp_path, monkeypatch):
    """pruning.compare=[random]: each curve panel shades the random curves' min-max and draws their mean;
    the importance heatmaps have a colour bar and integer head/layer ticks."""
    sh = make_shard(tmp_path, "copa", 1, 0, [0.6, 0.6, 0.5, 0.4], [0.6] * 4, IMP[("copa", 1, 0)])
    c = sh.curves()
    rand = {"heads_random0": [0.6, 0.5, 0.4, 0.3], "heads_random1": [0.6, 0.4, 0.4, 0.2]}
    c["heads_by"] = {k: [{"level": p, "value": v} for p, v in zip(LEVELS, vs)] for k, vs in rand.items()}
    write_json(sh.file("curves.json"), c)
    data = paper.fig56_curves(collect(tmp_path, MODEL), "heads")
    band = data["cells"][0]["random"]
    assert [b["mean"] for b in band] == pytest.approx([0.6, 0.45, 0.4, 0.25])
    assert [(b["min"], b["max"]) for b in band] == [(0.6, 0.6), (0.4, 0.5), (0.4, 0.4), (0.2, 0.3)]
    assert paper.fig56_curves(collect(tmp_path, MODEL), "ffn")["cells"][0]["random"] == []  # none for FFNs here
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    plots.fig56_curves(data, tmp_path / "x.png")
    ax = next(a for a in figs[0].axes if a.get_title() == "copa")
    assert "random, 1-shot (n=2)" in [line.get_label() for line in ax.get_lines()]
    assert len(ax.collections) >= 2  # the doc interval and the random band
    plots.fig3_importance(paper.fig3_importance(collect(tmp_path, MODEL)), tmp_path / "y.png")
    panel = next(a for a in figs[1].axes if a.get_title().startswith("copa"))
    assert any(a.get_ylabel() == "importance / max" for a in figs[1].axes)  # its colour bar
    figs[1].canvas.draw()
    assert all(float(t).is_integer() for t in panel.get_xticks()) and all(
        float(t).is_integer() for t in panel.get_yticks())
