#!/usr/bin/env python
"""ZeRO-3 section: one small shard under DeepSpeed ZeRO-3 on CPU ranks (torchrun, gloo, 1 thread per
rank), on 1 and 2 ranks, for this checkout and for earlier commits of the project (`--base`, default
6fe03b8, the commit before the pass schedule; `--main`, default 6bb1021, the commit before the gathers
were cut, 2 ranks only): wall time and model parameters gathered per stage, the peak share of the
model whole at once, and whether the stores equal this checkout's 1-rank one.

    python bench/zero3.py                       # writes bench/results/zero3.json and .md
    python bench/zero3.py --base 6fe03b8 --main 6bb1021 --collective-timeout-min 3
    python bench/zero3.py --scale 4 --main '' --repeat 2 --out bench/results/zero3_x4   # 4x the docs
    python bench/zero3.py --scale 8 --base '' --main '' --repeat 2 --out bench/results/zero3_x8

The model is a random OPT whose decoder blocks hold ~92% of its parameters (12 blocks of d=512,
FFN 2048; the embedding projected to 64), so that a live-parameter budget of a quarter of the model
(`model.deepspeed.max_live_parameters`, this checkout's runs) is ~3 blocks, as at paper scale where
the model never fits one device whole. The earlier commits have no such setting: their ranks never
complete DeepSpeed's trace, so they keep one module whole at a time (measured, not set). This
checkout's runs also size importance batches to memory (`importance.batch_size=auto`, one of the
cuts; the earlier commits have no such setting and keep the shard's 2).

`--repeat N` runs each (code, ranks) N times and keeps the fastest whole job: on 2 cores shared with
other work, the least disturbed run is the best estimate of the code's own time.

Gathers are counted in DeepSpeed's parameter coordinator by this file's `--worker` wrapper (the same
rule as icl_scale.models.zero.GatherCount, so the earlier commits, which have no counter, are
measured the same way): the bytes of every partitioned parameter fetched whole, per rank, divided by
the model's bytes ("full-model gathers"); `peak_live_frac` is the most parameters whole at once
(gathered, as the coordinator counts them), as a share of the model, and `resident_frac` adds the
parameters that stay whole on every rank (persistent: this checkout's norms and biases). A run that
does not finish within the collective timeout is recorded as such.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a random OPT whose decoder blocks dominate: 41M parameters, 12 blocks of 7.7% each, the embedding 7.6%
CONFIG = dict(num_hidden_layers=12, hidden_size=512, ffn_dim=2048, num_attention_heads=8, word_embed_proj_dim=64)


def shard(scale: int = 1) -> list[str]:
    """The bench shard; `scale` multiplies its eval docs, importance examples and knock-out docs (a
    bigger shard: the same gathers, more compute per gather)."""
    return ["task=copa", "shot=1", f"eval.limit={8 * scale}", f"importance.n_examples={4 * scale}",
            "importance.batch_size=2", f"knockout.limit={2 * scale}", "pruning.levels=[0,50]",
            "pruning.combined_levels=[0,50]", "progress=false", "wandb.mode=disabled", "model=tiny-opt",
            *[f"+model.config.{k}={v}" for k, v in CONFIG.items()]]


SHARD = shard()
STAGES = ("importance", "knockout", "curves")


def worker() -> None:
    """torchrun entry: jobs/score.py of the tree on PYTHONPATH, with the gathers counted per stage;
    rank 0 writes {stage: cumulative counts} to $ZERO3_BENCH_OUT after every stage."""
    import runpy

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C

    count = {"bytes": 0, "params": 0, "peak_live": 0}
    name = "_PartitionedParameterCoordinator__all_gather_params_"
    real = getattr(C, name)

    def counted(self, params, forward, quantize=False):
        todo = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        count["params"] += len(todo)
        count["bytes"] += sum(int(p.ds_numel) * p.ds_tensor.element_size() for p in todo)
        out = real(self, params, forward, quantize)
        count["peak_live"] = max(count["peak_live"], int(self._PartitionedParameterCoordinator__n_available_params))
        return out

    setattr(C, name, counted)
    stages: dict[str, dict] = {}

    def record(stage):
        stages[stage] = dict(count)
        if os.environ.get("RANK", "0") == "0":
            Path(os.environ["ZERO3_BENCH_OUT"]).write_text(json.dumps(stages))

    import icl_scale.shard as shard_module

    def timed(name, method):  # this rank's CPU seconds in the stage (what the load of other jobs inflates least)
        def run(self, *a, **k):
            t0 = time.process_time()
            try:
                return method(self, *a, **k)
            finally:
                count[f"cpu_{name}"] = round(time.process_time() - t0, 2)
        return run

    for stage in STAGES:
        setattr(shard_module.ShardRun, stage, timed(stage, getattr(shard_module.ShardRun, stage)))
    try:  # the stage callbacks of the run skeleton (icl_scale/runs.py)
        from icl_scale import runs

        runs.STAGE_CALLBACKS.append(lambda run, stage: record(stage))
    except ImportError:  # earlier commits: shard.after_stage
        import icl_scale.shard as shard

        real_after = shard.after_stage

        def after(stage, resumed):
            record(stage)
            return real_after(stage, resumed)

        shard.after_stage = after
    score = Path(os.environ["PYTHONPATH"].split(os.pathsep)[0]) / "jobs" / "score.py"
    sys.argv = [str(score), *sys.argv[2:]]
    runpy.run_path(str(score), run_name="__main__")


def run_one(tree: Path, ranks: int, store: Path, timeout_min: float, model_bytes: int, extra=(), log=print,
            args=SHARD) -> dict:
    """One shard on `ranks` ZeRO-3 ranks with the code in `tree` (`extra` settings): wall, per-stage
    times and gathers."""
    out = store / "counts.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(tree),
           "ZERO3_BENCH_OUT": str(out), "ICL_SCALE_COLLECTIVE_TIMEOUT_MIN": str(timeout_min)}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(ranks), __file__, "--worker", *args,
           f"store.root={store}", "model.deepspeed.enabled=true", *extra]
    t0, cpu0 = time.time(), _children_cpu()
    p = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=timeout_min * 60 + 900)
    wall, cpu = round(time.time() - t0, 1), round(_children_cpu() - cpu0, 1)
    shard = store / "tiny-opt" / "copa" / "1shot" / "seed0"
    manifest = json.loads((shard / "manifest.json").read_text()) if (shard / "manifest.json").exists() else {}
    counts = json.loads(out.read_text()) if out.exists() else {}
    res = {"ranks": ranks, "returncode": p.returncode, "wall_s": wall, "cpu_s_all_ranks": cpu,
           "status": manifest.get("status"),
           "error": manifest.get("error"), "timings": manifest.get("timings", {}), "stages": {}}
    if p.returncode != 0:
        res["log_tail"] = [x for x in (p.stdout + p.stderr).splitlines() if "rror" in x][-5:]
    prev = {"bytes": 0, "params": 0}
    for st in STAGES:
        if st in counts:
            c = counts[st]
            res["stages"][st] = {"gathers": round((c["bytes"] - prev["bytes"]) / model_bytes, 2),
                                 "gathered_gb": round((c["bytes"] - prev["bytes"]) / 2**30, 4),
                                 "params": c["params"] - prev["params"], "seconds": res["timings"].get(st),
                                 "rank0_cpu_s": c.get(f"cpu_{st}")}
            prev = {"bytes": c["bytes"], "params": c["params"]}
    res["gathers"] = round(prev["bytes"] / model_bytes, 2)
    res["gathered_gb"] = round(prev["bytes"] / 2**30, 4)
    res["peak_live_frac"] = round(max((c["peak_live"] for c in counts.values()), default=0) * 4 / model_bytes, 4)
    res["rank0_cpu_s"] = round(sum(s["rank0_cpu_s"] or 0 for s in res["stages"].values()), 2)
    log(f"[zero3] {tree.name} {ranks} rank(s): {res['status']} in {wall} s, {res['gathers']} full-model gathers")
    return res


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children: all ranks of a run, with the
    launcher and the start-up (a measure the other jobs' load on the cores does not inflate much)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def model_numbers() -> tuple[int, int]:
    """The bench model's float32 bytes (each parameter once: tied weights are one), and those of the
    parameters this checkout keeps whole on every rank (persistence threshold auto: the hidden size)."""
    import torch
    from transformers import AutoModelForCausalLM

    from icl_scale.models.loading import load_tokenizer, preset, random_config

    cfg = random_config("opt", len(load_tokenizer(preset("tiny-opt"))), **CONFIG)
    params = list(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).parameters())
    return sum(p.numel() * 4 for p in params), sum(p.numel() * 4 for p in params if p.numel() <= cfg.hidden_size)


def compare(a: Path, b: Path) -> dict:
    """Same results? Curves and predictions (bench/compare_stores.py) and importance's max relative gap."""
    from bench.compare_stores import same_predictions
    from icl_scale.store import read_tensors

    sa, sb = (p / "tiny-opt" / "copa" / "1shot" / "seed0" for p in (a, b))
    if not (sa / "importance.safetensors").exists() or not (sb / "importance.safetensors").exists():
        return {"compared": False}
    out = same_predictions(a, b)
    ia, ib = read_tensors(sa / "importance.safetensors"), read_tensors(sb / "importance.safetensors")
    out["importance_max_rel"] = max(float((ia[k] - ib[k]).abs().max()) / float(ia[k].abs().max())
                                    for k in ("heads", "ffn"))
    return {"compared": True, **out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="6fe03b8", help="the earlier commit to compare with; '' to skip")
    ap.add_argument("--main", default="6bb1021", help="a second earlier commit (2 ranks only); '' to skip")
    ap.add_argument("--collective-timeout-min", type=float, default=3.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "zero3"))
    ap.add_argument("--scale", type=int, default=1, help="eval docs, importance examples and knock-out docs x this")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (code, ranks); the fastest is kept")
    a = ap.parse_args(argv)
    args = shard(a.scale)
    from bench.common import machine_info, now
    from icl_scale.store import write_bytes

    mb, persistent = model_numbers()
    budget = mb // 4 // 4  # a quarter of the model's parameters
    res = {"date": now(), "machine": machine_info(), "shard": args, "scale": a.scale, "repeat": a.repeat,
           "base": a.base, "main": a.main,
           "model_mb": round(mb / 2**20, 1), "max_live_parameters": budget, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": Path(tmp) / "base", "main": Path(tmp) / "main", "this": REPO}
        for label, commit in (("base", a.base), ("main", a.main)):
            if commit:
                trees[label].mkdir()
                archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True,
                                         check=True).stdout
                subprocess.run(["tar", "-x", "-C", str(trees[label])], input=archive, check=True)
        todo = ([("base", 1), ("base", 2)] if a.base else []) + ([("main", 2)] if a.main else []) \
            + [("this", 1), ("this", 2)]
        for label, ranks in todo:
            extra = [f"model.deepspeed.max_live_parameters={budget}", "importance.batch_size=auto"] \
                if label == "this" else []
            runs = []
            for k in range(max(1, a.repeat)):
                store = Path(tmp) / f"{label}{ranks}" / f"run{k}"
                r = run_one(trees[label], ranks, store, a.collective_timeout_min, mb, extra, args=args)
                runs.append((r, store))
            r, store = min(runs, key=lambda x: (x[0]["status"] != "complete", x[0]["wall_s"]))
            r["walls_s"] = [x["wall_s"] for x, _ in runs]
            every = (Path(tmp) / f"{label}{ranks}").rename(Path(tmp) / f"{label}{ranks}_all")
            (every / store.name).rename(Path(tmp) / f"{label}{ranks}")  # the kept run's store, compared below
            r["resident_frac"] = round(r["peak_live_frac"] + (persistent / mb if label == "this" else 0), 4)
            res["runs"][f"{label}_{ranks}"] = r
        res["same_results"] = {k: compare(Path(tmp) / "this1", Path(tmp) / k)
                               for k in ("this2", "base1", "base2", "main2") if (Path(tmp) / k).exists()}
    res["ratios"] = _ratios(res["runs"])
    out = Path(a.out)
    write_bytes(out.with_suffix(".json"), (json.dumps(res, indent=2) + "\n").encode())
    write_bytes(out.with_suffix(".md"), markdown(res).encode())
    print(markdown(res))
    return 0


