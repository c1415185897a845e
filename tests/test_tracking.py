"""icl_scale.tracking: a real offline wandb run, read back from its .wandb file (tests/wandb_offline.py);
misconfiguration errors; no credential ever reaches the run files. No network: WANDB_MODE=offline."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from icl_scale import tracking
from icl_scale.tracking import TrackingError, resolve_mode, sanitize_config, start_run

from wandb_offline import find_offline_runs, read_offline_run

FAKE_KEY = "zzfake0key0zzfake0key0zzfake0key0zzfake0"


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    # No ~/.netrc from the machine running the tests.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    (tmp_path / "home").mkdir()


def _png(path):
    """A tiny valid PNG without extra dependencies."""
    import zlib

    w, h = 4, 3
    raw = b"".join(b"\x00" + b"".join(bytes([(x * 60) % 256, (y * 80) % 256, 128]) for x in range(w)) for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def test_offline_run_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # present, but offline: must never be written anywhere
    cfg = {
        "model": {"name": "smollm2-135m", "bos_token": "<|endoftext|>"},
        "task": "sst2",
        "shot": 4,
        "wandb": {"mode": "offline", "project": "icl_test", "api_key": "zzcfgsecret"},
        "hub": {"hf_token": "zzhfsecret"},
    }
    image = _png(tmp_path / "curve.png")
    run = start_run(cfg, name="score-sst2", group="g1", job_type="score", dir=tmp_path / "out")
    assert run.mode == "offline"
    for step in range(3):
        run.log_metrics({"acc": 0.5 + step / 10, "loss": 1.0 / (step + 1)})
    rows = [[0, 1, 0.5], [3, 2, 0.25], [29, 8, 0.0]]
    run.log_table("ranking", ["layer", "head", "importance"], rows)
    run.log_image("pruning_curve", image)
    run.log_summary({"best_acc": 0.7})
    run_dir = run.run_dir
    run.finish()

    assert run_dir is not None and run_dir.name.startswith("offline-run-")
    info = read_offline_run(run_dir)
    assert info["name"] == "score-sst2" and info["group"] == "g1" and info["job_type"] == "score"
    assert info["project"] == "icl_test"
    assert info["run_id"] == run.id
    assert info["exit_code"] == 0

    # Config: everything but credential-like keys.
    assert info["config"]["model"] == {"name": "smollm2-135m", "bos_token": "<|endoftext|>"}
    assert info["config"]["shot"] == 4 and info["config"]["task"] == "sst2"
    assert "api_key" not in info["config"]["wandb"] and info["config"]["wandb"]["mode"] == "offline"
    assert info["config"]["hub"] == {}

    metric_rows = [r for r in info["history"] if "acc" in r]
    assert [r["acc"] for r in metric_rows] == pytest.approx([0.5, 0.6, 0.7])
    assert [r["_step"] for r in metric_rows] == [0, 1, 2]
    assert info["summary"]["acc"] == pytest.approx(0.7)
    assert info["summary"]["best_acc"] == pytest.approx(0.7)

    table = info["tables"]["ranking"]
    assert table["columns"] == ["layer", "head", "importance"]
    assert table["data"] == rows

    (img,) = info["images"]["pruning_curve"]
    assert img.endswith(".png") and Path(img).read_bytes() == image.read_bytes()

    # The reader also accepts the folder given to start_run (newest run) and the .wandb file itself.
    assert find_offline_runs(tmp_path / "out") == [run_dir]
    assert read_offline_run(tmp_path / "out")["run_id"] == run.id
    assert read_offline_run(info["wandb_file"])["tables"]["ranking"]["data"] == rows

    # No secret anywhere under the run folder (record file, logs, config, metadata).
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for secret in (FAKE_KEY, "zzcfgsecret", "zzhfsecret"):
                assert secret.encode() not in data, f"{secret} leaked into {f}"


def test_context_manager_and_disabled_mode(tmp_path):
    with start_run({"wandb": {"mode": "disabled"}}, dir=tmp_path) as run:
        assert run.mode == "disabled"
        run.log_metrics({"x": 1})
        run.log_table("t", ["a"], [[1]])
    assert not list(tmp_path.rglob("*.wandb"))


def test_mode_resolution(monkeypatch):
    assert resolve_mode("ONLINE") == "online"
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode(None) == "offline"  # the default: nothing leaves the machine
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(None) == "disabled"
    assert resolve_mode("offline") == "offline"  # the config wins over the environment


def test_unknown_mode_is_one_line_error(tmp_path, monkeypatch):
    with pytest.raises(TrackingError) as e:
        start_run({"wandb": {"mode": "cloud"}}, dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "cloud" in msg and "offline" in msg and "wandb.mode" in msg
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(TrackingError, match="WANDB_MODE"):
        start_run({}, dir=tmp_path)


def test_online_without_credentials_is_one_line_error(tmp_path):
    with pytest.raises(TrackingError) as e:
        start_run({"wandb": {"mode": "online", "api_key": "zzcfgsecret"}}, dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert "wandb login" in msg and "WANDB_API_KEY" in msg
    assert "zzcfgsecret" not in msg
    assert not list(tmp_path.rglob("*.wandb"))


def test_online_credentials_detected_without_network(tmp_path, monkeypatch):
    assert not tracking._has_credentials()
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password zznetrckey\n")
    (tmp_path / "home" / ".netrc").chmod(0o600)
    assert tracking._has_credentials()
    (tmp_path / "home" / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert tracking._has_credentials()


def test_sanitize_config_keeps_model_tokens():
    cfg = {"model": {"bos_token": "<s>", "max_new_tokens": 5, "tokenizer": "x"},
           "API_KEY": "a", "db": {"password": "p", "user": "u"}, "list": [{"access_token": "t", "k": 1}]}
    assert sanitize_config(cfg) == {"model": {"bos_token": "<s>", "max_new_tokens": 5, "tokenizer": "x"},
                                    "db": {"user": "u"}, "list": [{"k": 1}]}


def test_sanitize_config_accepts_omegaconf():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"a": 1, "b": "${a}", "wandb": {"api_key": "x", "mode": "offline"}})
    assert sanitize_config(cfg) == {"a": 1, "b": 1, "wandb": {"mode": "offline"}}


def test_reader_rejects_non_wandb_file(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a wandb file at all")
    with pytest.raises(ValueError, match="not a .wandb file"):
        read_offline_run(bad)
    with pytest.raises(FileNotFoundError):
        read_offline_run(tmp_path / "missing")
