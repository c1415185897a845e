"""How much the importance continuation matters: head importance with the paper's doc_to_cont (the
bare choice) against the scored " " + choice (`importance.continuation=paper` vs `scoring`).

    ICL_SCALE_DATA_DIR=/path/to/mirror python bench/continuation_effect.py arc_easy piqa hellaswag

Prints, per task (0 shots, the first `--n` train docs), the true Spearman and the paper's argsort
statistic between the two [L, H] tensors and their largest relative difference (docs/fidelity.md)."""

from __future__ import annotations

import argparse
import os

from scipy import stats

from icl_scale.importance import gradient_importance
from icl_scale.models import load_model
from icl_scale.rankings import argsort_spearman
from icl_scale.tasks import build_requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tasks", nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=8, help="train docs")
    a = ap.parse_args()
    lm = load_model(a.model)
    for task in a.tasks:
        reqs = build_requests(task, split="train", shot=0, limit=a.n, data_dir=os.environ.get("ICL_SCALE_DATA_DIR"))
        paper, scoring = (gradient_importance(lm, reqs, batch_size=4, continuation=c).result()["heads"]
                          for c in ("paper", "scoring"))
        rel = ((paper - scoring).abs() / scoring.abs().clamp_min(1e-12)).max().item()
        rho = stats.spearmanr(paper.flatten().numpy(), scoring.flatten().numpy()).statistic
        print(f"{task} 0-shot, first {a.n} train docs: Spearman {rho:.3f}, argsort Spearman "
              f"{argsort_spearman(paper, scoring):.3f}, max relative difference {rel:.2f}", flush=True)


if __name__ == "__main__":
    main()
