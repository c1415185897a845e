"""Does the planner (icl_scale/plan.py) predict a shard job's wall time? Checked on this machine.

    python bench/plan_calibration.py [--out bench/results/plan_calibration.json]

1. Primitives, from a separate micro-run on 2 ranks (torchrun, gloo, one torch thread per rank) with
   random OPTs of their own sizes (none of the three shards'), run again just before each shard so that
   both see the same load from other work:
   * `peak_tflops` (with `utilization=1`): the FLOP rate of the plain model's forward at 4 x 128 tokens,
     both ranks working at once as in a job;
   * `bandwidth_gbs`, `pass_call_ms` and `layer_call_ms`, the fitted constants: a one-token forward
     under ZeRO-3 (less its FLOPs) of three models (3 layers at two widths, 9 layers), fitted (least
     squares, non-negative) as per pass + (layers + 1) x per block + bytes received / bandwidth; an
     all-gather of 32 MB is recorded beside it (`allgather_gbs`);
   * `load_gbs`: a line through the (warm) load times of those models under ZeRO-3;
   * `startup_s`: the micro-run's own start as a job makes it (launch, interpreter, imports, the
     config, the ranks' rendezvous, the first model's load, less its bytes at `load_gbs`) and its exit;
   * `tokenize_ktok_s`: rendering train docs and tokenising them, as a shard does;
   * `free_gb`: a rank's free memory as the scorer reads it (models/zero.least_free_memory), which sizes
     the ZeRO-3 passes (masks per pass, packed steps) the planner then plans.
2. The planner predicts each of three shards from those numbers and its formula (icl_scale/plan.py:
   the scorer's pass schedule, FLOPs, gathered bytes, fixed costs); nothing is tuned to the shards.
3. Each shard runs as a job, `torchrun --nproc_per_node 2 jobs/score.py` under ZeRO-3 (random OPTs
   of different sizes; different tasks, shots and list sizes; the task data of tests/data/fixtures),
   and its wall (launch to exit) is compared with the prediction; the manifest's stage timings and
   counted gathers are recorded beside the planned ones.

Writes bench/results/plan_calibration.{json,md} after every shard; `within_tolerance`: every
predicted / measured within 30%.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.3


def opt(layers: int, hidden: int, heads: int) -> list[str]:
    """model=tiny-opt overrides for a random OPT of this size (FFN 4 x hidden, untied head's width = hidden)."""
    return ["model=tiny-opt", f"+model.config.num_hidden_layers={layers}", f"+model.config.hidden_size={hidden}",
            f"+model.config.ffn_dim={4 * hidden}", f"+model.config.num_attention_heads={heads}",
            f"+model.config.word_embed_proj_dim={hidden}"]


MICRO = opt(3, 192, 6)  # the micro-run's model
PROBES = [opt(3, 768, 12), opt(9, 192, 6)]  # wider, deeper: the fits separate bytes, blocks and passes
SHARDS = [  # (name, model, task, shot, overrides): different sizes, tasks, shots, answer kinds, list sizes
    ("copa-1shot-L4-h256", opt(4, 256, 8), "copa", 1,
     ["eval.limit=20", "importance.n_examples=12", "knockout.split=heldout", "knockout.limit=8"]),
    ("piqa-0shot-L8-h128", opt(8, 128, 4), "piqa", 0,
     ["eval.limit=12", "importance.n_examples=8", "knockout.split=heldout", "knockout.limit=6"]),
    ("rte-1shot-L2-h512", opt(2, 512, 8), "rte", 1,
     ["eval.limit=10", "importance.n_examples=6", "knockout.split=paper"]),
]
COMMON = ["pruning.levels=[0,25,50]", "pruning.combined_levels=[0,50]", "eval.batch_size=4", "importance.batch_size=2",
          "progress=false", "wandb.mode=disabled", "model.deepspeed.enabled=true", "eval.physical_below=null"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
for _k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
    ENV.pop(_k, None)


def torchrun(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", *args]


MEASURE = """
import json, sys, time
t0 = float(sys.argv[1])
import torch, torch.distributed as td
from icl_scale import plan as P
from icl_scale.config import compose
from icl_scale.models.loading import load_model
from icl_scale.runs import start_ranks
from icl_scale.shard import run_shard  # noqa: F401  (what the job imports)
from icl_scale.tasks import build_requests
micro, probes, data = json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]


def spec(overrides, zero=True):
    return compose("config", overrides + [f"model.deepspeed.enabled={str(zero).lower()}", "task=copa",
                                          f"data.dir={data}"])["model"]


# a job's start, as the job makes it: launch, interpreter, imports, the config, the ranks, the first model
start_ranks()
torch.set_num_threads(1)
lm = load_model(spec(micro))
td.barrier()
started = time.time() - t0


def timed(fn, n):
    fn()  # warm-up
    td.barrier()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def load(overrides):
    s = spec(overrides)
    td.barrier()
    t = time.perf_counter()
    model = load_model(s)
    return model, time.perf_counter() - t, P.n_params(P.Arch.from_spec(s)) * 4


def one_token_pass(model):
    one = torch.tensor([[100]])
    with torch.inference_mode():
        return timed(lambda: model.model.base_model(input_ids=one), 10)


# the FLOP rate of the plain model, both ranks at once
plain = load_model(spec(micro, zero=False))
arch = P.Arch.from_spec(spec(micro))
ids = torch.randint(100, 1000, (4, 128))
with torch.inference_mode():
    dt = timed(lambda: plain.model.model(input_ids=ids), 3)
tflops = 4 * P.forward_flops(arch, 128, 0) / dt / 1e12
del plain
# an all-gather of 32 MB (each rank receives the other's 16 MB), for the record
x, out = torch.ones(2**22), torch.empty(2**23)
allgather = x.numel() * 4 / timed(lambda: td.all_gather_into_tensor(out, x), 5) / 1e9
# warm loads under ZeRO-3 (random weights: built, then partitioned) and a one-token pass of each model
loads, passes = [], []
for overrides in [*probes, micro]:
    model, seconds, nbytes = load(overrides)
    n_layers = P.Arch.from_spec(spec(overrides)).layers
    loads.append([nbytes, seconds])
    passes.append([nbytes, n_layers, one_token_pass(model) - P.forward_flops(arch, 1, 0) / (tflops * 1e12)])
    del model
# rendering and tokenising train docs, as a shard does
t = time.perf_counter()
reqs = build_requests("piqa", split="train", shot=1, data_dir=data)
strings = sorted({s for r in reqs for s in (*r.contexts, *r.continuations)})
n_tok = sum(len(i) for i in lm.tokenizer(strings, add_special_tokens=False)["input_ids"])
tokenize = n_tok / (time.perf_counter() - t) / 1e3
from icl_scale.models.zero import least_free_memory
free_gb = least_free_memory() / 2**30  # what a shard's ZeRO-3 passes are sized from (as at its load)
if td.get_rank() == 0:
    print("MEASURED " + json.dumps({
        "free_gb": free_gb, "peak_tflops": tflops, "allgather_gbs": allgather, "started_s": started,
        "tokenize_ktok_s": tokenize,
        "loads": loads, "one_token_passes": passes}), flush=True)
print("ENDED " + str(time.time()), flush=True)
"""


def fit(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (scipy's nnls)."""
    from scipy.optimize import nnls

    return list(nnls([list(map(float, r)) for r in rows], [float(y) for y in ys])[0])


def measure(data: str) -> dict:
    """The primitives (see the module docstring), from one torchrun of MEASURE."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "measure.py"
        script.write_text(MEASURE)
        t0 = time.time()
        p = subprocess.run(torchrun(str(script), str(t0), json.dumps(MICRO), json.dumps(PROBES), data), env=ENV,
                           capture_output=True, text=True, timeout=1200)
        ended = time.time()
    # both ranks print to one pipe: a line may be cut by the other rank's, so read the records by pattern
    lines = [json.JSONDecoder().raw_decode(x)[0] for x in re.findall(r"MEASURED (\{.*)", p.stdout)]
    ends = [float(x) for x in re.findall(r"ENDED ([0-9.]+)", p.stdout)]
    if p.returncode or not lines or not ends:
        raise SystemExit(f"measuring failed:\n{(p.stdout + p.stderr)[-3000:]}")
    m = lines[0]
    _, per_byte = fit([[1, b] for b, _ in m["loads"]], [t for _, t in m["loads"]])  # load = a + bytes x per_byte
    m["load_gbs"] = 1 / max(per_byte, 1e-12) / 1e9
    # a one-token pass (less its FLOPs) = per pass + (layers + 1) x per block + bytes received (half) / bandwidth
    c_pass, c_block, per_byte_pass = fit([[1, layers + 1, b / 2] for b, layers, _ in m["one_token_passes"]],
                                         [t for *_, t in m["one_token_passes"]])
    m["bandwidth_gbs"] = 1 / max(per_byte_pass, 1e-12) / 1e9
    m["pass_call_ms"], m["layer_call_ms"] = max(c_pass, 1e-6) * 1e3, max(c_block, 1e-6) * 1e3
    m["exit_s"] = ended - max(ends)
    micro_bytes = m["loads"][-1][0]
    m["startup_s"] = m["started_s"] - micro_bytes * per_byte + m["exit_s"]
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}


PLAN_KEYS = ("peak_tflops", "bandwidth_gbs", "pass_call_ms", "layer_call_ms", "startup_s", "load_gbs",
             "tokenize_ktok_s")


def predict(model: list[str], task: str, shot: int, extra: list[str], machine: dict, data: str):
    """The planner's ShardTime for the shard on 2 CPU ranks, from the measured primitives."""
    from icl_scale import plan as P

    cfg = P.compose([*model, f"data.dir={data}", f"sweep.tasks=[{task}]", f"sweep.shots=[{shot}]", *COMMON, *extra])
    # the memory ZeRO-3 passes are sized from: a rank's free memory (plan.py reads gpu_mem_gb x SAFETY)
    cfg["plan"].update(gpus=2, utilization=1.0, gpu_mem_gb=machine["free_gb"] / P.SAFETY,
                       **{k: machine[k] for k in PLAN_KEYS})
    [counts] = P.task_counts(cfg)
    t = P.shard_time(cfg, counts, 2)
    a = P.Arch.from_spec(cfg["model"])
    return t, t.gathered_bytes * 2 / (P.n_params(a) * 4)  # full-model gathers (each rank receives half)


def run_shard(model: list[str], task: str, shot: int, extra: list[str], root: Path, data: str) -> tuple[float, dict]:
    """(wall seconds from launch to exit, the manifest) of one shard job on 2 ranks."""
    cmd = torchrun(str(REPO / "jobs" / "score.py"), *model, f"task={task}", f"shot={shot}", f"store.root={root}",
                   f"data.dir={data}", *COMMON, *extra)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=3600)
    wall = time.time() - t0
    if p.returncode:
        raise SystemExit(f"{task} {shot}-shot failed:\n{(p.stdout + p.stderr)[-3000:]}")
    [manifest] = list(root.rglob("manifest.json"))
    return wall, json.loads(manifest.read_text())


def row(name, model, task, shot, extra, machine, data, root) -> dict:
    t, gathers = predict(model, task, shot, extra, machine, data)
    wall, m = run_shard(model, task, shot, extra, root, data)
    return {"shard": name, "task": task, "shot": shot, "overrides": [*model, *COMMON, *extra],
            "predicted_s": round(t.total_s, 1), "measured_s": round(wall, 1), "ratio": round(t.total_s / wall, 3),
            "predicted_terms_s": {"start": round(t.start_s, 1), "compute": round(t.compute_s, 1),
                                  "comm": round(t.comm_s, 1), "calls": round(t.calls_s, 1)},
            "planned_forwards": t.schedule.total.forwards, "planned_gathers": round(gathers, 2),
            "measured_gathers": m.get("zero", {}).get("total", {}).get("gathers"),
            "measured_timings_s": m.get("timings")}


def markdown(res: dict) -> str:
    lines = [f"# Planner calibration ({res['date']})", "",
             "`python bench/plan_calibration.py`: before each of three shard jobs on 2 CPU ranks under ZeRO-3, "
             "the machine's primitives from a micro-run; the planner's prediction from them; the job timed "
             f"(launch to exit). Load average at start {res['loadavg_start']}, at end {res.get('loadavg_end')}.", "",
             "| shard | predicted s | measured s | ratio | start / compute / comm / calls s | forwards | gathers "
             "planned / counted |", "|---|---|---|---|---|---|---|"]
    for r in res["shards"]:
        p = r["predicted_terms_s"]
        lines.append(f"| {r['shard']} | {r['predicted_s']} | {r['measured_s']} | {r['ratio']} | {p['start']} / "
                     f"{p['compute']} / {p['comm']} / {p['calls']} | {r['planned_forwards']} | "
                     f"{r['planned_gathers']} / {r['measured_gathers']} |")
    lines += ["", f"Within {TOLERANCE:.0%}: {res.get('within_tolerance')} (complete: {res.get('complete')})", "",
              "Primitives measured before each shard:", ""]
    keys = (*PLAN_KEYS, "allgather_gbs", "free_gb")
    lines += [f"* {r['shard']}: " + ", ".join(f"{k}={r['machine'][k]:.4g}" for k in keys if k in r["machine"])
              for r in res["shards"]]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "plan_calibration.json"))
    ap.add_argument("--data", default=str(REPO / "tests" / "data" / "fixtures"), help="task data (a mirror folder)")
    a = ap.parse_args(argv)
    from bench.common import loadavg, machine_info, now
    from icl_scale.store import write_bytes, write_json

    res = {"date": now(), "loadavg_start": loadavg(), "host": machine_info(), "ranks": 2, "data": "tests/data/fixtures"
           if Path(a.data).resolve() == (REPO / "tests" / "data" / "fixtures").resolve() else "--data",
           "tolerance": TOLERANCE, "shards": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, task, shot, extra in SHARDS:
            machine = measure(a.data)  # just before the shard: both see the same load from other work
            print("primitives:", json.dumps(machine), flush=True)
            res["shards"].append({**row(name, model, task, shot, extra, machine, a.data, Path(tmp) / name),
                                  "machine": machine})
            res["within_tolerance"] = all(abs(r["ratio"] - 1) <= TOLERANCE for r in res["shards"])
            res["complete"] = len(res["shards"]) == len(SHARDS)
            res["loadavg_end"] = loadavg()
            write_json(a.out, res)  # after every shard: a stopped run keeps what it measured
            write_bytes(Path(a.out).with_suffix(".md"), markdown(res).encode())
            print(json.dumps(res["shards"][-1]), flush=True)
    print(markdown(res))
    return 0 if res["within_tolerance"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
