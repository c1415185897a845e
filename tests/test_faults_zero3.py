"""Faults at two ranks under ZeRO-3: one rank of a 2-rank job (`torchrun`, DeepSpeed's CPU
accelerator) is SIGKILLed at 8 points, at stage boundaries and in the middle of each stage; every
file the killed job left reads back (none partial), and the rerun ("requeued") job finishes with
every result file byte-identical to an uninterrupted 2-rank run's."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from test_data_parallel import ENV, score, shard_dir

from conftest import read_back
from fault_injection import hold_env

ZERO = ["model.deepspeed.enabled=true", "eval.batch_size=4"]  # 2 knock-out batches per rank (batch 2 hangs: issue 25)
# (hold point, rank killed): after each stage, and inside importance, knock-out, the curves and the grid
POINTS = [("importance@4", 1), ("importance", 0), ("knockout@1", 1), ("knockout", 0), ("curves@1", 1),
          ("curves@3", 0), ("combined@2", 1), ("curves", 0)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    assert score(root, "tiny-opt", *ZERO, ranks=2).count("done in") == 2
    return shard_dir(root, "tiny-opt")


def _results(folder: Path) -> dict[str, object]:
    """Every result file's bytes (the manifest's timings differ between runs: compared apart); a
    safetensors file as its tensors' bytes and its metadata (whose key order safetensors does not fix)."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == "manifest.json":
            continue
        if p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                tensors = {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
                out[str(p.relative_to(folder))] = (f.metadata(), tensors)
        else:
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def _none_partial(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and not f.name.endswith(".tmp"):  # a killed writer's temporary files: removed on rerun
            read_back(f)


def _kill_rank(job, rank: int) -> None:
    import psutil  # a DeepSpeed dependency

    ranks = [q for q in psutil.Process(job.pid).children(recursive=True) if q.environ().get("RANK") == str(rank)]
    assert len(ranks) == 1, ranks
    ranks[0].send_signal(signal.SIGKILL)
    try:
        job.communicate(timeout=180)  # torchrun ends the other rank and exits
    except Exception:  # noqa: BLE001 - never leave a job behind
        from test_data_parallel import kill_job

        kill_job(job)
        raise
    assert job.returncode != 0


@pytest.mark.slow
@pytest.mark.parametrize("point,rank", POINTS, ids=[f"{p}-rank{r}" for p, r in POINTS])
def test_one_rank_killed_resumes_bit_identical(uninterrupted, tmp_path, point, rank):
    hold = tmp_path / "hold"
    hold.touch()
    job = score(tmp_path, "tiny-opt", *ZERO, ranks=2, env=hold_env(point, hold, ENV), wait=False)
    t0 = time.time()
    while not Path(f"{hold}.held").exists():
        assert job.poll() is None and time.time() - t0 < 600, job.communicate()[0][-3000:]
        time.sleep(0.2)
    _kill_rank(job, rank)
    hold.unlink()
    folder = shard_dir(tmp_path, "tiny-opt")
    _none_partial(folder)
    assert json.loads((folder / "manifest.json").read_text())["status"] != "complete"
    assert score(tmp_path, "tiny-opt", *ZERO, ranks=2).count("done in") == 2
    assert _results(folder) == _results(uninterrupted)
    manifest, reference = (json.loads((d / "manifest.json").read_text()) for d in (folder, uninterrupted))
    assert manifest["status"] == "complete" and manifest["config_hash"] == reference["config_hash"]
    assert manifest["baseline"] == reference["baseline"]
