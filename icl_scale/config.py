"""Configuration glue shared by every entry point and job: plain dicts from Hydra/OmegaConf configs,
and the process environment a job runs in."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping


def model_name(model_id) -> str:
    """The store name of a model id (conf/model/hf.yaml's `${model_name:${model.id}}`): the last part of
    a hub id or a folder path ("Qwen/Qwen2.5-0.5B" -> "Qwen2.5-0.5B", "/ckpt/mine/" -> "mine")."""
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
