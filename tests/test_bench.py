"""Smoke test of the benchmarks (bench/run.py and its sections) on a tiny model with tiny sizes: result
structure, the agreement checks, the output files and the data-folder error. No timing assertions (CPU
timings are noise here)."""

import json
import sys

import pytest

from icl_scale.models import load_model
from icl_scale.models.loading import preset

from conftest import REPO, data_dir, get_model

if str(REPO) not in sys.path:  # bench/ is not part of the installed package: import it from the checkout
    sys.path.insert(0, str(REPO))

from bench import importance, induction, masks, pruned, scoring
from bench import run as bench_run


@pytest.fixture(scope="module")
def tiny():
    return get_model("tiny-llama")


@pytest.mark.slow
def test_scoring_structure(tiny, mirror):
    res = scoring.bench_scoring(tiny, ["piqa", "boolq"], [0, 1], {0: 3, 1: 2}, batch_size=2, repeats=1, data=mirror,
                                log=lambda *a: None)
    assert [(r["task"], r["shot"]) for r in res["rows"]] == [("piqa", 0), ("boolq", 0), ("piqa", 1), ("boolq", 1)]
    have_lmeval = scoring.lmeval_available() is None
    methods = {"naive", "ours"} | ({"lmeval"} if have_lmeval else set())
    for r in res["rows"]:
        assert set(r["time"]) == methods and set(r["docs_per_s"]) == methods
        assert all(v > 0 for v in r["docs_per_s"].values())
        assert r["time"]["ours"]["best_s"] <= r["time"]["ours"]["worst_s"]
        # the prefix-cached scorer must pick the same choice as the naive reference everywhere
        assert r["naive_vs_ours"]["pred_agreement"] == 1.0
        assert r["naive_vs_ours"]["max_abs_dlogprob"] < 1e-3
        assert r["model_tokens"]["ours"] <= r["model_tokens"]["naive"]
        # measured from the forward passes: every needed position, plus padding
        assert r["padded_tokens"]["ours"] >= r["model_tokens"]["ours"] and r["padded_tokens"]["ours_passes"] >= 1
        assert "ours_vs_naive" in r["speedup"]
        if have_lmeval:
            c = r["lmeval_vs_ours"]
            assert 0 <= c["pred_agreement"] <= 1 and 0 <= c["same_tokens_frac"] <= 1
            if c["max_abs_dlogprob_same_tokens"] is not None:  # identical tokens: identical numbers
                assert c["max_abs_dlogprob_same_tokens"] < 1e-3
        else:
            assert "lmeval" in res["skipped"]
    assert set(res["summary"]) == {"0-shot", "1-shot"}
    assert res["naive_vs_ours_all_agree"] is True
    assert res["target_5shot"] is None  # no 5-shot rows here


@pytest.mark.slow
def test_importance_structure_and_agreement(tiny, mirror):
    before = [p.requires_grad for p in tiny.model.parameters()]
    res = importance.bench_importance(tiny, ["copa"], shot=1, n_examples=3, batch_size=2, repeats=1, data=mirror,
                                      log=lambda *a: None)
    # the original scheme turns parameter gradients on; it must leave the shared model as it was
    assert [p.requires_grad for p in tiny.model.parameters()] == before
    assert all(p.grad is None for p in tiny.model.parameters())
    (row,) = res["rows"]
    assert set(row["time"]) == {"forward", "forward_hf", "ours", "original"}
    assert row["ratio_importance_over_forward"] > 0 and row["speedup_vs_original"] > 0
    # same loss, same inputs: the two schemes give the same importance numbers
    assert row["agreement"]["sum"]["max_abs_diff_over_max"] < 1e-4
    assert row["agreement"]["per_token"]["max_abs_diff_over_max"] < 1e-4
    assert row["agreement"]["head_mask_grad_vs_loop_max_rel"] < 1e-3
    assert set(res["targets"]) == {"importance_over_forward<=2.5", "speedup_vs_original>=1.3", "agree_sum_mode<=1e-4"}


def test_induction_section(tiny):
    """The original loops (icl_scale/induction/reference.py) against ours, on the tiny model's first seed."""
    res = induction.section(tiny, quick=True)
    assert "error" not in res, res.get("error")
    assert res["function"] == "bench.induction.run" and res["kwargs"]["loop_seeds"] == (0,)
    assert res["loops"]["seeds"] == [0] and res["forward"]["seeds"] == [0]
    assert res["loops"]["max_abs_diff"]["inputs"] < 1e-4  # same captured inputs: same numbers
    assert res["forward"]["ratio"] > 0 and "induction scores" in res["printed"]