def _ratios(runs: dict) -> dict:
    r = {}
    t1, t2 = runs.get("this_1", {}), runs.get("this_2", {})
    for label in ("base", "main"):
        b = runs.get(f"{label}_2", {})
        if b.get("gathers") and t2.get("gathers") and b.get("status") == "complete":
            r[f"gathers_{label}2_over_this2"] = round(b["gathers"] / t2["gathers"], 2)
    stages = sum(v.get("seconds") or 0 for v in t2.get("stages", {}).values())
    stages1 = sum(v.get("seconds") or 0 for v in t1.get("stages", {}).values())
    if stages and stages1:
        r["stages_wall_this2_over_this1"] = round(stages / stages1, 2)
    if t1.get("rank0_cpu_s") and t2.get("rank0_cpu_s"):
        r["stages_rank0_cpu_this2_over_this1"] = round(t2["rank0_cpu_s"] / t1["rank0_cpu_s"], 2)
    if t1.get("timings", {}).get("total") and t2.get("timings", {}).get("total"):
        r["total_wall_this2_over_this1"] = round(t2["timings"]["total"] / t1["timings"]["total"], 2)
    b1, b2 = runs.get("base_1", {}), runs.get("base_2", {})
    if b1.get("timings", {}).get("total") and b2.get("timings", {}).get("total"):
        r["total_wall_base2_over_base1"] = round(b2["timings"]["total"] / b1["timings"]["total"], 2)
    return r


