"""A shard's live W&B run (icl_scale/live.py), read back from its offline files: progress and curve
points logged during the stages, a failure with its reason, and one run id per shard after a
requeue (the resumed attempt and the reducer's table continue the same run)."""

import json

import pytest

from icl_scale.live import shard_run_id
from icl_scale.reduce import run_reduce
from icl_scale.shard import run_shard
from icl_scale.store import Shard

from conftest import get_model, tiny_shard_cfg
from fault_injection import crash_after
from wandb_offline import find_offline_runs, read_offline_run


def test_live_run_logs_while_it_works_and_keeps_one_id_after_a_requeue(tmp_path, monkeypatch):
    cfg = tiny_shard_cfg(tmp_path, "copa", 1, "tiny-opt", "wandb.mode=offline", f"wandb.dir={tmp_path}",
                         "sweep.name=live")
    crash_after(monkeypatch, "knockout", only_fresh=True)  # preempted after the knock-out stage
    with pytest.raises(RuntimeError, match="injected failure"):
        run_shard(cfg, lm=get_model("tiny-opt"))
    first = [read_offline_run(d) for d in find_offline_runs(tmp_path)]
    assert len(first) == 1
    r1 = first[0]
    assert r1["exit_code"] != 0 and r1["summary"]["status"] == "failed"
    assert r1["summary"]["error"] == "RuntimeError: injected failure after stage knockout"
    stages = [row["stage"] for row in r1["history"] if "stage" in row]
    assert stages[0] == "importance" and "knockout" in stages and "curves" not in stages
    imp = [row for row in r1["history"] if "importance/done" in row]
    assert [row["importance/done"] for row in imp] == [3, 6, 8]  # every step as it finished (batch 3)
    assert all(row["importance/total"] == 8 and row["peak_memory_gb"] > 0 for row in imp)
    assert any("importance/tokens_per_s" in row for row in imp)
    ko = [row for row in r1["history"] if "knockout/value" in row]
    assert [row["knockout/level"] for row in ko] == [-1, 0, 1]  # unpruned, then each layer's FFN
    assert r1["group"] == "live" and r1["job_type"] == "shard" and r1["name"] == "copa-1shot-seed0"

    res = run_shard(cfg, lm=get_model("tiny-opt"))  # the requeued job resumes
    sh = Shard(tmp_path, "tiny-opt", "copa", 1)
    runs = [read_offline_run(d) for d in find_offline_runs(tmp_path)]
    assert len(runs) == 2 and {r["run_id"] for r in runs} == {shard_run_id(sh.path, res["config_hash"])}
    r2 = next(r for r in runs if r["wandb_file"] != r1["wandb_file"])
    assert r2["exit_code"] == 0 and r2["summary"]["status"] == "complete" and r2["summary"]["resumed"]
    curves = json.loads(sh.file("curves.json").read_text())
    logged = [(row["curve_heads/level"], row["curve_heads/value"]) for row in r2["history"]
              if "curve_heads/value" in row]
    assert logged == [(p["level"], p["value"]) for p in curves["heads"]]
    assert any("grid/value" in row for row in r2["history"])

    red = run_reduce({**cfg, "sweep": {**cfg["sweep"], "tasks": ["copa"], "shots": [1]}})
    runs = [read_offline_run(d) for d in find_offline_runs(tmp_path)]
    shard_ids = {r["run_id"] for r in runs if r["job_type"] == "shard"}
    assert shard_ids == {shard_run_id(sh.path, res["config_hash"])}  # the reducer continued the same run
    reducer = next(r for r in runs if r["job_type"] == "reduce")
    assert [row[3] for row in reducer["tables"]["shard_runs"]["data"]] == list(shard_ids)
    assert red["n_complete"] == 1
    # "Prunable" in W&B carries its doc count and paired interval, or says the sample cannot tell.
    summ = reducer["tables"]["summary"]
    (row,) = summ["data"]
    text = row[summ["columns"].index("heads_prunable")]
    assert text == red["summary"][0]["heads_prunable"]
    assert row[summ["columns"].index("heads_prunable_n")] == red["summary"][0]["n_eval"]
    assert text.startswith(f"too few docs to tell (n={red['summary'][0]['n_eval']}: one doc is")
    claims = reducer["tables"]["claims"]
    assert [r[claims["columns"].index("claim")] for r in claims["data"]] == [c["claim"] for c in red["claims"]]
