#!/usr/bin/env python
"""Export a physically pruned model: the heads and FFNs a shard's pruning masks keep, and nothing else.

    python jobs/export.py model=smollm2-135m task=copa shot=1 heads=70 ffn=20 out_dir=exports/copa1
    python jobs/export.py model=tiny-opt task=copa shot=1 out_dir=exports/x \
        head_mask=store/tiny-opt/copa/1shot/seed0/masks/heads_50.safetensors

`heads=<p>` / `ffn=<p>` take the masks of pruning level p% from the complete shard
<store.root>/<model>/<task>/<shot>shot/seed<seed>/masks/{heads,ffn}_<p>.safetensors (jobs/score.py
makes it); `head_mask=<file>` / `ffn_mask=<file>` take mask files instead (see jobs/evaluate.py).
Leave one out to keep every head (or every FFN).

out_dir (new, or an empty folder) receives:
  model.safetensors   the pruned weights only (icl_scale.models.physical; no pickle)
  config.json         the base architecture's HF config plus an `icl_scale_pruning` block: the kept
                      heads and whether the FFN is kept, per layer, and the source masks
  tokenizer files
  report.json/.md     parameters before/after; the task's accuracy (the shard's eval docs: its
                      eval.split/eval.limit; with mask files the command's eval.*) unpruned, gated
                      and pruned; the measured speed-up of score_requests on those docs (best of
                      `repeats`, default 3)

Load it back with `model=local model.path=<out_dir>` (add model.doc_start=<what the source model
used>, which report.md names). Everything is written to a temporary sibling folder and renamed into
place at the end: a failed export leaves nothing behind. Errors are one `error:` line.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icl_scale.cli import hydra_job  # noqa: E402


@hydra_job("export")
def main(c: dict) -> None:
    from icl_scale.export import export_pruned

    report, out = export_pruned(c)
    p, a, s = report["parameters"], report["accuracy"], report["speed"]
    print(f"{report['model']} {c['task']} {c['shot']}-shot: parameters {p['before']:,} -> {p['after']:,}; "
          f"{a['metric']} unpruned {a['unpruned']:.4f}, pruned {a['pruned']:.4f} (n={a['n']}); "
          f"speed-up x{s['speedup']} -> {out}")


if __name__ == "__main__":
    main()
