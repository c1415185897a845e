"""Configuration glue shared by every entry point and job: where the Hydra configs live, composing
them over the schema (icl_scale/schema.py) into plain dicts, and the process environment a job runs in."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

# The Hydra configs ship inside the package (icl_scale/conf links to the repository's conf/), so
# presets resolve the same from a checkout, an editable install or a wheel.
CONF_DIR = Path(__file__).resolve().parent / "conf"


def model_name(model_id) -> str:
    """The store name of a model id (conf/model/hf.yaml's `${model_name:${model.id}}`): the last part of
    a hub id or a folder path ("Qwen/Qwen2.5-0.5B" -> "Qwen2.5-0.5B", "/ckpt/mine/" -> "mine")."""
    if model_id in (None, "", "???"):
        return "hf"  # no id yet: validation says model.id is required
    return str(model_id).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or str(model_id)


def register_resolvers() -> None:
    """The OmegaConf resolvers conf/ uses (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("model_name"):
        OmegaConf.register_new_resolver("model_name", model_name)


def to_dict(cfg) -> dict:
    """A resolved plain dict from a DictConfig (or a shallow copy of a plain mapping): library code
    takes dicts. (A DictConfig is a Mapping too: it must be converted, not copied.)"""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"a config must be a mapping, got {type(cfg).__name__}")


register_resolvers()  # before any entry point composes conf/ (Hydra resolves lazily, at to_dict)


def setup_environment(log_level: int | None = None) -> None:
    """W&B offline unless asked otherwise, no tokenizer thread warnings, quiet library logs; with
    `log_level`, our own log lines go to stderr (batch jobs)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if log_level is not None:
        logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def compose(config_name: str = "config", overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The resolved plain-dict config of `conf/<config_name>.yaml` with Hydra overrides, exactly as a
    job with that config sees it (outside a Hydra app: the planner, tests, notebooks)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from .schema import register

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_dict(hcompose(config_name=config_name, overrides=list(overrides)))
