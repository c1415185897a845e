"""Does the planner (icl_scale/plan.py) predict a shard's wall time? Checked on this machine.

    python bench/plan_calibration.py [--out bench/plan_calibration.json] [--model smollm2-135m]

1. Measures this machine as the planner describes a GPU: the FLOP rate one rank reaches on the model's
   forward (one torch thread per rank, a batch of 4 x 128 tokens; the planner's `peak_tflops` with
   `utilization=1`) and the bandwidth of an all-gather between the 2 ranks (gloo; `bandwidth_gbs`).
2. Plans three different shards with those numbers (2 ranks, ZeRO-3, the task data of tests/data/fixtures
   or $ICL_SCALE_DATA_DIR), then runs each with `torchrun --nproc_per_node 2 jobs/score.py` and compares
   the planner's hours with the shard's measured importance + knock-out + curves time (the manifest's
   stage timings; loading the model and rendering are not planned).

Written to the --out JSON: the measured constants, per shard predicted and measured seconds and their
ratio, and whether every ratio is within 30%.
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
SHARDS = [  # (task, shot, extra overrides): different lengths, answer kinds and list sizes
    ("copa", 1, ["eval.limit=16", "importance.n_examples=12"]),
    ("rte", 0, ["eval.limit=8", "importance.n_examples=8"]),
    ("piqa", 1, ["eval.limit=12", "importance.n_examples=6"]),
]
COMMON = ["knockout.split=heldout", "knockout.limit=4", "pruning.levels=[0,50]", "pruning.combined_levels=[0,50]",
          "eval.batch_size=4", "importance.batch_size=2", "progress=false", "wandb.mode=disabled",
          "model.deepspeed.enabled=true", "eval.physical_below=null"]
TOLERANCE = 0.3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
for _k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_k, None)


def torchrun(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", *args]


MEASURE = """
import json, sys, time, torch, torch.distributed as td
from icl_scale import plan as P
from icl_scale.distributed import init_process_group
from icl_scale.models.loading import load_model, preset
torch.set_num_threads(1)
de = init_process_group("gloo")
spec = preset(sys.argv[1])
lm = load_model({**spec, "dtype": "float32"})
a = P.Arch.from_spec(spec)
ids = torch.randint(100, 1000, (4, 128))
with torch.inference_mode():
    lm.model.model(input_ids=ids)  # warm-up
    t0 = time.perf_counter()
    for _ in range(3):
        lm.model.model(input_ids=ids)
    dt = (time.perf_counter() - t0) / 3
flops = 4 * P.forward_flops(a, 128, 0)
x = torch.ones(2**24 // 2)  # 32 MB in all: each rank receives the other's 16 MB
out = torch.empty(2**24)
td.all_gather_into_tensor(out, x)
t0 = time.perf_counter()
for _ in range(5):
    td.all_gather_into_tensor(out, x)
gather = (time.perf_counter() - t0) / 5
if de.rank == 0:
    print("MEASURED " + json.dumps({"tflops": flops / dt / 1e12, "bandwidth_gbs": x.numel() * 4 / gather / 1e9}))
"""


def measure(model: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "measure.py"
        script.write_text(MEASURE)
        p = subprocess.run(torchrun(str(script), model), env=ENV, capture_output=True, text=True, timeout=900)
    lines = [x for x in p.stdout.splitlines() if x.startswith("MEASURED ")]
    if p.returncode or not lines:
        raise SystemExit(f"measuring failed:\n{(p.stdout + p.stderr)[-3000:]}")
    return json.loads(lines[0].removeprefix("MEASURED "))


def predict(model: str, task: str, shot: int, extra: list[str], machine: dict, data: str) -> float:
    """The planner's seconds for the shard's importance, knock-out and curves on 2 CPU ranks."""
    from icl_scale import plan as P

    cfg = P.compose([f"model={model}", "model.dtype=float32", f"data.dir={data}", f"sweep.tasks=[{task}]",
                     f"sweep.shots=[{shot}]", *COMMON, *extra])
    cfg["plan"].update(gpus=2, peak_tflops=machine["tflops"], utilization=1.0, bandwidth_gbs=machine["bandwidth_gbs"])
    [counts] = P.task_counts(cfg)
    compute, comm, _ = P.shard_hours(cfg, counts, 2)
    return (compute + comm) * 3600


def run_shard(model: str, task: str, shot: int, extra: list[str], root: Path, data: str) -> float:
    cmd = torchrun(str(REPO / "jobs" / "score.py"), f"model={model}", "model.dtype=float32", f"task={task}",
                   f"shot={shot}", f"store.root={root}", f"data.dir={data}", *COMMON, *extra)
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=3600)
    if p.returncode:
        raise SystemExit(f"{task} {shot}-shot failed:\n{(p.stdout + p.stderr)[-3000:]}")
    [manifest] = list((root / model / task).rglob("manifest.json"))
    t = json.loads(manifest.read_text())["timings"]
    return sum(t[k] for k in ("importance", "knockout", "curves"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "plan_calibration.json"))
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args(argv)
    data = os.environ.get("ICL_SCALE_DATA_DIR") or str(REPO / "tests" / "data" / "fixtures")
    machine = measure(a.model)
    from icl_scale.store import write_json

    res = {"model": a.model, "ranks": 2, "machine": machine, "data": data, "tolerance": TOLERANCE, "shards": []}
    with tempfile.TemporaryDirectory() as tmp:
        for task, shot, extra in SHARDS:
            predicted = predict(a.model, task, shot, extra, machine, data)
            t0 = time.time()
            measured = run_shard(a.model, task, shot, extra, Path(tmp) / task, data)
            res["shards"].append({"task": task, "shot": shot, "overrides": COMMON + extra,
                                  "predicted_s": round(predicted, 1), "measured_s": round(measured, 1),
                                  "ratio": round(predicted / measured, 3), "job_wall_s": round(time.time() - t0, 1)})
            res["within_tolerance"] = all(abs(r["ratio"] - 1) <= TOLERANCE for r in res["shards"])
            res["complete"] = len(res["shards"]) == len(SHARDS)
            write_json(a.out, res)  # after every shard: a stopped run keeps what it measured
            print(res["shards"][-1], flush=True)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
