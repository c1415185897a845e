import json
import os
from pathlib import Path

import pytest
import torch

from icl_scale.models import load_model
from icl_scale.tasks.data import is_unset

REPO = Path(__file__).resolve().parents[1]
TINY = ["tiny-opt", "tiny-llama", "tiny-gpt2", "tiny-gpt-neox"]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Under pytest-xdist (`make test` runs a worker per core) each worker gets one thread.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
if _WORKERS > 1:  # and so do the jobs and ranks its tests start
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


FIXTURES = REPO / "tests" / "data" / "fixtures"  # small verbatim slices of every task (tests/data/make_fixtures.py)
_ROWS = json.loads((FIXTURES / "rows.json").read_text(encoding="utf-8"))["tasks"]
MIRROR_SKIP = "needs the full task data: set ICL_SCALE_DATA_DIR to a mirror <dir>/<task>/<split>.jsonl"


def data_dir() -> Path:
    """The task data every test uses: the in-repo fixtures (always a real folder). Only tests marked
    `@pytest.mark.mirror` see the full mirror, through the `full_mirror` fixture."""
    return FIXTURES


def fixture_rows(task: str, split: str) -> list[int]:
    """The mirror row number of each fixture row of <task>/<split>.jsonl (tests/data/fixtures/rows.json)."""
    return [i for a, b in _ROWS[task][split]["ranges"] for i in range(a, b)]


def fixture_row(task: str, split: str, mirror_row: int) -> int:
    """The fixture row holding mirror row `mirror_row` (golden files name mirror rows)."""
    rows = fixture_rows(task, split)
    if mirror_row not in rows:
        raise LookupError(f"mirror row {mirror_row} of {task} {split} is not in the fixtures: "
                          f"add it in tests/data/make_fixtures.py and rerun it")
    return rows.index(mirror_row)


def mirror_size(task: str, split: str) -> int:
    """Rows of the full split in the mirror the fixtures were cut from."""
    return _ROWS[task][split]["mirror_rows"]


# What makes a test slow by nature: the real model, torchrun ranks, the local Slurm cluster.
HEAVY_FIXTURES = {"smollm", "cluster", "slurm_store"}
HEAVY_CODE = ("TORCHRUN", "ranks=2", "ranks=3")


def _unmarked_heavy(items) -> list[str]:
    """Tests that load the real model, start torchrun ranks or use the Slurm cluster without a
    `slow` or `slurm` mark: they would make `make test-fast` slow."""
    import inspect

    out = []
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("slurm"):
            continue
        fn = getattr(item, "function", None)
        code = inspect.getsource(fn) if fn else ""
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) or any(c in code for c in HEAVY_CODE):
            out.append(item.nodeid)
    return out


def pytest_collection_modifyitems(config, items):
    """Every heavy test is marked (honest tiers); without a mirror the `mirror` tests are deselected
    (they are the full-size versions of fixture tests that run anyway); the header and the summary
    say how many."""
    unmarked = _unmarked_heavy(items)
    if unmarked:
        raise pytest.UsageError(f"mark these tests slow (real model, torchrun or Slurm): {unmarked}")
    if not is_unset(os.environ.get("ICL_SCALE_DATA_DIR")):
        return
    deselected = [item for item in items if item.get_closest_marker("mirror")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("mirror")]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """One Slurm cluster: its tests take turns across pytest-xdist workers (a file lock held from the
    test's setup, module fixtures included, to its teardown)."""
    if item.get_closest_marker("slurm") is None:
        yield
        return
    import tempfile

    from filelock import FileLock

    with FileLock(str(Path(tempfile.gettempdir()) / "icl_scale-slurm-tests.lock")):
        yield


def pytest_report_header(config):
    if is_unset(os.environ.get("ICL_SCALE_DATA_DIR")):
        return f"task data: tests/data/fixtures; `mirror` tests deselected ({MIRROR_SKIP})"
    return f"task data: tests/data/fixtures; `mirror` tests on ICL_SCALE_DATA_DIR={os.environ['ICL_SCALE_DATA_DIR']}"


