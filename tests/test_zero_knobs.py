"""The stage-3 inference knobs (model.deepspeed.max_live_parameters, prefetch_bucket_size,
persistence_threshold): auto resolved from memory and the model, explicit values kept, every value
bounded so that the model is never kept whole by default (models/zero.py::stage3_knobs)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from icl_scale.models import zero


class Blocks(nn.Module):
    """Four blocks of 10k parameters and a 5k embedding: 45k parameters."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=50)
        self.embed = nn.Embedding(100, 50)
        self.layers = nn.ModuleList(nn.Linear(100, 100, bias=False) for _ in range(4))


def knobs(monkeypatch, free_bytes: int, **ds):
    monkeypatch.setattr(zero, "least_free_memory", lambda: free_bytes)
    spec = {"max_live_parameters": "auto", "prefetch_bucket_size": "auto", "persistence_threshold": "auto", **ds}
    return zero.stage3_knobs(Blocks(), spec, torch.float32)


def test_auto_knobs_come_from_free_memory_within_two_blocks_and_the_model(monkeypatch):
    assert zero.model_numbers(Blocks()) == (45_000, 10_000)
    k = knobs(monkeypatch, 4 * 4 * 30_000)  # a quarter of free memory holds 30k float32 parameters
    assert k == {"stage3_max_live_parameters": 30_000, "stage3_max_reuse_distance": 30_000,
                 "stage3_prefetch_bucket_size": 10_000, "stage3_param_persistence_threshold": 50}
    assert knobs(monkeypatch, 10)["stage3_max_live_parameters"] == 20_000  # at least two blocks
    assert knobs(monkeypatch, 10**12)["stage3_max_live_parameters"] == 45_000  # at most the model


def test_explicit_knobs_are_kept_and_the_prefetch_stays_within_the_budget(monkeypatch):
    k = knobs(monkeypatch, 10**12, max_live_parameters=5_000, persistence_threshold=0)
    assert k["stage3_max_live_parameters"] == k["stage3_max_reuse_distance"] == 5_000
    assert k["stage3_prefetch_bucket_size"] == 5_000 and k["stage3_param_persistence_threshold"] == 0
    assert knobs(monkeypatch, 10**12, prefetch_bucket_size=123)["stage3_prefetch_bucket_size"] == 123
    cfg = zero.ds_config(torch.float32, "none", k)["zero_optimization"]
    assert cfg["stage"] == 3 and cfg["stage3_max_live_parameters"] == 5_000
