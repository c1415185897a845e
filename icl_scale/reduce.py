"""The reducer job: aggregate every shard of a model, draw the figures, log to W&B; with several
models (`sweep.models`) also the cross-model figures (icl_scale.scale).

W&B layout: one run per shard (job_type `shard`, grouped by the sweep name) holding its curves as
a table and its unpruned/pruned metrics, and one `reduce` run with the tables behind the figures
(summary, seeds, cross-shot, transfer, retained induction capacity) and every figure. Offline by
default; the runs' files land under `wandb.dir`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .live import shard_run_id, shard_run_name
from .report import reduce_store
from .scale import reduce_scale
from .sweep_models import model_sections, sweep_dir, with_model
from .tracking import start_run
from .validation import ConfigError, check_no_secrets

log = logging.getLogger(__name__)

CURVE_COLUMNS = ["kind", "head_level", "ffn_level", "metric", "value", "ci_lo", "ci_hi", "n"]


def _flat(row: dict) -> dict:
    """{retained_x: {level: v}} -> retained_x_<level> columns (W&B tables hold scalars)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}_{lv}": x for lv, x in v.items()})
        else:
            out[k] = v
    return out


def _cell(v):
    return ", ".join(map(str, v)) if isinstance(v, list) else v


def run_reduce(cfg: dict, expected: list[tuple] | None = None) -> dict:
    check_no_secrets(cfg)
    model = cfg["model"]["name"]
    root = cfg["store"]["root"]
    if not Path(root).is_dir():  # a typo in store.root: say so, rather than make an empty store
        raise ConfigError(f"store.root={root} does not exist: set store.root to the folder the shards were "
                          "written to")
    res = reduce_store(root, model, expected)
    col = res.pop("collected")
    rows = res.pop("curves_rows")
    transfer = res.pop("transfer_rows")
    res.pop("figure_data")
    runs = []
    if cfg["wandb"]["mode"] != "disabled":
        wb = cfg["wandb"]
        group = wb["group"] or cfg["sweep"]["name"] or model
        # The reducer's own W&B settings apply to every run it logs (not those saved in shards).
        where = dict(mode=wb["mode"], project=wb["project"], entity=wb["entity"], dir=wb["dir"])
        shard_runs = []
        for d in col.ok:
            name = shard_run_name(d.shard.task, d.shard.shot, d.shard.seed)
            shard_rows = [r for r in rows if (r["task"], r["shot"], r["seed"]) == (d.shard.task, d.shard.shot,
                                                                                  d.shard.seed)]
            # The shard's own live run (icl_scale/live.py), resumed: one run per shard.
            with start_run({**d.manifest.get("resolved", {}), "config_hash": d.manifest.get("config_hash")},
                           name=name, group=group, job_type="shard",
                           run_id=shard_run_id(d.shard.path, d.manifest.get("config_hash")), **where) as run:
                run.log_table("curves", CURVE_COLUMNS, [[r[c] for c in CURVE_COLUMNS] for r in shard_rows])
                base = d.curves["heads"][0]["value"] if d.curves["heads"] else None
                run.log_summary({"task": d.shard.task, "shot": d.shard.shot, "seed": d.shard.seed,
                                 "metric": d.curves["metric"],
                                 "unpruned": base, "seconds": d.manifest.get("timings", {}).get("total")})
                runs.append(run.name)
                shard_runs.append([d.shard.task, d.shard.shot, d.shard.seed, run.id, run.name])
        with start_run({k: cfg[k] for k in ("model", "sweep", "pruning", "importance", "eval") if k in cfg},
                       name=f"reduce-{model}", group=group, job_type="reduce", **where) as run:
            run.log_table("shard_runs", ["task", "shot", "seed", "run_id", "name"], shard_runs)
            t1 = res["cross_shot"]
            for name, rows in (("summary", res["summary"]), ("seeds", res["seeds"]), ("transfer", transfer),
                               ("cross_shot", t1["per_task"] + [{"task": "mean", **r} for r in t1["mean_over_tasks"]]),
                               ("induction_retained", [_flat(r) for r in res["induction_relation"]]),
                               ("claims", res["claims"])):
                if rows:
                    cols = list(dict.fromkeys(k for r in rows for k in r))
                    run.log_table(name, cols, [[_cell(r.get(c)) for c in cols] for r in rows])
            run.log_table("problems", ["shard", "status", "reason"],
                          [[p["shard"], p["status"], p["reason"]] for p in res["problems"]])
            run.log_table("warnings", ["warning"], [[w] for w in res["warnings"]])
            for name, path in res["figures"].items():
                run.log_image(name.removesuffix(".png"), path)
            run.log_summary({"n_complete": res["n_complete"], "n_problems": len(res["problems"]),
                             "n_warnings": len(res["warnings"])})
            runs.append(run.name)
    res["wandb_runs"] = runs
    for p in res["problems"]:
        log.warning("shard %s: %s (%s)", p["shard"], p["status"], p["reason"])
    for w in res["warnings"]:
        log.warning("%s", w)
    return res


