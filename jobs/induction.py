#!/usr/bin/env python
"""Induction-head scores for one model (task-agnostic): prefix matching and copying per head.

    python jobs/induction.py model=smollm2-135m induction.n_seeds=100 store.root=store

writes <store.root>/<model.name>/induction/{scores.safetensors, scores.json, *.png}. Settings:
the `induction:` block of conf/config.yaml (conf/induction.yaml composes it).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402

from icl_scale.cli import one_line_errors, quiet_libraries, to_dict  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="induction")
@one_line_errors
def main(cfg) -> None:
    quiet_libraries()
    from icl_scale.induction import run_job

    print(json.dumps(run_job(to_dict(cfg))))


if __name__ == "__main__":
    main()
