"""DeepSeek-V3 / V3.1 targets that keep their nextn MTP head.

The trunk is mlx-lm's own `deepseek_v3` model (multi-head latent attention,
noaux_tc-routed MoE after `first_k_dense_replace` dense layers). The head is
stored as decoder layer `num_hidden_layers` (`model.layers.61.*` in the
released 671B checkpoints, README_WEIGHTS.md of deepseek-ai/DeepSeek-V3):
`enorm`, `hnorm`, `eh_proj`, `shared_head.{norm,head}`, a duplicate
`embed_tokens` (dropped: the trunk's is the same tensor), and a full MoE
decoder block with MLA attention. models/nextn.py keeps it; this file adds
what MLA needs (see `MLANextNHead`).

How the head is fed, as the references do it:
- one position reads `eh_proj([enorm(E[t_{i+1}]), hnorm(h_i)])`, embedding
  first (vLLM `vllm/model_executor/models/deepseek_mtp.py`, SGLang
  `python/sglang/srt/models/deepseek_nextn.py`); logits are
  `shared_head.head(shared_head.norm(block output))`;
- draft step j > 1 feeds back the post-`shared_head.norm` state, as SGLang's
  `DeepseekModelNextN.forward` returns it. vLLM (`deepseek_mtp.py` at
  4f7c144) returns the state before that norm, applies the norm only in
  `compute_logits`, and its EAGLE proposer feeds the returned state back
  (`vllm/v1/spec_decode/eagle.py`: `if self.method == "mtp": hidden_states =
  ret_hidden_states`). We keep the post-norm convention; the two differ in
  the drafts only, never in the output (the target verifies every draft).
- vLLM also zeroes the embedding at sequence position 0 ("not needed by
  MTP"); SGLang does not, and neither do we: the first head position reads
  E[t_1] like every other one.
DeepSeek's own `inference/model.py` has no MTP path (its convert.py skips
layer 61), so it settles none of this. llama.cpp names the same tensors
`blk.L.nextn.{eh_proj,enorm,hnorm,shared_head_norm,shared_head_head,
embed_tokens}` (src/llama-arch.cpp); loading those is loading/gguf/deepseek2.py.

Rollback: mlx-lm's MLA caches the compressed latents
(`cache.update_and_fetch(kv_latent, k_pe)`: keys [B, 1, T, kv_lora_rank],
values the rotated [B, 1, T, qk_rope_head_dim]); trimming moves the offset
back and the next write lands on the trimmed slots, so target and head
caches roll back like any KV cache (tests/test_deepseek_v3.py checks both).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Type

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import deepseek_v3 as lm_deepseek_v3
from mlx_lm.models.base import create_attention_mask

from .nextn import NextNHead, family_args, family_model

ModelArgs = family_args(lm_deepseek_v3.ModelArgs)


class MLANextNHead(NextNHead):
    """The nextn head with a boolean array mask. mlx-lm's MLA attention
    applies its mask to the rope scores with `mx.where(mask, ...)`, which
    needs an array; nextn.py's head asks for the default mask, the string
    "causal" when several positions are fed at once (a prompt, a verified
    run), which MLA cannot take. The trunks ask for an array the same way
    (`create_attention_mask(h, cache[0], return_array=True)`)."""

    def __call__(self, embeddings: mx.array, hidden: mx.array, cache: List[Any]) -> mx.array:
        mask = create_attention_mask(embeddings, cache[0], return_array=True)
        return self.layers[0].predict(embeddings, hidden, mask, cache[0])


def mla_family_model(lm_model: Type[nn.Module], decoder_layer: Type[nn.Module]) -> Callable[..., nn.Module]:
    """nextn.py's `family_model` with `MLANextNHead` as the `mtp` module: the
    class DeepSeek-V3 and GLM-4.7-Flash export."""
    base = family_model(lm_model, decoder_layer)

    class Model(base):
        def _init_mtp(self, args: Any) -> None:
            self.declared_mtp_layers = int(getattr(args, "num_nextn_predict_layers", 0) or 0)
            self.mtp_problem: Optional[str] = None
            if self.declared_mtp_layers > 0:
                self.mtp = MLANextNHead(args, self.decoder_layer, self.declared_mtp_layers)

    return Model


# Sanitizing the head (nextn.py's `_sanitize_head`) runs mlx-lm's
# DeepSeek-V3 `sanitize` on it posing as layer 0: its int4 remap and FP8
# dequantization are keyed by name suffix, and its expert stacking and
# kv_b_proj split go by which keys exist, so they apply to the MoE head even
# though the real layer 0 is dense (first_k_dense_replace=3).
class Model(mla_family_model(lm_deepseek_v3.Model, lm_deepseek_v3.DeepseekV3DecoderLayer)):
    """mlx-lm's `deepseek_v3.Model` with its nextn head as the `mtp` module
    (built as layer `num_hidden_layers`, so a MoE layer as stored)."""
