"""Train a T5-compatible unigram SentencePiece tokenizer (pad 0, eos 1, unk 2) on a dataset's captions.

    python -m data_pipelines.train_tokenizer --input /tmp/synth --output /tmp/tok/spiece --vocab_size 8000

`--input` is a folder of klingjax ArrayRecord shards (records with a "caption" key; `--prefix` picks the split,
default "train"), or a captions file: `.txt` (one per line), `.csv` (a "caption" column) or `.jsonl` (one
{"caption": ...} object per line). Empty captions are skipped and counted. Writes OUTPUT.model (load it with
`klingjax.data.tokenizer.SentencePieceTokenizer.from_file`; name it `spiece.model` inside a UMT5 folder) and
OUTPUT.vocab (piece<TAB>score per line, as `spm_train` writes).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator

from absl import app, flags, logging

from klingjax.data.records import decode_record, list_shards
from klingjax.data.tokenizer import SentencePieceTokenizer, train_unigram

CAPTION_KEY = "caption"
_READ_CHUNK = 256  # records per ArrayRecord read: bounds memory on video records


def _shard_captions(paths: list[str]) -> Iterator[object]:
    from array_record.python.array_record_module import ArrayRecordReader

    for path in paths:
        reader = ArrayRecordReader(path)
        try:
            n = reader.num_records()
            for start in range(0, n, _READ_CHUNK):
                for i, raw in enumerate(reader.read(start, min(n, start + _READ_CHUNK))):
                    record = decode_record(raw)
                    if CAPTION_KEY not in record:
                        raise KeyError(f"record {start + i} of {path} has no {CAPTION_KEY!r} key "
                                       f"(keys: {sorted(record)})")
                    yield record[CAPTION_KEY]
        finally:
            reader.close()


def _file_captions(path: str) -> Iterator[object]:
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8", newline="") as f:
        if ext == ".txt":
            yield from (line.rstrip("\r\n") for line in f)
        elif ext == ".csv":
            reader = csv.DictReader(f)
            if CAPTION_KEY not in (reader.fieldnames or []):
                raise KeyError(f"{path} has no {CAPTION_KEY!r} column (columns: {reader.fieldnames})")
            yield from (row[CAPTION_KEY] for row in reader)
        elif ext == ".jsonl":
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or CAPTION_KEY not in row:
                        raise KeyError(f"{path} line {n} is not an object with a {CAPTION_KEY!r} key")
                    yield row[CAPTION_KEY]
        else:
            raise ValueError(f"{path}: unknown captions file type {ext!r}; use .txt, .csv or .jsonl")


def read_captions(source: str, prefix: str = "train") -> tuple[list[str], int]:
    """(non-empty captions, number of empty ones skipped) of a shard folder (split `prefix`) or captions file."""
    if os.path.isdir(source):
        paths = list_shards(source, prefix)
        if not paths:
            raise FileNotFoundError(f"no ArrayRecord shards {prefix}-*-of-*.array_record in {source}")
        raw = _shard_captions(paths)
    elif os.path.isfile(source):
        raw = _file_captions(source)
    else:
        raise FileNotFoundError(f"caption source {source} is neither a shard folder nor a file")
    captions, empty = [], 0
    for caption in raw:
        if caption is None or not str(caption).strip():
            empty += 1
        else:
            captions.append(str(caption).strip())
    if empty:
        logging.warning("skipped %d empty captions in %s", empty, source)
    return captions, empty


def write_tokenizer(model_proto: bytes, output_prefix: str) -> tuple[str, str]:
    """Write OUTPUT.model and OUTPUT.vocab; returns their paths."""
    tokenizer = SentencePieceTokenizer(model_proto)  # validates the special ids
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    model_path, vocab_path = output_prefix + ".model", output_prefix + ".vocab"
    with open(model_path, "wb") as f:
        f.write(model_proto)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.writelines(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(tokenizer.vocab_size))
    return model_path, vocab_path


def train_tokenizer(source: str, output_prefix: str, vocab_size: int, *, prefix: str = "train",
                    hard_vocab_limit: bool = False) -> dict:
    """Read `source`'s captions, train a unigram model, write it; returns a summary dict."""
    captions, empty = read_captions(source, prefix)
    proto = train_unigram(captions, vocab_size, hard_vocab_limit=hard_vocab_limit)
    model_path, vocab_path = write_tokenizer(proto, output_prefix)
    return {"model": model_path, "vocab": vocab_path, "vocab_size": SentencePieceTokenizer(proto).vocab_size,
            "num_captions": len(captions), "num_empty": empty}


def _define_flags() -> dict[str, flags.FlagHolder]:
    # Defined only when run as a script, so importing this module registers no global flags.
    return {
        "input": flags.DEFINE_string("input", None, "Shard folder or .txt/.csv/.jsonl captions file.", required=True),
        "output": flags.DEFINE_string("output", None, "Output prefix: writes PREFIX.model, PREFIX.vocab.",
                                      required=True),
        "vocab_size": flags.DEFINE_integer("vocab_size", 8000, "Target number of pieces (specials included)."),
        "prefix": flags.DEFINE_string("prefix", "train", "Shard name prefix (split) when --input is a folder."),
        "hard_vocab_limit": flags.DEFINE_bool("hard_vocab_limit", False,
                                              "Fail instead of shrinking when the corpus cannot fill vocab_size."),
    }


def main(argv, fl: dict[str, flags.FlagHolder]):
    """CLI entry: train and write the tokenizer, print a JSON summary."""
    del argv
    v = {k: h.value for k, h in fl.items()}
    summary = train_tokenizer(v["input"], v["output"], v["vocab_size"], prefix=v["prefix"],
                              hard_vocab_limit=v["hard_vocab_limit"])
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    _flags = _define_flags()
    app.run(lambda argv: main(argv, _flags))
