"""The one configuration schema (icl_scale/schema.py): every key the jobs read is declared there,
no code restates a default, the config hash covers exactly the settings marked `hashed`, and
`--help` lists every setting."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from icl_scale import schema
from icl_scale.config import compose as compose_config
from icl_scale.settings import ConfigError, check_value
from icl_scale.shard import ShardRun, run_shard
from icl_scale.transfer import run_transfer

from conftest import REPO, get_model, tiny_shard_cfg


class UndeclaredRead(AssertionError):
    pass


class Strict(dict):
    """A config section that fails on a key the schema does not declare, and on `.get(key, default)`
    (the schema holds the default: code reads cfg[key])."""

    def __init__(self, d: dict, prefix: str = ""):
        super().__init__({k: wrap(v, f"{prefix}{k}") for k, v in d.items()})
        self.prefix = prefix

    def _check(self, key):
        full = f"{self.prefix}{key}"
        if self.prefix.startswith(("model.config.", "launcher.additional.")):
            return  # free-form mappings
        if not schema.declared(full, schema.ExportConfig) and not schema.declared(full, schema.PlanConfig):
            raise UndeclaredRead(f"{full} is read but the schema does not declare it")

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def get(self, key, *default):
        self._check(key)
        if default and default[0] is not None:
            raise UndeclaredRead(f"{self.prefix}{key} read with a default ({default[0]!r}) restated in code")
        return super().get(key)

    def __deepcopy__(self, memo):
        return Strict(copy.deepcopy(dict(self), memo), self.prefix)


def wrap(v, key):
    return Strict(v, key + ".") if isinstance(v, dict) else v


def test_the_strict_wrapper_catches_undeclared_reads_and_restated_defaults():
    cfg = Strict(compose_config("config", ["model=tiny-opt"]))
    assert cfg["eval"]["batch_size"] == 8
    with pytest.raises(UndeclaredRead, match="eval.batch_sise is read"):
        cfg["eval"]["batch_sise"]
    with pytest.raises(UndeclaredRead, match="restated"):
        cfg["eval"].get("batch_size", 8)


@pytest.mark.slow
def test_a_shard_and_a_transfer_run_read_only_declared_settings(tmp_path):
    """A whole shard (every stage, with the comparison rankings) and a transfer run on strict configs."""
    lm = get_model("tiny-opt")
    for task in ("copa", "rte"):
        cfg = tiny_shard_cfg(tmp_path, task, 1, "tiny-opt", "pruning.compare=[random]", "pruning.random_seeds=1")
        assert run_shard(Strict(cfg), lm=lm)["status"] == "complete"
    cfg = tiny_shard_cfg(tmp_path, "rte", 1, "tiny-opt", "transfer.sources=[copa,rte]")
    assert run_transfer(Strict(cfg), lm=lm)["status"] == "complete"


def test_every_yaml_key_is_declared_and_defaults_live_in_the_schema():
    """Composition refuses a key the schema lacks; and the shared YAML restates no schema default."""
    with pytest.raises(Exception, match="batch_sise"):
        compose_config("config", ["eval.batch_sise=3"])
    cfg = compose_config("config")
    from icl_scale.settings import defaults as schema_defaults

    defaults = schema_defaults(schema.Config)
    assert cfg["eval"]["batch_size"] == defaults["eval.batch_size"]
    base = (REPO / "conf" / "base.yaml").read_text()
    assert "batch_size" not in base and "n_examples" not in base


def _hash(*overrides):
    run = ShardRun(tiny_shard_cfg("/tmp/unused-store", "copa", 1, "tiny-opt", *overrides))
    return run.hash


@pytest.mark.parametrize("override, changes", [
    ("eval.batch_size=3", False), ("importance.batch_size=2", False), ("eval.masks_per_pass=2", False),
    ("progress=true", False), ("eval.physical_below=null", False),
    ("importance.n_examples=7", True), ("pruning.levels=[0,40]", True), ("eval.limit=11", True),
    ("model.max_length=200", True), ("pruning.count=round", True), ("knockout.split=heldout", True),
])
def test_the_config_hash_covers_exactly_the_hashed_settings(override, changes):
    key = override.split("=")[0]
    assert schema.specs()[key].hashed is changes
    assert (_hash(override) != _hash()) is changes


def test_help_lists_every_setting_with_its_default():
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "score.py"), "--help"], capture_output=True,
                         text=True, timeout=120).stdout
    for key in schema.specs():
        assert f"  {key}=" in out, key
    assert "  eval.batch_size=8\n" in out and "  knockout.split=paper [heldout | paper]" in out


def test_a_value_that_does_not_fit_its_declaration_is_one_line():
    spec = schema.specs()["eval.batch_size"]
    with pytest.raises(ConfigError, match=r"^eval.batch_size='x' must be a whole number, e.g. "):
        check_value("eval.batch_size", "x", spec)
    with pytest.raises(ConfigError, match=r"^eval.batch_size=0 must be >= 1$"):
        check_value("eval.batch_size", 0, spec)
    check_value("eval.masks_per_pass", "auto", schema.specs()["eval.masks_per_pass"])
