"""Where an architecture keeps its MTP head in a checkpoint, written down once.

Each family names its head differently on disk:
- Qwen3.5/3.6: `mtp.*` (maybe under `model.` / `language_model.`), counted
  by `mtp_num_hidden_layers`; Qwen3-Next: the same keys, counted by
  `num_nextn_predict_layers` (1 when the config says nothing, as vLLM reads it);
- DeepSeek-V3 and GLM-4.5/4.7 (`nextn`): one more decoder layer at index
  `num_hidden_layers`, `model.layers.L.*`, counted by `num_nextn_predict_layers`;
- MiMo: `model.mtp_layers.K.*`, counted by `num_nextn_predict_layers`.

Inside our model classes every head is the module `mtp`. Loading, `inspect`,
`convert` and `graft` ask a `HeadLayout` which stored keys are head keys,
what they are called inside the `mtp` module, and how many layers the config
declares. convert and graft write the head back under the family's own
names (`stored_key`): mlx-lm's `sanitize` drops exactly those (it would
refuse `mtp.*` in a GLM or DeepSeek checkpoint), so `mlx_lm.load` keeps
loading the trunk; every `local_key` also reads `mtp.*`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import mlx.core as mx

#: `mtp.` head keys as found in raw HF checkpoints, repacks and our own output.
MTP_KEY = re.compile(r"^(?:model\.|language_model\.|language_model\.model\.|model\.language_model\.)?mtp\.(.+)$")


def text_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The text model's config (multimodal checkpoints nest it)."""
    return config.get("text_config", config)


@dataclass(frozen=True)
class HeadLayout:
    """How one architecture stores its MTP head.

    - `local_key(key)`: the key inside our `mtp` module for a stored head
      key (`model.layers.46.enorm.weight` -> `layers.0.enorm.weight`), or
      None when `key` is not part of the head. Keys already written as
      `mtp.*` by mlx-mtp map to themselves minus the prefix.
    - `declared_layers`: head layers the config declares; `config_field`
      names the field users fix when it is wrong.
    - `sanitize(head, raw)`: head tensors keyed by `local_key` -> the `mtp`
      module's parameter layout (norm shifts, stacked experts, dropped
      duplicates); `raw` says the checkpoint is raw HF, not mlx-lm sanitized.
    - `stored_name`: how messages name the head's tensors ("mtp.*",
      "model.layers.46.*"); left out, the `local_key` says (the keys made by
      `layer_index_local_key` know their prefix).
    """

    local_key: Callable[[str], Optional[str]]
    declared_layers: int
    config_field: str
    sanitize: Callable[[Dict[str, mx.array], bool], Dict[str, mx.array]]
    stored_name: str = ""

    def __post_init__(self) -> None:
        if not self.stored_name:  # frozen: set once, here
            object.__setattr__(self, "stored_name", getattr(self.local_key, "stored_name", "mtp.*"))

    def is_head(self, key: str) -> bool:
        return self.local_key(key) is not None

    def stored_key(self, local: str) -> str:
        """A name inside `mtp` (`layers.0.enorm.weight`, or `mtp.layers.0...`)
        as the family stores it (`model.layers.46.enorm.weight`), for messages.
        Names sanitizing made (stacked experts) keep their layer prefix."""
        local = local[len("mtp."):] if local.startswith("mtp.") else local
        stored = getattr(self.local_key, "stored_key", None)
        return stored(local) if stored is not None else f"mtp.{local}"

    def field_path(self, config: Dict[str, Any]) -> str:
        """Where users set `config_field` in this config.json
        (`text_config.mtp_num_hidden_layers` in multimodal configs)."""
        return f"text_config.{self.config_field}" if "text_config" in config else self.config_field

    def split(self, weights: Dict[str, mx.array]) -> "tuple[Dict[str, mx.array], Dict[str, mx.array]]":
        """(head tensors keyed by `local_key`, everything else)."""
        head, rest = {}, {}
        for key, value in weights.items():
            local = self.local_key(key)
            if local is None:
                rest[key] = value
            else:
                head[local] = value
        return head, rest


def mtp_local_key(key: str) -> Optional[str]:
    m = MTP_KEY.match(key)
    return m.group(1) if m else None


class _LayerIndexKey:
    """`local_key` for heads stored as extra decoder layers (see
    `layer_index_local_key`); also knows the stored names, for messages."""

    def __init__(self, first_layer: int, prefix: str):
        self.first_layer, self.prefix = first_layer, prefix
        self.pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.(.+)$")
        # `model.layers.46.*` (the index matters: lower ones are the trunk);
        # `model.mtp_layers.*` where every index is the head's.
        self.stored_name = f"{prefix}{first_layer}.*" if first_layer else f"{prefix}*"

    def __call__(self, key: str) -> Optional[str]:
        own = mtp_local_key(key)
        if own is not None:
            return own
        m = self.pattern.match(key)
        if m is None or int(m.group(1)) < self.first_layer:
            return None
        return f"layers.{int(m.group(1)) - self.first_layer}.{m.group(2)}"

    def stored_key(self, local: str) -> str:
        m = re.match(r"^layers\.(\d+)\.(.+)$", local)
        return f"{self.prefix}{self.first_layer + int(m.group(1))}.{m.group(2)}" if m else f"mtp.{local}"


def layer_index_local_key(first_layer: int, prefix: str = "model.layers.") -> Callable[[str], Optional[str]]:
    """`local_key` for heads stored as extra decoder layers from index
    `first_layer` on (`model.layers.L.*`, `model.mtp_layers.0.*` with
    first_layer 0): head layer i is `layers.i.*` inside `mtp`. Keys mlx-mtp
    wrote (`mtp.*`) are head keys too."""
    return _LayerIndexKey(first_layer, prefix)
