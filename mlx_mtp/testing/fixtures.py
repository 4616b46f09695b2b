"""Pieces every tiny-checkpoint builder in mlx_mtp.testing shares: the
random initialisation, the "predictable" embedding / output head, loading
the drawn values into the model, and the `main(argv)` command line.

The draws happen in a fixed order (parameters as `tree_flatten` lists them,
then the permutation, the embedding and any pass-through projection), so a
fixed seed always gives the same weights.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, Iterable, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..loading.writers import is_norm

Draw = Callable[[np.random.Generator, tuple], np.ndarray]
#: Residual-branch outputs that `noise` scales (recurrent families add "out_proj.weight").
BRANCHES = ("o_proj.weight", "down_proj.weight")


def norm_draw(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """A norm weight near 1."""
    return 1.0 + 0.1 * rng.standard_normal(shape)


def fan_in_draw(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """A normal scaled by 1/sqrt(fan-in) (fan-in 1 for vectors)."""
    fan_in = shape[-1] if len(shape) > 1 else 1
    return rng.standard_normal(shape) / np.sqrt(fan_in)


def small_normal_draw(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    return 0.1 * rng.standard_normal(shape)


#: Gated-DeltaNet decay parameters, as Qwen3.5 / Qwen3-Next initialise them.
SSM_DRAWS: Tuple[Tuple[str, Draw], ...] = (
    ("A_log", lambda rng, shape: np.log(rng.uniform(1, 8, shape))),
    ("dt_bias", lambda rng, shape: rng.uniform(0.5, 1.5, shape)),
)


def random_params(model, rng: np.random.Generator, draws: Iterable[Tuple[object, Draw]] = (),
                  norm: Draw = norm_draw, norm_test: Callable[[str], bool] = is_norm) -> Dict[str, np.ndarray]:
    """Numpy values for every parameter of `model`, in `tree_flatten` order:
    `norm` for norms (`norm_test`), else the first of `draws` whose suffix
    (a string or tuple, as str.endswith takes) the name ends with, else
    `fan_in_draw`."""
    draws = tuple(draws)
    params: Dict[str, np.ndarray] = {}
    for name, value in tree_flatten(model.parameters()):
        shape = value.shape
        if norm_test(name):
            params[name] = norm(rng, shape)
            continue
        for suffix, draw in draws:
            if name.endswith(suffix):
                params[name] = draw(rng, shape)
                break
        else:
            params[name] = fan_in_draw(rng, shape)
    return params


def predictable_trunk(params: Dict[str, np.ndarray], rng: np.random.Generator, vocab: int, hidden: int,
                      noise: float, *, embed: str = "model.embed_tokens.weight", head: str = "lm_head.weight",
                      branches: Tuple[str, ...] = BRANCHES) -> None:
    """Make the greedy next token mostly a fixed permutation of the current
    one: unit-scale embedding rows E and an output head holding E in the
    permutation's inverse order; every residual branch in `branches` scaled
    by `noise` (so the stream stays near E[t]); the head's (`mtp.*`) norms
    all ones."""
    V, H = vocab, hidden
    perm = rng.permutation(V)  # greedy next token ~ perm[current]
    E = rng.standard_normal((V, H))
    E /= np.linalg.norm(E, axis=1, keepdims=True) / np.sqrt(H)
    params[embed] = E
    params[head] = 4.0 * E[np.argsort(perm)] / np.sqrt(H)
    for name in list(params):
        if name.endswith(branches):
            params[name] = params[name] * noise
        if name.startswith("mtp.") and is_norm(name):
            params[name] = np.ones_like(params[name])


def pass_through(rng: np.random.Generator, hidden: int, embedding_first: bool = True) -> np.ndarray:
    """A head's [H, 2H] input projection that passes the embedding half on
    (identity) and mixes in a little of the other half: the head then
    predicts the token after the one it is given. `embedding_first=False`
    for heads that read [hidden, embedding] (MiMo)."""
    H = hidden
    proj = np.zeros((H, 2 * H))
    if embedding_first:
        proj[:, :H] = np.eye(H)
        proj[:, H:] = 0.05 * rng.standard_normal((H, H))
    else:
        proj[:, :H] = 0.05 * rng.standard_normal((H, H))
        proj[:, H:] = np.eye(H)
    return proj


def load_params(model, params: Dict[str, np.ndarray]):
    """Put `params` into `model` as float32, evaluated, in eval mode."""
    model.update(tree_unflatten([(k, mx.array(v, dtype=mx.float32)) for k, v in params.items()]))
    mx.eval(model.parameters())
    model.eval()
    return model


def parse_args(argv: Optional[list], prog: str, description: str, noise: Optional[float] = None,
               noise_help: str = "how far the trunk strays from the predictable rule",
               extra: Callable[[argparse.ArgumentParser], None] = lambda ap: None,
               seed: bool = True) -> argparse.Namespace:
    """A builder's command line: `output_dir`, then what `extra` adds, then
    `--noise` (where a default is given) and `--seed`."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("output_dir")
    extra(ap)
    if noise is not None:
        ap.add_argument("--noise", type=float, default=noise, help=noise_help)
    if seed:
        ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(sys.argv[1:] if argv is None else argv)


def init_model(model, seed: int, predictable: bool, noise: float, make_predictable, draws=(), **random_kw):
    """`model` with `random_params` drawn from `seed`, then (`predictable`)
    `make_predictable(model, params, rng, noise)`, loaded as float32.

    Predictable: the trunk's greedy next token is mostly a fixed permutation
    of the current one and the head knows the permutation; `noise` scales
    every residual branch, so the head is right only some of the time
    (acceptances and rejections both happen)."""
    rng = np.random.default_rng(seed)
    params = random_params(model, rng, draws, **random_kw)
    if predictable:
        make_predictable(model, params, rng, noise)
    return load_params(model, params)


def per_expert(name: str, value: mx.array) -> Optional[Dict[str, mx.array]]:
    """A stacked `<prefix>.mlp.switch_mlp.<proj>.<leaf>` [E, ...] as the one
    tensor per expert raw HF checkpoints store (`<prefix>.mlp.experts.<e>.<proj>.<leaf>`);
    None for any other name. The inverse of models/qwen3_5.stack_experts."""
    if ".mlp.switch_mlp." not in name:
        return None
    prefix, rest = name.split(".mlp.switch_mlp.", 1)
    return {f"{prefix}.mlp.experts.{e}.{rest}": value[e] for e in range(value.shape[0])}
