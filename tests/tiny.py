"""Tests build their tiny checkpoints with mlx_mtp.testing."""

from mlx_mtp.testing import *  # noqa: F401,F403
from mlx_mtp.testing import VOCAB, build, hf_config, save_hf_checkpoint, text_config  # noqa: F401


def often_right_gemma_pair():
    """A dense Gemma 4 target and an assistant built to agree with it often
    (so both acceptances and rejections happen)."""
    from mlx_mtp.testing import gemma

    cfg = gemma.text_config("dense", tie_word_embeddings=False)
    target = gemma.build_target(cfg, seed=1, predictable=True)
    return target, gemma.build_assistant(gemma.assistant_config(cfg, ordered=False), target, seed=1, predictable=True)


def count_evals(monkeypatch) -> list:
    """Patch mx.eval to record one entry per call; returns the (live) list."""
    import mlx.core as mx

    calls: list = []
    real_eval = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a, **kw: (calls.append(1), real_eval(*a, **kw))[1])
    return calls
