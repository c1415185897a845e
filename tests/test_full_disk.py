"""A full disk ends a shard with one `error:` line and leaves every complete file intact; the rerun
resumes and finishes. The shard job runs as a subprocess whose `os.fsync` fails with ENOSPC after
its first N calls (what a full filesystem does to an atomic write: the temporary file is removed,
the file it was to replace stays as it was)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, data_dir, read_back

ARGS = ["model=tiny-opt", "task=copa", "shot=1", f"data.dir={data_dir()}", "eval.limit=6", "importance.n_examples=4",
        "importance.batch_size=2", "pruning.levels=[0,50]", "pruning.combined_levels=[0,50]", "progress=false",
        "wandb.mode=disabled"]

# Runs jobs/score.py with os.fsync failing (ENOSPC) after FAIL_AFTER successful calls.
RUNNER = """
import errno, os, runpy, sys
real, calls, limit = os.fsync, [0], int(os.environ["FAIL_AFTER"])
def fsync(fd):
    calls[0] += 1
    if calls[0] > limit:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd)
os.fsync = fsync
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _score(root: Path, fail_after: int | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("ICL_SCALE_DEBUG", None)
    cmd = [sys.executable, str(REPO / "jobs" / "score.py"), *ARGS, f"store.root={root}"]
    if fail_after is not None:
        env["FAIL_AFTER"] = str(fail_after)
        cmd = [sys.executable, "-c", RUNNER, *cmd[1:]]
    return subprocess.run(cmd, env=env, cwd=root.parent, capture_output=True, text=True, timeout=600)


def _all_read_back(folder: Path) -> list[str]:
    """Every file under the shard folder parses (JSON, JSON lines, safetensors); no temporary file is left."""
    names = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        assert not f.name.endswith(".tmp"), f"a partial file was left: {f}"
        read_back(f)
        names.append(str(f.relative_to(folder)))
    return names


@pytest.mark.slow
@pytest.mark.parametrize("fail_after", [3, 12])  # in the importance stage; later, among the curves
def test_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, fail_after):
    root = tmp_path / "store"
    p = _score(root, fail_after)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "failed (No space left on device): free space there" in errors[0]
    folder = root / "tiny-opt" / "copa" / "1shot" / "seed0"
    before = _all_read_back(folder)
    assert "curves.json" not in before
    p = _score(root, None)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((folder / "manifest.json").read_text())["status"] == "complete"
    assert {"curves.json", "importance.safetensors", "manifest.json"} <= set(_all_read_back(folder))
