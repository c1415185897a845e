"""python -m icl_scale.tasks render --task T --shot K [--split S] [--limit N] [--seed S] [--data-dir D]

Prints one JSON line per doc: {"doc", "contexts", "continuations", "gold"}.
"""

from __future__ import annotations

import argparse
import json
import sys

from .build import build_requests
from .registry import TASKS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse prints usage + error)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m icl_scale.tasks", description="Render task prompts (lm-eval 0.2.0 formats).")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    r = sub.add_parser("render", help="print one JSON line per doc: doc, contexts, continuations, gold")
    r.add_argument("--task", required=True, metavar="TASK",
                   help=f"one of: {', '.join(TASKS)}; or a task file (path/to/task.yaml, lm-eval 0.4 style)")
    r.add_argument("--shot", type=int, default=0, help="number of demonstrations (default 0)")
    r.add_argument("--split", default=None, help="split to render (default: the task's eval split)")
    r.add_argument("--limit", type=int, default=None, help="render only the first N docs")
    r.add_argument("--seed", type=int, default=0, help="demo sampling seed (default 0)")
    r.add_argument("--data-dir", default=None,
                   help="local mirror, or hub (default: $ICL_SCALE_DATA_DIR, else the embedded slice, else the hub)")
    r.add_argument("--demo-split", default="train", help="split the demos come from (default train)")
    a = p.parse_args(argv)
    try:
        reqs = build_requests(a.task, split=a.split, shot=a.shot, seed=a.seed, limit=a.limit,
                              data_dir=a.data_dir, demo_split=a.demo_split)
    except (ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    out = sys.stdout
    for req in reqs:
        line = {"doc": req.doc_id, "contexts": req.contexts, "continuations": req.continuations, "gold": req.gold}
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
