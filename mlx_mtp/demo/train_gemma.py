"""Train `assets/demo-gemma`: a tiny Gemma 4 target plus its assistant drafter,
on the Python standard library's source.

    python -m mlx_mtp.demo.train_gemma --out assets/demo-gemma

Reproducible: fixed seed, fixed step counts (`--target-steps`,
`--assistant-steps`), the corpus is this machine's stdlib minus its tests (the
same documents as demo-qwen, see train_qwen.py). The tokenizer is demo-qwen's
(its tokenizer.json and tokenizer_config.json are copied from
`--tokenizer-from`, default assets/demo-qwen; without them it is retrained
with the same settings). Runtime on the 2-core x86 CPU it was built on
(mlx[cpu], float32, OpenBLAS preloaded; wall clock, partly shared with other
jobs): 42 minutes for the defaults (target
28.5 min, 1500 steps, held-out loss 2.55; assistant 13.7 min, 400 steps,
argmax agreement with the target 0.69 / 0.68 / 0.66 at draft steps 1-3). The log goes to
OUT/../demo-gemma-train.log.

    LD_PRELOAD="$(dpkg -L libopenblas0-pthread | grep 'libopenblas.so.0$' | head -1)" \\
        nice -n 5 python -m mlx_mtp.demo.train_gemma --out assets/demo-gemma

What it does:
1. Target: a dense Gemma 4 text model (`gemma4` multimodal layout as the
   released checkpoints use, text path only): sliding/full attention layers,
   a small sliding window, tied embeddings, final logit soft-capping, built
   with mlx_mtp.models.gemma4.Model (the class the loader uses) and trained
   with next-token cross-entropy.
2. Assistant: mlx_mtp.models.gemma4_assistant.Gemma4Assistant (3 sliding + 1
   full layer, no K/V of its own, dense tied head), trained on the FROZEN
   target exactly as Gemma4AssistantDrafter runs it: a round at position p
   (the bonus token x_p) reads the target's post-norm hidden state h_{p-1}
   and E_target[x_p]; its queries sit at the fixed position p and attend to
   the target's keys/values (post k_norm/RoPE) of the last sliding layer (the
   last `sliding_window` positions before p) and the last full layer (every
   position before p); step j > 1 feeds back post_projection(y) and the
   embedding of the token drafted at step j - 1 (teacher-forced: x_{p+j-1}).
   Step j is distilled to the target's own next-token distribution at
   position p + j - 1 (soft cross-entropy), so the drafter learns what the
   target would say, not what the corpus says. Every position p of a batch is
   a round of its own, all in one pass (a masked attention per layer type).
   The assistant's head starts from the target's embedding (h == B).
3. Saves the target (HF names, `model.language_model.*`, config.json with
   model_type gemma4, tokenizer files, generation_config.json) in OUT and the
   assistant (config.json with model_type gemma4_assistant,
   generation_config.json with num_assistant_tokens) in OUT/assistant, both
   safetensors, through mlx_mtp.loading.writers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..loading.configs import gemma4_assistant_config
from ..models import gemma4
from ..models.base import FULL, SLIDING
from ..models.gemma4_assistant import AssistantArgs, Gemma4Assistant, sliding_keys
from .train_qwen import (
    CONTEXT_LENGTH,
    EOS_TOKEN,
    PAD_TOKEN,
    add_common_arguments,
    add_options,
    fixed_batches,
    init_matrices,
    make_schedule,
    make_train_step,
    random_batch,
    start_run,
    token_data,
    train_tokenizer,
    write_tokenizer,
)

ROPE = {
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
}


def layer_pattern(layers: int, full_every: int) -> List[str]:
    return [FULL if (i + 1) % full_every == 0 or i == layers - 1 else SLIDING for i in range(layers)]


def target_config(args, eos_id: int, pad_id: int) -> dict:
    """Multimodal-layout (`gemma4`) config as in the released repos."""
    text = {
        "model_type": "gemma4_text",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "layer_types": layer_pattern(args.layers, args.full_every),
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "global_head_dim": args.global_head_dim,
        "rms_norm_eps": 1e-6,
        "vocab_size": args.vocab,
        "vocab_size_per_layer_input": args.vocab,
        "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": 0,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
        "attention_k_eq_v": False,
        "attention_bias": False,
        "sliding_window": args.window,
        "max_position_embeddings": CONTEXT_LENGTH,
        "final_logit_softcapping": 30.0,
        "rope_parameters": copy.deepcopy(ROPE),
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
        "bos_token_id": None,
    }
    return {
        "model_type": "gemma4",
        "architectures": ["Gemma4ForConditionalGeneration"],
        "text_config": text,
        "vocab_size": args.vocab,
        "tie_word_embeddings": True,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def assistant_config(args, text: dict) -> dict:
    """A `gemma4_assistant` config that pairs with the target's text config."""
    return gemma4_assistant_config(
        hidden_size=args.a_hidden,
        intermediate_size=args.a_intermediate,
        layer_types=[SLIDING, SLIDING, SLIDING, FULL],
        num_attention_heads=args.a_heads,
        num_key_value_heads=text["num_key_value_heads"],
        head_dim=text["head_dim"],
        global_head_dim=text["global_head_dim"],
        vocab_size=text["vocab_size"],
        sliding_window=text["sliding_window"],
        max_position_embeddings=text["max_position_embeddings"],
        rope_parameters=text["rope_parameters"],
        backbone_hidden_size=text["hidden_size"],
        torch_dtype="float32",
    )


