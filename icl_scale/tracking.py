"""Weights & Biases tracking, offline by default.

Writing::

    run = start_run(cfg, name="score-opt-sst2-4shot", group="demo", job_type="score", dir="outputs")
    run.log_metrics({"acc": 0.81, "step": 3})
    run.log_table("ranking", ["layer", "head", "importance"], rows)
    run.log_image("pruning_curve", "curve.png")
    run.finish()

The mode comes from ``cfg["wandb"]["mode"]`` (``offline`` | ``online`` | ``disabled``), else from the
``WANDB_MODE`` environment variable, else ``offline``: nothing leaves the machine unless a user asks
for ``online``. Online mode needs credentials (``WANDB_API_KEY`` or ``wandb login``); they are checked
before wandb starts, and never copied into the run config, printed or written by this module: config
entries whose key looks secret (``api_key``, ``token``, ``password``...) are dropped before the config
reaches wandb.

``TrackedRun.finish`` waits until wandb's background process has written the run's exit record; for
that, :func:`iter_records` reads a ``.wandb`` transaction log (LevelDB log format, records are
``wandb.proto.wandb_internal_pb2.Record`` protobufs) without wandb's servers or private modules. The
full reader of offline runs (config, history, summary, tables, images) is a test helper:
tests/wandb_offline.py.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = [
    "MODES",
    "TrackedRun",
    "TrackingError",
    "iter_records",
    "resolve_mode",
    "sanitize_config",
    "start_run",
    "wandb_settings",
]

log = logging.getLogger(__name__)

MODES = ("offline", "online", "disabled")
DEFAULT_PROJECT = "icl_scale"

# Config keys that may hold credentials: dropped (at any depth) before the config reaches wandb.
# Deliberately not every "*token*": model configs have keys like bos_token or max_new_tokens.
_SECRET_KEY = re.compile(
    r"(^|[_.-])(api[_-]?keys?|apikeys?|secrets?|secret[_-]?keys?|passwords?|passwd|credentials?|netrc"
    r"|(access|auth|api|bearer|hf|hub|wandb|github|gh|refresh|id)[_-]?tokens?)$",
    re.IGNORECASE,
)


class TrackingError(RuntimeError):
    """Misconfigured tracking; the message is one line that names the fix."""


# ----------------------------------------------------------------------------------------- config


def _to_plain(cfg: Any) -> Any:
    """OmegaConf DictConfig/ListConfig (Hydra) -> plain dict/list; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def sanitize_config(cfg: Any) -> Any:
    """A copy of ``cfg`` without credential-like entries (keys such as api_key, token, password) and
    without any string equal to the ``WANDB_API_KEY`` in the environment."""
    cfg = _to_plain(cfg)
    env_key = os.environ.get("WANDB_API_KEY") or None

    def clean(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: clean(v) for k, v in x.items() if not (isinstance(k, str) and _SECRET_KEY.search(k))}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if env_key and isinstance(x, str) and env_key in x:
            return "<redacted>"
        return x

    return clean(cfg)


def wandb_settings(cfg: Any = None) -> dict[str, Any]:
    """The ``wandb`` section of a config (``{}`` when absent), as a plain dict."""
    cfg = _to_plain(cfg)
    if not cfg:
        return {}
    section = cfg.get("wandb") if isinstance(cfg, Mapping) else None
    return dict(_to_plain(section) or {})


def resolve_mode(mode: str | None = None) -> str:
    """Explicit mode, else ``WANDB_MODE``, else ``offline``. Raises TrackingError on an unknown mode."""
    source = "wandb.mode"
    if mode is None or str(mode).strip() == "":
        mode, source = os.environ.get("WANDB_MODE") or "offline", "WANDB_MODE"
    mode = str(mode).strip().lower()
    if mode == "dryrun":  # wandb's legacy name for offline
        mode = "offline"
    if mode not in MODES:
        raise TrackingError(f"unknown {source} {mode!r}: use one of {', '.join(MODES)} (e.g. wandb.mode=offline)")
    return mode


