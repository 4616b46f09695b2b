"""GLM-4.7-Flash (`glm4_moe_lite`) targets with their nextn MTP head.

The family-independent checks live in tests/test_deepseek_v3.py and run
here on a GLM-4.7-Flash fixture (its config as released, one dense layer,
then MoE; the head at `model.layers.{num_hidden_layers}`): parity with
mlx-lm, the numpy reference of the head, greedy and sampled losslessness,
rollback, loading the raw directory and the stripped / undeclared head.
"""

from __future__ import annotations

import pytest

from test_deepseek_v3 import (  # noqa: F401  (fixtures and checks, run on this family)
    cfg,
    hf,
    loaded_float32,
    model,
    random_model,
    raw_dir,
    test_first_cycle_drafts_match_numpy_reference,
    test_greedy_speculative_equals_plain,
    test_head_without_config_field_is_a_one_line_problem,
    test_raw_directory_loads_with_its_head,
    test_rollback_leaves_plain_caches,
    test_sampling_at_temperature_1_follows_the_target,
    test_stripped_checkpoint_loads_with_one_line_problem,
    test_trunk_matches_mlx_lm,
    transformers_model,
    assert_transformers_parity,
)


# The imported fixtures and checks are this module's on purpose (pytest collects them here): listing them
# marks them used for pyflakes, which does not read noqa comments.
__all__ = [
    "cfg",
    "hf",
    "loaded_float32",
    "model",
    "random_model",
    "raw_dir",
    "test_first_cycle_drafts_match_numpy_reference",
    "test_greedy_speculative_equals_plain",
    "test_head_without_config_field_is_a_one_line_problem",
    "test_raw_directory_loads_with_its_head",
    "test_rollback_leaves_plain_caches",
    "test_sampling_at_temperature_1_follows_the_target",
    "test_stripped_checkpoint_loads_with_one_line_problem",
    "test_trunk_matches_mlx_lm",
    "transformers_model",
    "assert_transformers_parity",
]


@pytest.fixture(scope="module")
def family() -> str:
    return "glm4_moe_lite"


def test_trunk_matches_transformers(raw_dir):
    """transformers' Glm4MoeLiteForCausalLM on the same raw directory.

    One documented difference: transformers builds the MLA latent norms
    (q_a_layernorm, kv_a_layernorm) with its RMSNorm default eps 1e-6,
    where mlx-lm (like vLLM's DeepseekV2 MLA, which serves GLM-4.7-Flash)
    uses rms_norm_eps, 1e-5 in the release. It moves the logits by ~1e-4;
    with the eps aligned the two agree as closely as for DeepSeek-V3
    (2e-5 on hidden states, 2e-4 on logits)."""
    hf_model = transformers_model("glm4_moe_lite", raw_dir)
    eps = hf_model.config.rms_norm_eps
    for layer in hf_model.model.layers:
        assert layer.self_attn.q_a_layernorm.variance_epsilon == 1e-6 != eps
        layer.self_attn.q_a_layernorm.variance_epsilon = eps
        layer.self_attn.kv_a_layernorm.variance_epsilon = eps
    assert_transformers_parity(loaded_float32(raw_dir), hf_model, atol=2e-5)


def test_head_is_a_moe_layer_after_one_dense_layer(model):
    from mlx_lm.models import glm4_moe_lite as lm

    assert isinstance(model.model.layers[0].mlp, lm.Glm4MoeLiteMLP)
    assert isinstance(model.mtp.layers[0].mlp, lm.Glm4MoeLiteMoE)
