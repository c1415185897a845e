"""Write the small task-data slices the tests run on (and the package's embedded demo slice).

    .venv/bin/python tests/data/make_fixtures.py --mirror DIR               # tests/data/fixtures/
    .venv/bin/python tests/data/make_fixtures.py --mirror DIR --embedded    # + icl_scale/tasks/embedded/

DIR (default $ICL_SCALE_DATA_DIR) is a full local mirror `<DIR>/<task>/<split>.jsonl` in the
Hugging Face row schema. Deterministic: the same mirror gives byte-identical output.

Fixtures (tests/data/fixtures/<task>/<split>.jsonl), for all 14 tasks and every split the mirror
has for the task:

* the first HEAD rows of the split (`head()` below: 40 for train and the eval split, at least the
  golden metric check's prefix, 20 for the ARC/OpenBookQA validation splits that are not evaluated,
  20 for the long-passage boolq/record train splits; record validation has 11 rows: all of them),
* plus every other row the golden tests name (make_golden.SPEC: eval doc ids, train demo ids),
* MultiRC keeps whole questions (its metric groups answer rows by question): the validation prefix
  is extended to the end of its last question; train is the first 2 questions of each of the first
  3 paragraphs (paragraph 0 alone has 168 answer rows, and the same-split sampler needs rows of
  other paragraphs),

always in mirror order, each line copied byte for byte. tests/data/fixtures/rows.json says which
mirror rows each fixture holds: fixture row i is the i-th row of the concatenated half-open ranges
[start, stop) of mirror row numbers; `mirror_rows` is the full split's size. (For hellaswag
validation, whose mirror file is a 1000-row sample, `official_rows` also gives each fixture row's
position in the official split, from the mirror's aux/validation_subset_positions.jsonl.)

Embedded demo slice (icl_scale/tasks/embedded/<task>/<split>.jsonl, with --embedded): the first
EMBEDDED rows of the demo's tasks and splits, byte for byte.

The READMEs next to both (provenance, licences) are written by hand, not by this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIXTURES = HERE / "fixtures"
EMBEDDED_DIR = REPO / "icl_scale" / "tasks" / "embedded"

sys.path.insert(0, str(HERE))
from make_golden import SPEC  # (task -> (module, class, eval split, doc ids, demo ids, n))

TASKS = list(SPEC)  # the 14 tasks
HEAD_TRAIN, HEAD_EVAL, HEAD_OTHER = 40, 40, 20
HEAD_LONG = {("boolq", "train"): 20, ("record", "train"): 20}  # passages of 1-2 kB per row
MULTIRC_TRAIN = (3, 2)  # (paragraphs, whole questions per paragraph)
EMBEDDED = {"copa": {"train": 200, "validation": 100}, "arc_easy": {"train": 200, "test": 100}}


def read_lines(path: Path) -> list[str]:
    """The file's lines without their newline; a trailing newline is not an empty row."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if any(not line.strip() for line in lines):
        raise SystemExit(f"{path}: blank line inside the file")
    return lines


def head(task: str, split: str) -> int:
    eval_split, n_metric = SPEC[task][2], SPEC[task][5]
    if split == eval_split:
        return max(HEAD_EVAL, n_metric)
    if split == "train":
        return HEAD_LONG.get((task, split), HEAD_TRAIN)
    return HEAD_OTHER


def needed(task: str, split: str) -> set[int]:
    """Rows the golden tests look up by number."""
    _, _, eval_split, doc_ids, demo_ids, _ = SPEC[task]
    return set(doc_ids) if split == eval_split else set(demo_ids) if split == "train" else set()


def multirc_key(line: str) -> tuple:
    idx = json.loads(line)["idx"]
    return idx["paragraph"], idx["question"]


def select(task: str, split: str, lines: list[str]) -> list[int]:
    """Mirror row numbers of the fixture, ascending."""
    n = len(lines)
    if task == "multirc" and split == "train":
        n_para, n_q = MULTIRC_TRAIN
        keys = [multirc_key(x) for x in lines]
        paras: dict = {}
        for i, (p, q) in enumerate(keys):
            if p not in paras and len(paras) == n_para:
                break
            qs = paras.setdefault(p, [])
            if q not in qs:
                qs.append(q)
        want = {(p, q) for p, qs in paras.items() for q in qs[:n_q]}
        rows = {i for i, k in enumerate(keys) if k in want}
    else:
        k = min(head(task, split), n)
        if task == "multirc":  # extend to the end of the last question
            keys = [multirc_key(x) for x in lines]
            while 0 < k < n and keys[k] == keys[k - 1]:
                k += 1
        rows = set(range(k))
    extra = needed(task, split)
    if extra and max(extra) >= n:
        raise SystemExit(f"{task} {split}: the golden tests need row {max(extra)} but the mirror has {n} rows")
    return sorted(rows | extra)