@pytest.fixture(scope="session")
def task_data() -> Path:
    """The fixtures folder (see data_dir)."""
    return data_dir()


@pytest.fixture(scope="session")
def mirror(task_data) -> Path:
    """Old name of `task_data` (the fixtures, not a full mirror), kept for the tests that use it."""
    return task_data


@pytest.fixture
def full_mirror(request) -> Path:
    """$ICL_SCALE_DATA_DIR, the full mirror; only for tests marked `@pytest.mark.mirror`."""
    if request.node.get_closest_marker("mirror") is None:
        pytest.fail("full_mirror is only for tests marked @pytest.mark.mirror")
    env = os.environ.get("ICL_SCALE_DATA_DIR")
    if is_unset(env):
        pytest.skip(MIRROR_SKIP)
    p = Path(env)
    if not p.is_dir():
        pytest.fail(f"ICL_SCALE_DATA_DIR={env} is not a folder")
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
    from icl_scale.config import compose as compose_config

    return compose_config("config", overrides)


def tiny_shard_cfg(root, task="copa", shot=1, model="tiny-opt", *extra):
    d = data_dir()
    return compose(f"model={model}", f"task={task}", f"shot={shot}", f"store.root={root}",
                   f"data.dir={d}", "eval.limit=12", "importance.n_examples=8", "importance.batch_size=3",
                   "knockout.limit=6", "pruning.levels=[0,50]", "pruning.combined_levels=[0,50]",
                   "progress=false", "importance.checkpoint_every=1", *extra,
                   *([] if any(x.startswith("wandb.mode=") for x in extra) else ["wandb.mode=disabled"]))


def assert_same_store(a: Path, b: Path) -> None:
    """Two shard folders hold the same results up to float summation order: importance within 1e-5
    relative, knock-out drops and every curve accuracy exactly, per-doc log-likelihoods within 1e-4
    nats with the same predictions (multi-rank runs against one process)."""
    import json

    import torch

    from icl_scale.store import read_tensors

    ia, ib = read_tensors(a / "importance.safetensors"), read_tensors(b / "importance.safetensors")
    assert set(ia) == set(ib)
    for k in ("heads", "ffn"):  # gradient sums: equal up to summation order
        assert float((ia[k] - ib[k]).abs().max()) <= 1e-5 * float(ia[k].abs().max()), k
    assert torch.equal(ia["ffn_knockout"], ib["ffn_knockout"])  # accuracy drops: exactly
    ca, cb = (json.loads((d / "curves.json").read_text()) for d in (a, b))
    for kind in ("heads", "ffn", "combined"):
        assert [p["value"] for p in ca[kind]] == [p["value"] for p in cb[kind]], kind
    assert ca["knockout_baseline"] == cb["knockout_baseline"]
    samples = sorted(p.name for p in (a / "samples").iterdir())
    assert samples == sorted(p.name for p in (b / "samples").iterdir()) and samples
    for name in samples:
        ra, rb = ([json.loads(x) for x in (d / "samples" / name).read_text().splitlines()] for d in (a, b))
        assert [r["pred"] for r in ra] == [r["pred"] for r in rb], name
        diff = max(abs(x - y) for r, s in zip(ra, rb) for x, y in zip(r["logprobs"], s["logprobs"]))
        assert diff <= 1e-4, (name, diff)


def read_back(f: Path) -> None:
    """Parse one store file by its kind (JSON, JSON lines, safetensors): a partial file raises."""
    import json

    from safetensors.torch import load_file

    if f.suffix == ".json":
        json.loads(f.read_text())
    elif f.suffix == ".jsonl":
        [json.loads(line) for line in f.read_text().splitlines()]
    elif f.suffix == ".safetensors":
        load_file(str(f))
