"""Induction-head scores for one model (task-agnostic): prefix matching and copying per head.

    python jobs/induction.py model=smollm2-135m induction.n_seeds=100 store.root=store

writes <store.root>/<model.name>/induction/{scores.safetensors, scores.json, *.png}.
"""

import json
import logging

import hydra
from omegaconf import DictConfig

log = logging.getLogger("induction")


@hydra.main(version_base=None, config_path="../conf", config_name="induction")
def main(cfg: DictConfig) -> None:
    from icl_scale.induction import run_job

    paths = run_job(cfg)
    log.info("wrote %s", json.dumps(paths))
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
