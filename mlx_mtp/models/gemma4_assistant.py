"""The Gemma 4 assistant drafter model (`gemma4_assistant`, docs/gemma4-assistant.md#one-draft-step).

4 Gemma 4 decoder layers (mlx-lm's own `gemma4_text.DecoderLayer`, built with
every layer KV-shared, so they have q_proj / q_norm / o_proj and no K/V) whose
queries attend to the target's KV. One step:

    x      = pre_projection(concat[E_target[tok] * sqrt(B), state])
    x      = layers(x) at the fixed position p of the round
    y      = norm(x)
    state' = post_projection(y)
    logits = y @ embed^T   (dense)  or  the ordered-embedding sparse head
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma4_text as lm_gemma4_text

from .base import FULL, SLIDING, architecture  # noqa: F401  (FULL, SLIDING re-exported for drafters)


class AssistantError(ValueError):
    """A drafter checkpoint that cannot be loaded or paired (one-line reason)."""


def sliding_keys(window: int) -> int:
    """How many of the target's newest keys before the round's position p an
    assistant sliding layer sees: W + 1, i.e. positions p - W - 1 .. p - 1.

    transformers (Gemma4AssistantForCausalLM.create_attention_masks) masks
    these layers with the bidirectional |q - k| <= W over the target's KV,
    flipped to look back, so its one query sees the last W + 1 keys. The
    target's own sliding layers differ: a query there sees W keys, itself
    included (docs/gemma4-assistant.md#the-kv-it-reads)."""
    return window + 1


@dataclass
class AssistantArgs:
    text: lm_gemma4_text.ModelArgs
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32
    tie_word_embeddings: bool = True

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "AssistantArgs":
        if "text_config" not in config or "backbone_hidden_size" not in config:
            raise AssistantError(
                f"not a Gemma 4 assistant checkpoint (model_type {config.get('model_type')!r}; "
                "expected gemma4_assistant with text_config and backbone_hidden_size)"
            )
        text = copy.deepcopy(config["text_config"])
        n = int(text.get("num_hidden_layers", 4))
        # Every layer reads the target's KV (HF's config does the same).
        if not text.get("num_kv_shared_layers"):
            text["num_kv_shared_layers"] = n
        text.setdefault("hidden_size_per_layer_input", 0)
        text.setdefault("vocab_size_per_layer_input", 0)
        text.setdefault("use_double_wide_mlp", False)
        text.setdefault("final_logit_softcapping", None)
        if text["num_kv_shared_layers"] != n:
            raise AssistantError("every layer of a Gemma 4 assistant must be KV-shared")
        return cls(
            text=lm_gemma4_text.ModelArgs.from_dict(text),
            backbone_hidden_size=int(config["backbone_hidden_size"]),
            use_ordered_embeddings=bool(config.get("use_ordered_embeddings", False)),
            num_centroids=int(config.get("num_centroids", 2048)),
            centroid_intermediate_top_k=int(config.get("centroid_intermediate_top_k", 32)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        )


class MaskedEmbedding(nn.Module):
    """Ordered-embedding sparse head: centroids pick clusters of token ids."""

    def __init__(self, hidden: int, vocab: int, num_centroids: int, top_k: int):
        super().__init__()
        if vocab % num_centroids:
            raise AssistantError(f"vocab size {vocab} is not a multiple of num_centroids {num_centroids}")
        self.top_k = top_k
        self.num_centroids = num_centroids
        self.centroids = nn.Linear(hidden, num_centroids, bias=False)
        # int32 token ids, a permutation of the vocabulary: never quantized or cast.
        self.token_ordering = mx.zeros((vocab,), mx.int32)

    def candidates(self, y: mx.array, embed: nn.Module) -> Tuple[mx.array, mx.array]:
        """y [h] -> (token ids [top_k * V/C], their logits): only the selected
        clusters' embedding rows are read; no full-vocabulary matmul."""
        c = self.centroids(y)
        top = mx.argpartition(-c, kth=self.top_k - 1, axis=-1)[: self.top_k]
        ids = self.token_ordering.reshape(self.num_centroids, -1)[top].reshape(-1)
        rows = embed(ids)  # gathers (and dequantizes) just these rows
        return ids, rows @ y.astype(rows.dtype)


class _Trunk(nn.Module):
    def __init__(self, args: lm_gemma4_text.ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [lm_gemma4_text.DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Gemma4Assistant(nn.Module):
    def __init__(self, args: AssistantArgs):
        super().__init__()
        self.args = args
        t = args.text
        B, h = args.backbone_hidden_size, t.hidden_size
        self.model = _Trunk(t)
        self.pre_projection = nn.Linear(2 * B, h, bias=False)
        self.post_projection = nn.Linear(h, B, bias=False)
        if args.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(
                h, t.vocab_size, args.num_centroids, args.centroid_intermediate_top_k
            )
        # Set by the loader from generation_config.json.
        self.num_assistant_tokens: Optional[int] = None

    @property
    def layer_types(self):
        return [layer.layer_type for layer in self.model.layers]

    @property
    def head_dims(self) -> Dict[str, Tuple[int, int]]:
        """Layer type -> (query heads, head dim)."""
        return {l.layer_type: (l.self_attn.n_heads, l.self_attn.head_dim) for l in self.model.layers}

    @property
    def sliding_window(self) -> int:
        return int(self.args.text.sliding_window)

    def step(
        self,
        embedding: mx.array,
        state: mx.array,
        shared_kv: Dict[str, Tuple[mx.array, mx.array]],
        position: Union[int, mx.array],
        mask: Optional[Dict[str, mx.array]] = None,
    ) -> Tuple[mx.array, mx.array]:
        """embedding [1, L, B] (scaled target embedding), state [1, L, B] ->
        (y [1, L, h] after the final norm, next state [1, L, B]).

        shared_kv: layer type -> (keys, values) [1, kv_heads, S, D] that the
        queries see in full (the caller slices the sliding layer's last
        `sliding_keys(W)` keys). A batch of rows (docs/batching.md) passes
        [R, ...] arrays, `position` [R] and per layer type a boolean `mask`
        [R, 1, 1, S] of the keys each row sees instead."""
        dtype = self.model.norm.weight.dtype  # norms are never quantized
        x = self.pre_projection(mx.concatenate([embedding.astype(dtype), state.astype(dtype)], axis=-1))
        for layer in self.model.layers:
            visible = mask.get(layer.layer_type) if mask else None
            x, _, _ = layer(x, visible, None, shared_kv=shared_kv[layer.layer_type], offset=position)
        y = self.model.norm(x)
        return y, self.post_projection(y)

    def dense_logits(self, y: mx.array) -> mx.array:
        return self.model.embed_tokens.as_linear(y)

    def logits(self, y: mx.array) -> mx.array:
        """[h] -> [V] logits from either head. The sparse head scores only the
        selected clusters; every other token gets min(selected) - 1."""
        if not self.args.use_ordered_embeddings:
            return self.dense_logits(y)
        ids, scores = self.masked_embedding.candidates(y, self.model.embed_tokens)
        out = mx.full((self.args.text.vocab_size,), scores.min() - 1.0, dtype=scores.dtype)
        out[ids] = scores
        return out

    def greedy_token(self, y: mx.array) -> mx.array:
        """[h] -> argmax token without building [V] logits for the sparse head."""
        if not self.args.use_ordered_embeddings:
            return mx.argmax(self.dense_logits(y), axis=-1).astype(mx.int32)
        ids, scores = self.masked_embedding.candidates(y, self.model.embed_tokens)
        return ids[mx.argmax(scores)].astype(mx.int32)


# --- checkpoints --------------------------------------------------------------


def sanitize(weights: Dict[str, mx.array], tied: bool = True) -> Dict[str, mx.array]:
    """HF / repack names -> module names; token_ordering stays integer."""
    out = {}
    for key, value in weights.items():
        k = key
        for prefix in ("model.language_model.", "language_model.model.", "language_model."):
            if k.startswith(prefix):
                k = "model." + k[len(prefix) :]
        if "self_attn.rotary_emb" in k or k.endswith(("k_proj.weight", "v_proj.weight", "k_norm.weight")):
            continue  # no own K/V in the assistant
        if k == "lm_head.weight":
            if tied:
                if "model.embed_tokens.weight" not in weights:
                    out["model.embed_tokens.weight"] = value
                continue
        if k.endswith("token_ordering"):
            value = value.astype(mx.int32)
        out[k] = value
    return out


def quantize(model: Gemma4Assistant, bits: int = 8, group_size: int = 64, mode: str = "affine") -> Dict[str, Any]:
    """Quantize the linear layers and the embedding. Norms (not quantizable),
    `token_ordering` (an integer buffer) and the centroids stay as they are.
    Returns the `quantization` entry for config.json."""

    def predicate(path: str, module: nn.Module) -> bool:
        if not hasattr(module, "to_quantized") or "masked_embedding" in path:
            return False
        return module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=predicate)
    return {"group_size": group_size, "bits": bits, "mode": mode}


def compatibility_problem(target: Any, assistant: Gemma4Assistant) -> Optional[str]:
    """None when `assistant` can draft for `target`, else a one-line reason."""
    if not hasattr(target, "shared_kv"):
        return f"a Gemma 4 assistant drafts only for Gemma 4 targets, not {architecture(target)}"
    a = assistant.args
    if a.backbone_hidden_size != target.hidden_size:
        return (
            f"the assistant was trained for hidden size {a.backbone_hidden_size} "
            f"but the target's is {target.hidden_size}"
        )
    if a.text.vocab_size != target.vocab_size:
        return f"vocabularies differ: assistant {a.text.vocab_size}, target {target.vocab_size}"
    target_kv = target.kv_head_dims
    for layer_type, (heads, head_dim) in assistant.head_dims.items():
        if layer_type not in target_kv:
            return f"the target has no {layer_type} layer to share KV with"
        kv_heads, kv_dim = target_kv[layer_type]
        if kv_dim != head_dim:
            return f"{layer_type} head dims differ: assistant {head_dim}, target KV {kv_dim}"
        if heads % kv_heads:
            return f"{layer_type}: {heads} assistant query heads do not divide into {kv_heads} target KV heads"
    return None
