"""The contract between tasks and the scorer.

A task turns one evaluated dataset row (plus k demonstrations) into a `Request`: the strings to
score and what counts as correct. The scorer (icl_scale/scoring.py) knows nothing about tasks; it
scores `(contexts[i], continuations[i])` pairs and hands per-choice log-likelihoods back to
`metrics.py`, which computes acc / acc_norm / EM / F1 / macro-F1 / MultiRC all-answers accuracy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Request:
    """One evaluated document, rendered.

    `contexts` and `continuations` are broadcast against each other: either one shared context and
    n continuations (most tasks), or n contexts and one shared continuation (winogrande's partial
    scoring). Choice i is scored as log P(continuation_i | context_i).
    """

    doc_id: int  # row number in the evaluated split
    contexts: list[str]
    continuations: list[str]
    gold: int | list[int]  # index of the right choice; ReCoRD: every choice that is a gold entity
    task: str = ""
    # Extras some metrics need (kept JSON-serialisable):
    group: str | None = None  # MultiRC: question id (a question is right only if all answers are)
    answers: list[str] = field(default_factory=list)  # ReCoRD: gold answer strings for EM/F1
    # ReCoRD: entity of each choice; multiple-choice tasks: bare choice text (acc_norm divides by its length)
    choice_texts: list[str] = field(default_factory=list)
    # The gold continuation of the importance loss as the paper's code forms it (its `doc_to_cont`,
    # no leading space for the multiple-choice tasks); None: the gold scoring continuation.
    importance_continuation: str | None = None

    @property
    def n_choices(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def pair(self, i: int) -> tuple[str, str]:
        ctx = self.contexts[i] if len(self.contexts) > 1 else self.contexts[0]
        cont = self.continuations[i] if len(self.continuations) > 1 else self.continuations[0]
        return ctx, cont

    def importance_pair(self, form: str = "paper") -> tuple[str, str]:
        """(context, continuation) of the importance loss. `paper`: the gold context and the task's
        `doc_to_cont` (the original's `get_dataloader`); `scoring`: the gold pair as scored."""
        ctx, cont = self.pair(self.gold_index())
        if form == "paper" and self.importance_continuation is not None:
            cont = self.importance_continuation
        return ctx, cont

    def gold_index(self) -> int:
        """The choice used as 'the gold answer' for importance scoring (ReCoRD: the first gold)."""
        return self.gold[0] if isinstance(self.gold, list) else self.gold

    def to_json(self) -> dict:
        return asdict(self)
