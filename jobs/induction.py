#!/usr/bin/env python
"""Induction-head scores for one model (task-agnostic): prefix matching and copying per head.

    python jobs/induction.py model=smollm2-135m induction.n_seeds=100 store.root=store

writes <store.root>/<model.name>/induction/{scores.safetensors, scores.json, *.png}. Settings:
the `induction:` block of the config (icl_scale/schema.py InductionConfig; conf/induction.yaml composes it).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icl_scale.cli import hydra_job  # noqa: E402


@hydra_job("induction")
def main(c: dict) -> None:
    from icl_scale.induction import run_job

    print(json.dumps(run_job(c)))


if __name__ == "__main__":
    main()
