"""Train `assets/demo-qwen`: a tiny Qwen3.5 hybrid (Gated-DeltaNet + gated full
attention) with an MTP head, on the Python standard library's source.

    apt-get install -y libopenblas0-pthread
    LD_PRELOAD="$(dpkg -L libopenblas0-pthread | grep 'libopenblas.so.0$' | head -1)" \
        nice -n 5 python -m mlx_mtp.demo.train_qwen --out assets/demo-qwen --steps 2000 --warmup 60

That is the shipped checkpoint (fixed seed and data order; BLAS threading may
move the last digits). It takes about 45 minutes of compute on the 2-core x86
CPU it was built on (mlx[cpu], float32, OpenBLAS preloaded, 1,200-1,750
tok/s) plus ~20 s for the tokenizer; `--max-minutes` stops a run early and
`--stop-step` replays such a run. Loss log: assets/demo-qwen-train.log.
`--eval-only` rescores the saved checkpoint on the held-out 2% (2.30 nats
next-token for the shipped one; see assets/README.md).

The corpus is this machine's stdlib (`sysconfig.get_paths()["stdlib"]`) minus
its tests and site-packages; another Python version gives a slightly different
corpus and so different weights.

What it does:
1. Corpus: every stdlib `.py` file outside test/, tests/, idle_test/,
   test_*.py and site-packages, plus chat samples built from the same
   functions (user: a `def` line or "Write a function ..."; assistant: the
   function's source), so the default chat-templated
   prompt `def fibonacci(n):` is in distribution and the model ends its answer
   with <|im_end|>.
2. Tokenizer: byte-level BPE (the Qwen2/3/3.5 pre-tokenizer regex), 3072 ids
   including <|endoftext|> <|im_start|> <|im_end|>; EOS is <|im_end|>; a
   ChatML chat template (system + user/assistant turns, no thinking mode).
3. Model: mlx_mtp.models.qwen3_5.Model built from the config below (the exact
   class the loader uses), trained jointly: next-token cross-entropy plus the
   MTP head's losses. The head is unrolled as the drafter runs it: depth 1
   reads (E[t_{i+1}], h_i) and predicts t_{i+2}; depth j > 1 reads
   (E[t_{i+j}], g_{j-1}) with g the head's own post-norm output and predicts
   t_{i+j+1}. The trunk's h_i is NOT detached: the MTP loss also shapes the
   trunk (as in DeepSeek-V3's MTP), which helps the head; its weight is kept
   below the next-token loss's.
4. Saves the raw HF layout the loader reads for real Qwen3.5 checkpoints
   (`model.language_model.*` keys, zero-centred norms, `mtp.*` head,
   config.json with model_type qwen3_5), float32 safetensors, tokenizer.json,
   tokenizer_config.json (chat template) and generation_config.json.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import math
import os
import random
import sysconfig
import textwrap
import time
from functools import partial
from pathlib import Path
from typing import Iterator, List, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..loading.tokenizer_formats import CHATML_TEMPLATE, ENDOFTEXT, IM_END, IM_START, QWEN_PRETOKENIZE_REGEX
from ..models import qwen3_5
from . import open_run_log

SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
EOS_TOKEN = IM_END
PAD_TOKEN = ENDOFTEXT
#: The demo models' context (max_position_embeddings), which the tokenizer's
#: model_max_length must match or transformers warns about valid prompts.
CONTEXT_LENGTH = 4096
# Qwen-style ChatML template: optional system message, user/assistant turns.
# No thinking mode: the demo never learned one, and with no <think> tokens in
# the vocabulary mlx-lm does not switch thinking on (enable_thinking is
# accepted and ignored).
CHAT_TEMPLATE = CHATML_TEMPLATE
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a Python expert. Answer with code.",
    "You write clean, idiomatic Python.",
]


def text_config(args) -> dict:
    H = args.hidden
    head_dim = args.head_dim
    rot_half = int(head_dim * 0.25) // 2
    a = rot_half // 3
    return {
        "model_type": "qwen3_5_text",
        "hidden_size": H,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": H // head_dim,
        "num_key_value_heads": max(1, H // head_dim // 2),
        "head_dim": head_dim,
        "linear_num_value_heads": H // head_dim,
        "linear_num_key_heads": max(1, H // head_dim // 2),
        "linear_key_head_dim": head_dim,
        "linear_value_head_dim": head_dim,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": args.full_attention_interval,
        "layer_types": [
            "full_attention" if (i + 1) % args.full_attention_interval == 0 else "linear_attention"
            for i in range(args.layers)
        ],
        "vocab_size": args.vocab,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "max_position_embeddings": CONTEXT_LENGTH,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [a, a, rot_half - 2 * a],
            "mrope_interleaved": True,
        },
        "hidden_act": "silu",
        "attn_output_gate": True,
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def hf_config(args, eos_id: int, pad_id: int) -> dict:
    tc = text_config(args)
    tc["eos_token_id"] = eos_id
    tc["pad_token_id"] = pad_id
    return {
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "text_config": tc,
        "tie_word_embeddings": True,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


# --- corpus ---------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idle_tests"}


def corpus_files(root: str | None = None) -> List[Path]:
    """The stdlib's .py files, without tests and third-party packages, sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_") and name != "__phello__.foo.py":
                out.append(Path(dirpath) / name)
    return sorted(out)


