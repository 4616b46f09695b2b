"""Any model mlx-lm loads, as a target for drafters that need no hidden
states (prompt lookup, docs/ngram.md#any-mlx-lm-model).

mlx-lm's own model class holds the weights, exactly as `mlx_lm.generate`
loads them. Its `Model.__call__` is trunk then head; the engine needs the two
apart (hidden states for every verified position, logits where it samples),
so both are taken from that very `__call__`, run with a stand-in for the
trunk (`_Trunk`):

- `hidden`: the stand-in runs the real trunk with the arguments mlx-lm's
  code gives it and stops the call there (`_Stop`), before the head;
- `logits`: the stand-in returns the hidden states it is given, so the call
  runs just the head, as mlx-lm writes it for that architecture (tied
  embedding or lm_head, soft-capping, logit scaling).

Nothing per architecture here; `split_problem` checks at load time that the
split reproduces the model's own logits, and refuses the model otherwise.
Rollback is mlx-lm's trimming (models/rollback.py); `rollback_problem` names
a layer whose cache cannot roll back (a sliding window's RotatingKVCache, a
recurrent ArraysCache), and drafting is refused for such a model.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from .rollback import rollback_problem

#: Where mlx-lm's model classes keep their trunk, in the order tried.
TRUNK_NAMES = ("model", "transformer", "backbone")
#: Config keys that hold a context length, in the order tried.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
#: Context length for a config that declares none: mlx-lm itself sets no limit.
UNDECLARED_CONTEXT = 131072


class _Stop(Exception):
    """Raised by the trunk stand-in to end `__call__` before the head."""

    def __init__(self, hidden: mx.array):
        super().__init__()
        self.hidden = hidden


class _Trunk:
    """The trunk as mlx-lm's `__call__` sees it: runs the real one and stops
    (given is None), or returns `given`. Everything else (embed_tokens for a
    tied head, args, ...) is the real trunk's."""

    def __init__(self, trunk: nn.Module, given: Optional[mx.array] = None):
        self._trunk, self._given = trunk, given

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        if self._given is not None:
            return self._given
        raise _Stop(self._trunk(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trunk, name)


class _Self:
    """`self` for mlx-lm's `Model.__call__`: the real model, trunk aside."""

    def __init__(self, model: nn.Module, trunk_name: str, trunk: _Trunk):
        self._model, self._trunk_name, self._trunk = model, trunk_name, trunk

    def __getattr__(self, name: str) -> Any:
        return self._trunk if name == self._trunk_name else getattr(self._model, name)

    def __contains__(self, key: str) -> bool:  # `"lm_head" in self`
        return key in self._model


def _text_model(model: nn.Module) -> nn.Module:
    """The causal LM inside a multimodal wrapper, or the model itself."""
    inner = model.get("language_model") if isinstance(model, dict) else None
    if isinstance(inner, nn.Module) and not any(isinstance(model.get(n), nn.Module) for n in TRUNK_NAMES):
        return inner
    return model


class MlxLmTarget(nn.Module):
    """The `Target` protocol (models/base.py) over an mlx-lm model."""

    def __init__(self, model: nn.Module, config: Dict[str, Any]):
        super().__init__()
        self.lm = model  # a child module: parameters(), quantization, memory as for mlx-lm
        self.model_type = str(config.get("model_type"))
        text = _text_model(model)
        names = [n for n in TRUNK_NAMES if isinstance(text.get(n), nn.Module)]
        if not names:
            raise ValueError(f"mlx-lm's {self.model_type} model has no trunk module ({' / '.join(TRUNK_NAMES)})")
        self._trunk_name = names[0]
        args = getattr(text, "args", None)

        def declared(key: str) -> Any:  # the model's args first, then the config's text part
            return getattr(args, key, None) or config.get("text_config", config).get(key) or config.get(key)

        contexts = [declared(k) for k in CONTEXT_KEYS]
        self._context_length = int(next((c for c in contexts if c), UNDECLARED_CONTEXT))
        self._hidden_size, self._vocab_size = int(declared("hidden_size")), int(declared("vocab_size"))
        self.mtp_problem = (
            f"mlx-lm's {self.model_type} model has no MTP head: --drafter ngram drafts by prompt lookup"
        )
        #: why drafts cannot be rolled back on this model (None: they can)
        self.rollback_problem = rollback_problem(self.make_cache())

    @property
    def _text(self) -> nn.Module:
        return _text_model(self.lm)

    def _call(self, trunk: _Trunk, tokens: mx.array, cache: Optional[List[Any]]) -> mx.array:
        text = self._text
        return type(text).__call__(_Self(text, self._trunk_name, trunk), tokens, cache=cache)

    def hidden(self, tokens: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        try:
            self._call(_Trunk(self._text[self._trunk_name]), tokens, cache)
        except _Stop as stop:
            return stop.hidden
        raise RuntimeError(f"mlx-lm's {self.model_type} model did not call its trunk")

    def logits(self, hidden: mx.array) -> mx.array:
        # mlx-lm's code sees the [B, L, H] its trunk returns, and [B, L] inputs.
        rows = hidden.ndim == 2  # [B, H]: one position per row
        given = hidden[:, None, :] if rows else hidden
        out = self._call(_Trunk(self._text[self._trunk_name], given), mx.zeros(given.shape[:2], mx.int32), None)
        return out[:, 0, :] if rows else out

    def embed(self, tokens: mx.array) -> mx.array:
        # Only model drafters read embeddings, and none drafts for these
        # targets; this is the trunk's table as stored (before any scaling).
        return self._text[self._trunk_name].embed_tokens(tokens)

    def make_cache(self) -> List[Any]:
        return make_prompt_cache(self.lm)

    def split_problem(self) -> Optional[str]:
        """Why hidden + logits do not reproduce mlx-lm's own logits (None
        when they do, checked on a 3-token prompt). Runs the model once."""
        tokens = mx.array([[0, 1, 2]], mx.int32) % self.vocab_size
        try:
            ours = self.logits(self.hidden(tokens, self.make_cache()))
            theirs = self.lm(tokens, cache=make_prompt_cache(self.lm))
        except Exception as e:  # any failure of the stand-in means: no split
            return f"mlx-lm's {self.model_type} model does not run as trunk then head ({type(e).__name__}: {e})"
        if ours.shape != theirs.shape or not mx.allclose(ours, theirs, rtol=1e-4, atol=1e-4).item():
            return f"mlx-lm's {self.model_type} model does not split into trunk and head: the logits differ"
        return None

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size
