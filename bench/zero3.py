#!/usr/bin/env python
"""ZeRO-3 section: one small shard under DeepSpeed ZeRO-3 on CPU ranks (torchrun, gloo, 1 thread each),
on 1 and 2 ranks, for this checkout and for an earlier commit of the project (`--base`, default
6fe03b8, the commit before the pass schedule): wall time and model parameters gathered per stage, and
whether the 2-rank store equals the 1-rank one.

    python bench/zero3.py                       # writes bench/results/zero3.json and .md
    python bench/zero3.py --base 6fe03b8 --collective-timeout-min 3

Gathers are counted in DeepSpeed's parameter coordinator by this file's `--worker` wrapper (the same
rule as icl_scale.models.zero.GatherCount, so the earlier commit, which has no counter, is measured
the same way): the bytes of every partitioned parameter fetched whole, per rank, divided by the
model's bytes ("full-model gathers"); `peak_live_frac` is the most parameters whole at once, as a
share of the model. A run that does not finish within the collective timeout is recorded as such
(the earlier commit's ranks can wait on each other until then).
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
SHARD = ["task=copa", "shot=1", "eval.limit=8", "importance.n_examples=4", "importance.batch_size=2",
         "knockout.limit=2", "pruning.levels=[0,50]", "pruning.combined_levels=[0,50]", "progress=false",
         "wandb.mode=disabled", "model=tiny-opt"]
# a random OPT bigger than the tests' (8 layers, d=256): ~19M parameters, 2/3 of them the embedding
CONFIG = dict(num_hidden_layers=8, hidden_size=256, ffn_dim=1024, num_attention_heads=8, word_embed_proj_dim=256)
SHARD += [f"+model.config.{k}={v}" for k, v in CONFIG.items()]
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


def run_one(tree: Path, ranks: int, store: Path, timeout_min: float, model_bytes: int, log=print) -> dict:
    """One shard on `ranks` ZeRO-3 ranks with the code in `tree`: wall, per-stage times and gathers."""
    out = store / "counts.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(tree),
           "ZERO3_BENCH_OUT": str(out), "ICL_SCALE_COLLECTIVE_TIMEOUT_MIN": str(timeout_min)}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(ranks), __file__, "--worker", *SHARD,
           f"store.root={store}", "model.deepspeed.enabled=true"]
    t0 = time.time()
    p = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=timeout_min * 60 + 900)
    wall = round(time.time() - t0, 1)
    shard = store / "tiny-opt" / "copa" / "1shot" / "seed0"
    manifest = json.loads((shard / "manifest.json").read_text()) if (shard / "manifest.json").exists() else {}
    counts = json.loads(out.read_text()) if out.exists() else {}
    res = {"ranks": ranks, "returncode": p.returncode, "wall_s": wall, "status": manifest.get("status"),
           "error": manifest.get("error"), "timings": manifest.get("timings", {}), "stages": {}}
    if p.returncode != 0:
        res["log_tail"] = [x for x in (p.stdout + p.stderr).splitlines() if "rror" in x][-5:]
    prev = {"bytes": 0, "params": 0}
    for st in STAGES:
        if st in counts:
            c = counts[st]
            res["stages"][st] = {"gathers": round((c["bytes"] - prev["bytes"]) / model_bytes, 2),
                                 "gathered_gb": round((c["bytes"] - prev["bytes"]) / 2**30, 4),
                                 "params": c["params"] - prev["params"], "seconds": res["timings"].get(st)}
            prev = c
    res["gathers"] = round(prev["bytes"] / model_bytes, 2)
    res["gathered_gb"] = round(prev["bytes"] / 2**30, 4)
    res["peak_live_frac"] = round(max((c["peak_live"] for c in counts.values()), default=0) * 4 / model_bytes, 4)
    code = "this" if tree == REPO else "base"
    log(f"[zero3] {code} {ranks} rank(s): {res['status']} in {wall} s, {res['gathers']} full-model gathers")
    return res


def model_bytes() -> int:
    """The bench model's float32 bytes (each parameter once: tied weights are one)."""
    import torch
    from transformers import AutoModelForCausalLM

    from icl_scale.models.loading import load_tokenizer, preset, random_config

    cfg = random_config("opt", len(load_tokenizer(preset("tiny-opt"))), **CONFIG)
    return sum(p.numel() * 4 for p in AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).parameters())


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
    ap.add_argument("--base", default="6fe03b8", help="the earlier commit to compare with")
    ap.add_argument("--collective-timeout-min", type=float, default=3.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "zero3"))
    a = ap.parse_args(argv)
    from bench.common import machine_info, now
    from icl_scale.store import write_bytes

    mb = model_bytes()
    res = {"date": now(), "machine": machine_info(), "shard": SHARD, "base": a.base, "model_mb": round(mb / 2**20, 1),
           "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", a.base], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        for label, tree in (("base", base), ("this", REPO)):
            for ranks in (1, 2):
                store = Path(tmp) / f"{label}{ranks}"
                res["runs"][f"{label}_{ranks}"] = run_one(tree, ranks, store, a.collective_timeout_min, mb)
        res["same_results"] = {k: compare(Path(tmp) / "this1", Path(tmp) / k) for k in ("this2", "base1", "base2")}
    res["ratios"] = _ratios(res["runs"])
    out = Path(a.out)
    write_bytes(out.with_suffix(".json"), (json.dumps(res, indent=2) + "\n").encode())
    write_bytes(out.with_suffix(".md"), markdown(res).encode())
    print(markdown(res))
    return 0


def _ratios(runs: dict) -> dict:
    r = {}
    b, t = runs.get("base_2", {}), runs.get("this_2", {})
    if b.get("gathers") and t.get("gathers"):
        r["gathers_base2_over_this2"] = round(b["gathers"] / t["gathers"], 2)
    if runs["this_1"].get("timings", {}).get("total") and t.get("timings", {}).get("total"):
        r["wall_this2_over_this1"] = round(t["timings"]["total"] / runs["this_1"]["timings"]["total"], 2)
    return r


def markdown(res: dict) -> str:
    lines = [f"# ZeRO-3 section ({res['date']})", "", f"Shard: `{' '.join(res['shard'])}`; base commit {res['base']}.",
             "", "| code | ranks | status | wall s | stage | seconds | full-model gathers | GiB gathered |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in res["runs"].items():
        label = key.rsplit("_", 1)[0]
        for st in STAGES:
            s = r["stages"].get(st, {})
            lines.append(f"| {label} | {r['ranks']} | {r['status']} | {r['wall_s']} | {st} | {s.get('seconds', '-')} "
                         f"| {s.get('gathers', '-')} | {s.get('gathered_gb', '-')} |")
        lines.append(f"| {label} | {r['ranks']} | {r['status']} | {r['wall_s']} | **total** "
                     f"| {r['timings'].get('total', '-')} | {r.get('gathers', '-')} | {r.get('gathered_gb', '-')} |")
    lines += ["", "Peak parameters whole at once (share of the model): "
              + ", ".join(f"{k} {r['peak_live_frac']}" for k, r in res["runs"].items()),
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
