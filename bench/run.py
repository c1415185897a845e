"""Speed benchmarks: the prefix-cached scorer, the one-backward importance pass, the induction scores and
the FFN knock-out stage.

    python bench/run.py [--quick] [--only scoring,importance,induction,knockout] [--out bench/results] [--data-dir DIR]

Writes <out>.json (every number, plus machine info) and <out>.md (tables), atomically. With
--only, the sections not run are kept from an existing <out>.json (each section carries its own
date, machine load and settings). Task data (scoring, importance, knockout): --data-dir, else
$ICL_SCALE_DATA_DIR. See bench/README.md for what each number means.

Sections (one module each)
--------------------------
scoring     bench/scoring.py: naive vs prefix-cached vs lm-eval 0.4.13's HFLM, docs/s and agreement.
importance  bench/importance.py: importance pass vs forward only and vs the original code's scheme.
induction   bench/induction.py: induction scores vs the original loops and the bare forward passes.
knockout    bench/knockout.py: the FFN knock-out stage, restarted knock-outs vs one evaluation per knock-out.
data_parallel  bench/data_parallel.py: 2 ranks splitting the importance pass and an evaluation vs 2 in lockstep.
pruned      bench/pruned.py: scoring on a physically pruned copy vs gating, SmolLM2 and an OPT-1.3B shape.
masks       bench/masks.py: several masks in one batched forward (per-row gates) vs one pass set per mask.

Timing: every method of one configuration runs once per round, methods alternating, for
`repeats` rounds; we report the best round (least disturbed by other processes) and the spread.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/run.py`: import bench.* and tests.* from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench import data_parallel, induction, masks, pruned
from bench.common import REPO, BenchError, data_dir, loadavg, machine_info, now
from bench.importance import bench_importance
from bench.knockout import bench_knockout
from bench.report import write_results
from bench.scoring import bench_scoring, profile_scoring
from icl_scale.models.loading import LoadedModel, load_model

SECTIONS = ("scoring", "importance", "induction", "knockout", "data_parallel", "pruned", "masks")
NEEDS_DATA = {"scoring", "importance", "knockout", "data_parallel", "pruned", "masks"}

# Sizes: the brief's 40 / 24 docs per task take hours on a shared 2-core CPU (~50-200 tokens/s for a
# 135M model), so the default is smaller; `--limits 0:40,5:24` runs the bigger setting.
DEFAULT = dict(
    tasks=("piqa", "hellaswag", "arc_easy", "boolq", "winogrande"),
    shots=(0, 5),
    limits={0: 8, 5: 4},  # docs per task at each shot count
    batch_size=8,  # same number for all three scorers (see README: docs vs pairs)
    repeats=2,
    imp_tasks=("hellaswag", "arc_easy"),
    imp_shot=5,
    imp_examples=4,
    imp_batch_size=2,
    ko_task="copa",
    ko_shot=1,
    ko_docs=16,
    ko_batch_size=8,
    pruned_docs=16,  # SmolLM2; the OPT-1.3B shape scores the first pruned_opt_docs of them
    pruned_opt_docs=4,
)
QUICK = dict(DEFAULT, tasks=("piqa", "boolq"), limits={0: 4, 5: 2}, repeats=2, imp_tasks=("piqa",),
             imp_examples=2, imp_batch_size=2, ko_docs=4,
             pruned_docs=4, pruned_opt_docs=1)


def _scoring(lm: LoadedModel, cfg: dict, data: Path | None, profile: bool, log) -> dict:
    r = bench_scoring(lm, cfg["tasks"], cfg["shots"], cfg["limits"], cfg["batch_size"], cfg["repeats"],
                      data=data, log=log)
    tg = r.get("target_5shot")
    if profile and 5 in cfg["shots"] and tg is not None and not tg["met"]:
        # missed: show where ours spends its time on the slowest-relative 5-shot task
        worst = min((x for x in r["rows"] if x["shot"] == 5), key=lambda x: x["speedup"]["ours_vs_lmeval"])
        r["profile"] = profile_scoring(lm, worst["task"], 5, cfg["limits"][5], cfg["batch_size"], data=data)
    return r


def _section(sec: str, lm: LoadedModel, cfg: dict, quick: bool, data: Path | None, profile: bool, log) -> dict:
    if sec == "scoring":
        return _scoring(lm, cfg, data, profile, log)
    if sec == "importance":
        return bench_importance(lm, cfg["imp_tasks"], cfg["imp_shot"], cfg["imp_examples"], cfg["imp_batch_size"],
                                cfg["repeats"], data=data, log=log)
    if sec == "induction":
        return induction.section(lm, quick, parts=cfg.get("induction_parts"))
    if sec == "knockout":
        return bench_knockout(lm, cfg["ko_task"], cfg["ko_shot"], cfg["ko_docs"], cfg["ko_batch_size"], cfg["repeats"],
                              data=data, log=log)
    if sec == "data_parallel":  # its own 2 ranks (torchrun), each loading the model
        return data_parallel.section(lm.name, repeats=cfg["repeats"], data=data, log=log,
                                     **({"n_eval": 4, "n_imp": 4} if quick else {}))
    if sec == "pruned":
        return pruned.section(lm, n_docs=cfg["pruned_docs"], opt_docs=cfg["pruned_opt_docs"], repeats=cfg["repeats"],
                              data=data, opt=not quick, log=log)
    if sec == "masks":
        return masks.section(lm, settings=((2, 4, 2), (4, 2, 2)) if quick else masks.SETTINGS, repeats=cfg["repeats"],
                             data=data, log=log)
    raise ValueError(f"unknown section {sec!r}; use {', '.join(SECTIONS)}")


def _previous(out: str | Path | None) -> dict:
    """The existing <out>.json (its other sections are kept), or {}."""
    if out is None or not Path(out).with_suffix(".json").exists():
        return {}
    try:
        return json.loads(Path(out).with_suffix(".json").read_text())
    except ValueError:
        return {}


def run(sections: Sequence[str], quick: bool = False, model: str | LoadedModel = "smollm2-135m",
        out: str | Path | None = REPO / "bench" / "results", cfg: dict | None = None, profile: bool = True,
        data: str | Path | None = None, log=print) -> dict:
    """Run `sections`, merge them into <out>.json / <out>.md (None: write nothing), return the results.
    `data`: the task mirror (default: $ICL_SCALE_DATA_DIR; only scoring, importance and knockout read it)."""
    cfg = dict(QUICK if quick else DEFAULT, **(cfg or {}))
    data = data_dir(data) if NEEDS_DATA & set(sections) else None
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    res: dict[str, Any] = _previous(out)
    res["machine"] = machine_info()
    res["quick"] = quick
    res["model"] = lm.summary()
    for sec in sections:
        t0 = time.perf_counter()
        info = {"date": now(), "loadavg_start": loadavg(), "quick": quick}
        r = _section(sec, lm, cfg, quick, data, profile, log)
        info.update(seconds=time.perf_counter() - t0, loadavg_end=loadavg())
        r["_meta"] = info
        res[sec] = r
    res["machine"]["loadavg_end"] = loadavg()
    if out is not None:
        jp, mp = write_results(res, out)
        log(f"wrote {jp} and {mp}")
    return res


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, minutes)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma list of: " + ", ".join(SECTIONS))
    ap.add_argument("--out", default=str(REPO / "bench" / "results"),
                    help="writes <out>.json and <out>.md (default: bench/results of this checkout)")
    ap.add_argument("--data-dir", default=None,
                    help="task mirror <dir>/<task>/<split>.jsonl for scoring, importance and knockout "
                         "(default $ICL_SCALE_DATA_DIR)")
    ap.add_argument("--model", default="smollm2-135m", help="model preset (conf/model/*.yaml)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: stable ratios on a shared CPU, where oversubscribed OpenMP "
                         "threads stall; 0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--tasks", default=None, help="scoring tasks, comma list")
    ap.add_argument("--shots", default=None, help="scoring shot counts, comma list (default 0,5)")
    ap.add_argument("--limits", default=None, help="docs per task by shot count, e.g. 0:40,5:24")
    ap.add_argument("--imp-tasks", default=None, help="importance tasks, comma list")
    ap.add_argument("--imp-examples", type=int, default=None, help="importance examples per task")
    ap.add_argument("--ko-docs", type=int, default=None, help="knock-out docs (copa, 1-shot)")
    ap.add_argument("--induction-parts", default=None,
                    help="induction parts, comma list of: " + ", ".join(induction.PARTS) + " (default both)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile taken when the 5-shot target is missed")
    return ap


def _words(s: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in s.split(",") if t.strip())


def _cfg(a: argparse.Namespace, ap: argparse.ArgumentParser) -> dict[str, Any]:
    """The size overrides given on the command line (argparse errors for inconsistent ones)."""
    cfg: dict[str, Any] = {}
    if a.repeats:
        cfg["repeats"] = a.repeats
    if a.batch_size:
        cfg["batch_size"] = a.batch_size
    if a.tasks:
        cfg["tasks"] = _words(a.tasks)
    if a.shots:
        cfg["shots"] = tuple(int(x) for x in a.shots.split(","))
    if a.limits:
        cfg["limits"] = {int(k): int(v) for k, v in (x.split(":") for x in a.limits.split(","))}
    if a.imp_tasks:
        cfg["imp_tasks"] = _words(a.imp_tasks)
    if a.imp_examples:
        cfg["imp_examples"] = a.imp_examples
    if a.ko_docs:
        cfg["ko_docs"] = a.ko_docs
    if a.induction_parts:
        cfg["induction_parts"] = _words(a.induction_parts)
        bad = [p for p in cfg["induction_parts"] if p not in induction.PARTS]
        if bad:
            ap.error(f"--induction-parts: unknown part(s) {', '.join(bad)}; use {', '.join(induction.PARTS)}")
    base = QUICK if a.quick else DEFAULT
    missing = [k for k in cfg.get("shots", base["shots"]) if k not in cfg.get("limits", base["limits"])]
    if missing:
        ap.error(f"--limits has no doc count for shot(s) {missing}")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    sections = list(_words(a.only))
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"--only: unknown section(s) {', '.join(bad)}; use {', '.join(SECTIONS)}")
    cfg = _cfg(a, ap)
    try:
        data = data_dir(a.data_dir) if NEEDS_DATA & set(sections) else None
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    run(sections, quick=a.quick, model=a.model, out=a.out, cfg=cfg, profile=not a.no_profile, data=data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