# --- init -------------------------------------------------------------------


# normal(0, 0.02) for matrices, smaller for residual outputs; norms and layer
# scalars keep their ones.
RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight")


def build_target(config: dict, seed: int):
    mx.random.seed(seed)
    model = gemma4.Model(gemma4.ModelArgs.from_dict(copy.deepcopy(config)))
    init_matrices(model, seed, config["text_config"]["num_hidden_layers"], RESIDUAL_OUTPUTS)
    return model


def build_assistant(config: dict, target, seed: int) -> Gemma4Assistant:
    mx.random.seed(seed + 1)
    model = Gemma4Assistant(AssistantArgs.from_config(copy.deepcopy(config)))
    init_matrices(model, seed + 1, 4, RESIDUAL_OUTPUTS)
    B, h = model.args.backbone_hidden_size, model.args.text.hidden_size
    rng = np.random.default_rng(seed + 2)
    # x = pre_projection([E*sqrt(B), s]) starts at rms ~1 whatever the halves.
    model.pre_projection.weight = mx.array(rng.normal(0, 1 / math.sqrt(2 * B), (h, 2 * B)), dtype=mx.float32)
    if h == B:
        # Head start: the tied head begins as the target's embedding.
        model.model.embed_tokens.weight = mx.array(target.text_model.model.embed_tokens.weight)
    mx.eval(model.parameters())
    return model


# --- the frozen target as the drafter sees it -----------------------------------


def target_outputs(target, x: mx.array):
    """x [N, T] -> (E_target[x] * sqrt(B), post-norm hidden, target logits,
    {layer type: (keys, values)} of the layers the drafter reads), all
    without a cache, exactly the tensors the engine's cache would hold."""
    m = target.text_model.model
    h = m.embed_tokens(x) * m.embed_scale
    emb = h
    masks = m._make_masks(h, [None] * len(m.layers))
    wanted = {i: t for t, i in target.shared_kv_layers.items()}
    kv = {}
    for i, layer in enumerate(m.layers):
        h, kvs, _ = layer(h, masks[i], None)
        if i in wanted:
            kv[wanted[i]] = kvs
    hidden = m.norm(h)
    return emb, hidden, target.logits(hidden), kv


def round_masks(n: int, T: int, window: int) -> Dict[str, mx.array]:
    """Rounds at positions p = 1..n over keys 0..T-1: the full layer sees
    k < p, a sliding layer the last `sliding_keys(window)` of them (as the
    drafter slices, after transformers' |q - k| <= W)."""
    p = mx.arange(1, n + 1)[:, None]
    k = mx.arange(T)[None]
    full = k < p
    return {FULL: full, SLIDING: full & (k >= p - sliding_keys(window))}


def assistant_step(assistant: Gemma4Assistant, emb, state, kv, masks):
    """Gemma4Assistant.step for many rounds at once: query i sits at position i + 1."""
    x = assistant.pre_projection(mx.concatenate([emb, state], axis=-1))
    for layer in assistant.model.layers:
        x, _, _ = layer(x, masks[layer.layer_type], None, shared_kv=kv[layer.layer_type], offset=1)
    y = assistant.model.norm(x)
    return y, assistant.post_projection(y)