def ranges(rows: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for r in rows:
        if out and out[-1][1] == r:
            out[-1][1] = r + 1
        else:
            out.append([r, r + 1])
    return out


def check_whole_questions(task: str, split: str, lines: list[str], rows: list[int]) -> None:
    if task != "multirc":
        return
    keys = [multirc_key(x) for x in lines]
    have = {keys[i] for i in rows}
    full = {i for i, k in enumerate(keys) if k in have}
    if full != set(rows):
        raise SystemExit(f"multirc {split}: the fixture splits a question")


def official_positions(mirror: Path, task: str, split: str, rows: list[int]) -> list[int] | None:
    p = mirror / "hellaswag" / "aux" / "validation_subset_positions.jsonl"
    if (task, split) != ("hellaswag", "validation") or not p.is_file():
        return None
    pos = [json.loads(x)["row"] for x in read_lines(p)]
    return [pos[i] for i in rows]


def write_split(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8", newline="\n")


def clear(root: Path, tasks) -> None:
    """Remove the jsonl files this script writes (stale splits would otherwise linger)."""
    for task in tasks:
        for f in sorted((root / task).glob("*.jsonl")):
            f.unlink()


def make_fixtures(mirror: Path, out: Path = FIXTURES) -> dict:
    clear(out, TASKS)
    table: dict = {}
    for task in TASKS:
        splits = sorted(p.stem for p in (mirror / task).glob("*.jsonl"))
        if not splits:
            raise SystemExit(f"{mirror / task}: no <split>.jsonl files")
        for split in splits:
            lines = read_lines(mirror / task / f"{split}.jsonl")
            rows = select(task, split, lines)
            check_whole_questions(task, split, lines, rows)
            write_split(out / task / f"{split}.jsonl", [lines[i] for i in rows])
            entry = {"n": len(rows), "mirror_rows": len(lines), "ranges": ranges(rows)}
            off = official_positions(mirror, task, split, rows)
            if off is not None:
                entry["official_rows"] = off
            table.setdefault(task, {})[split] = entry
    write_rows_json(out / "rows.json", table)
    return table


ABOUT = ("row i of fixtures/<task>/<split>.jsonl is the i-th mirror row number in the concatenated "
         "half-open ranges [start, stop); mirror_rows: the full split's size; written by "
         "tests/data/make_fixtures.py")


def write_rows_json(path: Path, table: dict) -> None:
    """One line per (task, split), so a diff shows which slice changed."""
    tasks = []
    for task, splits in table.items():
        body = ",\n".join(f"   {json.dumps(split)}: {json.dumps(e)}" for split, e in splits.items())
        tasks.append(f"  {json.dumps(task)}: {{\n{body}\n  }}")
    text = "{\n" + f' "about": {json.dumps(ABOUT)},\n "tasks": {{\n' + ",\n".join(tasks) + "\n }\n}\n"
    assert json.loads(text) == {"about": ABOUT, "tasks": table}
    path.write_text(text, encoding="utf-8")


def make_embedded(mirror: Path, out: Path = EMBEDDED_DIR) -> dict:
    clear(out, EMBEDDED)
    sizes: dict = {}
    for task, splits in EMBEDDED.items():
        for split, n in splits.items():
            lines = read_lines(mirror / task / f"{split}.jsonl")
            if len(lines) < n:
                raise SystemExit(f"{task} {split}: the embedded slice wants {n} rows, the mirror has {len(lines)}")
            write_split(out / task / f"{split}.jsonl", lines[:n])
            sizes.setdefault(task, {})[split] = n
    return sizes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    env = os.environ.get("ICL_SCALE_DATA_DIR")
    ap.add_argument("--mirror", default=env, help="full mirror <dir>/<task>/<split>.jsonl (default $ICL_SCALE_DATA_DIR)")
    ap.add_argument("--embedded", action="store_true", help="also write icl_scale/tasks/embedded/")
    ap.add_argument("--out", default=str(FIXTURES), help="fixtures folder (default tests/data/fixtures)")
    a = ap.parse_args(argv)
    if not a.mirror:
        ap.error("no mirror: pass --mirror DIR or set ICL_SCALE_DATA_DIR")
    mirror = Path(a.mirror)
    if not mirror.is_dir():
        ap.error(f"--mirror {mirror}: no such folder")
    table = make_fixtures(mirror, Path(a.out))
    for task, splits in table.items():
        print(f"{task}: " + ", ".join(f"{s} {e['n']}/{e['mirror_rows']}" for s, e in splits.items()))
    if a.embedded:
        for task, splits in make_embedded(mirror).items():
            print(f"embedded {task}: " + ", ".join(f"{s} {n}" for s, n in splits.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
