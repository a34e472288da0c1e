"""Tests for the T5-style SentencePiece tokenizer and its training CLI: special ids, EOS/padding/truncation,
whole-word pieces on templated captions, determinism, caption reading from shards / text files, clear errors."""

import csv
import io
import json

import numpy as np
import pytest
import sentencepiece as spm

from data_pipelines.train_tokenizer import read_captions, train_tokenizer
from klingjax.data.records import make_video_record, write_shards
from klingjax.data.synthetic import SyntheticSpec, generate_split
from klingjax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, SentencePieceTokenizer, train_unigram

SPEC = SyntheticSpec(num_frames=1, height=16, width=16, size_range=(4.0, 6.0))


@pytest.fixture(scope="module")
def captions():
    return [clip.caption for clip in generate_split(SPEC, 0, "train", 300)]


@pytest.fixture(scope="module")
def tokenizer(captions):
    return SentencePieceTokenizer(train_unigram(captions, 64))


def test_special_ids_and_whole_word_pieces(tokenizer, captions):
    assert [tokenizer._sp.id_to_piece(i) for i in (PAD_ID, EOS_ID, UNK_ID)] == ["<pad>", "</s>", "<unk>"]
    assert tokenizer._sp.bos_id() == -1 and 10 < tokenizer.vocab_size <= 64
    # sentencepiece's own seeding splits templated words into characters; ours keeps every word whole
    for word in "red cyan magenta circle triangle moves slides background navy".split():
        assert tokenizer.piece_id("\u2581" + word) != UNK_ID, word
    assert tokenizer.pieces("a red circle moves left") == ["\u2581a", "\u2581red", "\u2581circle", "\u2581moves",
                                                          "\u2581left"]
    again = SentencePieceTokenizer(train_unigram(captions, 64))
    assert [again._sp.id_to_piece(i) for i in range(again.vocab_size)] == [
        tokenizer._sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def test_batch_encoding_eos_padding_truncation(tokenizer, captions):
    texts = [captions[0], "a blue square", ""]
    ids, mask = tokenizer(texts, 16)
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == np.int32 and mask.dtype == bool
    lengths = mask.sum(1)
    assert lengths.tolist() == [len(tokenizer.pieces(t)) + 1 for t in texts] and lengths[2] == 1
    for row, n in zip(ids, lengths):
        assert row[n - 1] == EOS_ID and (row[n:] == PAD_ID).all() and (row[: n - 1] > UNK_ID).all()
    assert tokenizer.decode(ids) == texts
    short, short_mask = tokenizer(captions[0], 4)  # truncation keeps the first pieces, then </s>
    assert short.shape == (1, 4) and short_mask.all() and short[0, -1] == EOS_ID
    assert (short[0, :3] == ids[0, :3]).all()
    with pytest.raises(ValueError, match="max_len"):
        tokenizer(["x"], 0)


def test_rejects_models_with_other_special_ids(captions):
    proto = io.BytesIO()  # sentencepiece's defaults: unk 0, bos 1, eos 2
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions), model_writer=proto, vocab_size=30,
                                   hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="T5-compatible"):
        SentencePieceTokenizer(proto.getvalue())
    with pytest.raises(FileNotFoundError, match="nope.model"):
        SentencePieceTokenizer.from_file("/nonexistent/nope.model")
    with pytest.raises(ValueError, match="no non-empty captions"):
        train_unigram(["", "  "], 32)


def test_train_tokenizer_from_shards_counts_empty_captions(tmp_path, captions):
    frame = np.zeros((1, 4, 4, 3), np.uint8)
    texts = captions[:40] + ["", "   "]
    records = [make_video_record(frame, codec="raw", caption=c, fps=8, num_frames=1, height=4, width=4)
               for c in texts]
    write_shards(records, str(tmp_path / "data"), "train", 3)
    got, empty = read_captions(str(tmp_path / "data"))
    assert sorted(got) == sorted(captions[:40]) and empty == 2
    summary = train_tokenizer(str(tmp_path / "data"), str(tmp_path / "tok" / "spiece"), 64)
    assert summary["num_captions"] == 40 and summary["num_empty"] == 2
    loaded = SentencePieceTokenizer.from_file(summary["model"])
    assert loaded.vocab_size == summary["vocab_size"]
    vocab = open(summary["vocab"], encoding="utf-8").read().splitlines()
    assert len(vocab) == loaded.vocab_size and vocab[EOS_ID].startswith("</s>\t")
    with pytest.raises(FileNotFoundError, match="eval-"):
        read_captions(str(tmp_path / "data"), "eval")


def test_read_captions_from_text_files(tmp_path):
    (tmp_path / "c.txt").write_text("a red circle\n\na blue square\n")
    with open(tmp_path / "c.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "caption"], [1, "a red circle"], [2, ""], [3, "a blue, square"]])
    (tmp_path / "c.jsonl").write_text(json.dumps({"caption": "a red circle"}) + "\n" + json.dumps({"caption": ""}))
    assert read_captions(str(tmp_path / "c.txt")) == (["a red circle", "a blue square"], 1)
    assert read_captions(str(tmp_path / "c.csv")) == (["a red circle", "a blue, square"], 1)
    assert read_captions(str(tmp_path / "c.jsonl")) == (["a red circle"], 1)
    (tmp_path / "bad.csv").write_text("id,text\n1,hello\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "hello"}))
    (tmp_path / "c.parquet").write_text("")
    with pytest.raises(KeyError, match="'caption' column"):
        read_captions(str(tmp_path / "bad.csv"))
    with pytest.raises(KeyError, match="line 1"):
        read_captions(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="parquet"):
        read_captions(str(tmp_path / "c.parquet"))
    with pytest.raises(FileNotFoundError, match="neither"):
        read_captions(str(tmp_path / "missing.txt"))
