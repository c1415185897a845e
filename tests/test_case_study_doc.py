"""Every number docs/case-study-smollm2.md states comes from a file the pipeline wrote, not from a
hand (issue 27): the reducer's claims table, statistics and report (docs/case_study/claims.json,
claims.md, report.md) and the collected baselines (summary.json), all copied there by
docs/make_case_study.py. Commands, settings and links (code spans, fenced blocks, link targets) are
not results and are left out; so are the section numbers of the paper's figures and tables."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "case-study-smollm2.md"
OUT = REPO / "docs" / "case_study"
SOURCES = ("claims.json", "claims.md", "report.md", "summary.json")
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")


def prose(text: str) -> str:
    """The doc without what is not a result: fenced blocks, code spans, link targets, figure and
    table names of the paper (Fig. 9, Table 1), and the model's name (SmolLM2-135M, OPT-66B)."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "] ", text)
    text = re.sub(r"\b(Figs?\.|Table|Tables|issue)\s+\d+(\s*-\s*\d+)?", " ", text)
    return re.sub(r"\b(SmolLM2-135M|SmolLM2|OPT-66B|Bansal et al\. 2022)\b", " ", text)


def numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def source_values() -> list[float]:
    vals = []
    for name in SOURCES:
        text = (OUT / name).read_text()
        if name.endswith(".json"):
            text = json.dumps(json.loads(text))  # every stored number as written
        vals += [float(x) for x in NUMBER.findall(text)]
    return vals


def quoted_from(doc_number: str, values: list[float]) -> bool:
    """A doc number is quoted when a source holds it at the doc's precision (a rounded 0.6174 is 0.62;
    signs aside: the doc writes drops, the claims differences; percent or fraction: 70% is 0.70)."""
    places = len(doc_number.split(".")[1]) if "." in doc_number else 0
    d = float(doc_number)
    for v in values:
        for x in (abs(v), abs(v) * 100):
            if round(x, places) == d or (places == 0 and abs(x - d) < 1e-9):
                return True
    return False


def test_the_number_filter_keeps_results_and_drops_settings():
    text = "acc 0.62 [-4.2, 25.8] at 70% (`eval.limit=200`, [Fig. 9](x_9.png)) ```run 5```"
    assert numbers(prose(text)) == ["0.62", "4.2", "25.8", "70"]
    assert quoted_from("0.62", [0.6174]) and quoted_from("70", [0.7]) and not quoted_from("0.63", [0.6174])


def test_every_number_in_the_case_study_is_in_the_files_the_pipeline_wrote():
    values = source_values()
    missing = sorted({n for n in numbers(prose(DOC.read_text())) if not quoted_from(n, values)}, key=float)
    assert not missing, f"numbers in {DOC.name} that no file in docs/case_study/ holds: {missing}"
