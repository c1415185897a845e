"""The induction job (jobs/induction.py, the sweep's InductionJob, the demo): load the model, score
every head, write <store.root>/<model>/induction/ (scores.safetensors, scores.json, heatmaps).

scores.json records the settings' hash (`induction_key`: the model's hashed settings and the
induction block), so a rerun with the same settings finds the scores done and loads nothing, and
the sweep submits the job again only when a setting changed (store.force=true recomputes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .. import store
from ..figures import pyplot, save_png
from ..schema import hashed_settings
from .options import InductionConfigError, copying_options_from
from .scores import InductionResult, induction_scores

# The `induction:` block of conf/config.yaml, the one place these are set (no defaults here).
CONFIG_KEYS = ("n_seeds", "seed", "exclude_frac", "bos", "scores", "original_indexing", "copying", "top_k",
               "progress", "dtype")
DTYPES = (None, "auto", "float32", "bfloat16", "float16")  # induction.dtype; null: model.dtype
log = logging.getLogger(__name__)


def heatmap(scores: torch.Tensor, title: str, path: Path, cmap: str = "viridis") -> None:
    """Layers x heads heatmap (layer 0 at the bottom, 0-based labels), small PNG, written atomically."""
    plt = pyplot()
    L, H = scores.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.28 * H, 1.2 + 0.16 * L), dpi=80)
    im = ax.imshow(scores.numpy(), origin="lower", aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, H, max(1, H // 8)))
    ax.set_yticks(range(0, L, max(1, L // 10)))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
    fig.tight_layout()
    save_png(fig, path)


def save_result(result: InductionResult, out_dir: Path, k: int = 10, key: str | None = None) -> dict[str, Path]:
    """scores.safetensors ([L, H] float32 each), heatmaps (mean, variance) and scores.json (with the
    settings' hash `key`), each written to a temporary file in out_dir and renamed into place
    (icl_scale.store); scores.json last, so its hash says the rest is written."""
    out_dir = Path(out_dir)
    tensors = {k_: v.float().contiguous() for k_, v in result.scores().items()}
    meta = result.metadata(k) | ({"config_hash": key} if key else {})
    paths = {"scores": out_dir / "scores.safetensors", "json": out_dir / "scores.json"}
    store.write_tensors(paths["scores"], tensors, metadata={"json": json.dumps(meta)})
    for name, t in tensors.items():
        label = name.replace("_var", " (variance)").replace("_", " ")
        paths[name] = out_dir / f"{name}.png"
        heatmap(t, f"{result.model} {label}, {result.n_seeds} seeds", paths[name],
                cmap="magma" if name.endswith("_var") else "viridis")
    store.write_json(paths["json"], meta)
    return paths


def induction_settings(cfg) -> dict:
    """The `induction:` block as a plain dict; a missing or unknown key is a config error."""
    from omegaconf import OmegaConf

    block = cfg["induction"]
    ind = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block)
    missing = [k for k in CONFIG_KEYS if k not in ind]
    unknown = sorted(set(ind) - set(CONFIG_KEYS))
    if missing or unknown:
        raise InductionConfigError(
            (f"the induction config lacks {', '.join('induction.' + k for k in missing)}" if missing else
             f"the induction config has unknown keys {', '.join('induction.' + k for k in unknown)}")
            + f"; conf/config.yaml's induction block defines {', '.join(CONFIG_KEYS)}")
    if ind["dtype"] not in DTYPES:
        raise InductionConfigError(f"induction.dtype={ind['dtype']!r} is not an option; use null (model.dtype), "
                                   "auto, float32, bfloat16 or float16")
    return ind


def induction_model_spec(cfg, ind: dict) -> dict:
    """cfg.model with `induction.dtype` in place of model.dtype when it is set (the paper's
    prefix_matching_copying.py loads the model in float32, its evaluation in float16)."""
    from omegaconf import OmegaConf

    spec = cfg["model"]
    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
    return spec if ind["dtype"] is None else {**spec, "dtype": ind["dtype"]}


def induction_key(cfg) -> str:
    """The hash of what the scores depend on: the model's hashed settings (induction.dtype in place of
    model.dtype when set) and the induction block but its progress bar."""
    ind = induction_settings(cfg)
    model = hashed_settings({"model": induction_model_spec(cfg, ind)}, "model")
    return store.config_hash({"model": model, "induction": {k: v for k, v in ind.items() if k != "progress"}})


def done_paths(out_dir: Path, key: str) -> dict[str, Path] | None:
    """The files of scores made with the settings hashed as `key`, or None when they are not all there."""
    try:
        meta = json.loads((Path(out_dir) / "scores.json").read_text())
    except (OSError, ValueError):
        return None
    paths = {"scores": Path(out_dir) / "scores.safetensors", "json": Path(out_dir) / "scores.json"}
    paths |= {p.stem: p for p in sorted(Path(out_dir).glob("*.png"))}
    ok = isinstance(meta, dict) and meta.get("config_hash") == key and paths["scores"].exists()
    return paths if ok else None


def weights_read(lm) -> list:
    """The parameters the scores read outside a forward pass (the copying score's OV circuit: every
    output projection, the unembedding, the final norm, OPT-350m's project_out). Under ZeRO-3 they
    are partitioned placeholders until gathered (icl_scale.models.zero.gathered)."""
    a = lm.adapter
    decoder = getattr(getattr(lm.model, "model", None), "decoder", None)
    mods = [a.o_proj(layer) for layer in range(a.geometry.n_layers)]
    mods += [a.final_norm(), lm.model.get_output_embeddings(), getattr(decoder, "project_out", None)]
    return [p for m in mods if m is not None for p in m.parameters(recurse=False)]


def run_job(cfg) -> dict:
    """Load cfg.model, score every head, write <store.root>/<model.name>/induction/. Returns the paths.
    cfg: the composed config (a DictConfig or a plain dict)."""
    from ..distributed import dist_env
    from ..models import load_model
    from ..models.zero import gathered

    ind = induction_settings(cfg)
    key, spec = induction_key(cfg), induction_model_spec(cfg, ind)
    done = None if cfg["store"]["force"] else done_paths(store.induction_dir(cfg["store"]["root"], spec["name"]), key)
    if done:  # every rank reads the same files, so every rank skips
        log.info("%s induction scores are complete (settings %s): nothing to do", spec["name"], key)
        return {k: str(v) for k, v in done.items()}
    store.set_writer(dist_env().is_main)  # several ranks (ZeRO-3) compute the same scores; rank 0 writes
    lm = load_model(spec)
    with gathered(weights_read(lm)):  # ZeRO-3: full tensors of what the scores read directly
        result = induction_scores(
            lm, bos=ind["bos"], n_seeds=int(ind["n_seeds"]), seed=int(ind["seed"]),
            exclude_frac=float(ind["exclude_frac"]), scores=tuple(ind["scores"]),
            original_indexing=bool(ind["original_indexing"]), copying=copying_options_from(ind["copying"]),
            progress=bool(ind["progress"]))
    paths = save_result(result, store.induction_dir(cfg["store"]["root"], lm.name), k=int(ind["top_k"]), key=key)
    return {k: str(v) for k, v in paths.items()}
