"""MoE expert layers on MLX's CPU backend.

mlx-lm runs float experts through `mx.gather_mm` (`SwitchLinear`). On the CPU
backend that kernel takes float32 only: a bf16 or fp16 MoE checkpoint fails
inside the first forward pass with `[GatherMM::eval] Currently only supports
float32`. Metal and CUDA take bf16, and quantized experts (`gather_qmm`) work
everywhere, so only float experts on the CPU need this.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map
from mlx_lm.models.switch_layers import SwitchLinear


class Float32SwitchLinear(SwitchLinear):
    """A `SwitchLinear` whose experts are stored in float32 and that returns
    its input's dtype, so the layers around it keep running in bf16.

    Why the weights and not each call: a per-call cast would convert every
    expert of the layer at every step (gather_mm needs the whole stack). A
    one-time cast costs twice the experts' bytes, on the CPU only."""

    def __init__(self, linear: SwitchLinear):
        nn.Module.__init__(self)  # not SwitchLinear's: it would draw random weights
        self.weight = linear.weight.astype(mx.float32)
        if "bias" in linear:
            self.bias = linear.bias.astype(mx.float32)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return super().__call__(x.astype(mx.float32), indices, sorted_indices).astype(x.dtype)


def _needs_float32(module: nn.Module) -> bool:
    return type(module) is SwitchLinear and module.weight.dtype != mx.float32


def _to_float32(module: nn.Module) -> nn.Module:
    return Float32SwitchLinear(module) if _needs_float32(module) else module


def fit_experts_to_device(model: nn.Module) -> int:
    """On the CPU backend, swap every non-float32 float `SwitchLinear` for a
    `Float32SwitchLinear` (lazily: the cast happens when the weights are read).
    Elsewhere nothing changes. Returns how many layers were swapped."""
    if mx.default_device().type != mx.DeviceType.cpu:
        return 0
    count = sum(1 for _, m in model.named_modules() if _needs_float32(m))
    if count:
        model.update_modules(tree_map(_to_float32, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return count
