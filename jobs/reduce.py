#!/usr/bin/env python
"""Aggregate a model's shards: the paper's figures, report.md (the numbers behind each figure),
tables (CSV/JSON) and W&B runs. The sweep runs it as a dependent job; run it by hand any time:

    python jobs/reduce.py                         # the embedded model's store
    python jobs/reduce.py experiment=paper wandb.mode=online
    python jobs/reduce.py store.root=/data/store model=opt-1.3b 'sweep.seeds=[0,1,2]'
    python jobs/reduce.py experiment=scale        # every model's figures, then the cross-model ones

Missing, failed or corrupt shards are named; the rest are still aggregated. Complete shards made
with settings that differ from the other shards' are aggregated too, and named in a warning.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icl_scale.cli import hydra_job, print_problems, print_warnings  # noqa: E402


@hydra_job("config")
def main(c: dict) -> None:
    from icl_scale.reduce import reduce_sweep
    from icl_scale.store import shard_seed
    from icl_scale.sweep_models import sweep_dir

    sw = c["sweep"]
    expected = sorted({(t, int(k), shard_seed(k, seed)) for t in sw["tasks"] for k in sw["shots"]
                       for seed in sw["seeds"]})
    results = reduce_sweep(c, expected)
    res = results[-1]  # with sweep.models: the cross-model reduction (each model's is in its summary/)
    print_problems(res["problems"])
    print_warnings(res["warnings"])
    out = (sweep_dir(c) / "summary" if c["sweep"]["models"] else Path(c["store"]["root"]) / c["model"]["name"]
           / "summary").resolve()
    print(f"reduced {res['n_complete']} shards ({len(res['problems'])} problems, {len(res['warnings'])} warnings); "
          f"{len(res['figures'])} figures, report.md and tables in {out}")
    for w in res.get("not_drawn", []) if c["sweep"]["models"] else []:
        print(f"  not drawn: {w}")


if __name__ == "__main__":
    main()
