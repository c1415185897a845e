"""A sweep over models (sweep.models): entries, the GPUs the planner gives each model, the sweep's
manifest, and the cross-model reducer (icl_scale.scale) on a synthetic two-model store whose per-doc
samples are written here, so every prunable fraction and depth is known by construction."""

import json
import math

import numpy as np
import pytest
import torch

from icl_scale import paired, scale
from icl_scale.reduce import run_reduce_scale
from icl_scale.resources import job_resources
from icl_scale.settings import ConfigError
from icl_scale.slurm_env import NodeType
from icl_scale.store import Shard, write_json, write_jsonl, write_tensors
from icl_scale.sweep_models import model_cfgs, model_sections, presets, sweep_dir

from conftest import compose, get_model
from wandb_offline import find_offline_runs, read_offline_run

OPT = [f"opt-{s}" for s in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")]


# --- entries ------------------------------------------------------------------------------------------

def test_entries_are_presets_or_presets_with_settings():
    cfg = compose("sweep.models=[tiny-opt,{preset: hf, id: /ckpt/mine},{preset: tiny-llama, name: tiny-b, "
                  "config: {num_hidden_layers: 3}}]", "sweep.model_settings={max_length: 128}")
    models = model_sections(cfg)
    assert [m["name"] for m in models] == ["tiny-opt", "mine", "tiny-b"]  # hf: the id's last part
    assert [m["max_length"] for m in models] == [128, 128, 128]  # sweep.model_settings over every preset
    assert models[1]["source"] == "hf" and models[1]["id"] == "/ckpt/mine"
    assert models[2]["family"] == "llama" and models[2]["config"] == {"num_hidden_layers": 3}
    assert models[0]["deepspeed"] == {"enabled": False, "offload_param": "none", "max_live_parameters": "auto",
                                      "prefetch_bucket_size": "auto", "persistence_threshold": "auto"}  # the schema's
    with pytest.raises(ConfigError, match=r"sweep.models\[0\] \(tiny-opt\): nope is not a model setting"):
        model_sections(compose("sweep.models=[tiny-opt]", "sweep.model_settings={nope: 1}"))
    # Without sweep.models the sweep is the one model=, as before.
    assert [c["model"]["name"] for c in model_cfgs(compose("model=tiny-opt"))] == ["tiny-opt"]


@pytest.mark.parametrize("models, message", [
    ("[opt-9b]", "sweep.models[0]: unknown model preset 'opt-9b'; the presets (conf/model/) are: hf, local, "),
    ("[tiny-opt,{preset: hf}]", "sweep.models[1]: preset hf needs id, e.g. {preset: hf, id: org/name}"),
    ("[{preset: tiny-opt, layers: 3}]", "sweep.models[0] (tiny-opt): layers is not a model setting"),
    ("[{id: org/x}]", "sweep.models[0]={'id': 'org/x'} must be a model preset name (e.g. opt-1.3b) or a mapping"),
    ("[tiny-opt,tiny-opt]", "sweep.models lists tiny-opt more than once"),
    ("[{preset: hf, id: a/x},{preset: hf, id: b/x}]", "give one entry its own name, e.g. {preset: ..., name: x-b}"),
])
def test_bad_entries_are_one_line_naming_the_fix(models, message):
    with pytest.raises(ConfigError) as e:
        model_sections(compose(f"sweep.models={models}"))
    assert message in str(e.value) and "\n" not in str(e.value)
    if "unknown model preset" in message:
        assert all(p in str(e.value) for p in presets())


# --- GPUs per model from the planner --------------------------------------------------------------------

def gpus(*extra):
    cfg = compose(f"sweep.models=[{','.join(OPT)}]", "sweep.model_settings={dtype: float16}", "eval.batch_size=4",
                  "importance.batch_size=1", "launcher.gpus_per_node=auto", *extra)
    return {c["model"]["name"]: (c["launcher"]["gpus_per_node"], c["model"]["deepspeed"]["enabled"])
            for c in model_cfgs(cfg)}


def test_each_model_gets_the_fewest_gpus_the_planner_fits_it_on():
    on_60 = gpus("launcher.gpu_mem_gb=60")
    assert on_60["opt-125m"] == (1, False) and on_60["opt-1.3b"] == (1, False)  # one GPU, no ZeRO
    assert on_60["opt-66b"] == (8, True)  # 132 GB of float16 weights: 8 GPUs with ZeRO-3
    assert on_60["opt-30b"] == (2, True)
    on_80 = gpus("launcher.gpu_mem_gb=80")
    assert on_80["opt-30b"] == (1, False) and on_80["opt-66b"] == (4, True)
    with pytest.raises(ConfigError, match=r"opt-66b does not fit 4 GPUs of 60 GB .* raise launcher.max_gpus"):
        gpus("launcher.gpu_mem_gb=60", "launcher.max_gpus=4")
    with pytest.raises(ConfigError, match="launcher.gpus_per_node=auto needs launcher.gpu_mem_gb"):
        gpus()
    # A number is kept as it is, for every model.
    assert set(gpus("launcher.gpus_per_node=2").values()) == {(2, False)}


def test_memory_and_ranks_per_model_follow_the_planned_gpus():
    cfg = compose("sweep.models=[opt-125m,opt-66b]", "sweep.model_settings={dtype: float16}", "eval.batch_size=4",
                  "importance.batch_size=1", "launcher.gpus_per_node=auto", "launcher.gpu_mem_gb=60",
                  "launcher.mem_gb=auto", "launcher.cpus_per_task=auto")
    node = [NodeType("gpu", cpus=64, mem_mb=1_024_000, gpus=8, count=1)]
    small, big = (job_resources(c, node) for c in model_cfgs(cfg))
    assert (small["gpus"], small["tasks"], small["cpus_per_task"]) == (1, 1, 64)
    assert (big["gpus"], big["tasks"], big["cpus_per_task"]) == (8, 8, 8)
    assert small["mem_gb"] < 10 < big["mem_gb"] < 8 * 40  # 66b: partitioned loading, about 1/8 per rank


def test_an_hf_folder_entry_gets_its_geometry_and_size_from_config_json(tmp_path):
    """{preset: hf, id: <folder>}: the planner reads config.json for the GPUs and the manifest's count,
    which equals the loaded model's (what the shard's manifest records)."""
    from icl_scale.models.loading import n_parameters
    from icl_scale.sweep_models import manifest_entry

    lm = get_model("tiny-qwen3")
    lm.model.save_pretrained(tmp_path / "qwen3-small")
    cfg = compose(f"sweep.models=[tiny-opt,{{preset: hf, id: {tmp_path / 'qwen3-small'}}}]",
                  "launcher.gpus_per_node=auto", "launcher.gpu_mem_gb=1")
    opt, qwen = model_cfgs(cfg)
    assert qwen["model"]["name"] == "qwen3-small" and qwen["launcher"]["gpus_per_node"] == 1
    assert manifest_entry(qwen, [], {})["parameters"] == n_parameters(lm.model)
    assert manifest_entry(opt, [], {})["parameters"] == n_parameters(get_model("tiny-opt").model)


def test_experiment_scale_sweeps_opt_125m_to_66b_from_the_hub():
    cfg = compose("experiment=scale")
    cfgs = model_cfgs(cfg)
    assert [c["model"]["name"] for c in cfgs] == OPT
    assert [c["model"]["id"] for c in cfgs] == [f"facebook/{n}" for n in OPT]
    assert {c["model"]["dtype"] for c in cfgs} == {"float16"}
    assert (cfgs[0]["launcher"]["gpus_per_node"], cfgs[-1]["launcher"]["gpus_per_node"]) == (1, 4)
    assert cfgs[-1]["model"]["deepspeed"]["enabled"] and not cfgs[0]["model"]["deepspeed"]["enabled"]
    assert sweep_dir(cfg).parts[-2:] == ("_sweeps", "scale-opt")
    # One shard by hand (model=opt-13b) has the model settings the sweep gives that model.
    by_hand = compose("experiment=scale", "model=opt-13b")["model"]
    assert by_hand == next(c["model"] for c in cfgs if c["model"]["name"] == "opt-13b")


# --- the cross-model reducer on a synthetic store ----------------------------------------------------------

LEVELS = [0.0, 10.0, 20.0, 30.0]
N = 400


def synthetic_shard(root, model, imp, params, flips, task="copa", shot=1):
    """A complete shard whose unpruned run gets the first 60% of N docs right; at each level of curve
    `kind` the first flips[(kind, level)] of those docs become wrong."""
    sh = Shard(root, model, task, shot, 0)
    layers = len(imp)
    write_tensors(sh.file("importance.safetensors"), {"heads": torch.tensor(imp, dtype=torch.float32),
                                                      "ffn": torch.ones(layers), "ffn_knockout": torch.zeros(layers)})
    curves = {"model": model, "task": task, "shot": shot, "seed": 0, "metric": "acc", "n_eval": N,
              "n_importance": 4, "knockout_baseline": 0.6, "combined": [], "heads_by": {}}
    for kind in ("heads", "ffn"):
        curves[kind] = []
        for p in LEVELS:
            correct = [i < int(0.6 * N) and i >= flips.get((kind, p), 0) for i in range(N)]
            write_jsonl(sh.file(f"samples/{paired.sample_key(kind, p)}.jsonl"),
                        [{"doc": i, "pred": 0, "gold": 0 if c else 1, "correct": c} for i, c in enumerate(correct)])
            v = float(np.mean(correct))
            curves[kind].append({"level": p, "value": v, "metrics": {"acc": {"value": v, "ci95": [v - .05, v + .05],
                                                                             "n": N}}})
    write_json(sh.file("curves.json"), curves)
    write_json(sh.file("manifest.json"), {"status": "complete", "config_hash": model, "parameters": params,
                                          "config": {"model": {"name": model}, "task": task, "shot": shot,
                                                     "seed": 0, "pruning": {"count": "floor"}}})
    return sh


SMALL_IMP = [[9, 1, 1], [1, 1, 1]]  # 6 heads: the top one (10%, rounded up) in layer 0 of 2
BIG_IMP = [[1] * 5, [1] * 5, [1] * 5, [1, 1, 1, 9, 8]]  # 20 heads: the top two in layer 3 of 4


@pytest.fixture
def two_models(tmp_path):
    # small: 40 of 400 docs lost at 10% of heads (10 points): nothing prunable. 2 lost at 10% of FFNs.
    synthetic_shard(tmp_path, "small", SMALL_IMP, 1_000, {("heads", 10.0): 40, ("heads", 20.0): 60,
                                                          ("heads", 30.0): 80, ("ffn", 10.0): 2, ("ffn", 20.0): 60,
                                                          ("ffn", 30.0): 60})
    # big: none lost at 10%, 2 at 20% (half a point), 40 at 30%: 20% prunable within 1 point.
    synthetic_shard(tmp_path, "big", BIG_IMP, 100_000, {("heads", 20.0): 2, ("heads", 30.0): 40,
                                                        ("ffn", 30.0): 40})
    return tmp_path


def _row(rows, model, kind=None):
    return next(r for r in rows if r["model"] == model and (kind is None or r["kind"] == kind))


def test_prunable_fraction_and_its_paired_interval(two_models):
    res = scale.reduce_scale(two_models, "s", [{"name": "small"}, {"name": "big"}], None, two_models / "out")
    assert [m["model"] for m in res["models"]] == ["small", "big"]  # by size
    assert [m["parameters"] for m in res["models"]] == [1_000, 100_000]  # from the shards' manifests
    small, big = _row(res["prunable"], "small", "heads"), _row(res["prunable"], "big", "heads")
    assert (small["fraction"], small["ci_lo"], small["ci_hi"]) == (0.0, 0.0, 0.0) and small["paired"]
    assert big["fraction"] == 0.2 and big["ci_hi"] == 0.2 and big["n_docs"] == N
    # The lower end: a drop beyond 1 point is ruled out at 10% (no doc changed) and at 20% only if the
    # paired interval of 2 lost docs in 400 stays above -1 point.
    at20 = paired.paired_interval([np.array([-1.0] * 2 + [0.0] * (N - 2))])
    assert big["ci_lo"] == (0.2 if at20["ci95"][0] >= -0.01 else 0.1)
    # FFNs of the small model: 2 docs lost at 10% (half a point), 60 at 20%.
    assert _row(res["prunable"], "small", "ffn")["fraction"] == 0.1
    assert _row(res["prunable"], "big", "ffn")["fraction"] == 0.2


def test_depth_of_the_top_heads(two_models):
    res = scale.reduce_scale(two_models, "s", [{"name": "small"}, {"name": "big"}], None, two_models / "out")
    small, big = _row(res["depth"], "small"), _row(res["depth"], "big")
    assert (small["top_heads"], small["n_layers"], small["mean_depth"]) == (1, 2, 0.25)
    assert math.isnan(small["ci_lo"])  # one head: no interval over heads
    assert (big["top_heads"], big["n_layers"], big["mean_depth"]) == (2, 4, 0.875)
    assert big["ci_lo"] == pytest.approx(0.875) and big["ci_hi"] == pytest.approx(0.875)
    spread = scale.important_depth(torch.arange(12.0).reshape(4, 3), top=1.0)  # every head: evenly spread
    assert spread["mean_depth"] == pytest.approx(0.5) and spread["ci_lo"] < 0.5 < spread["ci_hi"]


def test_the_cross_model_summary_report_and_wandb(two_models):
    cfg = compose(f"store.root={two_models}", "sweep.name=s", "sweep.models=[tiny-opt,tiny-llama]",
                  "wandb.mode=offline", f"wandb.dir={two_models}")
    models = [{"name": "small"}, {"name": "big"}, {"name": "absent"}]
    res = run_reduce_scale(cfg, models, [("copa", 1, 0)])
    out = two_models / "_sweeps" / "s" / "summary"
    assert res["summary_dir"] == str(out)
    assert set(res["figures"]) == {"scale_prunable.png", "scale_depth.png"}
    assert all((out / f).stat().st_size > 1000 for f in res["figures"])
    assert res["problems"] and res["problems"][0]["shard"].startswith("absent/copa/1shot")
    report = (out / "report.md").read_text()
    assert "| copa | 1 | big | 100,000 | 0.20 [" in report and "![prunable](scale_prunable.png)" in report
    assert "- not aggregated: absent/copa/1shot" in report
    saved = json.loads((out / "scale.json").read_text())
    assert {r["model"] for r in saved["depth"]} == {"small", "big"} and saved["tolerance"] == paired.TOL
    assert (out / "scale_prunable.csv").read_text().startswith("model,parameters,task,shot")
    runs = {read_offline_run(d)["name"]: read_offline_run(d) for d in find_offline_runs(two_models)}
    run = runs["reduce-scale-s"]
    assert run["job_type"] == "reduce_scale" and run["group"] == "s"
    assert {"scale_models", "scale_prunable", "scale_depth", "problems"} <= set(run["tables"])


def test_one_model_of_known_size_draws_nothing_and_says_why(two_models):
    res = scale.reduce_scale(two_models, "s", [{"name": "big"}], None, two_models / "one")
    assert res["figures"] == {} and "two or more models of known size (1 here)" in res["not_drawn"][0]
    assert "not drawn: the cross-model figures need" in (two_models / "one" / "report.md").read_text()


def test_reduce_by_hand_redraws_every_model_then_the_cross_model_figures(two_models):
    """`python jobs/reduce.py` with sweep.models: each model's own summary, then the cross-model one."""
    from icl_scale.reduce import reduce_sweep

    cfg = compose(f"store.root={two_models}", "sweep.name=s", "wandb.mode=disabled",
                  "sweep.models=[{preset: tiny-opt, name: small},{preset: tiny-llama, name: big}]")
    *per_model, across = reduce_sweep(cfg, [("copa", 1, 0)])
    assert [r["model"] for r in per_model] == ["small", "big"] and all(r["n_complete"] == 1 for r in per_model)
    assert (two_models / "small" / "summary" / "report.md").exists()
    assert across["summary_dir"] == str(two_models / "_sweeps" / "s" / "summary") and len(across["figures"]) == 2
    # Without sweep.models: the one model's reduction, as before.
    only = reduce_sweep(compose(f"store.root={two_models}", "model=tiny-opt", "model.name=big", "wandb.mode=disabled"))
    assert [r["model"] for r in only] == ["big"]
