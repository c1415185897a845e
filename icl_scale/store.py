"""The results store: one folder per (model, task, shot) shard, written atomically.

    <root>/<model>/<task>/<shot>shot/
        manifest.json            resolved config, config hash, versions, timings, status
        importance.safetensors   heads [L, H], ffn [L], ffn_knockout [L] (float32)
        masks/*.safetensors      the pruning masks of every curve level
        curves.json              accuracy at every pruning level (heads, ffn, combined grid)
        samples/*.jsonl          per-level per-doc eval samples
        checkpoint/              progress inside a running shard (removed when complete)

Every file is written to a temporary name in the same folder and renamed into place (atomic on
POSIX), so a reader never sees a half-written file. A shard is complete only when its manifest
says `status: complete`; a rerun with the same config hash then does no work. No pickle: tensors
are safetensors, everything else JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

MANIFEST = "manifest.json"


class StoreError(RuntimeError):
    pass


# --- atomic primitives ------------------------------------------------------------------------

def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


_MODE = 0o666 & ~_umask()  # mkstemp makes 0600 files; results should be readable like any file


# Under ZeRO-Inference every rank computes the same numbers; only rank 0 writes (set_writer).
_WRITER = True


def set_writer(is_writer: bool) -> None:
    global _WRITER
    _WRITER = bool(is_writer)


def _atomic(path: Path, write, every_rank: bool = False) -> None:
    if not (_WRITER or every_rank):
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextmanager
def atomic_dir(out: Path):
    """A folder written whole or not at all: yields a temporary sibling folder, renamed to `out` (which
    must be absent or empty) when the block ends; removed if it raises."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):  # mkdtemp and some writers make owner-only files: share them like any file
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        os.rename(tmp, out)  # replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: Path, data: bytes, every_rank: bool = False) -> None:
    """Atomic write (rank 0 only, unless `every_rank`: a rank's own checkpoint file)."""
    _atomic(path, lambda f: f.write(data), every_rank)


def write_json(path: Path, obj: Any, every_rank: bool = False) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), every_rank)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_bytes(path, "".join(json.dumps(r, default=str) + "\n" for r in rows).encode())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  every_rank: bool = False) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_bytes(path, data, every_rank)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is corrupt ({e.msg} at line {e.lineno}); "
                         "delete it or rerun with store.force=true") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise StoreError(f"{path} is not a readable safetensors file ({e}); "
                         "delete it or rerun with store.force=true") from None


def config_hash(cfg: dict) -> str:
    """Hash of the settings that change results (callers drop paths, launcher, wandb...)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("icl_scale", "torch", "transformers", "safetensors", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def check_writable(root: Path, setting: str = "store.root") -> Path:
    """`root` exists (made if needed) and takes new files; else one line naming `setting`."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".probe.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise StoreError(f"{setting}={root} is not writable ({e.strerror}); "
                         f"set {setting} to a writable folder") from None
    return root


# --- shards ---------------------------------------------------------------------------------------

def clear_checkpoint(folder: Path) -> None:
    """Remove `folder/checkpoint/` (rank 0's, every rank's own files included)."""
    d = Path(folder) / "checkpoint"
    if _WRITER and d.exists():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))


def shard_seed(shot: int, seed: int) -> int:
    """The demonstration seed a shard is stored under: 0-shot prompts have no demonstrations, so
    every seed of a 0-shot shard is the same shard, seed 0."""
    return 0 if int(shot) == 0 else int(seed)


class Shard:
    """One (model, task, shot, demonstration seed) result folder: <root>/<model>/<task>/<shot>shot/seed<seed>.

    `legacy=True`: a store written before the seed axis, with the shard's files directly in
    <shot>shot/; it is read (as the seed its manifest records), never written to."""

    def __init__(self, root: Path | str, model: str, task: str, shot: int, seed: int = 0, legacy: bool = False):
        self.root = Path(root)
        self.model, self.task, self.shot = model, task, int(shot)
        self.seed, self.legacy = shard_seed(shot, seed), legacy
        self.shot_dir = self.root / safe_name(model) / safe_name(task) / f"{self.shot}shot"
        self.path = self.shot_dir if legacy else self.shot_dir / f"seed{self.seed}"

    @property
    def name(self) -> str:
        """model/task/<shot>shot/seed<k> (a legacy shard: model/task/<shot>shot)."""
        base = f"{self.model}/{self.task}/{self.shot}shot"
        return base if self.legacy else f"{base}/seed{self.seed}"

    def __repr__(self) -> str:
        return f"Shard({self.name})"

    # manifest
    def manifest(self) -> dict | None:
        p = self.path / MANIFEST
        if not p.exists():
            return None
        m = read_json(p)
        if not isinstance(m, dict):
            raise StoreError(f"{p} is a {type(m).__name__}, not a manifest object; delete it or rerun with "
                             "store.force=true")
        return m

    def is_complete(self, cfg_hash: str | None = None) -> bool:
        m = self.manifest()
        return bool(m and m.get("status") == "complete" and (cfg_hash is None or m.get("config_hash") == cfg_hash))

    def write_manifest(self, every_rank: bool = False, **fields) -> dict:
        """Update the manifest with `fields` (rank 0 only, unless `every_rank`: a failing rank's record)."""
        p = self.path / MANIFEST
        try:
            m = self.manifest() or {}
        except StoreError:  # a corrupt manifest is replaced, never trusted
            m = {}
        m.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json(p, m, every_rank)
        return m

    # files
    def file(self, name: str) -> Path:
        return self.path / name

    def ckpt(self, name: str) -> Path:
        return self.path / "checkpoint" / name

    def remove_stale_temps(self) -> None:
        """Temporary files a killed writer left behind (a finished write renames its file away)."""
        if _WRITER and self.path.exists():
            for tmp in self.path.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def clear_checkpoint(self) -> None:
        clear_checkpoint(self.path)

    def importance(self) -> dict[str, torch.Tensor]:
        return read_tensors(self.file("importance.safetensors"))

    def curves(self) -> dict:
        return read_json(self.file("curves.json"))


# --- a model's induction scores (task-agnostic, one per model) -----------------------------------

def induction_dir(root: Path | str, model: str) -> Path:
    """<root>/<model>/induction/: scores.safetensors, scores.json, heatmaps."""
    return Path(root) / safe_name(model) / "induction"


def list_shards(root: Path | str) -> list[Shard]:
    """Every shard folder under root (complete or not), sorted: <model>/<task>/<shot>shot/seed<k>,
    and a legacy <shot>shot/ folder with files of its own (a store from before the seed axis; its
    seed is the one its manifest records, icl_scale.collect)."""
    root = Path(root)
    out = []
    for d in sorted(root.glob("*/*/*shot")):
        if not (d.is_dir() and d.name[:-4].isdigit()):
            continue
        model, task, shot = d.parent.parent.name, d.parent.name, int(d.name[:-4])
        seeds = sorted(int(s.name[4:]) for s in d.glob("seed*") if s.is_dir() and s.name[4:].isdigit()
                       and shard_seed(shot, int(s.name[4:])) == int(s.name[4:]))
        if any(f.is_file() or f.name == "checkpoint" for f in d.iterdir()):
            out.append(Shard(root, model, task, shot, legacy=True))
        out += [Shard(root, model, task, shot, seed) for seed in seeds]
    return out
