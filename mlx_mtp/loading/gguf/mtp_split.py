"""llama.cpp's split MTP files as drafters.

`convert_hf_to_gguf.py --mtp` writes `mtp-<name>.gguf`: the full qwen35 /
qwen35moe metadata (block_count still counts the trunk, nextn_predict_layers
set) but only `token_embd`, `output_norm`, `output` and the head's
`blk.N.nextn.*` and `blk.N.*` tensors. Its `--no-mtp` run writes the matching
trunk-only file. (Checked against llama.cpp 0c1e570, the tree vendored by
llama-cpp-python 0.3.36.)

The head drafts for a trunk-only GGUF or an MLX trunk of the same model: it
reads the target's embedding and LM head, as the built-in head does, so the
split file's own copies are never converted.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from ..safetensors import CheckpointError
from .quants import Tensor, convert_tensor, dequant, load_into, mlx_weights
from .qwen35 import ARCHS, GGUFCheckpoint, read_qwen35
from .reader import metadata, open_gguf

HEAD_PREFIX = "mtp."
USE_AS_DRAFTER = ("pass it as --drafter (drafter=...) next to the trunk-only GGUF (converted with --no-mtp) "
                  "or an MLX trunk of the same model")
# The targets a split head's arch drafts for: trunk-only GGUFs and MLX trunks.
TARGET_TYPES = {"qwen35": ("qwen35", "qwen3_5", "qwen3_5_text"),
                "qwen35moe": ("qwen35moe", "qwen3_5_moe", "qwen3_5_moe_text")}
# How far the split file's final norm may be from the target's and still be
# the same model: bfloat16 rounding of values near 1 (an MLX trunk) is 2^-8.
NORM_TOLERANCE = 1e-2


def fits_target(split_arch: str, target_arch: str) -> bool:
    """Whether a split head of `split_arch` suits a target reported as
    `target_arch` (a GGUF arch, or an MLX config's model_type)."""
    return target_arch in TARGET_TYPES.get(split_arch, ())


def is_mtp_only(meta: Dict[str, Any], names: Iterable[str]) -> bool:
    """True for a split MTP file: a qwen35 head declared and present, with no
    trunk layer at all."""
    arch = meta.get("general.architecture")
    n_mtp = int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
    if arch not in ARCHS or not n_mtp:
        return False
    trunk = int(meta.get(f"{arch}.block_count", 0) or 0) - n_mtp
    blocks = {int(m.group(1)) for n in names if (m := re.match(r"^blk\.(\d+)\.", n))}
    return bool(blocks) and min(blocks) >= trunk


def mtp_only_layout(meta: Dict[str, Any], names: Iterable[str]) -> Optional[str]:
    """`inspect`'s description of a split MTP file (None for any other file)."""
    if not is_mtp_only(meta, names):
        return None
    return "llama.cpp MTP-only drafter file (converted with --mtp): the head, no trunk"


class HeadCheckpoint(GGUFCheckpoint):
    """Only the head's tensors of a split file, named inside the head module."""

    def keeps(self, name: str) -> bool:
        return name.startswith(HEAD_PREFIX)

    def tensors(self) -> Iterator[Tuple[str, Tensor, str]]:
        for name, value, kind in super().tensors():
            yield name[len(HEAD_PREFIX):], value, kind


class SplitHead:
    """What MTPDrafter drives: the target's embedding and LM head, with the
    MTP head from a split file (the target itself is left as it is)."""

    has_mtp = True

    def __init__(self, target: Any, head: Any):
        self.target = target
        self.mtp = head

    def embed(self, tokens: mx.array) -> mx.array:
        return self.target.embed(tokens)

    def logits(self, hidden: mx.array) -> mx.array:
        return self.target.logits(hidden)

    def mtp_logits(self, state: mx.array) -> mx.array:
        # A Qwen3.5 head's post-norm state goes through the trunk's LM head.
        return self.target.logits(state)

    def make_mtp_cache(self) -> List[Any]:
        return self.mtp.make_cache()


def _mismatch(ckpt: GGUFCheckpoint, target: Any) -> Optional[str]:
    """Why the split file's head does not belong to `target` (None: it does)."""
    from ...models.qwen3_5 import Model, MoeModel

    want = MoeModel if ckpt.arch == "qwen35moe" else Model
    if not isinstance(target, want):
        kind = getattr(target, "model_type", None) or type(target).__name__
        return f"it is a {ckpt.arch} MTP head, but the target is {kind}"
    head, trunk = ckpt.config["text_config"], target.language_model.args
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        if head[key] != getattr(trunk, key):
            return f"its {key} is {head[key]}, the target's {getattr(trunk, key)}: not the same model"
    # Same sizes are not the same model: the final norms (tiny) must agree too.
    norm = next((t for t in ckpt.reader.tensors if t.name == "output_norm.weight"), None)
    if norm is not None:
        theirs = dequant(convert_tensor(norm))
        ours = np.array(target.language_model.model.norm.weight.astype(mx.float32))
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, atol=NORM_TOLERANCE):
            return "its output_norm differs from the target's final norm: not the same model"
    return None


def load_mtp_drafter(path: Union[str, Path], target: Any, lazy: bool = False, requant_bits: int = 8):
    """An MTPDrafter for `target` with the head of a split MTP file. Bad or
    mismatched files raise AssistantError (a drafter that cannot be paired)."""
    from ...drafters import MTPDrafter
    from ...models.gemma4_assistant import AssistantError
    from mlx_lm.models.qwen3_5 import TextModelArgs

    from ...models.qwen3_5 import MTPHead

    path = Path(path).expanduser()
    try:
        reader = open_gguf(path)
        meta = metadata(reader)
        if not is_mtp_only(meta, (t.name for t in reader.tensors)):
            raise CheckpointError(f"{path}: not an MTP-only drafter file (a complete {meta.get('general.architecture')} "
                                  "model, or no MTP head): load it as the model instead")
        ckpt = read_qwen35(path, reader, meta, requant_bits)
        problem = _mismatch(ckpt, target)
        if problem:
            raise CheckpointError(f"{path.name} cannot draft for this target: {problem}")
        text = ckpt.config["text_config"]
        # mlx-lm's args rewrite rope_parameters in place: give them a copy.
        head = MTPHead(TextModelArgs.from_dict(copy.deepcopy(text)), text["mtp_num_hidden_layers"])
        split = HeadCheckpoint(path, reader, meta, ckpt.config, requant_bits)
        weights, quantization = mlx_weights(split)
        load_into(head, weights, quantization, lazy)
    except CheckpointError as e:
        raise AssistantError(str(e)) from e
    return MTPDrafter(SplitHead(target, head))