def markdown(res: dict) -> str:
    lines = [f"# ZeRO-3 section ({res['date']})", "", f"Shard: `{' '.join(res['shard'])}`; base commit {res['base']}, "
             f"main {res['main']}.", "",
             "| code | ranks | status | wall s | stage | seconds | rank 0 CPU s | full-model gathers | GiB gathered |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in res["runs"].items():
        label = key.rsplit("_", 1)[0]
        for st in STAGES:
            s = r["stages"].get(st, {})
            lines.append(f"| {label} | {r['ranks']} | {r['status']} | {r['wall_s']} | {st} | {s.get('seconds', '-')} "
                         f"| {s.get('rank0_cpu_s', '-')} | {s.get('gathers', '-')} | {s.get('gathered_gb', '-')} |")
        lines.append(f"| {label} | {r['ranks']} | {r['status']} | {r['wall_s']} | **stages** "
                     f"| {round(sum(s.get('seconds') or 0 for s in r['stages'].values()), 2)} "
                     f"| {r.get('rank0_cpu_s', '-')} | {r.get('gathers', '-')} | {r.get('gathered_gb', '-')} |")
        lines.append(f"| {label} | {r['ranks']} | {r['status']} | {r['wall_s']} | whole job (total; CPU all ranks) "
                     f"| {r['timings'].get('total', '-')} | {r.get('cpu_s_all_ranks', '-')} | | |")
    lines += ["", f"Live-parameter budget of this checkout: {res['max_live_parameters']} parameters "
              f"(model {res['model_mb']} MiB float32).",
              "", "Peak parameters whole at once, gathered (share of the model): "
              + ", ".join(f"{k} {r['peak_live_frac']}" for k, r in res["runs"].items()),
              "", "Peak resident, gathered + persistent (share of the model): "
              + ", ".join(f"{k} {r['resident_frac']}" for k, r in res["runs"].items()),
              "", f"Load average at the start: {res['machine'].get('loadavg_start')} (2 CPU cores shared "
              "with other jobs: wall times are disturbed by that load).",
              "", "Wall seconds of every run (the fastest is kept): "
              + ", ".join(f"{k} {r.get('walls_s', [r['wall_s']])}" for k, r in res["runs"].items()),
              "", f"Ratios: {json.dumps(res['ratios'])}", "", "Same results as this checkout on 1 rank:"]
    for k, v in res["same_results"].items():
        lines.append(f"- {k}: " + (json.dumps({x: v[x] for x in ('curves_equal', 'knockout_equal', 'same_pred_frac',
                                                                  'max_abs_dlogprob', 'importance_max_rel')})
                                   if v.get("compared") else "not compared (the run did not finish)"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker()
    else:
        sys.path.insert(0, str(REPO))
        sys.exit(main())
