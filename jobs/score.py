#!/usr/bin/env python
"""One (model, task, shot) shard: importance, FFN knock-out, pruning curves -> store.

    python jobs/score.py task=piqa shot=5                      # embedded SmolLM2, full splits
    python jobs/score.py experiment=demo task=rte shot=1       # small limits
    python jobs/score.py experiment=paper task=piqa shot=5     # one shard of the paper's sweep
    python jobs/score.py task=piqa shot=5 seed=2               # another demonstration draw (its own folder)
    python jobs/score.py model=opt-125m task=copa shot=0 importance.n_examples=500 eval.limit=100 store.root=/data/store

A complete shard with the same settings is skipped (store.force=true recomputes); a killed run
resumes from its checkpoint. Any config key can be overridden; see conf/config.yaml.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icl_scale.cli import hydra_job  # noqa: E402


@hydra_job("config")
def main(c: dict) -> None:
    from icl_scale.shard import run_shard
    from icl_scale.store import shard_seed

    res = run_shard(c)
    name = f"{c['model']['name']}/{c['task']}/{c['shot']}shot/seed{shard_seed(c['shot'], c['seed'])}"
    if res["status"] == "skipped":
        print(f"{name}: already complete in {res['shard']} (store.force=true to recompute)")
        return
    base = res.get("baseline", {})
    t = res.get("timings", {}).get("total", 0)
    print(f"{name}: done in {t:.0f} s; "
          + ", ".join(f"unpruned {k}={v:.3f}" for k, v in base.items()) + f"; results in {res['shard']}")


if __name__ == "__main__":
    main()
