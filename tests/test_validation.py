"""No silent wrong results: bad settings and bad data fail before the store is touched, a complete
shard is never clobbered by a run with other settings, and the manifest says what produced it."""

from __future__ import annotations

import json
import shutil

import pytest

from icl_scale.shard import run_shard
from icl_scale.store import Shard, StoreError
from icl_scale.sweep import SweepError, submit
from icl_scale.tasks import TaskDataError
from icl_scale.validation import ConfigError

from conftest import compose, data_dir, get_model, tiny_shard_cfg


def _bytes(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A complete tiny shard; tests copy it rather than recompute it."""
    root = tmp_path_factory.mktemp("store")
    run_shard(tiny_shard_cfg(root), lm=get_model("tiny-opt"))
    return root


@pytest.fixture
def store(complete, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(complete, root)
    return root, Shard(root, "tiny-opt", "copa", 1)


def _data_copy(tmp_path, edit=None, task="copa", split="validation"):
    """A copy of the fixture data with `edit(rows)` applied to one split."""
    d = tmp_path / "data"
    shutil.copytree(data_dir(), d)
    if edit:
        f = d / task / f"{split}.jsonl"
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        f.write_text("".join(json.dumps(r) + "\n" for r in edit(rows)))
    return d


def test_other_settings_never_clobber_a_complete_shard(store):
    root, sh = store
    before = _bytes(sh.path)
    lm = get_model("tiny-opt")
    # Other settings that would fail only after the model loads (the old code had then already
    # rewritten the manifest to running/failed and cleared the checkpoint)...
    with pytest.raises(StoreError, match="complete shard made with other settings.*store.force=true"):
        run_shard(tiny_shard_cfg(root, "copa", 1, "tiny-opt", "knockout.limit=39"), lm=lm)
    # ...and other settings that would run fine.
    with pytest.raises(StoreError, match="complete shard made with other settings"):
        run_shard(tiny_shard_cfg(root, "copa", 1, "tiny-opt", "eval.limit=6"), lm=lm)
    assert _bytes(sh.path) == before
    assert run_shard(tiny_shard_cfg(root), lm=lm)["status"] == "skipped"  # the original command


def test_sweep_refuses_to_replace_a_complete_shard_with_other_settings(store):
    root, sh = store
    before = _bytes(sh.path)
    cfg = compose("model=tiny-opt", f"store.root={root}", f"data.dir={data_dir()}", "sweep.tasks=[copa]",
                  "sweep.shots=[1]", "sweep.induction=false", "knockout.limit=6", "eval.limit=5")
    with pytest.raises(SweepError, match=r"complete shards made with other settings or data \(copa/1shot/seed0\)"):
        submit(cfg)
    assert _bytes(sh.path) == before


def test_changed_data_is_not_taken_for_done_work(store, tmp_path):
    root, sh = store
    lm = get_model("tiny-opt")

    def fix_a_row(rows):
        rows[0]["premise"] = rows[0]["premise"] + " (fixed)"
        return rows

    old_data = sh.manifest()["config"]["data"]
    fixed = _data_copy(tmp_path, fix_a_row)
    with pytest.raises(StoreError, match="other settings or data"):  # was: "already complete", stale results
        run_shard(tiny_shard_cfg(root, "copa", 1, "tiny-opt", f"data.dir={fixed}"), lm=lm)
    res = run_shard(tiny_shard_cfg(root, "copa", 1, "tiny-opt", f"data.dir={fixed}", "store.force=true"), lm=lm)
    assert res["status"] == "complete"
    new_data = sh.manifest()["config"]["data"]
    assert new_data["validation"] != old_data["validation"] and new_data["train"] == old_data["train"]
    assert str(fixed) in sh.manifest()["data_sources"]["validation"]


@pytest.mark.parametrize("label,message", [(5, "label=5 is not one of 0, 1"), ("0", "label='0' is not one of 0, 1")])
def test_bad_labels_are_refused_with_the_row(tmp_path, label, message):
    def bad(rows):
        rows[3]["label"] = label
        return rows

    d = _data_copy(tmp_path, bad)
    with pytest.raises(TaskDataError, match=f"copa validation row 3: {message}.*fix the row"):
        run_shard(tiny_shard_cfg(tmp_path / "s", "copa", 1, "tiny-opt", f"data.dir={d}"), lm=get_model("tiny-opt"))
    sh = Shard(tmp_path / "s", "tiny-opt", "copa", 1)
    assert not sh.file("curves.json").exists()
    assert sh.manifest()["status"] == "failed" and "row 3" in sh.manifest()["error"]  # the reducer names it


@pytest.mark.parametrize("override,message", [
    ("eval.limit=0", "eval.limit=0 must be >= 1"),
    ("eval.limit=abc", "eval.limit='abc' must be a whole number or null"),
    ("shot=1.5", "shot=1.5 must be a whole number"),
    ("shot=true", "shot=True must be a whole number"),
    ("seed=x", "seed='x' must be a whole number"),
    ("importance.batch_size=0", "importance.batch_size=0 must be >= 1"),
    ("eval.split=train", "eval.split=train would evaluate on the documents importance is computed on"),
    ("knockout.split=nope", "knockout.split='nope' is not an option; use one of heldout, paper"),
    ("wandb.mode=sometimes", "wandb.mode='sometimes' is not an option"),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_shard(tiny_shard_cfg(tmp_path, "copa", 1, "tiny-opt", override), lm=get_model("tiny-opt"))
    assert not any(tmp_path.iterdir())


def test_empty_eval_set_is_an_error_not_nan(tmp_path):
    d = _data_copy(tmp_path, lambda rows: [])
    with pytest.raises(ConfigError, match="copa validation has no rows"):
        run_shard(tiny_shard_cfg(tmp_path / "s", "copa", 1, "tiny-opt", f"data.dir={d}"), lm=get_model("tiny-opt"))


@pytest.mark.slow
def test_manifest_records_truncation_and_a_secret_setting_is_refused(tmp_path):
    secret = tiny_shard_cfg(tmp_path, "copa", 5, "tiny-opt", "+wandb.api_key=SECRET123")
    with pytest.raises(ConfigError, match="wandb.api_key looks like a credential"):
        run_shard(secret, lm=None)  # refused before anything is written (tests/test_secrets.py: the whole job)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and b"SECRET123" in p.read_bytes()]
    cfg = tiny_shard_cfg(tmp_path, "copa", 5, "tiny-opt", "model.max_length=48")
    run_shard(cfg, lm=None)  # loads tiny-opt with max_length=48: 5-shot copa contexts do not fit
    m = Shard(tmp_path, "tiny-opt", "copa", 5).manifest()
    assert m["truncated"]["eval"] > 0 and m["truncated"]["importance"] > 0


def test_stale_temp_files_are_removed_by_the_next_run(store):
    root, sh = store
    stale = sh.path / "masks" / ".heads_50.safetensors.abc123.tmp"
    stale.write_bytes(b"half a file")
    run_shard(tiny_shard_cfg(root, "copa", 1, "tiny-opt", "store.force=true"), lm=get_model("tiny-opt"))
    assert not stale.exists()
