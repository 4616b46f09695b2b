"""Config dicts (HF key names) that several builders make: the GGUF loader
derives them from metadata, the test fixtures and the demo trainer from
their own sizes.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional


def gemma4_assistant_config(
    *,
    hidden_size: int,
    intermediate_size: int,
    layer_types: List[str],
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    global_head_dim: int,
    vocab_size: int,
    sliding_window: int,
    max_position_embeddings: int,
    rope_parameters: Dict[str, Any],
    backbone_hidden_size: int,
    rms_norm_eps: float = 1e-6,
    attention_k_eq_v: bool = False,
    num_global_key_value_heads: Optional[int] = None,
    use_ordered_embeddings: bool = False,
    **extra: Any,
) -> Dict[str, Any]:
    """A `gemma4_assistant` config: Gemma 4 text layers that all read the
    target's KV (no K/V, no per-layer inputs, no MoE), a tied head, and
    `backbone_hidden_size` the target's hidden size. `extra` goes to the top
    level (num_centroids, torch_dtype, ...)."""
    n = len(layer_types)
    text = {
        "model_type": "gemma4_text",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": n,
        "layer_types": list(layer_types),
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "global_head_dim": global_head_dim,
        "attention_k_eq_v": attention_k_eq_v,
        "rms_norm_eps": rms_norm_eps,
        "vocab_size": vocab_size,
        "vocab_size_per_layer_input": 0,
        "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": n,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
        "sliding_window": sliding_window,
        "max_position_embeddings": max_position_embeddings,
        "final_logit_softcapping": None,
        "rope_parameters": copy.deepcopy(rope_parameters),
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
    }
    if num_global_key_value_heads is not None:
        text["num_global_key_value_heads"] = num_global_key_value_heads
    config = {
        "model_type": "gemma4_assistant",
        "architectures": ["Gemma4AssistantForCausalLM"],
        "backbone_hidden_size": int(backbone_hidden_size),
        "use_ordered_embeddings": use_ordered_embeddings,
        "tie_word_embeddings": True,
        "text_config": text,
    }
    config.update(extra)
    return config
