"""The data side of the planner (icl_scale/plan.py): eval docs, importance candidates and tokens per doc
of each (task, shot), counted from a data mirror when it has the splits, else from conf/plan_tasks.yaml."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .plan_machine import PlanError

TABLE = "plan_tasks.yaml"  # conf/plan_tasks.yaml: the full splits' sizes and tokens, with their sources


@dataclass(frozen=True)
class TaskCounts:
    """One (task, shot)'s request lists, as the planner prices them."""

    task: str
    shot: int
    eval_docs: int
    train_docs: int  # importance candidates (WSC: its positive rows)
    eval_tokens: float  # mean per eval doc: its context(s) + every continuation
    eval_scored: float  # mean continuation tokens per eval doc (the positions unembedded)
    imp_tokens: float  # mean per importance example: context + gold continuation
    imp_scored: float
    multi_token: bool  # a continuation longer than one token: a continuation pass after each context pass
    source: str  # "data: <where>" or "table: <source>"


def _mean_tokens(tokenizer, requests) -> tuple[float, float, bool]:
    """(mean context + continuation tokens, mean continuation tokens, any continuation > 1 token)."""
    tot = scored = 0
    multi = False
    for r in requests:
        ctx = {r.pair(i)[0] for i in range(r.n_choices)}
        conts = [len(tokenizer(r.pair(i)[1], add_special_tokens=False)["input_ids"]) for i in range(r.n_choices)]
        tot += sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in ctx) + sum(conts)
        scored += sum(conts)
        multi |= max(conts) > 1
    n = max(1, len(requests))
    return tot / n, scored / n, multi


def count_from_data(task: str, shot: int, data_dir, tokenizer, sample: int) -> TaskCounts:
    """Docs counted from the split files; tokens from the first `sample` docs rendered as the shard
    renders them (seed 0), with `tokenizer`."""
    from .tasks import build_requests, get_task, load_split
    from .tasks.data import data_source
    from .tasks.fewshot import demo_pool

    t = get_task(task)
    evals = build_requests(task, shot=shot, limit=sample, data_dir=data_dir)
    imps = build_requests(task, split="train", shot=shot, limit=sample, data_dir=data_dir)
    e_tok, e_sc, multi = _mean_tokens(tokenizer, evals)
    imps = [replace(r, contexts=[r.pair(r.gold_index())[0]], continuations=[r.pair(r.gold_index())[1]], gold=0)
            for r in imps]
    i_tok, i_sc, _ = _mean_tokens(tokenizer, imps)
    train = load_split(t, "train", data_dir)
    return TaskCounts(task, shot, len(load_split(t, t.eval_split, data_dir)), len(demo_pool(t, train)), e_tok, e_sc,
                      i_tok, i_sc, multi, f"data: {data_source(t, t.eval_split, data_dir)}")


def count_from_table(task: str, shot: int, table: dict) -> TaskCounts:
    row = (table["tasks"] or {}).get(task)
    if row is None or shot not in row["tokens"]:
        raise PlanError(f"no task data for {task} {shot}-shot and conf/{TABLE} has no row for it: set data.dir to a "
                        f"mirror <dir>/<task>/<split>.jsonl (or add the row with docs/make_plan_tasks.py)")
    tok = row["tokens"][shot]
    return TaskCounts(task, shot, int(row["eval_docs"]), int(row["train_docs"]), float(tok["eval"]),
                      float(tok["eval_scored"]), float(tok["importance"]), float(tok["importance_scored"]),
                      bool(tok["multi_token"]), f"table: {row['source']}")


def _has_data(cfg: dict, task: str) -> bool:
    from .tasks import get_task
    from .tasks.data import resolve_source

    t = get_task(task)
    src = [resolve_source(t, s, cfg["data"]["dir"]) for s in (t.eval_split, "train")]
    return all(s.kind == "mirror" and (s.root / task / f"{split}.jsonl").is_file()
               for s, split in zip(src, (t.eval_split, "train")))


def task_counts(cfg: dict) -> list[TaskCounts]:
    """Every (task, shot) of the sweep: counted from the data when its splits are in a mirror, else
    from conf/plan_tasks.yaml (the full splits, with their sources)."""
    import yaml

    from .config import CONF_DIR

    table = yaml.safe_load((CONF_DIR / TABLE).read_text(encoding="utf-8"))
    tokenizer = None
    out = []
    for task in cfg["sweep"]["tasks"]:
        for shot in cfg["sweep"]["shots"]:
            if _has_data(cfg, task):
                tokenizer = tokenizer or planning_tokenizer(cfg)
                sample = int(cfg["plan"]["token_sample"])
                out.append(count_from_data(task, int(shot), cfg["data"]["dir"], tokenizer, sample))
            else:
                out.append(count_from_table(task, int(shot), table))
    return out


def planning_tokenizer(cfg: dict):
    """The model's tokenizer when it loads without a download; else SmolLM2's (embedded), a byte-level
    BPE of a similar vocabulary (49,152 vs OPT's 50,272) standing in for it."""
    from .models.loading import load_tokenizer, preset

    spec = cfg["model"]
    return load_tokenizer(spec if spec.get("source") in ("local", "gguf_wheel", "random") else preset("smollm2-135m"))
