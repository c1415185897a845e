"""Few-shot demonstration sampling: deterministic per (task, split, doc_id, seed), order-free.

lm-eval 0.2.0 draws demos with one `random.Random(42)` shared across the (shuffled) docs, so a
doc's demos depend on which docs came before it, and a doc can be its own demo. Here each doc gets
its own generator seeded from a hash of (task, split, doc_id, seed): the same doc always gets the
same demos whatever `limit` or processing order, and results are reproducible across processes
(`hash()` of a str is salted per process, so sha256 is used).

When the evaluated split is the demo split (importance scoring renders train docs with train
demos), the doc itself is never its own demo, and neither is any row sharing its `leak_key`
(MultiRC: the same paragraph, ReCoRD: the same passage), so a demo cannot reveal the answer.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence

from .registry import Task
from .taskfile import get_task


def demo_pool(task: str | Task, rows: Sequence[dict]) -> list[int]:
    """Row indices of the demo split that may be demonstrations (WSC: label == True only)."""
    t = get_task(task)
    return [i for i, r in enumerate(rows) if t.demo_filter(r)]


def doc_rng(task: str, split: str, doc_id: int, seed: int) -> random.Random:
    h = hashlib.sha256(f"{task}|{split}|{doc_id}|{seed}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def check_shot(task: str, k: int, pool_size: int) -> None:
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"shot must be an integer >= 0, got {k!r}")
    if k > pool_size:
        raise ValueError(f"{task}: {k} demonstrations requested but the demo pool has only {pool_size} rows")


def sample_demos(
    task: str | Task,
    doc_id: int,
    k: int,
    pool: Sequence[int],
    *,
    seed: int = 0,
    split: str = "",
    exclude: Iterable[int] = (),
    pool_set: set[int] | None = None,
) -> list[int]:
    """k distinct row indices from `pool`, none in `exclude`, in demonstration order.

    `split` is the evaluated split (part of the seed, so validation doc 3 and train doc 3 differ).
    `pool_set` is `set(pool)`, passed in by callers that sample many docs.
    """
    name = get_task(task).name
    check_shot(name, k, len(pool))
    if k == 0:
        return []
    excl = set(exclude)
    n_excl = len(excl & (pool_set if pool_set is not None else set(pool))) if excl else 0
    if k > len(pool) - n_excl:
        raise ValueError(
            f"{name}: {k} demonstrations requested but only {len(pool) - n_excl} of the {len(pool)} "
            f"pool rows remain after excluding doc {doc_id}'s own rows"
        )
    # Draw k + |excluded| and drop the excluded ones: O(k) per doc even for a 27k-row pool,
    # and always leaves at least k.
    draw = doc_rng(name, split, doc_id, seed).sample(pool, k + n_excl)
    return [i for i in draw if i not in excl][:k]


class DemoSampler:
    """Demonstrations for every doc of one evaluated split.

    `same_split`: the evaluated docs are the demo rows themselves (e.g. train docs rendered with
    train demos); then doc i and every row sharing its `leak_key` are excluded.
    """

    def __init__(self, task: str | Task, demo_rows: Sequence[dict], *, k: int, seed: int = 0,
                 split: str = "", same_split: bool = False):
        self.task = get_task(task)
        self.k, self.seed, self.split, self.same_split = k, seed, split, same_split
        self.pool = demo_pool(self.task, demo_rows) if k else []
        self.pool_set = set(self.pool)
        check_shot(self.task.name, k, len(self.pool))
        self._by_key: dict = {}
        if same_split and k:
            for i, r in enumerate(demo_rows):
                key = self.task.leak_key(r)
                if key is not None:
                    self._by_key.setdefault(key, []).append(i)

    def exclusions(self, doc_id: int, doc: dict) -> list[int]:
        if not self.same_split:
            return []
        key = self.task.leak_key(doc)
        return [doc_id, *self._by_key.get(key, [])] if key is not None else [doc_id]

    def __call__(self, doc_id: int, doc: dict) -> list[int]:
        return sample_demos(self.task, doc_id, self.k, self.pool, seed=self.seed, split=self.split,
                            exclude=self.exclusions(doc_id, doc), pool_set=self.pool_set)
