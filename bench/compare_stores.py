#!/usr/bin/env python
"""Compare two results stores file by file: are they the same results?

    python bench/compare_stores.py STORE_A STORE_B [--ignore resolved]
    python bench/compare_stores.py STORE_A STORE_B --predictions   # same results up to float rounding

Tensors (safetensors: every tensor and the metadata), JSON/JSONL (parsed), CSV (parsed) and images
(bytes) must be identical, apart from what differs between any two runs: wall-clock fields
(timings, start/finish/update times, seconds, runtime) and the store's own path inside files.
W&B runs, submitit logs and Hydra folders are not results and are skipped. Exits 1 on any
difference and lists them. `--ignore KEY` drops more JSON keys (e.g. `resolved`, the manifest's copy of
the whole config, when a change renamed a setting that does not enter the config hash). Used to show
that a refactor changed no result.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from safetensors import safe_open

SKIP_DIRS = {"wandb", "_submitit", "hydra", "_multirun", "checkpoint"}
VOLATILE = {"timings", "started", "finished", "updated", "seconds", "runtime_s"}


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts)}


def scrub(obj, root: str):
    """Drop wall-clock fields; write the store's path as <store>."""
    if isinstance(obj, dict):
        return {k: scrub(v, root) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [scrub(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<store>")
    return obj


def tensors(path: Path, root: str) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        meta = {k: v.replace(root, "<store>") for k, v in (f.metadata() or {}).items()}
        if "json" in meta:  # the induction scores keep their metadata as JSON (with a runtime)
            meta["json"] = scrub(json.loads(meta["json"]), "<store>")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def same_tensors(a: Path, b: Path, ra: str, rb: str) -> str | None:
    (ta, ma), (tb, mb) = tensors(a, ra), tensors(b, rb)
    if ma != mb:
        return "metadata differs"
    if ta.keys() != tb.keys():
        return f"tensor names differ: {sorted(ta)} vs {sorted(tb)}"
    for k in ta:
        if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not bool((ta[k] == tb[k]).all()):
            diff = (ta[k].double() - tb[k].double()).abs().max().item() if ta[k].shape == tb[k].shape else "shape"
            return f"tensor {k!r} differs (max |diff| {diff})"
    return None


def parsed(path: Path, root: str):
    text = path.read_text()
    if path.suffix == ".json":
        return scrub(json.loads(text), root)
    if path.suffix == ".jsonl":
        return [scrub(json.loads(line), root) for line in text.splitlines() if line.strip()]
    if path.suffix == ".csv":
        return [scrub(row, root) for row in csv.DictReader(io.StringIO(text))]
    return text.replace(root, "<store>")


def compare(a_root: Path, b_root: Path) -> list[str]:
    fa, fb = files(a_root), files(b_root)
    problems = [f"only in A: {f}" for f in sorted(fa - fb)] + [f"only in B: {f}" for f in sorted(fb - fa)]
    ra, rb = str(a_root.resolve()), str(b_root.resolve())
    for f in sorted(fa & fb):
        a, b = a_root / f, b_root / f
        if a.suffix == ".safetensors":
            why = same_tensors(a, b, ra, rb)
        elif a.suffix in (".json", ".jsonl", ".csv", ".md", ".txt"):
            why = None if parsed(a, ra) == parsed(b, rb) else "content differs"
        else:
            why = None if a.read_bytes() == b.read_bytes() else "bytes differ"
        if why:
            problems.append(f"{f}: {why}")
    return problems


def same_predictions(a_root: Path, b_root: Path) -> dict:
    """Two versions' shards judged as results rather than bytes: every shard's curve and grid values,
    the share of per-doc predictions that agree over all samples/*.jsonl, the largest per-choice
    log-likelihood gap (nats) and the FFN knock-out drops."""
    out: dict = {"shards": 0, "docs": 0, "same_pred": 0, "max_abs_dlogprob": 0.0, "curves_equal": True,
                 "knockout_equal": True, "curve_diffs": []}
    for ca in sorted(a_root.rglob("curves.json")):
        rel = ca.parent.relative_to(a_root)
        cb = b_root / rel / "curves.json"
        if not cb.is_file() or SKIP_DIRS & set(rel.parts):
            continue
        out["shards"] += 1
        ja, jb = json.loads(ca.read_text()), json.loads(cb.read_text())
        for kind in ("heads", "ffn", "combined"):
            va, vb = [p["value"] for p in ja[kind]], [p["value"] for p in jb[kind]]
            if va != vb:
                out["curves_equal"] = False
                out["curve_diffs"].append({"shard": str(rel), "kind": kind, "a": va, "b": vb})
        ia, ib = (dict(tensors(d.parent / "importance.safetensors", "")[0]) for d in (ca, cb))
        out["knockout_equal"] &= bool((ia["ffn_knockout"] == ib["ffn_knockout"]).all())
        for fa in sorted((ca.parent / "samples").glob("*.jsonl")):
            fb = cb.parent / "samples" / fa.name
            if not fb.is_file():
                continue
            ra, rb = (parsed(f, "") for f in (fa, fb))
            for x, y in zip(ra, rb):
                out["docs"] += 1
                out["same_pred"] += x["pred"] == y["pred"]
                gap = max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"]))
                out["max_abs_dlogprob"] = max(out["max_abs_dlogprob"], gap)
    out["same_pred_frac"] = out["same_pred"] / out["docs"] if out["docs"] else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--ignore", action="append", default=[], help="a JSON key to leave out (repeatable)")
    ap.add_argument("--predictions", action="store_true",
                    help="compare as results, not bytes: curves, knock-out drops, share of equal per-doc "
                         "predictions and the largest log-likelihood gap (prints JSON; exits 1 below 99.5%%)")
    args = ap.parse_args()
    if args.predictions:
        r = same_predictions(args.a, args.b)
        print(json.dumps(r, indent=1))
        sys.exit(0 if r["docs"] and r["same_pred_frac"] >= 0.995 else 1)
    VOLATILE.update(args.ignore)
    problems = compare(args.a, args.b)
    n = len(files(args.a) | files(args.b))
    for p in problems:
        print(p)
    print(f"{n} files compared: {'identical' if not problems else f'{len(problems)} differences'}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
