"""The 14 tasks, rendered exactly as lm-eval 0.2.0 renders them (the harness of Bansal et al. 2022).

Every `doc` here is a raw row in the Hugging Face `datasets` schema (what `data.load_split`
returns); each task converts it the way 0.2.0's `_convert_standard` / `_process_doc` does, on the
fly. The strings below are copied from 0.2.0's task files (lm_eval/tasks/*.py) and checked
character for character by tests/test_tasks.py against golden strings produced by 0.2.0's own
classes (tests/data/make_golden.py).
"""

from __future__ import annotations

import re
from typing import ClassVar

from .base import Request

FEWSHOT_SEP = "\n\n"  # 0.2.0 base.Task.fewshot_context joins demos and the query with a blank line


def _yesno(x) -> str:
    return "yes" if x else "no"


def _general_detokenize(string: str) -> str:
    # lm_eval 0.2.0 utils.general_detokenize (used by WSC)
    string = string.replace(" n't", "n't")
    string = string.replace(" )", ")")
    string = string.replace("( ", "(")
    string = string.replace('" ', '"')
    string = string.replace(' "', '"')
    string = re.sub(r" (['.,])", r"\1", string)
    return string


def _choice_lists(doc: dict) -> str | None:
    """ARC / OpenBookQA: choices = {text: [...], label: [...]}, one label per text."""
    c = doc["choices"]
    if not isinstance(c, dict) or not isinstance(c.get("text"), list) or not isinstance(c.get("label"), list):
        return "choices must be {text: [...], label: [...]}"
    if len(c["text"]) != len(c["label"]) or len(c["text"]) < 2:
        return f"choices has {len(c['text'])} texts and {len(c['label'])} labels (one label per text, at least 2)"
    return None


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


# ---------------------------------------------------------------------------------------------
# SuperGLUE / GLUE
# ---------------------------------------------------------------------------------------------
class _YesNo(Task):
    """Binary tasks scored with " yes" / " no" (choice 0 = yes). 0.2.0 predicts yes iff
    ll_yes > ll_no; our argmax breaks exact ties towards yes (see docs/tasks.md)."""

    def doc_to_target(self, doc):
        return " " + _yesno(doc["label"])

    def _choices(self, doc):
        return [" yes", " no"], 0 if doc["label"] else 1, []


class BoolQ(_YesNo):
    name = "boolq"
    hub = ("aps/super_glue", "boolq")
    required_fields = ("passage", "question", "label")
    strings = ("passage", "question")
    label = ("label", (0, 1))

    def doc_to_text(self, doc):
        return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"


class CommitmentBank(Task):
    name = "cb"
    metrics = ("acc", "f1")  # f1: 0.2.0's unweighted mean of the three per-class F1s
    hub = ("aps/super_glue", "cb")
    required_fields = ("premise", "hypothesis", "label")
    strings = ("premise", "hypothesis")
    label = ("label", (0, 1, 2))
    LABELS: ClassVar[dict[int, str]] = {0: "True", 1: "False", 2: "Neither"}  # entail., contra., neutral

    def doc_to_text(self, doc):
        return "{}\nQuestion: {}. True, False or Neither?\nAnswer:".format(doc["premise"], doc["hypothesis"])

    def doc_to_target(self, doc):
        return " {}".format(self.LABELS[doc["label"]])

    def _choices(self, doc):
        return [" True", " False", " Neither"], int(doc["label"]), []


class Copa(Task):
    name = "copa"
    hub = ("aps/super_glue", "copa")
    required_fields = ("premise", "choice1", "choice2", "question", "label")
    strings = ("premise", "choice1", "choice2")
    label = ("label", (0, 1))

    def shape_problem(self, doc):
        return None if doc["question"] in ("cause", "effect") else \
            f"question={doc['question']!r} is not one of 'cause', 'effect'"

    @staticmethod
    def convert_choice(choice):
        return choice[0].lower() + choice[1:]

    def doc_to_text(self, doc):
        connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
        return doc["premise"].strip()[:-1] + f" {connector}"  # drop the final period

    def doc_to_target(self, doc):
        correct = doc["choice1"] if doc["label"] == 0 else doc["choice2"]
        return " " + self.convert_choice(correct)

    def _choices(self, doc):
        texts = [self.convert_choice(doc["choice1"]), self.convert_choice(doc["choice2"])]
        return [" " + t for t in texts], int(doc["label"]), texts


class MultiRC(Task):
    """One request per answer row; a question counts as right only if all its answers are."""

    name = "multirc"
    hub = ("aps/super_glue", "multirc")
    required_fields = ("paragraph", "question", "answer", "idx.paragraph", "idx.question", "label")
    strings = ("paragraph", "question")  # an answer may be empty (the mirror has one)
    label = ("label", (0, 1))

    @staticmethod
    def format_answer(answer, label):
        return f"{answer}\nIs the answer correct? {_yesno(label)}"

    def doc_to_text(self, doc):
        return f"{doc['paragraph']}\nQuestion: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc):
        return " " + self.format_answer(doc["answer"], doc["label"])

    def _choices(self, doc):
        conts = [" " + self.format_answer(doc["answer"], True), " " + self.format_answer(doc["answer"], False)]
        return conts, 0 if doc["label"] == 1 else 1, []

    def group(self, doc):
        # 0.2.0 acc_all keys questions by (paragraph idx, question idx)
        return f"{doc['idx']['paragraph']}-{doc['idx']['question']}"

    def leak_key(self, doc):
        return doc["idx"]["paragraph"]


