"""Train a small UMT5-architecture text encoder from scratch on a dataset's captions (masked-token objective).

    python -m data_pipelines.train_text_encoder --input /tmp/synth --output /tmp/umt5_small --steps 2000

Reads the captions (ArrayRecord shards or a .txt/.csv/.jsonl file, as data_pipelines/train_tokenizer.py), trains
a unigram SentencePiece tokenizer on them, then a UMT5 encoder whose vocabulary is the tokenizer's plus one mask
id (the last id, where T5 keeps its sentinels). Each step hides ~15% of the caption tokens (BERT's 80/10/10:
mask id / random token / unchanged) and predicts them through the tied output projection, with AdamW.
OUTPUT/ gets transformers' UMT5EncoderModel layout (config.json, model.safetensors, spiece.model) plus
training.json, so `klingjax.models.umt5.load_umt5(OUTPUT)` (and `UMT5EncoderModel.from_pretrained`) load it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx

from data_pipelines.train_tokenizer import read_captions
from klingjax.data.tokenizer import EOS_ID, SPECIAL_PIECES, SentencePieceTokenizer, train_unigram
from klingjax.models.umt5 import UMT5Config, UMT5Encoder, save_umt5


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEncoderTraining:
    """Tokenizer size, encoder sizes and optimisation settings of one training run."""

    vocab_size: int = 1000  # tokenizer target; small caption sets give fewer pieces
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 256
    max_len: int = 32  # longest tokenized caption used for training (with </s>)
    batch_size: int = 128
    steps: int = 1000
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    mask_rate: float = 0.15
    log_every: int = 100
    seed: int = 0


def mask_tokens(rng: np.random.Generator, ids: np.ndarray, mask: np.ndarray, *, rate: float, mask_id: int,
                vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT corruption of ids (B, L): pick ~`rate` of the real non-</s> tokens -> (corrupted ids, picked (B, L)).

    Runs on the host (as BERT's data collators do), which keeps random-number code out of the compiled step.
    """
    picked = mask & (ids != EOS_ID) & (rng.random(ids.shape) < rate)  # (B, L)
    kind = rng.random(ids.shape)  # < 0.8: mask id, < 0.9: random piece, else unchanged
    random_ids = rng.integers(len(SPECIAL_PIECES), vocab, ids.shape)
    corrupted = np.where(kind < 0.8, mask_id, np.where(kind < 0.9, random_ids, ids))
    return np.where(picked, corrupted, ids).astype(ids.dtype), picked