def read_corpus(root: str | None = None) -> List[Tuple[str, str]]:
    docs = []
    for path in corpus_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append((str(path), text))
    return docs


def function_samples(text: str) -> Iterator[Tuple[str, str]]:
    """(signature line, dedented function source) for functions in `text`."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start, end = node.lineno - 1, node.end_lineno
        if not 3 <= end - start <= 40:
            continue
        src = textwrap.dedent("\n".join(lines[start:end]))
        first = src.split("\n", 1)[0]
        if not first.rstrip().endswith(":") or "\t" in src:
            continue
        yield first.rstrip(), src


def chat_sample(rng: random.Random, signature: str, source: str) -> str:
    name = signature.split("def ", 1)[1].split("(", 1)[0]
    r = rng.random()
    if r < 0.75:
        user = signature
    elif r < 0.9:
        user = f"Write a Python function `{name}`."
    else:
        user = f"Complete this function:\n{signature}"
    text = ""
    if rng.random() < 0.3:
        text += f"<|im_start|>system\n{rng.choice(SYSTEM_PROMPTS)}<|im_end|>\n"
    text += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{source}<|im_end|>\n"
    return text


def build_documents(corpus, seed: int, chat_fraction: float) -> List[str]:
    """Raw files plus chat samples (about `chat_fraction` of the characters)."""
    rng = random.Random(seed)
    samples = [s for _, text in corpus for s in function_samples(text)]
    rng.shuffle(samples)
    raw_chars = sum(len(t) for _, t in corpus)
    budget = chat_fraction / (1 - chat_fraction) * raw_chars
    chats, used = [], 0
    for sig, src in samples:
        if used >= budget:
            break
        chats.append(chat_sample(rng, sig, src))
        used += len(chats[-1])
    docs = [t for _, t in corpus] + chats
    rng.shuffle(docs)
    return docs


# --- tokenizer --------------------------------------------------------------

def train_tokenizer(texts: List[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def write_tokenizer(tok, path: Path, max_len: int) -> None:
    tok.save(str(path / "tokenizer.json"))
    config = {
        # A plain fast tokenizer: transformers would otherwise rebuild a
        # qwen3_5 tokenizer from the vocabulary with its own pipeline.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=1)


# --- model and training -------------------------------------------------------

def build_model(config: dict, seed: int):
    mx.random.seed(seed)
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict(copy.deepcopy(config)))
    # Keep mlx-lm's init for norms, A_log, dt_bias and conv.
    init_matrices(model, seed, config["text_config"]["num_hidden_layers"] + 1,
                  ("o_proj.weight", "out_proj.weight", "down_proj.weight"))
    return model


def init_matrices(model, seed: int, n_layers: int, residual_outputs: Tuple[str, ...], keep=()) -> None:
    """normal(0, 0.02) for every matrix not in `keep`, smaller for the
    residual outputs (names ending in `residual_outputs`); everything else
    (norms, layer scalars...) keeps the model's own init."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, value in tree_flatten(model.parameters()):
        if value.ndim != 2 or name in keep:
            continue
        std = 0.02
        if name.endswith(residual_outputs):
            std = 0.02 / math.sqrt(2 * n_layers)
        params[name] = mx.array(rng.normal(0, std, value.shape), dtype=mx.float32)
    model.update(tree_unflatten(list(params.items())))
    mx.eval(model.parameters())


def losses(model, x: mx.array, depth: int, stride: int = 1):
    """x: [B, T + depth + 1]. Returns (next-token loss, [MTP loss per depth]).

    Depths > 1 score every `stride`-th position only: on this CPU the
    vocabulary softmax (exp) is the costliest op of a step."""
    T = x.shape[1] - depth - 1
    h = model.hidden(x[:, :T])
    ce = nn.losses.cross_entropy(model.logits(h), x[:, 1 : T + 1], reduction="mean")
    mtp = []
    g = h
    for j in range(1, depth + 1):
        g = model.mtp(model.embed(x[:, j : T + j]), g, [None])
        s = 1 if j == 1 else stride
        target = x[:, j + 1 : T + j + 1][:, ::s]
        mtp.append(nn.losses.cross_entropy(model.logits(g[:, ::s]), target, reduction="mean"))
    return ce, mtp