def _has_credentials() -> bool:
    """True when wandb can authenticate without prompting: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or
    a .netrc entry for the W&B host (what ``wandb login`` writes). The key itself is never returned."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else []
    candidates += [os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            auth = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if auth and auth[2]:
            return True
    return False


# ---------------------------------------------------------------------------------------- writing


class TrackedRun:
    """Thin wrapper around a wandb run with the few calls the project needs."""

    def __init__(self, run: Any, mode: str):
        self._run = run
        self.mode = mode
        self._finished = False

    # -- properties
    @property
    def wandb_run(self) -> Any:
        """The underlying ``wandb`` run object (for anything this wrapper does not cover)."""
        return self._run

    @property
    def id(self) -> str | None:
        return getattr(self._run, "id", None)

    @property
    def name(self) -> str | None:
        return getattr(self._run, "name", None)

    @property
    def files_dir(self) -> Path | None:
        """The run's ``files/`` folder (None when disabled)."""
        d = getattr(self._run, "dir", None) if self.mode != "disabled" else None
        return Path(d) if d else None

    @property
    def run_dir(self) -> Path | None:
        """The run's folder (``.../wandb/offline-run-*``), holding its ``run-*.wandb`` record file."""
        return self.files_dir.parent if self.files_dir else None

    # -- logging
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """One history row of scalars (or anything wandb accepts)."""
        self._run.log(dict(metrics), step=step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table (stored as JSON under files/media/table/ and referenced from history/summary)."""
        import wandb

        table = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        self._run.log({key: table})

    def log_image(self, key: str, path: str | os.PathLike, caption: str | None = None) -> None:
        """An image file (PNG/JPEG...), copied under files/media/images/."""
        import wandb

        self._run.log({key: wandb.Image(str(path), caption=caption)})

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Final values shown in the run table (override the last history values)."""
        for k, v in values.items():
            self._run.summary[k] = v

    def finish(self, exit_code: int = 0, flush_timeout_s: float = 30.0) -> None:
        """Finish the run. Also waits (up to ``flush_timeout_s``) until wandb's background process has
        written the run's exit record: ``wandb.finish()`` can return while the ``.wandb`` file still
        holds only its header, and a reader started right after would see an empty run."""
        if self._finished:
            return
        self._finished = True
        run_dir = self.run_dir
        self._run.finish(exit_code=exit_code)
        if run_dir is not None and flush_timeout_s > 0:
            _wait_for_exit_record(run_dir, flush_timeout_s)

    def __enter__(self) -> TrackedRun:  # noqa: PYI034
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def start_run(
    cfg_dict: Any = None,
    name: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    dir: str | os.PathLike | None = None,
    *,
    mode: str | None = None,
    project: str | None = None,
    entity: str | None = None,
    run_id: str | None = None,
    tags: Sequence[str] | None = None,
) -> TrackedRun:
    """Start a W&B run.

    ``cfg_dict`` is the experiment config (dict or Hydra DictConfig); its ``wandb`` section may set
    ``mode``, ``project``, ``entity``, ``group``, ``dir``. Keyword arguments override the section.
    The whole config, minus credential-like keys, is stored as the run config. ``run_id`` resumes the
    same run (``resume="allow"``), e.g. for a requeued Slurm job.

    Raises TrackingError (one line naming the fix) for an unknown mode, or online mode without
    credentials.
    """
    section = wandb_settings(cfg_dict)
    mode = resolve_mode(mode if mode is not None else section.get("mode"))
    if mode == "online" and not _has_credentials():
        raise TrackingError(
            "wandb.mode=online but no W&B credentials were found: run `wandb login` or export "
            "WANDB_API_KEY (or use wandb.mode=offline and `wandb sync` later)"
        )
    project = project or section.get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    entity = entity or section.get("entity") or None
    group = group or section.get("group") or None
    run_dir = dir or section.get("dir") or os.environ.get("WANDB_DIR") or None
    if run_dir is not None:
        run_dir = os.path.abspath(os.fspath(run_dir))
        os.makedirs(run_dir, exist_ok=True)

    config = sanitize_config(cfg_dict) if cfg_dict is not None else {}
    if not isinstance(config, Mapping):
        raise TrackingError(f"run config must be a mapping, got {type(config).__name__}: pass a dict or DictConfig")

    try:
        import wandb
    except ImportError as e:  # pragma: no cover - wandb is a dependency
        raise TrackingError("wandb is not installed: pip install wandb (or set wandb.mode=disabled)") from e

    kwargs: dict[str, Any] = {
        "project": project,
        "entity": entity,
        "group": group,
        "job_type": job_type,
        "name": name,
        "dir": run_dir,
        "config": dict(config),
        "mode": mode,
        "tags": list(tags) if tags else None,
        "reinit": "create_new",
        # W&B's system metadata records the process's command line (sys.argv): a credential typed there
        # would land in the run files. Off; the config (sanitised above) says what ran.
        "settings": wandb.Settings(x_disable_meta=True),
    }
    if run_id is not None:
        kwargs.update(id=run_id, resume="allow")
    try:
        run = wandb.init(**kwargs)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "check wandb.project/entity and credentials" if mode == "online" else "check wandb.dir"
        raise TrackingError(f"wandb.init failed ({mode}): {msg} -- {hint}, or set wandb.mode=disabled") from e
    return TrackedRun(run, mode)


# ------------------------------------------------------------------- the .wandb record file

# LevelDB log format (https://github.com/google/leveldb/blob/main/doc/log_format.md) with wandb's
# 7-byte file header ":W&B" + magic 0xBEE1 + version 0 and its CRC-32 over (type byte + data).
_HEADER_IDENT = b":W&B"
_HEADER_MAGIC = 0xBEE1
_HEADER_LEN = 7
_BLOCK_LEN = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _crc_ok(checksum: int, rtype: int, data: bytes) -> bool:
    return checksum == (zlib.crc32(data, zlib.crc32(bytes([rtype]))) & 0xFFFFFFFF)


def _iter_raw_records(path: str | os.PathLike) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if len(data) < _HEADER_LEN:
        raise ValueError(f"{path}: too short to be a .wandb file")
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER_LEN])
    if ident != _HEADER_IDENT or magic != _HEADER_MAGIC:
        raise ValueError(f"{path}: not a .wandb file (header {data[:_HEADER_LEN]!r})")
    if version != 0:
        log.warning("%s: unknown .wandb format version %d; trying anyway", path, version)
    pos, pending = _HEADER_LEN, None
    n = len(data)
    while pos + _HEADER_LEN <= n:
        left_in_block = _BLOCK_LEN - pos % _BLOCK_LEN
        if left_in_block < _HEADER_LEN:  # zero trailer at the end of a block
            pos += left_in_block
            continue
        checksum, length, rtype = struct.unpack("<IHB", data[pos : pos + _HEADER_LEN])
        start, end = pos + _HEADER_LEN, pos + _HEADER_LEN + length
        if end > n:  # truncated tail (run still being written, or killed)
            break
        if checksum == 0 and length == 0 and rtype == 0:  # zero padding: skip to the next block
            pos += left_in_block
            continue
        chunk = data[start:end]
        pos = end
        if not _crc_ok(checksum, rtype, chunk):
            log.warning("%s: bad checksum at offset %d; stopping", path, start - _HEADER_LEN)
            break
        if rtype == _FULL:
            pending = None
            yield chunk
        elif rtype == _FIRST:
            pending = bytearray(chunk)
        elif rtype == _MIDDLE and pending is not None:
            pending += chunk
        elif rtype == _LAST and pending is not None:
            pending += chunk
            yield bytes(pending)
            pending = None


def iter_records(wandb_file: str | os.PathLike) -> Iterator[Any]:
    """Yield the ``wandb_internal_pb2.Record`` protobufs of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    for raw in _iter_raw_records(wandb_file):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        yield rec


def _has_exit_record(wandb_file: Path) -> bool:
    try:
        return any(rec.WhichOneof("record_type") == "exit" for rec in iter_records(wandb_file))
    except (OSError, ValueError):
        return False


def _wait_for_exit_record(run_dir: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        files = sorted(Path(run_dir).glob("run-*.wandb"))
        if files and _has_exit_record(files[-1]):
            return True
        if time.monotonic() > deadline:
            log.warning("wandb has not flushed %s after %.0f s; reading it now may miss records", run_dir, timeout_s)
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
