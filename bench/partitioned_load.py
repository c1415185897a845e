"""Host memory of loading a model under ZeRO-3, per rank (icl_scale/models/partitioned.py).

    python bench/partitioned_load.py [--out bench/partitioned_load.json] [--folder DIR]

Makes (once) a random OPT of 355M parameters (24 layers, hidden 1,024, FFN 4,096, SmolLM2's 49,152-token
vocabulary) saved as ~100 MB float32 safetensors shards, as hub checkpoints are, then loads it

* `plain`: one process, no DeepSpeed (the reference);
* `zero`: 2 CPU ranks under ZeRO-3 with partitioned loading (what `load_model` does now);
* `zero_whole`: 2 CPU ranks under ZeRO-3 the earlier way: every rank loads the whole model
  (`from_pretrained`), then `deepspeed.initialize` partitions it;

and records, per rank, the peak host RSS (the kernel's ru_maxrss: anonymous and file-backed pages,
so memory-mapped checkpoint pages count) above the rank's RSS just before loading (the no-model
baseline: Python, torch, transformers, DeepSpeed and the process group already up), as a fraction of
the model's bytes in its dtype. Then each computes the gradient head/FFN importance of 8 copa
training docs (1 shot) and the ZeRO-3 runs are compared with `plain`. Target: partitioned peak <= 0.8x
the model's bytes, importance within 1e-5 relative. Results: bench/partitioned_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096, max_position_embeddings=2048,
             word_embed_proj_dim=1024)
DOCS = 8
TARGET = 0.8


def make_checkpoint(folder: Path) -> Path:
    """The random OPT, saved in ~100 MB safetensors shards with SmolLM2's tokenizer (once)."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    from icl_scale.models.loading import load_tokenizer, preset, random_config

    tok = load_tokenizer(preset("smollm2-135m"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(random_config("opt", len(tok), **SHAPE), dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="100MB")
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def rank_main(mode: str, folder: Path, out: Path) -> None:
    """One rank: baseline RSS, load, peak RSS, importance; writes out/<mode>_rank<r>.json."""
    import torch

    from icl_scale.distributed import dist_env, init_process_group
    from icl_scale.importance import gradient_importance
    from icl_scale.models.loading import load_model, partition_zero3
    from icl_scale.tasks import build_requests

    torch.set_num_threads(1)
    spec = {"name": "opt-355m-random", "source": "local", "path": str(folder), "dtype": "float32",
            "doc_start": "none", "deepspeed": {"enabled": mode == "zero", "offload_param": "none"}}
    if mode != "plain":
        import deepspeed  # noqa: F401 - imported (and its ops built) before the baseline

        init_process_group()
    baseline = _rss()
    t0 = time.time()
    lm = load_model(spec)
    if mode == "zero_whole":
        partition_zero3(lm, "none")
    load_s = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = _rss()
    n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in lm.model.parameters())
    reqs = build_requests("copa", split="train", shot=1, limit=DOCS, data_dir=REPO / "tests" / "data" / "fixtures")
    state = gradient_importance(lm, reqs, batch_size=1)
    res = state.result(False, "paper")
    rank = dist_env().rank
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps({
        "mode": mode, "rank": rank, "params": n_params, "bytes": n_params * 4, "baseline_rss": baseline,
        "peak_rss": peak, "after_load_rss": after, "load_s": round(load_s, 1),
        "heads": res["heads"].flatten().tolist(), "ffn": res["ffn"].flatten().tolist()}))


def _launch(mode: str, folder: Path, work: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    me = [str(Path(__file__).resolve()), "--rank-mode", mode, "--folder", str(folder), "--work", str(work)]
    cmd = [sys.executable, *me] if mode == "plain" else \
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", *me]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{(p.stdout + p.stderr)[-3000:]}")
    return [json.loads(f.read_text()) for f in sorted(work.glob(f"{mode}_rank*.json"))]


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))


def summarise(runs: dict[str, list[dict]]) -> dict:
    ref = runs["plain"][0]
    out = {"model": "random OPT, " + ", ".join(f"{k}={v}" for k, v in SHAPE.items()), "params": ref["params"],
           "model_bytes": ref["bytes"], "target_peak_over_baseline": TARGET, "runs": {}}
    for mode, ranks in runs.items():
        out["runs"][mode] = {
            "ranks": len(ranks),
            "peak_above_baseline_gb": [round((r["peak_rss"] - r["baseline_rss"]) / 2**30, 3) for r in ranks],
            "peak_above_baseline_x_model": [round((r["peak_rss"] - r["baseline_rss"]) / ref["bytes"], 3)
                                            for r in ranks],
            "baseline_rss_gb": [round(r["baseline_rss"] / 2**30, 3) for r in ranks],
            "load_s": [r["load_s"] for r in ranks],
            "importance_max_rel_diff_vs_plain": max(_max_rel(r["heads"] + r["ffn"], ref["heads"] + ref["ffn"])
                                                    for r in ranks),
        }
    zero = out["runs"]["zero"]
    out["zero_meets_target"] = max(zero["peak_above_baseline_x_model"]) <= TARGET
    out["zero_importance_within_1e-5"] = zero["importance_max_rel_diff_vs_plain"] <= 1e-5
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "partitioned_load.json"))
    ap.add_argument("--folder", default=str(Path.home() / ".cache" / "icl_scale" / "bench-opt-355m-random"))
    ap.add_argument("--modes", default="plain,zero,zero_whole")
    ap.add_argument("--rank-mode", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    folder = Path(a.folder)
    if a.rank_mode:
        rank_main(a.rank_mode, folder, Path(a.work))
        return 0
    import tempfile

    make_checkpoint(folder)
    with tempfile.TemporaryDirectory() as work:
        runs = {m: _launch(m, folder, Path(work)) for m in a.modes.split(",")}
    res = summarise(runs)
    from icl_scale.store import write_json

    write_json(a.out, res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