def wandb_where(cfg: dict) -> dict:
    wb = cfg["wandb"]
    return dict(mode=wb["mode"], project=wb["project"], entity=wb["entity"], dir=wb["dir"])


def run_reduce_scale(cfg: dict, models: list[dict], expected: list[tuple] | None = None) -> dict:
    """The cross-model reduction of a sweep's models into <store.root>/_sweeps/<sweep.name>/summary/
    (icl_scale.scale), and its W&B run (`reduce-scale-<sweep.name>`, in the sweep's group)."""
    check_no_secrets(cfg)
    root, name = cfg["store"]["root"], cfg["sweep"]["name"]
    if not Path(root).is_dir():
        raise ConfigError(f"store.root={root} does not exist: set store.root to the folder the shards were "
                          "written to")
    res = reduce_scale(root, name, models, expected, sweep_dir(cfg) / "summary")
    runs = []
    if cfg["wandb"]["mode"] != "disabled":
        group = cfg["wandb"]["group"] or name
        with start_run({k: cfg[k] for k in ("sweep", "pruning", "importance", "eval") if k in cfg} | {
                        "models": [m["name"] for m in models]}, name=f"reduce-scale-{name}", group=group,
                       job_type="reduce_scale", **wandb_where(cfg)) as run:
            for table in ("models", "prunable", "depth"):
                cols = list(dict.fromkeys(k for r in res[table] for k in r))
                if cols:
                    run.log_table(f"scale_{table}", cols, [[_cell(r.get(c)) for c in cols] for r in res[table]])
            run.log_table("problems", ["shard", "status", "reason"],
                          [[p["shard"], p["status"], p["reason"]] for p in res["problems"]])
            for file, path in res["figures"].items():
                run.log_image(file.removesuffix(".png"), path)
            run.log_summary({"n_models": len(models), "n_complete": res["n_complete"],
                             "n_problems": len(res["problems"])})
            runs.append(run.name)
    for p in res["problems"]:
        log.warning("shard %s: %s (%s)", p["shard"], p["status"], p["reason"])
    keep = ("n_complete", "problems", "warnings", "figures", "summary_dir", "not_drawn")
    return {**{k: res[k] for k in keep}, "wandb_runs": runs}


def reduce_sweep(cfg: dict, expected: list[tuple] | None = None) -> list[dict]:
    """What `python jobs/reduce.py` does: the model's reduction, or with `sweep.models` every model's
    and then the cross-model one (the last result)."""
    if not cfg["sweep"]["models"]:
        return [run_reduce(cfg, expected)]
    models = model_sections(cfg)
    return [*(run_reduce(with_model(cfg, m), expected) for m in models), run_reduce_scale(cfg, models, expected)]
