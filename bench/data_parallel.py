"""Data-parallel section: one shard job's work on 2 ranks (torchrun, gloo, 1 thread each) split
between them (icl_scale.distributed, the default) vs the same 2 ranks in lockstep (every rank does all
of it, the earlier behaviour): the importance pass and one evaluation, timed alternately, results of
the two checked equal (bench/README.md, "Data-parallel section").

    python bench/run.py --only data_parallel          # launches the ranks itself
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def section(model: str, task: str = "copa", shot: int = 1, n_eval: int = 64, n_imp: int = 16, batch_size: int = 4,
            repeats: int = 2, data: Path | str | None = None, log=print) -> dict:
    """Launch the two ranks (this file's `worker`) and return rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dp.json"
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", "--nproc_per_node", "2", __file__, "--worker", "--model", model,
               "--task", task, "--shot", str(shot), "--n-eval", str(n_eval), "--n-imp", str(n_imp),
               "--batch-size", str(batch_size), "--repeats", str(repeats), "--out", str(out)]
        if data is not None:
            cmd += ["--data-dir", str(data)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"data-parallel bench failed:\n{(p.stdout + p.stderr)[-3000:]}")
        r = json.loads(out.read_text())
    log(f"[data_parallel] {task} {shot}-shot, 2 ranks x 1 thread: importance {r['speedup']['importance']:.2f}x, "
        f"evaluation {r['speedup']['evaluation']:.2f}x over lockstep")
    return r


def worker(a) -> None:
    import torch

    from bench.common import stats
    from icl_scale.distributed import barrier, init_process_group, set_data_parallel
    from icl_scale.importance import gradient_importance
    from icl_scale.models import load_model
    from icl_scale.scoring import score_requests
    from icl_scale.tasks import build_requests

    torch.set_num_threads(1)
    de = init_process_group()
    lm = load_model(a.model)
    reqs = build_requests(a.task, shot=a.shot, limit=a.n_eval, data_dir=a.data_dir)
    imp = build_requests(a.task, split="train", shot=a.shot, limit=a.n_imp, data_dir=a.data_dir)
    work = {"importance": lambda: gradient_importance(lm, imp, batch_size=a.batch_size),
            "evaluation": lambda: score_requests(lm, reqs, batch_size=8)}
    times = {f"{w}_{m}": [] for w in work for m in ("lockstep", "data_parallel")}
    outs = {}
    for r in range(a.repeats + 1):  # round 0 warms up, untimed
        for mode in (("lockstep", "data_parallel") if r % 2 else ("data_parallel", "lockstep")):
            set_data_parallel(mode == "data_parallel")
            for w, fn in work.items():
                barrier()
                t0 = time.perf_counter()
                outs[w, mode] = fn()
                barrier()
                if r:
                    times[f"{w}_{mode}"].append(time.perf_counter() - t0)
    set_data_parallel(True)
    st = {k: stats(v) for k, v in times.items()}
    ia, ib = outs["importance", "lockstep"], outs["importance", "data_parallel"]
    rel = max(float((ia.heads - ib.heads).abs().max() / ia.heads.abs().max()),
              float((ia.ffn - ib.ffn).abs().max() / ia.ffn.abs().max()))
    la = [c.logprob for row in outs["evaluation", "lockstep"] for c in row]
    lb = [c.logprob for row in outs["evaluation", "data_parallel"] for c in row]
    speed = {w: st[f"{w}_lockstep"]["best_s"] / st[f"{w}_data_parallel"]["best_s"] for w in work}
    res = {"settings": {"model": lm.name, "task": a.task, "shot": a.shot, "eval_docs": len(reqs),
                        "importance_examples": len(imp), "importance_batch_size": a.batch_size, "ranks": 2,
                        "threads_per_rank": 1, "repeats": a.repeats},
           "time": st, "speedup": speed,
           "agreement": {"importance_max_rel": rel, "eval_max_abs_dlogprob": max(abs(x - y) for x, y in zip(la, lb))},
           "targets": {"importance>=1.7": speed["importance"] >= 1.7, "evaluation>=1.7": speed["evaluation"] >= 1.7}}
    if de.rank == 0:
        Path(a.out).write_text(json.dumps(res, indent=2))


def markdown(sec: dict) -> list[str]:
    s, t = sec["settings"], sec["time"]
    return [f"{s['model']}, {s['task']} {s['shot']}-shot, {s['ranks']} ranks x {s['threads_per_rank']} thread "
            f"(gloo): importance over {s['importance_examples']} examples (batch {s['importance_batch_size']} per "
            f"rank), one evaluation of {s['eval_docs']} docs; best of {s['repeats']}.", "",
            "| work | lockstep (s) | data-parallel (s) | speed-up |", "|---|---|---|---|",
            *[f"| {w} | {t[w + '_lockstep']['best_s']:.2f} | {t[w + '_data_parallel']['best_s']:.2f} | "
              f"{sec['speedup'][w]:.2f}x |" for w in ("importance", "evaluation")], "",
            f"Agreement: importance max relative difference {sec['agreement']['importance_max_rel']:.1e}, "
            f"per-choice log-likelihoods {sec['agreement']['eval_max_abs_dlogprob']:.1e} nats."]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    for flag, typ in (("--model", str), ("--task", str), ("--shot", int), ("--n-eval", int), ("--n-imp", int),
                      ("--batch-size", int), ("--repeats", int), ("--out", str), ("--data-dir", str)):
        ap.add_argument(flag, type=typ, default=None)
    worker(ap.parse_args())
