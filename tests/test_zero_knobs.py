"""The stage-3 inference knobs (model.deepspeed.max_live_parameters, prefetch_bucket_size,
persistence_threshold): auto resolved from memory and the model, explicit values kept, every value
bounded so that the model is never kept whole by default (models/zero.py::stage3_knobs)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from icl_scale.models import zero


class Blocks(nn.Module):
    """Four blocks of 10k parameters (two tensors of 5k each) and a 5k embedding: 45k parameters."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=50)
        self.embed = nn.Embedding(100, 50)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(100, 50, bias=False), nn.Linear(50, 100, bias=False))
                                    for _ in range(4))


def knobs(monkeypatch, free_bytes: int, **ds):
    monkeypatch.setattr(zero, "least_free_memory", lambda: free_bytes)
    spec = {"max_live_parameters": "auto", "prefetch_bucket_size": "auto", "persistence_threshold": "auto", **ds}
    return zero.stage3_knobs(Blocks(), spec, torch.float32)


def test_auto_knobs_come_from_free_memory_within_two_blocks_and_the_model(monkeypatch):
    assert zero.model_numbers(Blocks()) == (45_000, 10_000, 5_000)
    k = knobs(monkeypatch, 4 * 4 * 30_000)  # a quarter of free memory holds 30k float32 parameters
    # DeepSpeed's budget is what may be whole beside the block it gathers on demand, less one tensor
    # its prefetch may overshoot by: 30k - 10k - 5k
    assert k == {"stage3_max_live_parameters": 15_000, "stage3_max_reuse_distance": 15_000,
                 "stage3_prefetch_bucket_size": 10_000, "stage3_param_persistence_threshold": 50}
    assert knobs(monkeypatch, 10)["stage3_max_live_parameters"] == 5_000  # at least two blocks in all
    assert knobs(monkeypatch, 10**12)["stage3_max_live_parameters"] == 30_000  # at most the model


def test_explicit_knobs_are_kept_and_the_prefetch_stays_within_the_budget(monkeypatch, caplog):
    k = knobs(monkeypatch, 10**12, max_live_parameters=20_000, persistence_threshold=0)
    assert k["stage3_max_live_parameters"] == k["stage3_max_reuse_distance"] == 5_000
    assert k["stage3_prefetch_bucket_size"] == 5_000 and k["stage3_param_persistence_threshold"] == 0
    assert knobs(monkeypatch, 10**12, prefetch_bucket_size=123)["stage3_prefetch_bucket_size"] == 123
    small = knobs(monkeypatch, 10**12, max_live_parameters=12_000)  # under a block and a tensor: nothing beside
    assert small["stage3_max_live_parameters"] == small["stage3_prefetch_bucket_size"] == 0
    # ... which is allowed but stops prefetching: a warning names the field and the least useful value
    assert "max_live_parameters=12000 holds only the module running" in caplog.text and "25000 or more" in caplog.text
    caplog.clear()
    knobs(monkeypatch, 10**12, max_live_parameters=25_000)
    assert "max_live_parameters" not in caplog.text
    cfg = zero.ds_config(torch.float32, "none", k)["zero_optimization"]
    assert cfg["stage"] == 3 and cfg["stage3_max_live_parameters"] == 5_000
