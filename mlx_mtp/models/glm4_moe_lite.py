"""GLM-4.7-Flash (`glm4_moe_lite`) targets that keep their nextn MTP head.

The trunk is mlx-lm's own `glm4_moe_lite` model: DeepSeek-V3's multi-head
latent attention and noaux_tc-routed MoE (one dense layer first) under GLM's
sizes. The released checkpoint (zai-org/GLM-4.7-Flash) stores its one nextn
layer as `model.layers.47.*`, laid out as DeepSeek-V3's (models/deepseek_v3.py
says how the head is fed and fed back; the same MLA mask fix applies).

mlx-lm's `glm4_moe_lite.ModelArgs` already has `num_nextn_predict_layers`,
defaulting to 1; `family_args` redeclares it defaulting to 0, so a config
that leaves it out declares no head, as for every other nextn family here.
"""

from __future__ import annotations

from mlx_lm.models import glm4_moe_lite as lm_glm4_moe_lite

from .deepseek_v3 import mla_family_model
from .nextn import family_args

ModelArgs = family_args(lm_glm4_moe_lite.ModelArgs)

# mlx-lm's sanitize drops every layer >= num_hidden_layers, then stacks
# experts and splits kv_b_proj by which keys exist; run on the head posing
# as layer 0 (nextn.py) it keeps the head and lays it out like a MoE layer.
class Model(mla_family_model(lm_glm4_moe_lite.Model, lm_glm4_moe_lite.Glm4MoeLiteDecoderLayer)):
    """mlx-lm's `glm4_moe_lite.Model` with its nextn head as the `mtp` module
    (built as layer `num_hidden_layers`, so a MoE layer as stored)."""
