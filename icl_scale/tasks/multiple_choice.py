"""The multiple-choice tasks of lm-eval 0.2.0 (HellaSwag, PIQA, ARC, OpenBookQA) and Winogrande,
rendered exactly as 0.2.0 renders them (strings copied from its lm_eval/tasks/*.py, checked by
tests/test_tasks.py against golden strings from 0.2.0's own classes)."""

from __future__ import annotations

import re

from .base import Request
from .task import Task


def _choice_lists(doc: dict) -> str | None:
    """ARC / OpenBookQA: choices = {text: [...], label: [...]}, one label per text."""
    c = doc["choices"]
    if not isinstance(c, dict) or not isinstance(c.get("text"), list) or not isinstance(c.get("label"), list):
        return "choices must be {text: [...], label: [...]}"
    if len(c["text"]) != len(c["label"]) or len(c["text"]) < 2:
        return f"choices has {len(c['text'])} texts and {len(c['label'])} labels (one label per text, at least 2)"
    return None


# ---------------------------------------------------------------------------------------------
# MultipleChoiceTask family (0.2.0 base.MultipleChoiceTask): target " " + choices[gold], one
# continuation " {choice}" per choice, acc and acc_norm (normalised by len(choice), no space).
# ---------------------------------------------------------------------------------------------
class MultipleChoiceTask(Task):
    metrics = ("acc", "acc_norm")

    def convert(self, doc: dict) -> dict:
        """0.2.0's `_convert_standard`: {"query", "choices", "gold"}."""
        raise NotImplementedError

    def doc_to_text(self, doc: dict) -> str:
        return self.convert(doc)["query"]

    def doc_to_target(self, doc: dict) -> str:
        d = self.convert(doc)
        return " " + d["choices"][d["gold"]]

    def doc_to_cont(self, doc: dict) -> str:
        # The original's arc.py, hellaswag.py, piqa.py, openbookqa.py: doc['choices'][doc['gold']],
        # the bare choice with no leading space, tokenised apart from the context.
        d = self.convert(doc)
        return d["choices"][d["gold"]]

    def _choices(self, doc):
        d = self.convert(doc)
        # choice_texts keep the bare choice: 0.2.0's acc_norm divides by len(choice) (no space)
        return [f" {c}" for c in d["choices"]], d["gold"], list(d["choices"])


class HellaSwag(MultipleChoiceTask):
    name = "hellaswag"
    hub = ("Rowan/hellaswag", None)
    required_fields = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
    strings = ("activity_label", "ctx_a")
    label = ("label", ("0", "1", "2", "3"))

    def shape_problem(self, doc):
        e = doc["endings"]
        if not isinstance(e, list) or len(e) != 4 or not all(isinstance(x, str) for x in e):
            return f"endings must be a list of 4 strings (got {len(e) if isinstance(e, list) else type(e).__name__})"
        return None

    @staticmethod
    def preprocess(text: str) -> str:
        text = text.strip()
        # NOTE (0.2.0): brackets are artifacts of the WikiHow part of HellaSwag.
        text = text.replace(" [title]", ". ")
        text = re.sub("\\[.*?\\]", "", text)
        text = text.replace("  ", " ")
        return text

    def convert(self, doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": self.preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [self.preprocess(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }


class PiQA(MultipleChoiceTask):
    name = "piqa"
    hub = ("baber/piqa", None)  # the original "piqa"/ybisk/piqa builder is a script dataset
    required_fields = ("goal", "sol1", "sol2", "label")
    strings = ("goal", "sol1", "sol2")
    label = ("label", (0, 1))

    def convert(self, doc):
        return {
            "query": "Question: " + doc["goal"] + "\nAnswer:",
            "choices": [doc["sol1"], doc["sol2"]],
            "gold": int(doc["label"]),
        }


class ARCEasy(MultipleChoiceTask):
    name = "arc_easy"
    eval_split = "test"
    hub = ("allenai/ai2_arc", "ARC-Easy")
    required_fields = ("question", "choices", "answerKey")
    strings = ("question",)

    def shape_problem(self, doc):
        return _choice_lists(doc)

    def label_problem(self, doc):
        labels = doc["choices"].get("label") if isinstance(doc["choices"], dict) else None
        if not isinstance(doc["answerKey"], str) or labels is None or doc["answerKey"] not in labels:
            return f"answerKey={doc['answerKey']!r} is not one of the row's choice labels {labels}"
        return None

    def convert(self, doc):
        # Some answerKeys are "1".."5"; 0.2.0 maps them to letters (without mutating our row).
        num_to_letter = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}
        key = num_to_letter.get(doc["answerKey"], doc["answerKey"])
        return {
            "query": "Question: " + doc["question"] + "\nAnswer:",
            "choices": doc["choices"]["text"],
            "gold": ["A", "B", "C", "D", "E"].index(key),
        }


