#!/usr/bin/env python
"""Cross-task transfer for one (model, task, shot, seed): prune the task's heads with the aggregate
ranking of `transfer.sources` (with and without the task) and with other tasks' own rankings, and
score its eval docs at every pruning level -> <shard>/transfer/ in the store.

    python jobs/transfer.py task=rte shot=1 transfer.sources=[copa,rte,piqa]
    python jobs/transfer.py task=rte shot=1 transfer.sources=[copa,rte] transfer.rankings_from=[copa]

Needs the source tasks' shards (same model, shot, seed; `python jobs/score.py task=... shot=...`);
one that is missing or incomplete is named and left out. Complete results with the same sources and
settings are skipped. The sweep runs it for every shard with sweep.transfer=true.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icl_scale.cli import hydra_job  # noqa: E402


@hydra_job("config")
def main(c: dict) -> None:
    from icl_scale.transfer import run_transfer

    res = run_transfer(c)
    for reason in res["left_out"]:
        print(f"left out: {reason}")
    where = f"{c['model']['name']}/{c['task']}/{c['shot']}shot/seed{res['seed']}"
    if res["status"] == "skipped":
        print(f"{where}: transfer curves already complete (same sources and settings)")
        return
    m = res["metric"]
    for name, rows in res["curves"].items():
        print(f"{where} {name}: " + ", ".join(f"{r['level']:g}% {m}={r['value']:.3f}" for r in rows))


if __name__ == "__main__":
    main()
