"""Partitioned loading under ZeRO-3 (icl_scale/models/partitioned.py) on 2 CPU ranks: a random OPT
saved in several safetensors shards, loaded by `load_model` with model.deepspeed.enabled, lands in each
rank's partition bit for bit (float32) and in the target dtype (bfloat16); the whole shard's importance
equals a 1-process plain load's. The host-memory measurement is bench/partitioned_load.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from test_data_parallel import ENV, TORCHRUN, score, shard_dir

from conftest import REPO, assert_same_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 3-layer random OPT (SmolLM2's tokenizer) in ~100 KB safetensors shards, as hub checkpoints are
    sharded; float32, so that a bfloat16 load has to convert."""
    from transformers import AutoModelForCausalLM

    from icl_scale.models.loading import load_tokenizer, preset, random_config

    out = tmp_path_factory.mktemp("opt_sharded")
    tok = load_tokenizer(preset("smollm2-135m"))
    torch.manual_seed(0)
    cfg = random_config("opt", len(tok), hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=96,
                        word_embed_proj_dim=64)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out, max_shard_size="100KB")
    tok.save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    return out


RANK = """
import json, sys, torch, torch.distributed as td
from safetensors import safe_open
from pathlib import Path
from icl_scale.models.loading import load_model
from icl_scale.models.zero import gathered

path, dtype = Path(sys.argv[1]), sys.argv[2]
import deepspeed.comm as dscomm  # count what zero.Init broadcasts while the model is built (nothing, now)
real, sent = dscomm.broadcast, []


def counted(tensor, *a, **k):
    sent.append(tensor.numel() * tensor.element_size())
    return real(tensor, *a, **k)


dscomm.broadcast = counted
lm = load_model({"name": "sharded", "source": "local", "path": str(path), "dtype": dtype, "doc_start": "none",
                 "deepspeed": {"enabled": True, "offload_param": "none"}})
index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
out = {"rank": td.get_rank(), "checked": 0, "differ": [], "dtypes": set(), "partition_numel": 0, "numel": 0}
for name, p in lm.model.named_parameters():
    out["partition_numel"] += p.ds_tensor.numel()
    out["numel"] += p.ds_numel
    out["dtypes"].add(str(p.ds_tensor.dtype))
    with gathered([p]):
        with safe_open(str(path / index[name]), "pt") as f:
            want = f.get_tensor(name).to(p.dtype)
        out["checked"] += 1
        if not torch.equal(p.data, want):
            out["differ"].append(name)
out["broadcast_bytes"] = sum(sent)
out["model_bytes"] = sum(p.ds_numel * p.ds_tensor.element_size() for p in lm.model.parameters())
out["tied"] = lm.model.lm_head.weight is lm.model.model.decoder.embed_tokens.weight
out["dtypes"] = sorted(out["dtypes"])
(Path(sys.argv[3]) / f"rank{out['rank']}.json").write_text(json.dumps(out))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_rank_holds_its_partition_of_the_checkpoint(checkpoint, tmp_path, dtype):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    p = subprocess.run([*TORCHRUN, str(script), str(checkpoint), dtype, str(tmp_path)], cwd=REPO,
                       env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    res = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in res) == [0, 1]
    n_tensors = len(json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"])
    for r in res:
        assert r["checked"] == n_tensors and r["differ"] == [], r
        assert r["dtypes"] == [f"torch.{dtype}"] and r["tied"]
        # no parameter is broadcast from rank 0 while the model is built (the checkpoint fills every
        # partition; a broadcast's receive copy was rank 1's load transient)
        assert r["broadcast_bytes"] < 0.01 * r["model_bytes"], r["broadcast_bytes"]
        # a rank keeps half of every parameter (rounded up), never the whole model
        assert r["numel"] / 2 <= r["partition_numel"] < r["numel"] / 2 + 100


def test_shard_under_zero3_from_a_sharded_checkpoint_equals_one_plain_process(checkpoint, tmp_path):
    """The whole shard (importance, knock-out, curves) from partitioned loading on 2 ranks, against one
    process that loads the checkpoint with from_pretrained."""
    model = [f"model.path={checkpoint}", "model.name=sharded", "model.doc_start=none", "model.dtype=float32"]
    score(tmp_path / "one", "local", *model)
    out = score(tmp_path / "two", "local", *model, "model.deepspeed.enabled=true", ranks=2)
    assert "partitioned loading" in out  # the log line of models/partitioned.py: not the whole-model path
    assert_same_store(shard_dir(tmp_path / "one", "sharded"), shard_dir(tmp_path / "two", "sharded"))
    # The manifest's parameter count (the cross-model figures' x) is the whole model's under ZeRO-3 too.
    counts = [json.loads((shard_dir(tmp_path / run, "sharded") / "manifest.json").read_text())["parameters"]
              for run in ("one", "two")]
    assert counts[0] == counts[1] > 0