def assistant_losses(assistant, emb, hidden, tlogits, kv, depth: int, window: int):
    """Soft cross-entropy of draft step j (j = 1..depth) against the target's
    distribution at position p + j - 1, for every round p = 1..T-depth."""
    T = emb.shape[1]
    n = T - depth
    masks = round_masks(n, T, window)
    state = hidden[:, :n]  # h_{p-1}
    out, agree = [], []
    for j in range(1, depth + 1):
        y, state = assistant_step(assistant, emb[:, j : j + n], state, kv, masks)  # token x_{p+j-1}
        logp = nn.log_softmax(assistant.dense_logits(y).astype(mx.float32), axis=-1)
        t = tlogits[:, j : j + n].astype(mx.float32)
        q = mx.softmax(t, axis=-1)
        out.append(-(q * logp).sum(-1).mean())
        agree.append((mx.argmax(logp, -1) == mx.argmax(t, -1)).astype(mx.float32).mean())
    return out, agree


# --- training -------------------------------------------------------------------


def train_target(args, model, train, val, say):
    def loss_fn(model, x):
        h = model.hidden(x[:, :-1])
        return nn.losses.cross_entropy(model.logits(h), x[:, 1:], reduction="mean")

    schedule = make_schedule(args.lr, args.target_steps, args.warmup)
    step, state = make_train_step(model, loss_fn, schedule, args.weight_decay)

    @partial(mx.compile, inputs=[model.state])  # the weights change between evals
    def eval_step(x):
        return loss_fn(model, x)

    rng = np.random.default_rng(args.seed)
    L = args.seq + 1
    val_batches = fixed_batches(val, L, args.batch, args.seed + 1)
    model.train()
    say(f"target: training {args.target_steps} steps of {args.batch}x{args.seq} tokens")
    t0, avg, losses = time.time(), None, {}
    for it in range(1, args.target_steps + 1):
        loss = step(random_batch(rng, train, L, args.batch))
        mx.eval(state, loss)
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if it % 10 == 0 or it == 1:
            el = time.time() - t0
            say(f"target step {it} lr {float(schedule(it)):.2e} loss {avg:.3f} | "
                f"{it * args.batch * args.seq / el:.0f} tok/s, eta {el / it * (args.target_steps - it) / 60:.1f} min")
        stop = args.target_minutes is not None and time.time() - t0 > 60 * args.target_minutes
        if it % args.eval_every == 0 or it == args.target_steps or stop:
            model.eval()
            v = float(np.mean([eval_step(b).item() for b in val_batches]))
            model.train()
            losses = {"step": it, "train": avg, "val": v}
            say(f"target eval step {it}: val loss {v:.3f} (ppl {math.exp(v):.1f})")
        if stop:
            say(f"target: stopping early at step {it} of {args.target_steps} (--target-minutes {args.target_minutes})")
            break
    model.eval()
    return losses


