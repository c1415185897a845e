#!/usr/bin/env python
"""One (model, task, shot) shard: importance, FFN knock-out, pruning curves -> store.

    python jobs/score.py task=piqa shot=5                      # embedded SmolLM2, full splits
    python jobs/score.py experiment=demo task=rte shot=1       # small limits
    python jobs/score.py experiment=paper task=piqa shot=5     # one shard of the paper's sweep
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

    res = run_shard(c)
    if res["status"] == "skipped":
        print(f"{c['model']['name']}/{c['task']}/{c['shot']}shot: already complete in {res['shard']} "
              f"(store.force=true to recompute)")
        return
    base = res.get("baseline", {})
    t = res.get("timings", {}).get("total", 0)
    print(f"{c['model']['name']}/{c['task']}/{c['shot']}shot: done in {t:.0f} s; "
          + ", ".join(f"unpruned {k}={v:.3f}" for k, v in base.items()) + f"; results in {res['shard']}")


if __name__ == "__main__":
    main()
