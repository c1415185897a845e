"""The SuperGLUE tasks of the paper (BoolQ, CB, COPA, WiC, WSC, MultiRC, RTE, ReCoRD), rendered
exactly as lm-eval 0.2.0 renders them (strings copied from its lm_eval/tasks/*.py, checked by
tests/test_tasks.py against golden strings from 0.2.0's own classes)."""

from __future__ import annotations

import re
from typing import ClassVar

from .task import Task


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
