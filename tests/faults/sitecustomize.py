"""Fault injection for jobs that run in another process (torchrun ranks, submitit/Slurm jobs), which
a test cannot monkeypatch: put this folder on PYTHONPATH (`faults.hold_env`) and Python imports this
file at start-up. With ICL_SCALE_HOLD_AFTER="<stage>:<file>" a fresh (not resumed) run waits after
<stage> for as long as <file> exists, so the test can kill or requeue it at a known point; with
"importance@<n>:<file>" it waits in the middle of the importance pass, once a checkpoint covering at
least <n> examples is written. The resumed run goes straight through."""

import os
import time

HOLD_ENV = "ICL_SCALE_HOLD_AFTER"
HOLD_MAX_S = 900


def _install() -> None:
    point, _, hold_file = os.environ.get(HOLD_ENV, "").partition(":")
    if not (point and hold_file):
        return
    from icl_scale import runs

    def hold(run) -> None:
        t0 = time.time()
        while not run.resumed and os.path.exists(hold_file) and time.time() - t0 < HOLD_MAX_S:
            time.sleep(0.2)

    def after_stage(run, stage):
        if stage == point:
            hold(run)

    def after_checkpoint(run, stage, n_done):
        name, _, n = point.partition("@")
        if n and stage == name and n_done >= int(n):
            hold(run)

    runs.STAGE_CALLBACKS.append(after_stage)
    runs.CHECKPOINT_CALLBACKS.append(after_checkpoint)


_install()
