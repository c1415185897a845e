"""A physically pruned model: the heads and FFNs a shard's pruning masks keep, and nothing else,
written as a checkpoint folder that `model=local` loads (the library of jobs/export.py, whose
docstring says what the folder holds)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_model

from .evaluator import Evaluator, primary_metric
from .models import load_model
from .models.gates import check_model_masks, read_mask_file
from .models.physical import STRUCTURE_KEY, n_parameters, plan, prune_physically, structure
from .scoring import score_requests
from .store import Shard, atomic_dir, check_writable
from .tasks import build_requests


def check_out_dir(c: dict) -> Path:
    if not c["out_dir"]:
        raise ValueError("out_dir is required: add out_dir=<new folder> to the command")
    out = Path(str(c["out_dir"])).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir={c['out_dir']} already exists and is not empty; choose a new folder "
                         "(or remove it)")
    check_writable(out.parent, "out_dir")
    return out


def level(value, key: str) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value} is not a pruning level; give a percentage such as {key}=50") from None
    if not 0 <= p <= 100:
        raise ValueError(f"{key}={value} is not a percentage in 0..100")
    return p


def mask_levels(shard, kind: str) -> list[str]:
    out = []
    for f in (shard.path / "masks").glob(f"{kind}_*.safetensors"):
        try:
            out.append(float(f.name[len(kind) + 1: -len(".safetensors")]))
        except ValueError:  # masks of other rankings (heads_random0_50, ...)
            continue
    return [f"{p:g}" for p in sorted(out)]


def complete_shard(c: dict):
    """The shard the levels come from, which must be complete."""
    shard = Shard(c["store"]["root"], c["model"]["name"], c["task"], int(c["shot"]), int(c["seed"]))
    m = shard.manifest()
    run = f"`python jobs/score.py model={c['model']['name']} task={c['task']} shot={c['shot']}`"
    if m is None:
        raise ValueError(f"heads=/ffn= need the shard {shard.path}, which does not exist: run {run} first "
                         "(or give head_mask=/ffn_mask= files)")
    if m.get("status") != "complete":
        raise ValueError(f"the shard {shard.path} is not complete (status {m.get('status')}): finish it with "
                         f"{run} before exporting from it")
    return shard, m


def source_masks(c: dict) -> tuple[dict, dict, dict | None]:
    """({head_mask, ffn_mask} tensors present, where each came from, the shard's eval settings or None)."""
    masks, source, eval_cfg = {}, {}, None
    for level_key, file_key, kind in (("heads", "head_mask", "heads"), ("ffn", "ffn_mask", "ffn")):
        if c.get(level_key) is not None and c.get(file_key):
            raise ValueError(f"give {level_key}=<level> or {file_key}=<file>, not both")
        if c.get(file_key):
            masks[file_key] = read_mask_file(c[file_key], file_key)
            source[file_key] = {"file": str(c[file_key])}
        elif c.get(level_key) is not None:
            p = level(c[level_key], level_key)
            shard, manifest = complete_shard(c)
            f = shard.path / "masks" / f"{kind}_{p:g}.safetensors"
            if not f.is_file():
                have = ", ".join(mask_levels(shard, kind)) or "none"
                raise ValueError(f"{level_key}={c[level_key]}: the shard {shard.path} has no {kind} mask at level "
                                 f"{p:g}%; its levels are: {have}")
            masks[file_key] = read_mask_file(f, file_key)
            source[file_key] = {"shard": shard.name, "level": p, "file": str(f),
                                "config_hash": manifest.get("config_hash")}
            eval_cfg = (manifest.get("config") or {}).get("eval")
    if not masks:
        raise ValueError("nothing to prune: give heads=<level> and/or ffn=<level> (from the shard's curves), or "
                         "head_mask=<file> and/or ffn_mask=<file>")
    return masks, source, eval_cfg


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(c: dict, lm, pruned, masks: dict, reqs, n_repeats: int) -> dict:
    """Accuracy unpruned / gated / pruned, the largest log-prob gap pruned vs gated, and speed."""
    bs = int(c["eval"]["batch_size"])
    hm, fm = masks.get("head_mask"), masks.get("ffn_mask")
    ev, ev_pruned = Evaluator(lm, c["task"], bs), Evaluator(pruned, c["task"], bs)
    full, _ = ev(reqs)
    gated, gated_docs = ev(reqs, hm, fm)
    pr, pr_docs = ev_pruned(reqs)
    gap = max((abs(a - b) for d, e in zip(gated_docs, pr_docs) for a, b in zip(d["logprobs"], e["logprobs"])),
              default=0.0)
    m = primary_metric(c["task"])
    t_full = best_time(lambda: score_requests(lm, reqs, batch_size=bs), n_repeats)
    t_pruned = best_time(lambda: score_requests(pruned, reqs, batch_size=bs), n_repeats)
    g = lm.adapter.geometry
    kept_heads = int((hm != 0).sum()) if hm is not None else g.n_layers * g.n_heads
    kept_ffn = int((fm != 0).sum()) if fm is not None else g.n_layers
    before, after = n_parameters(lm.model), n_parameters(pruned.model)
    return {
        "parameters": {"before": before, "after": after, "removed": before - after,
                       "fraction_kept": round(after / before, 6)},
        "heads": {"kept": kept_heads, "total": g.n_layers * g.n_heads},
        "ffn": {"kept": kept_ffn, "total": g.n_layers},
        "accuracy": {"metric": m, "n": len(reqs), "unpruned": full[m]["value"], "gated": gated[m]["value"],
                     "pruned": pr[m]["value"], "pruned_ci95": pr[m]["ci95"]},
        "max_logprob_gap_pruned_vs_gated": gap,
        "speed": {"what": "score_requests on the eval docs, best of repeats", "repeats": n_repeats,
                  "unpruned_s": round(t_full, 4), "pruned_s": round(t_pruned, 4),
                  "speedup": round(t_full / t_pruned, 3) if t_pruned > 0 else None,
                  "device": str(lm.device), "threads": torch.get_num_threads()},
    }


def report_md(r: dict) -> str:
    p, a, s = r["parameters"], r["accuracy"], r["speed"]
    return "\n".join([
        f"# Pruned {r['model']} for {r['task']} {r['shot']}-shot", "",
        f"- heads kept: {r['heads']['kept']} / {r['heads']['total']}; FFNs kept: {r['ffn']['kept']} / "
        f"{r['ffn']['total']}",
        f"- parameters: {p['before']:,} -> {p['after']:,} ({100 * p['fraction_kept']:.1f}% kept)",
        f"- {a['metric']} on {a['n']} eval docs: unpruned {a['unpruned']:.4f}, gated {a['gated']:.4f}, "
        f"pruned {a['pruned']:.4f} (largest log-prob gap pruned vs gated: "
        f"{r['max_logprob_gap_pruned_vs_gated']:.2e} nats)",
        f"- speed ({s['what']}, {s['device']}, {s['threads']} threads): unpruned {s['unpruned_s']:.3f} s, "
        f"pruned {s['pruned_s']:.3f} s, speed-up x{s['speedup']}",
        *[f"- {key}: " + (f"level {v['level']:g}% of the shard {v['shard']} ({v['file']})" if "level" in v
                          else f"{v['file']}") for key, v in r["source"].items()], "",
        f"Load it with `model=local model.path=<this folder> model.doc_start={r['load_with']['doc_start']}`.", ""])


def write_export(out: Path, lm, pruned, plans, report: dict) -> None:
    """Everything into a temporary sibling folder, renamed to `out` at the end (store.atomic_dir)."""
    with atomic_dir(out) as tmp:
        save_model(pruned.model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads(pruned.model.config.to_json_string(use_diff=False))
        cfg["architectures"] = [type(pruned.model).__name__]
        cfg[STRUCTURE_KEY] = {"version": 1, **structure(plans), "source": report["source"],
                              "load_with": report["load_with"], "parameters": report["parameters"]}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        lm.tokenizer.save_pretrained(str(tmp))
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / "report.md").write_text(report_md(report))


def export_pruned(c: dict) -> tuple[dict, Path]:
    """The whole export of jobs/export.py: masks checked before the model loads, the pruned copy,
    its accuracy and speed measured, everything written at once. Returns (report, out_dir)."""
    out = check_out_dir(c)
    masks, source, shard_eval = source_masks(c)  # every file is checked before the model loads
    ev = {**c["eval"], **{k: v for k, v in (shard_eval or {}).items() if k in ("split", "limit")}}
    reqs = build_requests(c["task"], split=ev["split"], shot=int(c["shot"]), seed=int(c["seed"]),
                          limit=ev["limit"], data_dir=c["data"]["dir"])
    lm = load_model(c["model"])
    g = lm.adapter.geometry
    check_model_masks(masks, g, lambda key: f"{key} ({source[key]['file']}, {lm.name})")
    pruned = prune_physically(lm, masks.get("head_mask"), masks.get("ffn_mask"))
    report = {"model": lm.name, "task": c["task"], "shot": int(c["shot"]), "seed": int(c["seed"]),
              "eval": {"split": ev["split"], "limit": ev["limit"]}, "source": source,
              "load_with": {"doc_start": lm.spec["doc_start"], "max_length": lm.max_length},
              **measure(c, lm, pruned, masks, reqs, int(c["repeats"]))}
    write_export(out, lm, pruned, plan(g, masks.get("head_mask"), masks.get("ffn_mask")), report)
    return report, out