def masked_token_loss(model: UMT5Encoder, inputs: jax.Array, mask: jax.Array, picked: jax.Array,
                      targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy, accuracy) over the picked positions of the tied-projection token logits."""
    logits = model.token_logits(model(inputs, mask))  # (B, L, V)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # (B, L)
    weight = picked.astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    accuracy = ((logits.argmax(-1) == targets) * weight).sum() / count
    return (ce * weight).sum() / count, accuracy


def _tokenize(tokenizer: SentencePieceTokenizer, captions: Sequence[str], max_len: int) -> tuple[np.ndarray, ...]:
    ids, mask = tokenizer(captions, max_len)
    length = int(mask.sum(1).max())  # trim padding every caption shares
    return ids[:, :length], mask[:, :length]


def train_text_encoder(captions: Sequence[str], output: str, settings: TextEncoderTraining = TextEncoderTraining(),
                       eval_captions: Sequence[str] | None = None) -> dict:
    """Train tokenizer + encoder on `captions`, save to `output` (a UMT5 folder); returns the training summary."""
    s = settings
    if s.d_model % s.num_heads:
        raise ValueError(f"d_model {s.d_model} must be divisible by num_heads {s.num_heads}")
    if s.steps < 1 or s.batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got {s.steps} and {s.batch_size}")
    t0 = time.time()
    tokenizer = SentencePieceTokenizer(train_unigram(captions, s.vocab_size))
    mask_id = tokenizer.vocab_size  # one id past the tokenizer's pieces, like T5's sentinels
    cfg = UMT5Config(vocab_size=tokenizer.vocab_size + 1, d_model=s.d_model, d_kv=s.d_model // s.num_heads,
                     d_ff=s.d_ff, num_layers=s.num_layers, num_heads=s.num_heads)
    ids, mask = _tokenize(tokenizer, captions, s.max_len)
    eval_ids, eval_mask = _tokenize(tokenizer, eval_captions or captions[: 4 * s.batch_size], s.max_len)
    logging.info("training a %s on %d captions (%d tokens each at most)", cfg, len(ids), ids.shape[1])

    model = UMT5Encoder(cfg, rngs=nnx.Rngs(s.seed))
    graphdef, params = nnx.split(model)
    warmup = min(s.warmup_steps, s.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.learning_rate, warmup, max(s.steps, warmup + 1),
                                                  end_value=0.1 * s.learning_rate)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=s.weight_decay))
    opt_state = tx.init(params)
    corrupt = dict(rate=s.mask_rate, mask_id=mask_id, vocab=tokenizer.vocab_size)

    def loss_fn(params, inputs, mask, picked, targets):
        return masked_token_loss(nnx.merge(graphdef, params), inputs, mask, picked, targets)

    @jax.jit
    def train_step(params, opt_state, inputs, mask, picked, targets):
        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs, mask, picked, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": accuracy}

    evaluate = jax.jit(loss_fn)
    eval_inputs, eval_picked = mask_tokens(np.random.default_rng(s.seed + 1), eval_ids, eval_mask, **corrupt)
    eval_batch = (eval_inputs, eval_mask, eval_picked, eval_ids)  # one fixed corruption: comparable over steps
    initial_loss, initial_accuracy = (float(x) for x in evaluate(params, *eval_batch))
    rng = np.random.default_rng(s.seed)
    history = []
    for step in range(s.steps):
        batch = rng.integers(0, len(ids), s.batch_size)
        inputs, picked = mask_tokens(rng, ids[batch], mask[batch], **corrupt)
        params, opt_state, metrics = train_step(params, opt_state, inputs, mask[batch], picked, ids[batch])
        if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            history.append({"step": step + 1, **metrics})
            logging.info("step %d: masked-token loss %.4f, accuracy %.3f", step + 1, metrics["loss"],
                         metrics["accuracy"])
    final_loss, final_accuracy = (float(x) for x in evaluate(params, *eval_batch))

    model = nnx.merge(graphdef, params)
    save_umt5(model, tokenizer, output)
    summary = {
        "settings": dataclasses.asdict(s), "tokenizer_vocab_size": tokenizer.vocab_size, "mask_token_id": mask_id,
        "num_captions": len(ids), "num_eval_captions": len(eval_ids), "initial_eval_loss": initial_loss,
        "final_eval_loss": final_loss, "initial_eval_accuracy": initial_accuracy,
        "final_eval_accuracy": final_accuracy, "history": history, "seconds": time.time() - t0,
    }
    with open(os.path.join(output, "training.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("saved the text encoder to %s: eval loss %.3f -> %.3f", output, initial_loss, final_loss)
    return summary


def _define_flags() -> dict[str, flags.FlagHolder]:
    # Defined only when run as a script, so importing this module registers no global flags.
    d = TextEncoderTraining()
    fl = {
        "input": flags.DEFINE_string("input", None, "Shard folder or .txt/.csv/.jsonl captions file.", required=True),
        "output": flags.DEFINE_string("output", None, "Output folder (UMT5 layout).", required=True),
        "prefix": flags.DEFINE_string("prefix", "train", "Training shard prefix when --input is a folder."),
        "eval_prefix": flags.DEFINE_string("eval_prefix", "eval", "Held-out shard prefix ('' or missing: none)."),
    }
    for field in dataclasses.fields(TextEncoderTraining):
        define = flags.DEFINE_float if isinstance(getattr(d, field.name), float) else flags.DEFINE_integer
        fl[field.name] = define(field.name, getattr(d, field.name), f"TextEncoderTraining.{field.name}")
    return fl


def main(argv, fl: dict[str, flags.FlagHolder]):
    """CLI entry: read captions, train, save, print the summary without its history."""
    del argv
    v = {k: h.value for k, h in fl.items()}
    captions, _ = read_captions(v["input"], v["prefix"])
    eval_captions = None
    if v["eval_prefix"] and os.path.isdir(v["input"]):
        try:
            eval_captions, _ = read_captions(v["input"], v["eval_prefix"])
        except FileNotFoundError:
            logging.info("no %s shards: evaluating on training captions", v["eval_prefix"])
    settings = TextEncoderTraining(**{f.name: v[f.name] for f in dataclasses.fields(TextEncoderTraining)})
    summary = train_text_encoder(captions, v["output"], settings, eval_captions)
    print(json.dumps({k: x for k, x in summary.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    _flags = _define_flags()
    app.run(lambda argv: main(argv, _flags))
