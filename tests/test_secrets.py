"""No credential on disk: an override whose key names one is refused before anything is written,
and a key in the environment (WANDB_API_KEY) reaches no file of the store, the working directory,
the submitit folder or the W&B runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from icl_scale.validation import ConfigError, check_overrides, is_secret_key

from conftest import REPO, data_dir

SECRET = "zzsecret-5b1e0c7d"
TINY = ["model=tiny-opt", "task=copa", f"data.dir={data_dir()}", "eval.limit=6", "importance.n_examples=4",
        "importance.batch_size=2", "pruning.levels=[0,50]", "pruning.combined_levels=[0,50]", "progress=false"]


@pytest.mark.parametrize("key", ["wandb.api_key", "+wandb.api_key", "++hub.token", "a.b.c.password", "secret",
                                 "hydra.job.env_set.WANDB_API_KEY", "model.hf_token", "db.passwd"])
def test_secret_overrides_are_refused(key):
    with pytest.raises(ConfigError, match="export WANDB_API_KEY or run `wandb login`"):
        check_overrides(["task=copa", f"{key}={SECRET}"])


@pytest.mark.parametrize("key", ["model.doc_start", "plan.tokens_per_doc", "plan.scored_tokens", "model.bos_token",
                                 "pruning.levels", "induction.bos", "sweep.name"])
def test_ordinary_keys_pass(key):
    assert not is_secret_key(key)
    check_overrides(["-m", "--cfg", "job", f"{key}=1"])


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _files_holding(secret: str, *folders: Path) -> list[str]:
    return [str(p) for d in folders for p in d.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_no_secret_on_disk(tmp_path):
    """The key as a (refused) override, for a shard and a --multirun sweep, writes nothing; the key in
    the environment, through a whole local sweep with offline W&B, is in no file written."""
    store, work, submitit_dir = tmp_path / "store", tmp_path / "work", tmp_path / "submitit"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ICL_SCALE_DEBUG"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ICL_SCALE_SUBMITIT_DIR=str(submitit_dir))
    common = [*TINY, f"store.root={store}", "wandb.mode=offline"]
    for extra in ([], ["--multirun", "shot=0,1"]):
        p = _run([str(REPO / "jobs" / "score.py"), *common, *extra, f"+wandb.api_key={SECRET}"], work, env)
        errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
        assert p.returncode == 2 and len(errors) == 1 and "wandb.api_key looks like a credential" in errors[0], p.stderr
        assert not store.exists() and not list(work.iterdir()) and SECRET not in p.stdout + p.stderr
    p = _run([str(REPO / "jobs" / "sweep.py"), *common, "sweep.tasks=[copa]", "sweep.shots=[0]",
              "sweep.induction=false"], work, dict(env, WANDB_API_KEY=SECRET, WANDB_MODE="offline"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert list(store.rglob("run-*.wandb")) and list(submitit_dir.rglob("*.pkl")), "the sweep wrote no W&B run/job"
    assert (store / "tiny-opt" / "copa" / "0shot" / "seed0" / "manifest.json").is_file()
    assert _files_holding(SECRET, store, work, submitit_dir) == []
    assert SECRET not in p.stdout + p.stderr


def test_wandb_does_not_record_the_command_line(tmp_path, monkeypatch):
    """W&B's metadata would hold sys.argv; start_run turns it off (a value typed on the command line
    under any key never reaches the run files)."""
    from icl_scale.tracking import start_run

    monkeypatch.setattr(sys, "argv", ["jobs/score.py", f"wandb.entity={SECRET}"])
    with start_run({"wandb": {"mode": "offline"}}, dir=tmp_path, name="argv") as run:
        run.log_metrics({"x": 1})
    assert list(tmp_path.rglob("run-*.wandb"))
    assert _files_holding(SECRET, tmp_path) == []