def train_assistant(args, target, assistant, train, val, say):
    depth, window = args.depth, target.text_args.sliding_window
    weights = [float(w) for w in args.depth_weights.split(",")][:depth]
    assert len(weights) == depth, "--depth-weights needs one weight per depth"
    target.freeze()

    @mx.compile
    def frozen(x):
        return target_outputs(target, x)

    def loss_fn(assistant, emb, hidden, tlogits, kv):
        losses, agree = assistant_losses(assistant, emb, hidden, tlogits, kv, depth, window)
        return sum(w * l for w, l in zip(weights, losses)) / sum(weights), mx.stack([*losses, *agree])

    schedule = make_schedule(args.a_lr, args.assistant_steps, args.warmup)
    step, state = make_train_step(assistant, loss_fn, schedule, args.weight_decay)

    @partial(mx.compile, inputs=[assistant.state])  # the weights change between evals
    def eval_step(emb, hidden, tlogits, kv):
        losses, agree = assistant_losses(assistant, emb, hidden, tlogits, kv, depth, window)
        return mx.stack([*losses, *agree])

    L = args.a_seq
    rng = np.random.default_rng(args.seed + 10)
    val_batches = fixed_batches(val, L, args.a_batch, args.seed + 11)

    def evaluate():
        assistant.eval()
        r = mx.mean(mx.stack([eval_step(*frozen(b)) for b in val_batches]), axis=0).tolist()
        assistant.train()
        return r

    v = evaluate()
    say("assistant eval before training: ce " + " ".join(f"{x:.3f}" for x in v[:depth])
        + " | argmax agreement " + " ".join(f"{x:.3f}" for x in v[depth:]))
    assistant.train()
    say(f"assistant: training {args.assistant_steps} steps of {args.a_batch}x{L} tokens, depth {depth} weights {weights}")
    t0, avg, result = time.time(), None, {}
    for it in range(1, args.assistant_steps + 1):
        outs = frozen(random_batch(rng, train, L, args.a_batch))
        loss, parts = step(*outs)
        mx.eval(state, loss, parts)
        parts = np.array(parts.tolist())
        avg = parts if avg is None else 0.95 * avg + 0.05 * parts
        if it % 10 == 0 or it == 1:
            el = time.time() - t0
            say(f"assistant step {it} lr {float(schedule(it)):.2e} ce " + " ".join(f"{x:.3f}" for x in avg[:depth])
                + " | agree " + " ".join(f"{x:.3f}" for x in avg[depth:])
                + f" | eta {el / it * (args.assistant_steps - it) / 60:.1f} min")
        stop = args.assistant_minutes is not None and time.time() - t0 > 60 * args.assistant_minutes
        if it % args.eval_every == 0 or it == args.assistant_steps or stop:
            v = evaluate()
            result = {"step": it, "ce": v[:depth], "agree": v[depth:]}
            say(f"assistant eval step {it}: ce " + " ".join(f"{x:.3f}" for x in v[:depth])
                + " | argmax agreement " + " ".join(f"{x:.3f}" for x in v[depth:]))
        if stop:
            say(f"assistant: stopping early at step {it} of {args.assistant_steps} "
                f"(--assistant-minutes {args.assistant_minutes})")
            break
    assistant.eval()
    return result


