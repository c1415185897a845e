"""The 14 few-shot tasks in the paper's (lm-eval 0.2.0) prompt formats."""

from .base import Request

__all__ = ["Request"]
