"""Write conf/plan_tasks.yaml: the planner's table for tasks whose data is not at hand.

    ICL_SCALE_DATA_DIR=/path/to/mirror python docs/make_plan_tasks.py

Docs per split are the full splits' sizes (the sources below); tokens per doc (mean of the first
`plan.token_sample` docs, rendered as the shard renders them at 0, 1 and 5 shots, seed 0) are
counted from the mirror with SmolLM2's tokenizer (icl_scale.plan.count_from_data).
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (eval docs, importance candidates = train docs, source): the Hugging Face datasets the harness loads.
SUPER_GLUE = "aps/super_glue (SuperGLUE, Wang et al. 2019)"
FULL = {
    "hellaswag": (10042, 39905, "Rowan/hellaswag (Zellers et al. 2019)"),
    "piqa": (1838, 16113, "ybisk/piqa (Bisk et al. 2020)"),
    "arc_easy": (2376, 2251, "allenai/ai2_arc ARC-Easy (Clark et al. 2018)"),
    "arc_challenge": (1172, 1119, "allenai/ai2_arc ARC-Challenge (Clark et al. 2018)"),
    "openbookqa": (500, 4957, "allenai/openbookqa main (Mihaylov et al. 2018)"),
    "winogrande": (1267, 40398, "allenai/winogrande winogrande_xl (Sakaguchi et al. 2020)"),
    "boolq": (3270, 9427, SUPER_GLUE),
    "cb": (56, 250, SUPER_GLUE),
    "copa": (100, 400, SUPER_GLUE),
    "wic": (638, 5428, SUPER_GLUE),
    "wsc": (104, 259, SUPER_GLUE + "; train: its 259 positive rows of 554, the harness's training_docs"),
    "multirc": (4848, 27243, SUPER_GLUE + "; one doc per answer row"),
    "rte": (277, 2490, SUPER_GLUE),
    "record": (10000, 100730, SUPER_GLUE),
}
SHOTS = (0, 1, 5)


def main() -> int:
    import yaml

    from icl_scale.config import compose
    from icl_scale.models.loading import load_tokenizer, preset
    from icl_scale.plan import count_from_data

    data = os.environ.get("ICL_SCALE_DATA_DIR")
    if not data or not Path(data).is_dir():
        print("error: set ICL_SCALE_DATA_DIR to a mirror <dir>/<task>/<split>.jsonl", file=sys.stderr)
        return 2
    tok = load_tokenizer(preset("smollm2-135m"))
    sample = int(compose("plan")["token_sample"])
    tasks = {}
    for task, (n_eval, n_train, source) in FULL.items():
        tokens = {}
        for shot in SHOTS:
            c = count_from_data(task, shot, data, tok, sample)
            tokens[shot] = {"eval": round(c.eval_tokens, 1), "eval_scored": round(c.eval_scored, 1),
                            "importance": round(c.imp_tokens, 1), "importance_scored": round(c.imp_scored, 1),
                            "multi_token": c.multi_token}
        tasks[task] = {"eval_docs": n_eval, "train_docs": n_train, "source": source, "tokens": tokens}
        print(task, tokens[5])
    head = (f"# The planner's table (icl_scale/plan.py) for tasks whose data is not at hand. Written by\n"
            f"# docs/make_plan_tasks.py on {datetime.date.today()}: docs are the full splits' sizes (source per\n"
            f"# task); tokens per doc are means over the first {sample} docs of a mirror, rendered as the shard\n"
            "# renders them (seed 0) and tokenised with SmolLM2's tokenizer. eval: context(s) + every\n"
            "# continuation; eval_scored: the continuations; importance(_scored): context + gold continuation\n"
            "# (train split). multi_token: a continuation has more than one token (a second pass per batch).\n")
    (REPO / "conf" / "plan_tasks.yaml").write_text(head + yaml.safe_dump({"tasks": tasks}, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