def test_pruned_section(tiny, mirror):
    """Every level on the tiny model (the OPT-1.3B shape is left out): pruned and gated agree."""
    res = pruned.section(tiny, n_docs=3, batch_size=2, repeats=1, data=mirror, opt=False, log=lambda *a: None)
    (m,) = res["models"]
    assert [(r["kind"], r["level"]) for r in m["rows"]] == [tuple(s) for s in res["settings"]["levels"]]
    for r in m["rows"]:
        assert r["max_abs_dlogprob"] <= 1e-4 and r["same_predictions"] == 1.0
        assert r["speedup"] > 0 and r["build_s"] >= 0
        # FFNs never cost more (20% of 2 is none); heads under GQA may (unequal groups repeat KV heads)
        assert 0 < r["compute_fraction"] <= (1 if r["kind"] == "ffn" else 1.5)
    assert res["targets"]["agree<=1e-4"] and not res["targets"]["opt_heads70_forward>=1.25x"]
    assert res["targets"]["float64_agree<=1e-9"] and res["float64"]["same_predictions"] == 1.0
    assert "## Pruned vs gated scoring" in "\n".join(pruned.markdown(res))


def test_masks_section(tiny, mirror):
    """Several masks per pass agree with one pass set per mask on the tiny model; auto's choice is
    reported beside the forced one."""
    res = masks.section(tiny, settings=((2, 4, 2), (4, 2, 2)), repeats=1, data=mirror, log=lambda *a: None)
    assert [(r["docs"], r["batch_size"], r["masks_per_pass"], r["auto"]) for r in res["rows"]] == [(2, 4, 2, 2),
                                                                                                   (4, 2, 2, 1)]
    for r in res["rows"]:
        assert r["max_abs_dlogprob"] <= 1e-4 and r["same_predictions"] == 1.0 and r["speedup"] > 0
    assert res["targets"]["agree<=1e-4"] and res["targets"]["same_predictions"]
    assert "## Several masks per pass" in "\n".join(masks.markdown(res))


def test_write_results_and_cli(tiny, mirror, tmp_path, monkeypatch):
    out = tmp_path / "res"
    cfg = {"tasks": ("copa",), "shots": (0,), "limits": {0: 2}, "repeats": 1, "imp_tasks": ("copa",), "imp_shot": 0,
           "imp_examples": 2, "imp_batch_size": 2}
    res = bench_run.run(["scoring", "importance"], quick=True, model=tiny, out=out, cfg=cfg, data=mirror,
                        log=lambda *a: None)
    data = json.loads(out.with_suffix(".json").read_text())
    assert {"machine", "scoring", "importance", "model"} <= set(data)
    for k in ("cpu_count", "torch_threads", "torch", "transformers", "date"):
        assert k in data["machine"]
    md = out.with_suffix(".md").read_text()
    assert "## Scoring" in md and "## Importance pass" in md and "python bench/run.py" in md
    assert data["scoring"]["rows"][0]["docs"] == res["scoring"]["rows"][0]["docs"] == 2
    # --only keeps the other sections of an existing results file; the data folder may come from the env
    monkeypatch.setenv("ICL_SCALE_DATA_DIR", str(mirror))
    bench_run.run(["importance"], quick=True, model=tiny, out=out, cfg=cfg, log=lambda *a: None)
    assert "scoring" in json.loads(out.with_suffix(".json").read_text())
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(SystemExit):
        bench_run.main(["--only", "nonsense"])


def test_no_data_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("ICL_SCALE_DATA_DIR", raising=False)
    assert bench_run.main(["--only", "scoring", "--out", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:") and "--data-dir" in err and "ICL_SCALE_DATA_DIR" in err
    assert bench_run.main(["--only", "importance", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def four_layers(name: str):
    """The tiny preset with 4 layers (2 would leave nothing between the first and the last knock-out)."""
    spec = preset(name)
    spec["config"] = {**(spec["config"] or {}), "num_hidden_layers": 4}
    return load_model(spec)


# --- the knock-out section ----------------------------------------------------------------------------------

def test_knockout_section(tmp_path):
    """bench/run.py --only knockout on a tiny model: the section, its agreement checks, results.md."""
    from bench import knockout as bench_ko

    lm, out = four_layers("tiny-llama"), tmp_path / "res"
    cfg = {"ko_docs": 4, "ko_batch_size": 2, "repeats": 1}
    res = bench_run.run(["knockout"], quick=True, model=lm, out=out, cfg=cfg, data=data_dir(), log=lambda *a: None)
    sec = res["knockout"]
    assert sec["settings"]["docs"] == 4 and sec["settings"]["mode"] == "post_attention"
    assert sec["agreement"]["max_abs_dlogprob"] <= 1e-4 and sec["agreement"]["same_predictions"]
    assert sec["agreement"]["same_drops"] and all(sec["targets"][k] for k in ("agree<=1e-4", "same_drops"))
    assert len(sec["drops"]) == 4 and sec["block_passes"]["ratio"] == pytest.approx(20 / 10)
    assert set(sec["time"]) == set(bench_ko.TIMED) and sec["speedup"] > 0 and sec["cpu_speedup"] > 0
    assert "knockout" in json.loads(out.with_suffix(".json").read_text())
    assert "## FFN knock-out" in out.with_suffix(".md").read_text()
