"""Tests for data_pipelines/train_text_encoder.py: BERT-style token corruption statistics, and (slow) a short
masked-token run on synthetic-dataset shards that must learn the caption structure and save a loadable folder."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.make_synthetic import write_synthetic_dataset
from data_pipelines.train_text_encoder import TextEncoderTraining, mask_tokens, train_text_encoder
from data_pipelines.train_tokenizer import read_captions
from klingjax.data.synthetic import DEFAULT_COLOURS, SyntheticSpec
from klingjax.data.tokenizer import EOS_ID
from klingjax.models.umt5 import load_umt5


def test_mask_tokens_picks_real_tokens_only_bert_style():
    b, n, vocab, mask_id = 256, 40, 50, 50
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, n + 1, b)
    mask = np.arange(n)[None] < lengths[:, None]  # (B, L)
    ids = np.where(mask, rng.integers(3, vocab, (b, n)), 0)
    ids[np.arange(b), lengths - 1] = EOS_ID
    corrupted, picked = mask_tokens(np.random.default_rng(0), ids, mask, rate=0.15, mask_id=mask_id, vocab=vocab)
    candidates = mask & (ids != EOS_ID)
    assert not (picked & ~candidates).any()  # never padding, never </s>
    assert abs(picked.sum() / candidates.sum() - 0.15) < 0.02
    assert (corrupted[~picked] == ids[~picked]).all()
    new = corrupted[picked]
    assert abs((new == mask_id).mean() - 0.8) < 0.05
    assert (((new >= 3) & (new < vocab)) | (new == mask_id)).all()  # random draws are real pieces
    assert 0.05 < (new == ids[picked]).mean() < 0.2  # ~10% kept (+ random draws of the same piece)


@pytest.mark.slow
def test_short_run_learns_caption_structure_and_saves_a_umt5_folder(tmp_path):
    spec = SyntheticSpec(num_frames=1, height=16, width=16, size_range=(4.0, 6.0))
    write_synthetic_dataset(str(tmp_path / "data"), spec, 0, 600, 64, 2)
    train, _ = read_captions(str(tmp_path / "data"), "train")
    heldout, _ = read_captions(str(tmp_path / "data"), "eval")  # unseen (colour, shape, direction, background)
    settings = TextEncoderTraining(d_model=64, d_ff=128, num_heads=4, num_layers=2, batch_size=128, steps=200,
                                   learning_rate=5e-3, warmup_steps=20, log_every=50)
    out = str(tmp_path / "encoder")
    summary = train_text_encoder(train, out, settings, heldout)

    vocab = summary["tokenizer_vocab_size"] + 1
    assert summary["final_eval_loss"] < 0.3 * summary["initial_eval_loss"]
    assert summary["final_eval_loss"] < 0.5 * np.log(vocab)  # far better than guessing uniformly
    assert summary["final_eval_accuracy"] > summary["initial_eval_accuracy"] + 0.3
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "spiece.model", "training.json"]
    assert json.load(open(os.path.join(out, "training.json")))["mask_token_id"] == vocab - 1

    encoder = load_umt5(out)
    hidden, mask = encoder.encode(heldout[:8], 16)
    assert hidden.shape == (8, 16, 64) and bool(mask[:, 9].all())
    assert float(jnp.abs(hidden * ~mask[..., None]).max()) == 0.0

    # Masking the colour word of held-out captions, the encoder must fill the slot with a colour: it learned where
    # colours go (at init the tied head mostly echoes its input piece: the mask id, not a colour).
    model, tok = encoder.model, encoder.tokenizer
    colour_ids = [tok.piece_id("\u2581" + c) for c, _ in DEFAULT_COLOURS]
    ids, mask = tok(heldout, 16)
    rows = np.arange(len(ids))
    slot = np.argmax(np.isin(ids, colour_ids), axis=1)  # (N,) position of the colour word
    assert np.isin(ids[rows, slot], colour_ids).all()
    masked = ids.copy()
    masked[rows, slot] = vocab - 1
    probs = jax.nn.softmax(model.token_logits(model(jnp.asarray(masked), jnp.asarray(mask))), -1)[rows, slot]
    assert float(probs[:, colour_ids].sum(-1).mean()) > 0.6
    assert np.isin(np.asarray(probs.argmax(-1)), colour_ids).mean() >= 0.9

    # Captions that differ only in the colour word get embeddings that keep that colour: the hidden state at the
    # colour position decodes (tied head) to the caption's own colour for every colour, in every context.
    texts = [f"a {c} {shape} moves {d} on a {bg} background" for c, _ in DEFAULT_COLOURS
             for shape, d, bg in (("circle", "left", "black"), ("triangle", "up", "navy"))]
    ids, mask = tok(texts, 16)
    decoded = np.asarray(model.token_logits(encoder.encode_tokens(ids, mask)).argmax(-1))[:, 1]
    np.testing.assert_array_equal(decoded, ids[:, 1])
