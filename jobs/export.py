#!/usr/bin/env python
"""Export a physically pruned model: the heads and FFNs a shard's pruning masks keep, and nothing else.

    python jobs/export.py model=smollm2-135m task=copa shot=1 heads=70 ffn=20 out_dir=exports/copa1
    python jobs/export.py model=tiny-opt task=copa shot=1 out_dir=exports/x \
        head_mask=store/tiny-opt/copa/1shot/seed0/masks/heads_50.safetensors

`heads=<p>` / `ffn=<p>` take the masks of pruning level p% from the complete shard
<store.root>/<model>/<task>/<shot>shot/seed<seed>/masks/{heads,ffn}_<p>.safetensors (jobs/score.py
makes it); `head_mask=<file>` / `ffn_mask=<file>` take mask files instead (see jobs/evaluate.py).
Leave one out to keep every head (or every FFN).

out_dir (new, or an empty folder) receives:
  model.safetensors   the pruned weights only (icl_scale.models.physical; no pickle)
  config.json         the base architecture's HF config plus an `icl_scale_pruning` block: the kept
                      heads and whether the FFN is kept, per layer, and the source masks
  tokenizer files
  report.json/.md     parameters before/after; the task's accuracy (the shard's eval docs: its
                      eval.split/eval.limit; with mask files the command's eval.*) unpruned, gated
                      and pruned; the measured speed-up of score_requests on those docs (best of
                      `repeats`, default 3)

Load it back with `model=local model.path=<out_dir>` (add model.doc_start=<what the source model
used>, which report.md names). Everything is written to a temporary sibling folder and renamed into
place at the end: a failed export leaves nothing behind. Errors are one `error:` line.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icl_scale.cli import hydra_job  # noqa: E402


def check_out_dir(c: dict) -> Path:
    from icl_scale.store import check_writable

    if not c.get("out_dir"):
        raise ValueError("out_dir is required: add out_dir=<new folder> to the command")
    out = Path(str(c["out_dir"])).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir={c['out_dir']} already exists and is not empty; choose a new folder "
                         "(or remove it)")
    check_writable(out.parent, "out_dir")
    return out


def _level(value, key: str) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value} is not a pruning level; give a percentage such as {key}=50") from None
    if not 0 <= p <= 100:
        raise ValueError(f"{key}={value} is not a percentage in 0..100")
    return p


def _levels(shard, kind: str) -> list[str]:
    out = []
    for f in (shard.path / "masks").glob(f"{kind}_*.safetensors"):
        try:
            out.append(float(f.name[len(kind) + 1: -len(".safetensors")]))
        except ValueError:  # masks of other rankings (heads_random0_50, ...)
            continue
    return [f"{p:g}" for p in sorted(out)]


def complete_shard(c: dict):
    """The shard the levels come from, which must be complete."""
    from icl_scale.store import Shard

    shard = Shard(c["store"]["root"], c["model"]["name"], c["task"], int(c["shot"]), int(c.get("seed", 0)))
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
    from icl_scale.models.gates import read_mask_file

    masks, source, eval_cfg = {}, {}, None
    for level_key, file_key, kind in (("heads", "head_mask", "heads"), ("ffn", "ffn_mask", "ffn")):
        if c.get(level_key) is not None and c.get(file_key):
            raise ValueError(f"give {level_key}=<level> or {file_key}=<file>, not both")
        if c.get(file_key):
            masks[file_key] = read_mask_file(c[file_key], file_key)
            source[file_key] = {"file": str(c[file_key])}
        elif c.get(level_key) is not None:
            p = _level(c[level_key], level_key)
            shard, manifest = complete_shard(c)
            f = shard.path / "masks" / f"{kind}_{p:g}.safetensors"
            if not f.is_file():
                have = ", ".join(_levels(shard, kind)) or "none"
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
    import time

    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(c: dict, lm, pruned, masks: dict, reqs, n_repeats: int) -> dict:
    """Accuracy unpruned / gated / pruned, the largest log-prob gap pruned vs gated, and speed."""
    import torch

    from icl_scale.models.physical import n_parameters
    from icl_scale.scoring import score_requests
    from icl_scale.shard import Evaluator, primary_metric

    bs = int(c["eval"].get("batch_size", 8))
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
    """Everything into a temporary sibling folder, renamed to `out` at the end."""
    import json
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_model

    from icl_scale.models.physical import STRUCTURE_KEY, structure

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_model(pruned.model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads(pruned.model.config.to_json_string(use_diff=False))
        cfg["architectures"] = [type(pruned.model).__name__]
        cfg[STRUCTURE_KEY] = {"version": 1, **structure(plans), "source": report["source"],
                              "load_with": report["load_with"], "parameters": report["parameters"]}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        lm.tokenizer.save_pretrained(str(tmp))
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / "report.md").write_text(report_md(report))
        for f in tmp.iterdir():  # mkdtemp and safetensors make owner-only files; exports are shared like any file
            os.chmod(f, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        os.rename(tmp, out)  # replaces an empty out_dir
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    import os

    m = os.umask(0)
    os.umask(m)
    return m


@hydra_job("export")
def main(c: dict) -> None:
    from icl_scale.models import load_model
    from icl_scale.models.gates import check_model_masks
    from icl_scale.models.physical import plan, prune_physically
    from icl_scale.tasks import build_requests
    from icl_scale.validation import integer

    integer(c, "repeats", lo=1)  # before anything loads
    out = check_out_dir(c)
    masks, source, shard_eval = source_masks(c)  # every file is checked before the model loads
    ev = {**c["eval"], **{k: v for k, v in (shard_eval or {}).items() if k in ("split", "limit")}}
    reqs = build_requests(c["task"], split=ev.get("split"), shot=int(c["shot"]), seed=int(c.get("seed", 0)),
                          limit=ev.get("limit"), data_dir=(c.get("data") or {}).get("dir"))
    lm = load_model(c["model"])
    g = lm.adapter.geometry
    check_model_masks(masks, g, lambda key: f"{key} ({source[key]['file']}, {lm.name})")
    pruned = prune_physically(lm, masks.get("head_mask"), masks.get("ffn_mask"))
    report = {"model": lm.name, "task": c["task"], "shot": int(c["shot"]), "seed": int(c.get("seed", 0)),
              "eval": {"split": ev.get("split"), "limit": ev.get("limit")}, "source": source,
              "load_with": {"doc_start": lm.spec.get("doc_start", "none"), "max_length": lm.max_length},
              **measure(c, lm, pruned, masks, reqs, c["repeats"])}
    write_export(out, lm, pruned, plan(g, masks.get("head_mask"), masks.get("ffn_mask")), report)
    p, a, s = report["parameters"], report["accuracy"], report["speed"]
    print(f"{lm.name} {c['task']} {c['shot']}-shot: parameters {p['before']:,} -> {p['after']:,}; "
          f"{a['metric']} unpruned {a['unpruned']:.4f}, pruned {a['pruned']:.4f} (n={a['n']}); "
          f"speed-up x{s['speedup']} -> {out}")


if __name__ == "__main__":
    main()
