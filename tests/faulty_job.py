#!/usr/bin/env python
"""jobs/score.py with a fault on one rank, for test_data_parallel's failing-rank test (test code only).

    FAULT_RANK=1 FAULT_AT=2 torchrun --standalone --nproc_per_node 2 tests/faulty_job.py <score.py overrides>

On rank FAULT_RANK the FAULT_AT-th importance batch raises a ValueError (as a bad row or a bug would),
and the rank's interpreter shutdown then hangs for 10 minutes (as a NCCL teardown waiting on its peers
can): the other ranks must stop on their own, promptly, naming the rank and its exception."""

import atexit
import itertools
import os
import runpy
import sys
import time
from pathlib import Path

SCORE = Path(__file__).resolve().parents[1] / "jobs" / "score.py"

if os.environ.get("RANK") == os.environ["FAULT_RANK"]:
    import icl_scale.importance as importance

    real, calls = importance._batch_sums, itertools.count(1)

    def faulty(*a, **kw):
        if next(calls) == int(os.environ["FAULT_AT"]):
            atexit.register(time.sleep, 600)
            raise ValueError(f"injected fault on rank {os.environ['RANK']}")
        return real(*a, **kw)

    importance._batch_sums = faulty

sys.argv[0] = str(SCORE)
runpy.run_path(str(SCORE), run_name="__main__")
