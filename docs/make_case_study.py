#!/usr/bin/env python
"""The SmolLM2-135M case study (docs/case-study-smollm2.md): runs it, then collects its numbers.

    ICL_SCALE_DATA_DIR=/path/to/mirror python docs/make_case_study.py [--store store/case-study]

1. one shard per (task, shot) of `experiment=case_study` (jobs/score.py; a complete shard is
   skipped, a partial one resumes, so an interrupted run is simply started again);
2. the unpruned accuracy at demonstration seeds 1 and 2 of every few-shot config (jobs/evaluate.py,
   the same docs; seed 0 is the shard's), for the baseline over 3 seeds;
3. the cross-task transfer curves at 1 shot (jobs/transfer.py), the induction scores
   (jobs/induction.py) and the reducer (jobs/reduce.py: figures + report.md);
4. docs/case_study/: summary.json (baselines over seeds), the reducer's report.md, claims.json and
   claims.md (each of the paper's claims with this model's number, its paired 95% interval over docs
   and a verdict; the random-pruning baseline of `pruning.compare=[random]`) and figures (from
   <store>/<model>/summary).

`--collect-only` skips 1-3. Each step is an ordinary entry point with Hydra overrides, so any one
can be rerun by hand: the commands are printed as they run.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
# The tasks and shots are the preset's (sweep.tasks, sweep.shots): one source of truth.
_PRESET = OmegaConf.load(ROOT / "conf" / "experiment" / "case_study.yaml")
TASKS = list(_PRESET.sweep.tasks)
SHOTS = list(_PRESET.sweep.shots)
SEEDS = [0, 1, 2]
MODEL = "smollm2-135m"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def seed_dir(store: Path, task: str, shot: int, seed: int) -> Path:
    return store / "_seed_baselines" / task / f"{shot}shot" / f"seed{seed}"


def compute(store: Path) -> None:
    common = ["experiment=case_study", f"store.root={store}", "progress=false"]
    for task in TASKS:
        for shot in SHOTS:
            run(["jobs/score.py", *common, f"task={task}", f"shot={shot}"])
    for task in TASKS:
        for shot in SHOTS[1:]:
            for seed in SEEDS[1:]:
                out = seed_dir(store, task, shot, seed)
                if not (out / "metrics.json").exists():
                    run(["jobs/evaluate.py", *common, f"task={task}", f"shot={shot}", f"seed={seed}",
                         f"out_dir={out}"])
    for task in TASKS if len(TASKS) > 1 else []:  # cross-task transfer (Fig. 9) at 1 shot: needs 2+ tasks
        run(["jobs/transfer.py", *common, f"task={task}", "shot=1"])
    run(["jobs/induction.py", *common])
    run(["jobs/reduce.py", *common])


def baseline(store: Path, task: str, shot: int, seed: int) -> dict:
    """The unpruned accuracy (the shard's metric) of one demonstration seed."""
    curves = json.loads((store / MODEL / task / f"{shot}shot" / "seed0" / "curves.json").read_text())
    key = curves["metric"]
    if seed == 0 or shot == 0:  # the shard's unpruned point
        m = curves["heads"][0]["metrics"]
    else:
        m = json.loads((seed_dir(store, task, shot, seed) / "metrics.json").read_text())["metrics"]
    return {"metric": key, "value": m[key]["value"], "ci95": m[key]["ci95"], "n": m[key]["n"]}


def facts(store: Path) -> dict:
    """What was run, from a shard's manifest (the newest shard: older ones lack the parameter count):
    the model's size and the study's sizes."""
    m = json.loads((store / MODEL / TASKS[-1] / f"{SHOTS[-1]}shot" / "seed0" / "manifest.json").read_text())
    arch, r = m["resolved"]["model"]["arch"], m["resolved"]
    return {"parameters": m["parameters"], "layers": arch["layers"], "heads_per_layer": arch["heads"],
            "kv_heads": arch["kv_heads"], "heads": arch["layers"] * arch["heads"], "tasks": TASKS, "shots": SHOTS,
            "eval_limit": r["eval"]["limit"], "importance_examples": r["importance"]["n_examples"],
            "pruning_levels": r["pruning"]["levels"], "combined_levels": r["pruning"]["combined_levels"],
            "random_seeds": r["pruning"]["random_seeds"], "induction_sequences": r["induction"]["n_seeds"],
            "demonstration_seeds": SEEDS}


def collect(store: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in TASKS:
        for shot in SHOTS:
            seeds = [baseline(store, task, shot, s) for s in (SEEDS if shot else [0])]
            vals = [s["value"] for s in seeds]
            rows.append({"task": task, "shot": shot, "seeds": seeds, "mean": statistics.mean(vals),
                         "sd_over_seeds": statistics.stdev(vals) if len(vals) > 1 else 0.0})
    (out / "summary.json").write_text(json.dumps({"model": MODEL, "store": "experiment=case_study",
                                                  "facts": facts(store), "baselines": rows}, indent=2) + "\n")
    figs = store / MODEL / "summary"
    report = (figs / "report.md").read_text()
    # The reducer's claims table (icl_scale/claims.py: paired bootstrap over docs, the random
    # baseline, the induction null) and its report, as written: the case study quotes these files.
    for name in ("report.md", "claims.json", "claims.md"):
        shutil.copy2(figs / name, out / name)
    for f in out.glob("*.png"):  # figures of an earlier run that this one does not draw
        f.unlink()
    for f in sorted(figs.glob("*.png")):  # the figures report.md shows, and the importance heatmaps
        if f.name in report or f.name == "fig3_importance.png":
            shutil.copy2(f, out / f.name)
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="store/case-study")
    ap.add_argument("--out", default=str(ROOT / "docs" / "case_study"))
    ap.add_argument("--collect-only", action="store_true")
    args = ap.parse_args()
    store = Path(args.store).resolve()
    if not args.collect_only:
        compute(store)
    collect(store, Path(args.out))


if __name__ == "__main__":
    main()