class ARCChallenge(ARCEasy):
    name = "arc_challenge"
    hub = ("allenai/ai2_arc", "ARC-Challenge")


class OpenBookQA(MultipleChoiceTask):
    name = "openbookqa"
    eval_split = "test"
    hub = ("allenai/openbookqa", "main")
    required_fields = ("question_stem", "choices", "answerKey")
    strings = ("question_stem",)

    def shape_problem(self, doc):
        return _choice_lists(doc)

    def label_problem(self, doc):
        key = doc["answerKey"].strip() if isinstance(doc["answerKey"], str) else doc["answerKey"]
        n = len(doc["choices"].get("text", [])) if isinstance(doc["choices"], dict) else 0
        if key not in ("A", "B", "C", "D")[:n]:
            return f"answerKey={doc['answerKey']!r} is not one of A..{'ABCD'[max(n, 1) - 1]} ({n} choices)"
        return None

    def convert(self, doc):
        return {
            "query": doc["question_stem"],
            "choices": doc["choices"]["text"],
            "gold": ["A", "B", "C", "D"].index(doc["answerKey"].strip()),
        }


# ---------------------------------------------------------------------------------------------
class Winogrande(Task):
    """Partial scoring (Trinh & Le 2018): one context per option, one shared continuation."""

    name = "winogrande"
    hub = ("allenai/winogrande", "winogrande_xl")
    required_fields = ("sentence", "option1", "option2", "answer")
    strings = ("sentence", "option1", "option2")
    label = ("answer", ("1", "2"))

    def shape_problem(self, doc):
        return None if "_" in doc["sentence"] else "sentence has no '_' blank for the options"

    @staticmethod
    def partial_context(doc, option):
        # the sentence up to the blank, with the option filled in; everything after is dropped
        return doc["sentence"][: doc["sentence"].index("_")] + option

    @staticmethod
    def partial_target(doc):
        return " " + doc["sentence"][doc["sentence"].index("_") + 1 :].strip()

    @staticmethod
    def append_context(ctx, partial_ctx):
        # 0.2.0 verbatim: drop the last "\n\n" piece (the gold-filled query) and put the option's
        # partial context in its place.
        ctx = ctx.split("\n\n")
        ctx.pop()
        return "\n\n".join([*ctx, partial_ctx]) if ctx else partial_ctx

    def doc_to_text(self, doc):
        return self.partial_context(doc, doc["option" + doc["answer"]])

    def doc_to_target(self, doc):
        return self.partial_target(doc)

    def make_request(self, doc, doc_id, demos):
        ctx = self.fewshot_context(doc, demos)
        options = [doc["option1"], doc["option2"]]
        return Request(
            doc_id=doc_id,
            contexts=[self.append_context(ctx, self.partial_context(doc, o)) for o in options],
            continuations=[self.partial_target(doc)],
            gold={"1": 0, "2": 1}[doc["answer"]],
            task=self.name,
            choice_texts=options,
            importance_continuation=self.doc_to_cont(doc),
        )
