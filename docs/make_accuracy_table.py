#!/usr/bin/env python
"""Zero-shot accuracy of a model on every task the data mirror holds -> docs/<model>_0shot.{md,json}.

    ICL_SCALE_DATA_DIR=/path/to/mirror python docs/make_accuracy_table.py [--model smollm2-135m] [--limit N]

`--limit` caps the docs per task (the first N of the evaluated split); n in the table is what was
scored. 95% intervals: Wilson for proportions, bootstrap for F1 (see icl_scale/tasks/metrics.py).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icl_scale.models import load_model  # noqa: E402
from icl_scale.shard import Evaluator  # noqa: E402
from icl_scale.store import write_bytes, write_json  # noqa: E402
from icl_scale.tasks import TASKS, build_requests, get_task  # noqa: E402
from icl_scale.tasks.data import TaskDataError  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--out", default=str(Path(__file__).parent))
    args = ap.parse_args()
    lm = load_model(args.model)
    rows = []
    for task in args.tasks.split(","):
        t = get_task(task)
        try:
            reqs = build_requests(task, shot=0, limit=args.limit)
        except TaskDataError as e:
            print(f"{task}: skipped ({e})")
            continue
        t0 = time.time()
        metrics, _ = Evaluator(lm, task, 8, progress=True)(reqs)
        dt = time.time() - t0
        row = {"task": task, "split": t.eval_split, "n_docs": len(reqs), "seconds": round(dt, 1), "metrics": metrics}
        rows.append(row)
        print(task, {k: round(v["value"], 4) for k, v in metrics.items()}, f"n={len(reqs)} {dt:.0f}s", flush=True)
    out = Path(args.out)
    write_json(out / f"{args.model}_0shot.json", {"model": args.model, "limit": args.limit, "rows": rows})
    lines = ["| task | split | metric | value | 95% CI | n |", "|---|---|---|---|---|---|"]
    for r in rows:
        for m, v in r["metrics"].items():
            ci = f"{v['ci95'][0]:.3f}-{v['ci95'][1]:.3f}"
            lines.append(f"| {r['task']} | {r['split']} | {m} | {v['value']:.3f} | {ci} | {v['n']} |")
    write_bytes(out / f"{args.model}_0shot.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
