"""The 14 tasks by name, rendered exactly as lm-eval 0.2.0 renders them (the harness of Bansal et
al. 2022): multiple_choice.py (HellaSwag, PIQA, ARC, OpenBookQA, Winogrande) and superglue.py (BoolQ,
CB, COPA, WiC, WSC, MultiRC, RTE, ReCoRD) on the base class of task.py.

Every `doc` is a raw row in the Hugging Face `datasets` schema (what `data.load_split` returns);
each task converts it the way 0.2.0's `_convert_standard` / `_process_doc` does, on the fly. The
strings are copied from 0.2.0's task files (lm_eval/tasks/*.py) and checked character for
character by tests/test_tasks.py against golden strings produced by 0.2.0's own classes
(tests/data/make_golden.py).
"""

from __future__ import annotations

from .multiple_choice import ARCChallenge, ARCEasy, HellaSwag, OpenBookQA, PiQA, Winogrande
from .superglue import (
    RTE,
    BoolQ,
    CommitmentBank,
    Copa,
    MultiRC,
    ReCoRD,
    SGWinogradSchemaChallenge,
    WordsInContext,
)
from .task import FEWSHOT_SEP, Task  # noqa: F401 - the registry's vocabulary

_TASK_CLASSES = (
    HellaSwag, PiQA, ARCEasy, ARCChallenge, OpenBookQA, Winogrande,
    BoolQ, CommitmentBank, Copa, WordsInContext, SGWinogradSchemaChallenge, MultiRC, RTE, ReCoRD,
)  # fmt: skip
_REGISTRY: dict[str, Task] = {cls.name: cls() for cls in _TASK_CLASSES}
TASKS: tuple[str, ...] = tuple(_REGISTRY)


def get_task(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}, or a task file "
                         "(path/to/task.yaml)") from None
