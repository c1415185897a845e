"""Task-agnostic induction-head scores: prefix matching and copying (Bansal et al. 2022, App. A;
Olsson et al. 2022), plus the helpers the reducer needs to relate them to task importance.

Definitions (docs/induction.md has the derivation from the original code, amazon-science/
llm-interpret, lm_eval/prefix_matching_copying.py, and every deviation):

* Token pool: tokens created by BPE merges, ranked by merge index (frequency proxy); the first
  and last `exclude_frac` of the ranks are dropped. Tokenizers without merges fall back to
  token-id order (the result says which proxy was used). Seed i uses n_i = 2*i + 25 distinct
  tokens drawn without replacement; all draws come from one torch.Generator(seed).
* Prefix matching: BOS + s repeated 4 times (T = P + 4n, P = number of BOS tokens). For every
  token of repeats 2-4 (3n positions), sum the attention to the tokens that followed its earlier
  occurrences; average over the 3n positions. `original_indexing=True` (default) keeps the original
  code's off-by-one for the last token of a repeat, which also counts the first token of repeat 1.
* Copying: BOS + 4n distinct tokens (no repeat). Per layer, per head, per position j: the head's
  OV logits over the tokens at positions 0..j, mean-centred, ReLU, and the share of the ReLU mass
  that falls on the most-attended position; averaged over positions P..T-1 (see CopyingOptions).

No Python loops over tokens or heads: one forward pass per (seed, score) with probes on the
"attention" hook point (icl_scale.models.hooks) that reduce each layer's attention to [heads]
numbers while the pass runs.

Read top to bottom:
  options.py     the settings (CopyingOptions, the config's copying block) and the error type
  sequences.py   token pool, lengths, random sequences, prefix-matching targets
  reductions.py  per-layer math: attention or OV logits -> [heads] scores
  probes.py      the hooks that apply the reductions inside the forward pass
  scores.py      induction_scores: resolve the model and BOS, check, run the seeds, mean/variance
  analysis.py    retained capacity and pruning masks from rankings (for the reducer)
  job.py         the job: load, score, save (scores.safetensors, scores.json, heatmaps)
"""

from .analysis import PRUNE_LEVELS, mask_from_ranking, ranking_masks, retained_capacity
from .job import done_paths, heatmap, induction_key, run_job, save_result
from .options import SCORES, CopyingOptions, InductionConfigError, copying_options_from
from .reductions import copying_from, most_attended, prefix_from_lse, prefix_from_probs, unembedding_matrix
from .scores import InductionResult, induction_scores, top_heads
from .sequences import (
    default_lengths,
    expected_uniform_prefix,
    make_sequences,
    prefix_targets,
    ranked_vocabulary,
    token_pool,
)

__all__ = [
    "PRUNE_LEVELS", "SCORES", "CopyingOptions", "InductionConfigError", "InductionResult", "copying_from",
    "copying_options_from", "default_lengths", "done_paths", "expected_uniform_prefix", "heatmap", "induction_key",
    "induction_scores",
    "make_sequences", "mask_from_ranking", "most_attended", "prefix_from_lse", "prefix_from_probs",
    "prefix_targets", "ranked_vocabulary", "ranking_masks", "retained_capacity", "run_job", "save_result",
    "token_pool", "top_heads", "unembedding_matrix",
]
