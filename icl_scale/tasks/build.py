"""The high-level entry point: a task split rendered as a list of `Request`s."""

from __future__ import annotations

import os

from .base import Request
from .data import load_split
from .fewshot import DemoSampler
from .taskfile import get_task


def build_requests(
    task: str,
    split: str | None = None,
    shot: int = 0,
    seed: int = 0,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    demo_split: str = "train",
) -> list[Request]:
    """Render the first `limit` docs of `split` (default: the task's eval split) with `shot` demos.

    Demos come from `demo_split`. With split == demo_split (importance scoring on train docs) a
    doc is never its own demo (nor are rows of the same MultiRC paragraph / ReCoRD passage).
    """
    t = get_task(task)
    split = split or t.eval_split
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if not isinstance(shot, int) or shot < 0:
        raise ValueError(f"shot must be an integer >= 0, got {shot!r}")
    docs = load_split(t, split, data_dir)
    if limit is not None:
        docs = docs[:limit]
    demo_rows = load_split(t, demo_split, data_dir) if shot > 0 else []
    sampler = DemoSampler(t, demo_rows, k=shot, seed=seed, split=split, same_split=split == demo_split)
    return [
        t.make_request(doc, i, [demo_rows[j] for j in sampler(i, doc)]) for i, doc in enumerate(docs)
    ]


def demo_ids(
    task: str,
    doc_id: int,
    split: str | None = None,
    shot: int = 0,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    demo_split: str = "train",
) -> list[int]:
    """The demo-split row numbers `build_requests` uses for one doc (for logging/reproduction)."""
    t = get_task(task)
    split = split or t.eval_split
    doc = load_split(t, split, data_dir)[doc_id]
    demo_rows = load_split(t, demo_split, data_dir) if shot > 0 else []
    return DemoSampler(t, demo_rows, k=shot, seed=seed, split=split, same_split=split == demo_split)(doc_id, doc)