def check_against_drafter(target, assistant, tokens: mx.array, depth: int) -> float:
    """Max |difference| between the batched training step and the drafter's
    own per-round computation (Gemma4AssistantDrafter's slicing), on float32."""
    from ..drafters.gemma4_assistant import Gemma4AssistantDrafter

    emb, hidden, _, kv = target_outputs(target, tokens[None])
    T = tokens.shape[0]
    n = T - depth
    masks = round_masks(n, T, target.text_args.sliding_window)
    ys, state = [], hidden[:, :n]
    for j in range(1, depth + 1):
        y, state = assistant_step(assistant, emb[:, j : j + n], state, kv, masks)
        ys.append(y)
    drafter = Gemma4AssistantDrafter(assistant, target)
    worst = 0.0
    for p in (1, n // 2, n):
        cache = target.make_cache()
        target.hidden(tokens[None, :p], cache)
        drafter.bind(target, cache)
        skv, position = drafter._shared_kv()
        assert position == p
        s = hidden[:, p - 1 : p]
        for j in range(1, depth + 1):
            y, s = assistant.step(target.embed(tokens[p + j - 1].reshape(1, 1)), s, skv, position)
            worst = max(worst, mx.abs(y[0, 0] - ys[j - 1][0, p - 1]).max().item())
    return worst


# --- saving ------------------------------------------------------------------


def cast(model, dtype: str) -> None:
    if dtype != "float32":
        model.set_dtype(getattr(mx, dtype), lambda d: mx.issubdtype(d, mx.floating))


def save_target_dir(model, out: Path, config: dict, dtype: str, tok_dir: Path) -> None:
    from ..loading.writers import save_target

    config = copy.deepcopy(config)
    config["torch_dtype"] = dtype
    save_target(model, out, config, raw=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tok_dir.resolve() != out.resolve():
            shutil.copyfile(tok_dir / name, out / name)
    gen = {"eos_token_id": [config["eos_token_id"]], "pad_token_id": config["pad_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1))


def save_assistant_dir(model, out: Path, config: dict, dtype: str, num_assistant_tokens: int) -> None:
    from ..loading.writers import save_assistant

    config = copy.deepcopy(config)
    config["torch_dtype"] = dtype
    save_assistant(model, out, config, num_assistant_tokens=num_assistant_tokens)


def load_target_dir(path: Path):
    from ..loading import load_target

    model, config = load_target(path)
    model.eval()
    return model, config


# --- main ------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, out="assets/demo-gemma")
    p.add_argument("--tokenizer-from", default="assets/demo-qwen",
                   help="directory with demo-qwen's tokenizer.json + tokenizer_config.json to reuse")
    # target (--hidden, --intermediate, --layers, --head-dim, --seq, --batch, --lr above)
    p.add_argument("--full-every", type=int, default=2, help="every Nth layer (and the last) is full attention")
    add_options(p, heads=4, kv_heads=2, global_head_dim=64, window=64, target_steps=1500)
    p.add_argument("--target-minutes", type=float, default=None, help="stop the target's training early")
    p.add_argument("--skip-target", action="store_true", help="reuse the target already saved in OUT")
    # assistant
    add_options(p, a_hidden=128, a_intermediate=256, a_heads=4, a_seq=128, a_batch=8, assistant_steps=400, a_lr=3e-3)
    p.add_argument("--depth", type=int, default=3, help="draft steps unrolled in training")
    p.add_argument("--depth-weights", default="1,0.7,0.5,0.4")
    p.add_argument("--num-assistant-tokens", type=int, default=3, help="generation_config default draft length")
    p.add_argument("--assistant-minutes", type=float, default=None, help="stop the assistant's training early")
    p.add_argument("--eval-every", type=int, default=100)
    args = p.parse_args(argv)

    from tokenizers import Tokenizer

    t_start, out, say, corpus = start_run(args, append=args.skip_target)
    tok_dir = Path(args.tokenizer_from)
    if not (tok_dir / "tokenizer.json").exists():
        say(f"no tokenizer in {tok_dir}: training demo-qwen's tokenizer settings into {out}")
        tok = train_tokenizer([t for _, t in corpus], args.vocab)
        write_tokenizer(tok, out, CONTEXT_LENGTH)
        tok_dir = out
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == args.vocab, tok.get_vocab_size()
    eos_id, pad_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    docs, data, train, val = token_data(tok, corpus, args.seed, args.chat_fraction, 20 * (args.seq + args.depth + 1))
    say(f"tokens: {len(data) / 1e6:.2f}M, {len(docs)} documents, val {len(val)}; tokenizer from {tok_dir}")

    config = target_config(args, eos_id, pad_id)
    summary: Dict[str, object] = {}
    if args.skip_target:
        target, config = load_target_dir(out)
        say(f"target: reusing {out}")
    else:
        target = build_target(config, args.seed)
        n = sum(v.size for _, v in tree_flatten(target.parameters()))
        say(f"target: {n / 1e6:.2f}M parameters, layers {config['text_config']['layer_types']}, "
            f"window {args.window}")
        t0 = time.time()
        summary["target"] = train_target(args, target, train, val, say)
        summary["target"]["minutes"] = (time.time() - t0) / 60
        save_target_dir(target, out, config, "float32", tok_dir)
        say(f"target saved to {out} (float32; {(time.time() - t0) / 60:.1f} min)")

    acfg = assistant_config(args, config["text_config"])
    assistant = build_assistant(acfg, target, args.seed)
    n = sum(v.size for _, v in tree_flatten(assistant.parameters()))
    say(f"assistant: {n / 1e6:.2f}M parameters, hidden {args.a_hidden}")
    t0 = time.time()
    summary["assistant"] = train_assistant(args, target, assistant, train, val, say)
    summary["assistant"]["minutes"] = (time.time() - t0) / 60
    check = check_against_drafter(target, assistant, mx.array(val[:200]), args.depth)
    say(f"batched training step vs the drafter's own rounds: max |dy| {check:.2e}")
    assert check < 1e-3, check

    cast(target, args.dtype)
    cast(assistant, args.dtype)
    if args.dtype != "float32" or not args.skip_target:
        save_target_dir(target, out, config, args.dtype, tok_dir)
    save_assistant_dir(assistant, out / "assistant", acfg, args.dtype, args.num_assistant_tokens)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    say(f"saved {out} and {out / 'assistant'} ({args.dtype}, {size / 1e6:.1f} MB); "
        f"total {(time.time() - t_start) / 60:.1f} min")
    say("summary: " + json.dumps(summary))


if __name__ == "__main__":
    main()
