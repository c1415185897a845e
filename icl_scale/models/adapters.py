"""Architecture adapters: the one place that knows where each model family keeps its parts.

Everything else in icl_scale (gates, importance, induction scores, physical pruning) asks an
adapter for "layer l's attention output projection" or "layer l's FFN" and never touches
family-specific attribute names itself.

Supported families: OPT, the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2; GQA), Gemma 2 and
Gemma 3 (text), Phi-3, GPT-2 and GPT-NeoX (Pythia).

Two families need care about where the FFN gate sits:

* Gemma 2/3 normalise each branch's output before adding it to the residual stream
  (post_attention_layernorm after the attention, post_feedforward_layernorm after the MLP). An RMS
  norm undoes any scaling of its input, so the FFN gate sits on post_feedforward_layernorm's output
  (the FFN's contribution to the residual), not on the MLP's. The head gate stays on o_proj's input,
  as everywhere: closing a head equals removing its columns of o_proj, and the post-attention norm
  then sees the other heads' sum. Their RMS norms scale by (1 + weight).
* Phi-3 fuses q/k/v into qkv_proj ([q | k | v] rows, GQA sizes) and gate/up into gate_up_proj; the
  gates are on o_proj's input and the MLP's output as for Llama.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HeadGeometry:
    n_layers: int
    n_heads: int  # query heads per layer
    n_kv_heads: int  # key/value heads per layer (== n_heads without GQA)
    head_dim: int
    hidden: int

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class Family:
    """Where a family keeps its modules (paths relative to the CausalLM model)."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # ModuleList of decoder blocks
    attn: str  # attention module inside a block
    q_proj: str  # inside attn; "" when q/k/v are fused
    k_proj: str
    v_proj: str
    qkv_proj: str  # fused q/k/v projection inside attn ("" when separate)
    qkv_layout: str  # fused rows: "blocks" ([q | k | v], GPT-2, Phi-3) or "per_head" (GPT-NeoX); "" separate
    o_proj: str  # attention output projection inside attn: its input is the concatenated heads
    ffn: str  # module whose output is the FFN's contribution to the residual stream
    ffn_output_is_flat: bool  # OPT's fc2 sees (batch*seq, dim), everything else (batch, seq, dim)
    pre_attn_norm: str
    pre_ffn_norm: str
    final_norm: str
    embed: str
    unembed: str  # informational: unembedding_weight() asks the model (names vary by version)
    rotary: bool
    conv1d: bool  # GPT-2 stores Linear weights transposed (transformers Conv1D)
    mlp: str = ""  # the MLP module itself when `ffn` is a norm after it (Gemma); "" = `ffn`
    norm_offset: float = 0.0  # RMS norms scale by (offset + weight): Gemma 1.0
    logit_softcap: bool = False  # the CausalLM soft-caps its logits by config.final_logit_softcapping (Gemma)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="opt", model_types=("opt",), layers="model.decoder.layers", attn="self_attn",
        q_proj="q_proj", k_proj="k_proj", v_proj="v_proj", qkv_proj="", qkv_layout="", o_proj="out_proj",
        ffn="fc2", ffn_output_is_flat=True, pre_attn_norm="self_attn_layer_norm",
        pre_ffn_norm="final_layer_norm", final_norm="model.decoder.final_layer_norm",
        embed="model.decoder.embed_tokens", unembed="lm_head", rotary=False, conv1d=False,
    ),
    Family(
        name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), layers="model.layers",
        attn="self_attn", q_proj="q_proj", k_proj="k_proj", v_proj="v_proj", qkv_proj="", qkv_layout="",
        o_proj="o_proj", ffn="mlp", ffn_output_is_flat=False, pre_attn_norm="input_layernorm",
        pre_ffn_norm="post_attention_layernorm", final_norm="model.norm", embed="model.embed_tokens",
        unembed="lm_head", rotary=True, conv1d=False,
    ),
    Family(
        name="gemma", model_types=("gemma2", "gemma3_text"), layers="model.layers", attn="self_attn",
        q_proj="q_proj", k_proj="k_proj", v_proj="v_proj", qkv_proj="", qkv_layout="", o_proj="o_proj",
        ffn="post_feedforward_layernorm", ffn_output_is_flat=False, pre_attn_norm="input_layernorm",
        pre_ffn_norm="pre_feedforward_layernorm", final_norm="model.norm", embed="model.embed_tokens",
        unembed="lm_head", rotary=True, conv1d=False, mlp="mlp", norm_offset=1.0, logit_softcap=True,
    ),
    Family(
        name="phi3", model_types=("phi3",), layers="model.layers", attn="self_attn", q_proj="", k_proj="",
        v_proj="", qkv_proj="qkv_proj", qkv_layout="blocks", o_proj="o_proj", ffn="mlp",
        ffn_output_is_flat=False, pre_attn_norm="input_layernorm", pre_ffn_norm="post_attention_layernorm",
        final_norm="model.norm", embed="model.embed_tokens", unembed="lm_head", rotary=True, conv1d=False,
    ),
    Family(
        name="gpt2", model_types=("gpt2",), layers="transformer.h", attn="attn", q_proj="", k_proj="",
        v_proj="", qkv_proj="c_attn", qkv_layout="blocks", o_proj="c_proj", ffn="mlp", ffn_output_is_flat=False,
        pre_attn_norm="ln_1", pre_ffn_norm="ln_2", final_norm="transformer.ln_f",
        embed="transformer.wte", unembed="lm_head", rotary=False, conv1d=True,
    ),
    Family(
        name="gpt_neox", model_types=("gpt_neox",), layers="gpt_neox.layers", attn="attention",
        q_proj="", k_proj="", v_proj="", qkv_proj="query_key_value", qkv_layout="per_head", o_proj="dense", ffn="mlp",
        ffn_output_is_flat=False, pre_attn_norm="input_layernorm",
        pre_ffn_norm="post_attention_layernorm", final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in", unembed="embed_out", rotary=True, conv1d=False,
    ),
)

SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)
# Who they are, for error messages.
FAMILY_NAMES = "OPT, Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), Phi-3, GPT-2, GPT-NeoX"


class UnsupportedArchitecture(ValueError):
    pass


def _get(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class Adapter:
    """Family-specific accessors plus the head geometry of one loaded model."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        for fam in FAMILIES:
            if model_type in fam.model_types:
                self.family = fam
                break
        else:
            raise UnsupportedArchitecture(
                f"unsupported architecture model_type={model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} ({FAMILY_NAMES})"
            )
        self.model = model
        cfg = model.config
        n_heads = cfg.num_attention_heads
        hidden = cfg.hidden_size
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
        self.geometry = HeadGeometry(
            n_layers=len(self.layers()), n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, hidden=hidden
        )

    # --- module accessors -------------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.family.layers)

    def layer(self, l: int) -> nn.Module:
        return self.layers()[l]

    def attn(self, l: int) -> nn.Module:
        return _get(self.layer(l), self.family.attn)

    def o_proj(self, l: int) -> nn.Module:
        return _get(self.attn(l), self.family.o_proj)

    def ffn(self, l: int) -> nn.Module:
        """The module whose output is layer l's FFN contribution to the residual stream (the FFN gate's)."""
        return _get(self.layer(l), self.family.ffn)

    def mlp(self, l: int) -> nn.Module:
        """Layer l's MLP itself (Gemma: the module before `ffn`, its post-FFN norm)."""
        return _get(self.layer(l), self.family.mlp or self.family.ffn)

    def pre_attn_norm(self, l: int) -> nn.Module:
        return _get(self.layer(l), self.family.pre_attn_norm)

    def final_norm(self) -> nn.Module:
        return _get(self.model, self.family.final_norm)

    def embedding(self) -> nn.Module:
        return _get(self.model, self.family.embed)

    def unembedding_weight(self) -> torch.Tensor:
        """[vocab, hidden] matrix mapping the final residual (after the final norm) to logits."""
        return self.model.get_output_embeddings().weight  # the family's own name varies by version

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states [..., d] (the base model's output), as the family's CausalLM
        forward computes them: the output embedding, then Gemma 2/3's cap * tanh(logits / cap) when
        the config sets `final_logit_softcapping`. Whoever unembeds by hand calls this, not the head."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None) if self.family.logit_softcap else None
        if cap is not None:  # the same operations, in the same order and dtype, as transformers
            logits = torch.tanh(logits / cap) * cap
        return logits

    # --- weights in a family-independent layout --------------------------------------------
    def o_proj_weight(self, l: int) -> torch.Tensor:
        """Output projection as [hidden_out, n_heads*head_dim] (nn.Linear layout)."""
        w = self.o_proj(l).weight
        return w.t() if self.family.conv1d else w

    def v_weight(self, l: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Value projection as ([n_kv*head_dim, hidden], bias or None) in nn.Linear layout."""
        g = self.geometry
        attn = self.attn(l)
        if self.family.v_proj:
            mod = _get(attn, self.family.v_proj)
            return mod.weight, mod.bias
        fused = _get(attn, self.family.qkv_proj)
        w = fused.weight.t() if self.family.conv1d else fused.weight  # [(H + 2 KV) * head_dim, hidden]
        b = fused.bias
        if self.family.qkv_layout == "blocks":  # [q | k | v] blocks (GPT-2, Phi-3)
            start = (g.n_heads + g.n_kv_heads) * g.head_dim
            sl = slice(start, start + g.n_kv_heads * g.head_dim)
            return w[sl], (b[sl] if b is not None else None)
        # GPT-NeoX interleaves per head: rows are (head, [q|k|v], head_dim)
        w3 = w.view(g.n_heads, 3, g.head_dim, g.hidden)[:, 2].reshape(g.n_heads * g.head_dim, g.hidden)
        b3 = b.view(g.n_heads, 3, g.head_dim)[:, 2].reshape(-1) if b is not None else None
        return w3, b3

    def kv_head_of(self) -> torch.Tensor:
        """Index of the KV head each query head reads (GQA: consecutive groups)."""
        g = self.geometry
        return torch.arange(g.n_heads) // g.group_size

    def final_norm_scale(self) -> torch.Tensor | None:
        """The final norm's per-channel scale (Gemma: 1 + weight), or None when it has no weight."""
        w = getattr(self.final_norm(), "weight", None)
        return None if w is None else w + self.family.norm_offset if self.family.norm_offset else w

    def describe(self) -> dict:
        g = self.geometry
        return {
            "family": self.family.name,
            "model_type": self.model.config.model_type,
            "layers": g.n_layers,
            "heads": g.n_heads,
            "kv_heads": g.n_kv_heads,
            "head_dim": g.head_dim,
            "hidden": g.hidden,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }
