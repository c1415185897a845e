#!/usr/bin/env python
"""Submit the sweep: per model one array element per (task, shot, seed), the induction job, and a
reducer that waits for them; with several models (sweep.models) a cross-model reducer after those.
`make sweep` runs this.

    python jobs/sweep.py                                        # embedded model, local executor
    python jobs/sweep.py experiment=demo launcher=slurm         # the demo on a Slurm cluster
    python jobs/sweep.py experiment=paper                       # OPT-66B, 14 tasks x {0,1,5}, Slurm
    python jobs/sweep.py sweep.tasks=[piqa] sweep.shots=[5]     # just one shard
    python jobs/sweep.py launcher=slurm sweep.wait=false        # submit and return
    python jobs/sweep.py experiment=scale                       # OPT 125m to 66B, each on its own GPUs
    python jobs/sweep.py 'sweep.models=[tiny-opt,smollm2-135m]' # two models, then the cross-model figures

Complete shards (same settings) are never resubmitted or deleted; store.force=true recomputes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icl_scale.cli import hydra_job, print_problems, print_warnings  # noqa: E402


@hydra_job("config")
def main(c: dict) -> None:
    from icl_scale.sweep import SweepError, submit
    from icl_scale.sweep_models import sweep_dir

    try:
        sub = submit(c, wait=c["sweep"].get("wait"))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    root = Path(c["store"]["root"]).resolve()
    models = ", ".join(sub.models) if c["sweep"]["models"] else c["model"]["name"]
    summary = sweep_dir(c).resolve() / "summary" if c["sweep"]["models"] else root / c["model"]["name"] / "summary"
    if not sub.all_jobs():
        running = f"; being computed by other jobs: {', '.join(sub.running)}" if sub.running else ""
        print(f"sweep {c['sweep']['name']}: {len(sub.skipped)} shards and the induction scores are "
              f"complete in {root}{running}; nothing submitted (store.force=true to recompute)")
        return
    inductions = [j.job_id for j in [sub.induction_job, *(m.induction_job for m in sub.models.values())] if j]
    print(f"sweep {c['sweep']['name']} ({c['launcher']['name']}): {len(sub.shard_jobs)} shard jobs"
          + (f" [{sub.shard_jobs[0].job_id.split('_')[0]}]" if sub.shard_jobs else "")
          + (f", induction [{', '.join(inductions)}]" if inductions else "")
          + ("" if not sub.models else f" of {len(sub.models)} models ({models})")
          + f", reducer [{sub.reduce_job.job_id}]; {len(sub.skipped)} already complete"
          + (f", {len(sub.running)} being computed by other jobs ({', '.join(sub.running)})" if sub.running else ""))
    where = "<model>" if c["sweep"]["models"] else c["model"]["name"]
    print(f"results: {root}/{where}/<task>/<shot>shot   figures: {summary}   "
          f"W&B ({c['wandb']['mode']}): {Path(c['wandb']['dir']).resolve()}/wandb"
          + (f"   manifest: {sub.manifest}" if sub.manifest else ""))
    if sub.reduce_job.done():
        res = sub.reduce_job.result()
        print_problems(res["problems"])
        print_warnings(res.get("warnings", []))
        print(f"reduced {res['n_complete']} shards; figures in {summary}")


if __name__ == "__main__":
    main()