class RTE(Task):
    # 0.2.0 uses glue/rte (sentence1, sentence2); we read super_glue/rte (premise, hypothesis):
    # same rows, same labels (0 = entailment).
    name = "rte"
    hub = ("aps/super_glue", "rte")
    required_fields = ("premise", "hypothesis", "label")
    strings = ("premise", "hypothesis")
    label = ("label", (0, 1))

    def doc_to_text(self, doc):
        return "{}\nQuestion: {} True or False?\nAnswer:".format(doc["premise"], doc["hypothesis"])

    def doc_to_target(self, doc):
        return " {}".format({0: "True", 1: "False"}[doc["label"]])

    def _choices(self, doc):
        return [" True", " False"], int(doc["label"]), []


class ReCoRD(Task):
    name = "record"
    metrics = ("em", "f1")
    hub = ("aps/super_glue", "record")
    required_fields = ("passage", "query", "entities", "answers", "idx.passage")
    strings = ("passage", "query")

    def shape_problem(self, doc):
        ents = doc["entities"]
        if not isinstance(ents, list) or not ents or not all(isinstance(x, str) for x in ents):
            return "entities must be a non-empty list of strings"
        if "@placeholder" not in doc["query"]:
            return "query has no @placeholder"
        if isinstance(doc["answers"], list) and not set(doc["answers"]) & set(ents):
            return "no answer is among the entities (the doc could never be scored right)"
        return None

    @staticmethod
    def process(doc):
        # 0.2.0 _process_doc: deduplicated, sorted entities and answers
        return sorted(set(doc["entities"])), sorted(set(doc["answers"]))

    @staticmethod
    def format_answer(query, entity):
        return f"  - {query}".replace("@placeholder", entity)

    def label_problem(self, doc):
        if not isinstance(doc["answers"], list) or not all(isinstance(a, str) for a in doc["answers"]):
            return f"answers={doc['answers']!r} is not a list of strings"
        return None

    def doc_to_text(self, doc):
        initial_text, *highlights = doc["passage"].strip().split("\n@highlight\n")
        text = initial_text + "\n\n"
        for highlight in highlights:
            text += f"  - {highlight}.\n"
        return text

    def doc_to_target(self, doc):
        # 0.2.0 demonstrates only the first (sorted) gold answer
        return self.format_answer(doc["query"], self.process(doc)[1][0])

    def _choices(self, doc):
        entities, answers = self.process(doc)
        conts = [self.format_answer(doc["query"], e) for e in entities]
        gold = [i for i, e in enumerate(entities) if e in answers]
        return conts, gold, entities

    def _answers(self, doc):
        return self.process(doc)[1]

    def leak_key(self, doc):
        return doc["idx"]["passage"]


class WordsInContext(_YesNo):
    name = "wic"
    hub = ("aps/super_glue", "wic")
    required_fields = ("sentence1", "sentence2", "start1", "end1", "label")
    strings = ("sentence1", "sentence2")
    ints = ("start1", "end1")
    label = ("label", (0, 1))

    def doc_to_text(self, doc):
        return (
            "Sentence 1: {}\nSentence 2: {}\nQuestion: Is the word '{}' used in the same way in the"
            " two sentences above?\nAnswer:".format(
                doc["sentence1"], doc["sentence2"], doc["sentence1"][doc["start1"] : doc["end1"]]
            )
        )


class SGWinogradSchemaChallenge(_YesNo):
    name = "wsc"
    # 0.2.0 read super_glue "wsc"; the mirror is "wsc.fixed" (same rows, 96 span texts repaired).
    hub = ("aps/super_glue", "wsc.fixed")
    required_fields = ("text", "span1_text", "span2_index", "span2_text", "label")
    strings = ("text", "span1_text", "span2_text")
    ints = ("span2_index",)
    label = ("label", (0, 1))

    def demo_filter(self, doc):
        # GPT-3's format (and 0.2.0's training_docs) only uses positive examples as demos
        return bool(doc["label"])

    def doc_to_text(self, doc):
        raw_passage = doc["text"]
        # NOTE (0.2.0): span indices are word-based, not character-based.
        pre = " ".join(raw_passage.split()[: doc["span2_index"]])
        post = raw_passage[len(pre) + len(doc["span2_text"]) + 1 :]
        passage = _general_detokenize(pre + " *{}*".format(doc["span2_text"]) + post)
        noun = doc["span1_text"]
        pronoun = doc["span2_text"]
        return (
            f"Passage: {passage}\n"
            + f'Question: In the passage above, does the pronoun "*{pronoun}*" refer to "*{noun}*"?\n'
            + "Answer:"
        )


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
