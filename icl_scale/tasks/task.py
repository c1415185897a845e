"""The task base class: a few-shot task's prompt strings, choices and gold for one dataset row, as
lm-eval 0.2.0's base.Task renders them (the 14 tasks: multiple_choice.py and superglue.py; task files
in lm-eval 0.4's vocabulary: taskfile.py)."""

from __future__ import annotations

from .base import Request

FEWSHOT_SEP = "\n\n"  # 0.2.0 base.Task.fewshot_context joins demos and the query with a blank line


class Task:
    """A few-shot task: prompt strings, choices and gold for one dataset row.

    Subclasses implement `doc_to_text`, `doc_to_target` and `_choices` (continuations, gold, and
    per-choice texts). `make_request` renders a doc with its demonstrations.
    """

    name: str = ""
    eval_split: str = "validation"
    metrics: tuple[str, ...] = ("acc",)
    hub: tuple[str, str | None] = ("", None)  # (dataset id, config) for datasets.load_dataset
    required_fields: tuple[str, ...] = ()  # validated at load time
    # (field, allowed values) of the gold label in the HF schema, type included: a "1" where the
    # schema has 1 (or a 5 for a 2-choice task) would silently change accuracy and demonstrations.
    label: tuple[str, tuple] | None = None
    source_file = None  # the task file of a task from YAML (tasks/taskfile.py); None for the built-in ones

    strings: tuple[str, ...] = ()  # fields that must be non-empty strings (the prompt is built from them)
    ints: tuple[str, ...] = ()  # fields that must be whole numbers (token or character positions)

    def row_problem(self, doc: dict) -> str | None:
        """Why this row cannot be rendered or scored as the task defines it, or None: a wrong type,
        an empty text, a malformed choice list, an unusable gold label."""
        for f in self.strings:
            if not isinstance(doc[f], str) or not doc[f].strip():
                return f"{f}={doc[f]!r} must be a non-empty string"
        for f in self.ints:
            if isinstance(doc[f], bool) or not isinstance(doc[f], int):
                return f"{f}={doc[f]!r} must be a whole number"
        return self.shape_problem(doc) or self.label_problem(doc)

    def shape_problem(self, doc: dict) -> str | None:
        """Task-specific structure (choice lists, blanks, placeholders); None when fine."""
        return None

    def label_problem(self, doc: dict) -> str | None:
        """Why this row's gold label is unusable, or None."""
        if self.label is None:
            return None
        field, allowed = self.label
        v = doc[field]
        if not any(v == a and type(v) is type(a) for a in allowed):
            kind = type(allowed[0]).__name__
            return f"{field}={v!r} is not one of {', '.join(map(repr, allowed))} ({kind}, as in the HF schema)"
        return None

    # --- the 0.2.0 interface -------------------------------------------------------------------
    def doc_to_text(self, doc: dict) -> str:
        raise NotImplementedError

    def doc_to_target(self, doc: dict) -> str:
        raise NotImplementedError

    def _choices(self, doc: dict) -> tuple[list[str], int | list[int], list[str]]:
        """(continuations, gold, choice_texts) for the shared-context case."""
        raise NotImplementedError

    def split_name(self, split: str) -> str:
        """The data's name of a split the shard asks for (task files map "train" to their training_split)."""
        return split

    def doc_to_cont(self, doc: dict) -> str:
        """The gold continuation of the paper's importance loss: what its task's `get_dataloader`
        passes to `utils.create_dataloader` (doc_to_target, except where the task defines doc_to_cont)."""
        return self.doc_to_target(doc)

    # --- few-shot hooks ------------------------------------------------------------------------
    def demo_filter(self, doc: dict) -> bool:
        """Whether a demo-split row may serve as a demonstration (WSC: positives only)."""
        return True

    def leak_key(self, doc: dict):
        """Rows sharing this key are never demos for each other when evaluating on the demo split
        (MultiRC: same paragraph; ReCoRD: same passage). None (the default): only the row itself is excluded."""

    def group(self, doc: dict) -> str | None:
        return None

    # --- rendering -----------------------------------------------------------------------------
    def fewshot_context(self, doc: dict, demos: list[dict]) -> str:
        # 0.2.0: description is "" (none), labeled_examples = "\n\n".join(text+target) + "\n\n"
        if not demos:
            return self.doc_to_text(doc)
        labeled = FEWSHOT_SEP.join(self.doc_to_text(d) + self.doc_to_target(d) for d in demos)
        return labeled + FEWSHOT_SEP + self.doc_to_text(doc)

    def make_request(self, doc: dict, doc_id: int, demos: list[dict]) -> Request:
        ctx = self.fewshot_context(doc, demos)
        continuations, gold, choice_texts = self._choices(doc)
        return Request(
            doc_id=doc_id,
            contexts=[ctx],
            continuations=continuations,
            gold=gold,
            task=self.name,
            group=self.group(doc),
            answers=self._answers(doc),
            choice_texts=choice_texts,
            importance_continuation=self.doc_to_cont(doc),
        )

    def _answers(self, doc: dict) -> list[str]:
        return []

    def __repr__(self) -> str:
        return f"<Task {self.name}>"
