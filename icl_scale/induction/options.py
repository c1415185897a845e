"""The induction scores' settings: which scores, how copying reads a head's OV circuit, and the
one-line error every bad setting raises."""

from __future__ import annotations

from dataclasses import dataclass, fields

SCORES = ("prefix_matching", "copying")


class InductionConfigError(ValueError):
    """Bad arguments for the induction scores (one line, says what to change)."""


@dataclass(frozen=True)
class CopyingOptions:
    """How the copying score reads a head's OV circuit. The defaults are the original code's.

    input: "embeddings" = every layer is applied to the token (+ learned position) embeddings, as
        the original code does (it never updates its hidden states across layers: the direct OV
        circuit W_U W_O W_V W_E of Olsson et al.); "residual" = the layer's real input.
    source: "output" = the head's output at j (attention-weighted values through its W_O slice);
        "query" = the OV image of the query token's own value, which is what the original code
        computes (`logits[head][j]` is built from value j, not from the attended tokens).
    final_norm: "fold" = the final norm's elementwise weight (and, for LayerNorm, its centring) is
        folded into the unembedding; its per-token 1/rms scale is dropped, which the ReLU ratio does
        not see. "none" = unembed the head output directly (original code).
    softmax: turn the logits into probabilities over the full vocabulary before centring (original
        code). The normaliser cancels in the ratio, so this costs no full-vocabulary product.
    o_bias: add the output projection's bias to every head's output (original code; not a per-head
        quantity, so off in head_output()).
    """

    input: str = "embeddings"
    source: str = "query"
    final_norm: str = "none"
    softmax: bool = True
    o_bias: bool = True

    @classmethod
    def paper(cls) -> CopyingOptions:
        """Exactly what llm-interpret's prefix_matching_copying.py computes (the default)."""
        return cls()

    @classmethod
    def head_output(cls) -> CopyingOptions:
        """Our definition: ReLU of mean-centred logits of the head's attention-weighted output, final
        norm folded into the unembedding, no bias (docs/induction.md)."""
        return cls(input="embeddings", source="output", final_norm="fold", softmax=False, o_bias=False)

    def check(self) -> CopyingOptions:
        allowed = {"input": ("embeddings", "residual"), "source": ("output", "query"),
                   "final_norm": ("fold", "none")}
        for k, ok in allowed.items():
            if getattr(self, k) not in ok:
                raise InductionConfigError(f"copying.{k}={getattr(self, k)!r}; use one of {', '.join(ok)}")
        return self


PRESETS = ("paper", "head_output", "custom")


def copying_options_from(cfg) -> CopyingOptions:
    """CopyingOptions from the `induction.copying` config block: preset paper (the original code,
    default) or head_output (ours) ignore the fields; custom takes them (a field the block leaves
    out keeps the CopyingOptions default, the paper's)."""
    cfg = dict(cfg or {})
    preset = cfg.pop("preset", "paper")
    known = tuple(f.name for f in fields(CopyingOptions))
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise InductionConfigError(f"induction.copying has unknown keys {unknown}; use preset and "
                                   f"{', '.join(known)}")
    if preset not in PRESETS:
        raise InductionConfigError(f"induction.copying.preset={preset!r}; use one of {', '.join(PRESETS)}")
    if preset == "paper":
        return CopyingOptions.paper()
    if preset == "head_output":
        return CopyingOptions.head_output()
    return CopyingOptions(**cfg).check()
