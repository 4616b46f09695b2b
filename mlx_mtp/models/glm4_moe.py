"""GLM-4.5 / 4.6 / 4.7 (`glm4_moe`) targets that keep their nextn MTP head.

The trunk is mlx-lm's own `glm4_moe` model; `nextn.NextNMixin` keeps what its
`sanitize` throws away: the head stored as decoder layer `num_hidden_layers`
(`model.layers.46.*` in GLM-4.5-Air, `model.layers.92.*` in GLM-4.5/4.6/4.7),
a MoE block like the trunk's later layers plus `enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`, and, in GLM-4.5 only, `shared_head.head` and a duplicate
`embed_tokens`. GLM-4.6 and later leave those two out: they are the trunk's
`lm_head` and `embed_tokens` (vLLM PR #27597), so the head falls back to the
trunk's `lm_head` when `shared_head.head` is absent.

How the head runs (checked against vllm/model_executor/models/glm4_moe_mtp.py,
python/sglang/srt/models/glm4_moe_nextn.py and transformers'
modeling_layers.MtpModel, which reads the same `model.layers.N.*` keys):
- input at head position i: eh_proj([enorm(E[t_{i+1}]), hnorm(h_i)]), the
  embedding first; h_i is the trunk's state after its final norm;
- RoPE position of head entry i is i (vLLM and SGLang pass the target's
  positions; transformers passes i + 1 for every entry, which is the same
  attention since RoPE scores only see position differences);
- draft step j > 1 feeds back the post-`shared_head.norm` state, as SGLang
  and transformers do (vLLM feeds back the state before that norm: see
  models/nextn.py). That changes drafts only, never the output: the target
  verifies every draft. vLLM also zeroes the embedding of the pair at
  position 0; SGLang and transformers do not, and neither do we.
"""

from __future__ import annotations

from typing import Any, Dict

from mlx_lm.models import glm4_moe as lm_glm4_moe

from . import nextn


class ModelArgs(nextn.family_args(lm_glm4_moe.ModelArgs)):
    """mlx-lm's args plus `num_nextn_predict_layers`, which it would drop.

    The released config.json files (transformers 4.5x) carry `rope_theta`,
    `rope_scaling` and `partial_rotary_factor` at the top level, where
    mlx-lm requires them; configs saved by transformers 5 move them into
    `rope_parameters`. Both read the same here."""

    @classmethod
    def from_dict(cls, params: Dict[str, Any]) -> "ModelArgs":
        params = dict(params)
        rope = params.get("rope_parameters") or {}
        if "rope_theta" not in params and "rope_theta" in rope:
            params["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" not in params:
            params["partial_rotary_factor"] = rope.get("partial_rotary_factor", 0.5)  # transformers' default
        if "rope_scaling" not in params:
            # mlx-lm's glm4_moe applies plain RoPE whatever this says; "default" means none.
            params["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
        return super().from_dict(params)


class Model(nextn.family_model(lm_glm4_moe.Model, lm_glm4_moe.DecoderLayer)):
    """mlx-lm's `glm4_moe.Model` with its nextn head as the `mtp` module.

    The head's decoder layer is built with index `num_hidden_layers`, so it
    is a MoE layer (index >= `first_k_dense_replace`) exactly as stored;
    its per-expert tensors are stacked by mlx-lm's own `sanitize`."""
