"""Checkpoint loading keeps the MTP head: raw HF layout, mlx-lm layout,
quantized with per-layer overrides, and clear messages when a head is missing."""

import json
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import tiny
from mlx_mtp import decode
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.api import DrafterUnavailableError, make_drafter
from mlx_mtp.loading import CheckpointError, load_target

PROMPT = mx.array([[5, 17, 33, 2, 9, 11]])


def _outputs(model):
    hidden = model.hidden(PROMPT)
    head = model.mtp(model.embed(PROMPT), hidden, model.make_mtp_cache())
    return np.array(model.logits(hidden)), np.array(model.logits(head))


def _greedy(model, k):
    drafter = MTPDrafter(model) if k else None
    return [t for c in decode(model, [5, 17, 33], drafter=drafter, num_draft=k, max_tokens=40) for t in c.tokens]


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("text_only", [False, True])
def test_raw_hf_checkpoint_roundtrip(tmp_path, moe, text_only):
    config = tiny.text_config(moe=moe) if text_only else tiny.hf_config(moe=moe)
    model = tiny.build(config if text_only else config["text_config"], seed=1, predictable=True, noise=1.6)
    tiny.save_hf_checkpoint(model, tmp_path, config, raw=True)
    keys = set(mx.load(str(tmp_path / "model.safetensors")))
    assert any(k.startswith("mtp.") for k in keys)
    assert any(k.startswith("model.language_model.") for k in keys)
    loaded, _ = load_target(tmp_path)
    assert loaded.has_mtp and loaded.mtp_problem is None
    for a, b in zip(_outputs(model), _outputs(loaded)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # norms shifted exactly once


def test_vision_weights_are_ignored(tmp_path):
    config = tiny.hf_config()
    model = tiny.build(config["text_config"], seed=1)
    tiny.save_hf_checkpoint(model, tmp_path, config, raw=True)
    weights = mx.load(str(tmp_path / "model.safetensors"))
    weights["model.visual.blocks.0.attn.qkv.weight"] = mx.zeros((8, 8))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), weights)
    loaded, _ = load_target(tmp_path)
    assert loaded.has_mtp


def test_mlx_layout_and_quantized_with_mtp_overrides(tmp_path):
    config = tiny.hf_config()
    model = tiny.build(config["text_config"], seed=2, predictable=True, noise=1.6)
    # mlx-lm layout: sanitized keys, norms already shifted. Trunk at 4 bits,
    # the head at 8 bits through per-layer overrides.
    head_paths = [p for p, m in model.named_modules() if p.startswith("mtp.") and isinstance(m, nn.Linear)]
    quantization = {"group_size": 32, "bits": 4, "mode": "affine"}
    quantization.update({p: {"group_size": 32, "bits": 8} for p in head_paths})

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % 32:
            return False
        return quantization.get(path, True)

    nn.quantize(model, group_size=32, bits=4, class_predicate=predicate)
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**config, "quantization": quantization}, f)

    loaded, _ = load_target(tmp_path)
    assert loaded.has_mtp
    assert loaded.mtp.fc.bits == 8 and loaded.mtp.layers[0].self_attn.q_proj.bits == 8
    assert loaded.language_model.model.layers[1].self_attn.q_proj.bits == 4
    for a, b in zip(_outputs(model), _outputs(loaded)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert _greedy(loaded, 3) == _greedy(loaded, 0)


def test_declared_head_missing_weights(tmp_path):
    config = tiny.hf_config()
    model = tiny.build(config["text_config"], seed=1)
    tiny.save_hf_checkpoint(model, tmp_path, config, raw=True, drop_mtp=True)
    loaded, _ = load_target(tmp_path)
    assert not loaded.has_mtp
    assert "mtp_num_hidden_layers=1" in loaded.mtp_problem and "no mtp.* weights" in loaded.mtp_problem
    with pytest.raises(DrafterUnavailableError, match="no mtp.\\* weights"):
        make_drafter(loaded, "mtp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drafter, note = make_drafter(loaded, "auto")
    assert drafter is None and "plain decoding" in note
    # The reason is returned, never warned: front ends show it once.
    assert "no mtp.* weights" in note and not caught
    assert _greedy(loaded, 0)  # plain decoding still works


def test_head_weights_without_declaration(tmp_path):
    config = tiny.hf_config()
    model = tiny.build(config["text_config"], seed=1)
    config["text_config"]["mtp_num_hidden_layers"] = 0
    tiny.save_hf_checkpoint(model, tmp_path, config, raw=True)
    loaded, _ = load_target(tmp_path)
    assert not loaded.has_mtp
    assert "declares no MTP head" in loaded.mtp_problem
    with pytest.raises(DrafterUnavailableError):
        make_drafter(loaded, "mtp")


def test_bad_checkpoints_give_clear_errors(tmp_path):
    config = tiny.hf_config()
    model = tiny.build(config["text_config"], seed=1)
    good = tiny.save_hf_checkpoint(model, tmp_path / "good", config, raw=True)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text(json.dumps(config))
    data = (good / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_target(truncated)

    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))  # neither we nor mlx-lm
    with pytest.raises(CheckpointError, match="supported neither"):
        load_target(unsupported)

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(good / "model.safetensors"))
    weights.pop("mtp.fc.weight")
    mx.save_safetensors(str(partial / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match="do not match"):
        load_target(partial)
