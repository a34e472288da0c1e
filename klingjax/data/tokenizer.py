"""SentencePiece tokenizer with T5's conventions (pad 0, eos 1, unk 2, no bos), and unigram training on captions.

`SentencePieceTokenizer(texts, max_len)` returns what a T5 / umT5 encoder expects: each text's pieces, truncated
to `max_len - 1`, then `</s>`, right-padded with `<pad>` = 0, and a mask covering the pieces and the `</s>`
(as transformers' `T5TokenizerFast(..., padding="max_length", truncation=True)`).
`train_unigram` learns a unigram model with those special ids from an iterable of captions.
"""

from __future__ import annotations

import collections
import io
import os
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_PIECES = {PAD_ID: "<pad>", EOS_ID: "</s>", UNK_ID: "<unk>"}
_MAX_PIECE_LEN = 16  # sentencepiece's default max_sentencepiece_length
_SEED_SIZE = 1_000_000  # sentencepiece's default seed_sentencepiece_size


class SentencePieceTokenizer:
    """T5-style tokenizer: texts -> ids int32 (B, max_len) ending in `</s>`, right-padded with 0; mask (B, max_len)."""

    def __init__(self, model_proto: bytes, *, source: str = "<bytes>"):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.source = source
        got = {"pad": self._sp.pad_id(), "eos": self._sp.eos_id(), "unk": self._sp.unk_id()}
        want = {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}
        if got != want:
            raise ValueError(f"SentencePiece model {source} has special ids {got}; a T5-compatible model needs {want}")

    @classmethod
    def from_file(cls, path: str) -> SentencePieceTokenizer:
        """Load a `.model` file (e.g. a T5 / umT5 `spiece.model`)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model file {path} does not exist")
        with open(path, "rb") as f:
            return cls(f.read(), source=path)

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special pieces included."""
        return self._sp.get_piece_size()

    @property
    def model_proto(self) -> bytes:
        """The serialised model (what a `.model` file holds)."""
        return self._sp.serialized_model_proto()

    def pieces(self, text: str) -> list[str]:
        """The pieces of one text, without `</s>`."""
        return self._sp.encode(text, out_type=str)

    def piece_id(self, piece: str) -> int:
        """Id of `piece` (UNK_ID when the piece is not in the vocabulary)."""
        return self._sp.piece_to_id(piece)

    def __call__(self, texts: Sequence[str] | str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids int32 (B, max_len) and mask bool (B, max_len); over-long texts keep their first pieces + `</s>`."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1 (room for </s>), got {max_len}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.full((len(texts), max_len), PAD_ID, np.int32)  # (B, L)
        mask = np.zeros((len(texts), max_len), bool)  # (B, L)
        for i, pieces in enumerate(self._sp.encode(texts)):
            row = pieces[: max_len - 1] + [EOS_ID]
            ids[i, : len(row)], mask[i, : len(row)] = row, True
        return ids, mask

    def decode(self, ids: np.ndarray) -> list[str]:
        """Texts of ids (B, L); everything from the first `</s>` on is dropped."""
        out = []
        for row in np.asarray(ids).tolist():
            row = row[: row.index(EOS_ID)] if EOS_ID in row else row
            out.append(self._sp.decode([i for i in row if i != PAD_ID and i < self.vocab_size]))
        return out


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def _seed_pieces(word_counts: collections.Counter, seed_size: int) -> list[tuple[str, int]]:
    """Candidate pieces: every substring (2..16 chars) of every "▁word", scored by frequency x length.

    sentencepiece >= 0.2 extracts seeds from branching suffix-array nodes only, which on small templated caption
    sets (every word always followed by a space) drops whole words; explicit seeds restore them.
    """
    counts: collections.Counter = collections.Counter()
    for word, freq in word_counts.items():
        w = "\u2581" + word
        for i in range(len(w)):
            for j in range(i + 2, min(len(w), i + _MAX_PIECE_LEN) + 1):
                counts[w[i:j]] += freq
    return sorted(counts.items(), key=lambda kv: (-kv[1] * len(kv[0]), kv[0]))[:seed_size]


def train_unigram(captions: Iterable[str], vocab_size: int, *, hard_vocab_limit: bool = False,
                  character_coverage: float = 1.0) -> bytes:
    """Train a unigram SentencePiece model with pad=0, eos=1, unk=2 (no bos) on `captions`; returns the model bytes.

    With `hard_vocab_limit=False` a corpus too small for `vocab_size` pieces yields a smaller vocabulary.
    Training is deterministic: the same captions give the same pieces and scores.
    """
    import sentencepiece as spm

    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ValueError("no non-empty captions to train a tokenizer on")
    if vocab_size < len(SPECIAL_PIECES) + 1:
        raise ValueError(f"vocab_size must be > {len(SPECIAL_PIECES)}, got {vocab_size}")
    words = collections.Counter(w for c in captions for w in unicodedata.normalize("NFKC", c).split())
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        seeds_file = os.path.join(tmp, "seeds.tsv")
        with open(seeds_file, "w", encoding="utf-8") as f:
            f.writelines(f"{piece}\t{count}\n" for piece, count in _seed_pieces(words, _SEED_SIZE))
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions), model_writer=model, model_type="unigram", vocab_size=vocab_size,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, pad_piece=SPECIAL_PIECES[PAD_ID],
            eos_piece=SPECIAL_PIECES[EOS_ID], unk_piece=SPECIAL_PIECES[UNK_ID], hard_vocab_limit=hard_vocab_limit,
            character_coverage=character_coverage, seed_sentencepieces_file=seeds_file, num_threads=1,
            minloglevel=2,
        )
    proto = model.getvalue()
    logging.info("trained a unigram SentencePiece model: %d pieces from %d captions",
                 SentencePieceTokenizer(proto).vocab_size, len(captions))
    return proto