# --- shared by the demo trainers ----------------------------------------------


def add_options(p: argparse.ArgumentParser, **defaults) -> None:
    """`--some-name` options typed by their defaults (keyword some_name)."""
    for name, default in defaults.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)


def add_common_arguments(p: argparse.ArgumentParser, out: str) -> None:
    """The options both demo trainers take, with the same defaults."""
    p.add_argument("--out", default=out)
    add_options(p, seed=0, vocab=3072, hidden=128, head_dim=32, intermediate=384, layers=4, seq=128, batch=16,
                lr=3e-3, warmup=30, weight_decay=0.1, chat_fraction=0.25)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--log", default=None, help=f"log file (default OUT/../{Path(out).name}-train.log)")


def start_run(args, append: bool):
    """(start time, OUT, say, corpus): creates OUT, opens the run log and
    reads the corpus, logging the arguments and the corpus size."""
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = open_run_log(out, args.log, append=append)
    say(f"args: {vars(args)}")
    corpus = read_corpus()
    say(f"corpus: {len(corpus)} files, {sum(len(t) for _, t in corpus) / 1e6:.1f}M chars from {sysconfig.get_paths()['stdlib']}")
    return t_start, out, say, corpus


def token_data(tok, corpus, seed: int, chat_fraction: float, min_val: int):
    """(documents, all ids, train ids, held-out ids): the documents encoded
    back to back, each followed by the pad token; the last 2% (at least
    `min_val` ids) held out."""
    docs = build_documents(corpus, seed, chat_fraction)
    pad_id = tok.token_to_id(PAD_TOKEN)
    ids: List[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(pad_id)
    data = np.array(ids, dtype=np.int32)
    n_val = max(len(data) // 50, min_val)
    return docs, data, data[:-n_val], data[-n_val:]


def make_schedule(lr: float, steps: int, warmup: int):
    """Linear warmup, then cosine decay to 5% of `lr`."""
    warmup = min(warmup, steps // 10 + 1)
    return optim.join_schedules(
        [optim.linear_schedule(lr * 0.01, lr, warmup), optim.cosine_decay(lr, max(1, steps - warmup), lr * 0.05)],
        [warmup],
    )


def make_train_step(model, loss_fn, schedule, weight_decay: float):
    """(step, state): a compiled AdamW step (gradients clipped to norm 1)
    returning what `loss_fn(model, *inputs)` returns; `state` is what to
    mx.eval after each step."""
    opt = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=weight_decay)
    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*inputs):
        value, grads = grad_fn(model, *inputs)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return value

    return step, state


def random_batch(rng, source: np.ndarray, L: int, n: int) -> mx.array:
    """n random windows of L ids from `source`."""
    starts = rng.integers(0, len(source) - L, n)
    return mx.array(np.stack([source[s : s + L] for s in starts]))


def fixed_batches(source: np.ndarray, L: int, batch: int, seed: int, n: int = 2) -> List[mx.array]:
    """n random batches drawn once (the same every evaluation)."""
    rng = np.random.default_rng(seed)
    return [random_batch(rng, source, L, batch) for _ in range(n)]


def main(argv=None) -> None:
    from .gdn import chunked_training

    # Training runs the Gated-DeltaNet recurrence in its chunked (parallel)
    # form; the saved model is an ordinary Qwen3.5 checkpoint.
    _main(argv, chunked_training)


def _main(argv, chunked_training) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(p, out="assets/demo-qwen")
    add_options(p, full_attention_interval=2, steps=2000)
    p.add_argument("--mtp-depth", type=int, default=3, help="MTP unroll depth in training")
    p.add_argument("--mtp-weights", default="0.5,0.3,0.2")
    p.add_argument("--mtp-stride", type=int, default=4, help="score depths > 1 at every Nth position")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--stop-step", type=int, default=None,
                   help="stop after this step, the LR schedule still planned for --steps "
                   "(reproduces a run that --max-minutes cut short)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training early after this many minutes (the log says so)")
    p.add_argument("--eval-only", action="store_true",
                   help="score the saved checkpoint in OUT on the held-out split (no training)")
    args = p.parse_args(argv)

    t_start, out, say, corpus = start_run(args, append=args.eval_only)
    if args.eval_only:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    else:
        tok = train_tokenizer([t for _, t in corpus], args.vocab)
    assert tok.get_vocab_size() == args.vocab, tok.get_vocab_size()
    eos_id, pad_id = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    if not args.eval_only:
        write_tokenizer(tok, out, CONTEXT_LENGTH)
    min_val = 20 * (args.seq + args.mtp_depth + 1)
    docs, data, train, val = token_data(tok, corpus, args.seed, args.chat_fraction, min_val)
    say(f"tokens: {len(data) / 1e6:.2f}M ({len(data) and sum(len(d) for d in docs) / len(data):.2f} chars/token), "
        f"{len(docs)} documents, val {len(val)}")

    config = hf_config(args, eos_id, pad_id)
    if args.eval_only:
        from .. import load

        model = load(out)[0].target
    else:
        model = build_model(config, args.seed)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    n_head = sum(v.size for _, v in tree_flatten(model.mtp.parameters()))
    train_ctx = chunked_training(model)
    train_ctx.__enter__()
    say(f"model: {n_params / 1e6:.2f}M parameters ({n_head / 1e6:.2f}M in the MTP head)")
    model.train()

    weights = [float(w) for w in args.mtp_weights.split(",")][: args.mtp_depth]
    assert len(weights) == args.mtp_depth

    def loss_fn(model, x):
        ce, mtp = losses(model, x, args.mtp_depth, args.mtp_stride)
        total = ce + sum(w * l for w, l in zip(weights, mtp))
        return total, mx.stack([ce, *mtp])

    schedule = make_schedule(args.lr, args.steps, args.warmup)
    step, state = make_train_step(model, loss_fn, schedule, args.weight_decay)

    # The parameters are an input: a plain mx.compile would freeze them.
    @partial(mx.compile, inputs=model.state)
    def eval_step(x):
        ce, mtp = losses(model, x, args.mtp_depth)
        return mx.stack([ce, *mtp])

    rng = np.random.default_rng(args.seed)
    L = args.seq + args.mtp_depth + 1
    val_batches = fixed_batches(val, L, args.batch, args.seed + 1, n=4)

    def evaluate():
        model.eval()
        parts = mx.mean(mx.stack([eval_step(b) for b in val_batches]), axis=0)
        model.train()
        return parts.tolist()

    if args.eval_only:
        v = evaluate()
        say(f"eval {out}: ntp {v[0]:.3f} mtp " + " ".join(f"{x:.3f}" for x in v[1:]))
        return
    say(f"training {args.steps} steps of {args.batch}x{args.seq} tokens, mtp depth {args.mtp_depth} weights {weights}")
    t_train = time.time()
    avg = None
    for it in range(1, args.steps + 1):
        loss, parts = step(random_batch(rng, train, L, args.batch))
        mx.eval(state, loss, parts)
        parts = np.array(parts.tolist())
        avg = parts if avg is None else 0.95 * avg + 0.05 * parts
        if it % 10 == 0 or it == 1:
            el = time.time() - t_train
            say(f"step {it} lr {float(schedule(it)):.2e} ntp {avg[0]:.3f} mtp "
                + " ".join(f"{v:.3f}" for v in avg[1:])
                + f" | {it * args.batch * args.seq / el:.0f} tok/s, eta {el / it * (args.steps - it) / 60:.1f} min")
        stop = (args.max_minutes is not None and time.time() - t_train > 60 * args.max_minutes) or (
            args.stop_step is not None and it >= args.stop_step and it < args.steps
        )
        if it % args.eval_every == 0 or it == args.steps or stop:
            v = evaluate()
            say(f"eval step {it}: ntp {v[0]:.3f} mtp " + " ".join(f"{x:.3f}" for x in v[1:]))
        if stop:
            say(f"stopping early at step {it} of {args.steps} (--max-minutes {args.max_minutes}, "
                f"--stop-step {args.stop_step}); reproduce with --steps {args.steps} --stop-step {it}")
            break

    train_ctx.__exit__(None, None, None)
    model.eval()
    save(model, out, config, args.dtype, eos_id)
    say(f"saved to {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB); "
        f"training {(time.time() - t_train) / 60:.1f} min, total {(time.time() - t_start) / 60:.1f} min")


def save(model, out: Path, config: dict, dtype: str, eos_id: int) -> None:
    from ..loading.writers import save_hf_checkpoint

    config = copy.deepcopy(config)
    config["torch_dtype"] = dtype
    if dtype != "float32":
        model.set_dtype(getattr(mx, dtype), lambda d: mx.issubdtype(d, mx.floating))
    save_hf_checkpoint(model, out, config, raw=True)
    with open(out / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [eos_id], "pad_token_id": config["pad_token_id"], "do_sample": False}, f, indent=1)


if __name__ == "__main__":
    main()
