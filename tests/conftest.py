import os
from pathlib import Path

import pytest
import torch

from icl_scale.models import load_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["tiny-opt", "tiny-llama", "tiny-gpt2", "tiny-gpt-neox"]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def data_dir() -> Path | None:
    """The local task mirror: $ICL_SCALE_DATA_DIR, else ../shared/data beside the repo."""
    env = os.environ.get("ICL_SCALE_DATA_DIR")
    p = Path(env) if env else REPO.parent / "shared" / "data"
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def mirror() -> Path:
    p = data_dir()
    if p is None:
        pytest.skip("no task data mirror: set ICL_SCALE_DATA_DIR or place it at ../shared/data")
    return p


_cache: dict = {}


def get_model(name: str):
    if name not in _cache:
        _cache[name] = load_model(name)
    return _cache[name]


@pytest.fixture(scope="session")
def smollm():
    return get_model("smollm2-135m")


def compose(*overrides: str) -> dict:
    """The resolved job config, exactly as jobs/*.py would see it with these overrides."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def tiny_shard_cfg(root, task="copa", shot=1, model="tiny-opt", *extra):
    d = data_dir()
    return compose(f"model={model}", f"task={task}", f"shot={shot}", f"store.root={root}",
                   f"data.dir={d}", "eval.limit=12", "importance.n_examples=8", "importance.batch_size=3",
                   "knockout.limit=6", "pruning.levels=[0,50]", "pruning.combined_levels=[0,50]",
                   "progress=false", "importance.checkpoint_every=1", *extra)
