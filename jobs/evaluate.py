#!/usr/bin/env python
"""Evaluate one (task, shot) on a model, optionally with head/FFN masks; writes
out_dir/metrics.json and out_dir/samples.jsonl.

    python jobs/evaluate.py task=piqa shot=5 eval.limit=100 out_dir=runs/piqa5
    python jobs/evaluate.py model=tiny-opt task=copa shot=1 out_dir=runs/x \
        head_mask=store/smollm2-135m/copa/1shot/seed0/masks/heads_50.safetensors

A mask file is a safetensors file holding one tensor (key `mask`): [layers, heads] for heads,
[layers] for FFNs of this model, float or bool, 1 = keep, 0 = remove (nothing else: no NaN, no
fractions). A file that is not that is one `error:` line naming head_mask=/ffn_mask= and the file.
A head mask may remove every head of a layer: that layer's attention adds nothing, the residual
stream passes through.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icl_scale.cli import hydra_job  # noqa: E402


@hydra_job("evaluate")
def main(c: dict) -> None:
    import time

    from icl_scale.evaluator import Evaluator, primary_metric
    from icl_scale.models import load_model
    from icl_scale.models.gates import check_model_masks, read_mask_file
    from icl_scale.store import check_writable, write_json, write_jsonl
    from icl_scale.tasks import build_requests

    if not c["out_dir"]:
        raise ValueError("out_dir is required: add out_dir=<folder> to the command")
    # The files' contents are checked before anything is written or loaded; their shapes once the model is.
    masks = {key: read_mask_file(c[key], key) for key in ("head_mask", "ffn_mask") if c.get(key)}
    out = check_writable(Path(c["out_dir"]))
    ev = c["eval"]
    reqs = build_requests(c["task"], split=ev["split"], shot=int(c["shot"]), seed=int(c["seed"]),
                          limit=ev["limit"], data_dir=c["data"]["dir"])
    lm = load_model(c["model"])
    check_model_masks(masks, lm.adapter.geometry, lambda key: f"{key}={c[key]} ({lm.name})")
    t0 = time.time()
    metrics, per_doc = Evaluator(lm, c["task"], int(ev["batch_size"]), bool(c["progress"]))(
        reqs, masks.get("head_mask"), masks.get("ffn_mask"))
    dt = time.time() - t0
    rows = [{"request": r.to_json(), **d} for r, d in zip(reqs, per_doc)]
    write_jsonl(out / "samples.jsonl", rows)
    write_json(out / "metrics.json", {"model": lm.name, "task": c["task"], "shot": c["shot"], "n": len(reqs),
                                      "metrics": metrics, "seconds": round(dt, 2),
                                      "head_mask": c["head_mask"], "ffn_mask": c["ffn_mask"]})
    m = primary_metric(c["task"])
    v = metrics[m]
    print(f"{lm.name} {c['task']} {c['shot']}-shot: {m}={v['value']:.4f} "
          f"(95% CI {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f}, n={v['n']}) in {dt:.1f} s -> {out}")


if __name__ == "__main__":
    main()
