"""The 14 few-shot tasks in the paper's (lm-eval 0.2.0) prompt formats.

    build_requests(task, split=None, shot=0, seed=0, limit=None, data_dir=None, demo_split="train")
    compute_metrics(task, requests, loglikelihoods) -> (metrics, per_doc)
    get_task(name or path/to/task.yaml), TASKS, load_split(task, split, data_dir=None)
"""

from .base import Request
from .build import build_requests, demo_ids
from .data import TaskDataError, load_split
from .fewshot import DemoSampler, sample_demos
from .metrics import compute_metrics
from .registry import TASKS, Task
from .taskfile import TaskFileError, get_task

__all__ = [
    "TASKS",
    "DemoSampler",
    "Request",
    "Task",
    "TaskDataError",
    "TaskFileError",
    "build_requests",
    "compute_metrics",
    "demo_ids",
    "get_task",
    "load_split",
    "sample_demos",
]  # fmt: skip
