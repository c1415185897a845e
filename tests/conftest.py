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
