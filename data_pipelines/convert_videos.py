"""Convert local videos + captions into ArrayRecord shards of klingjax video records, with a manifest.

    python -m data_pipelines.convert_videos --input DIR|captions.csv|captions.jsonl --output OUT \\
        [--input_root DIR] [--num_shards 8] [--num_workers 4] [--split train] [--max_side 256] [--min_frames 17]
        [--reencode]

Inputs (see `klingjax.data.inputs.list_inputs`): a folder of videos with sidecar captions (a.mp4 + a.txt),
or a CSV / JSONL with `path, caption[, start, end]` rows. Only files inside the input root are read: the
folder, or the captions file's folder, or `--input_root`. A row whose path resolves outside it (`..`, an
absolute path elsewhere, a symlink pointing out) is skipped with the reason; a clip whose header declares
more than `VideoLimits` (8192 px a side, 36 MP, 10M frames) is skipped as "too large" before it is
decoded. OUT must not overlap the input root (neither inside it nor holding it) and `--split` must be a
plain name, so every file written lands in OUT; both are checked before anything is written.
Input i goes to shard i % num_shards; each shard
is converted by one worker process and written atomically to OUT/SPLIT-0000k-of-0000N.array_record, then
its part manifest OUT/.convert_parts/SPLIT-0000k-of-0000N.json is written. Re-running skips shards whose
part (same inputs, same options) and shard file exist, so an interrupted run resumes where it stopped.
OUT/manifest.json is written last: {"splits": {SPLIT: {"written": [...], "skipped": [{"path", "reason"}],
"totals": {...}, ...}}}. A bad input never stops the run: it is listed in "skipped" with its reason.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import re
from collections.abc import Sequence

from absl import app, flags, logging

from klingjax.data.inputs import ClipInput, default_root, inside, list_inputs
from klingjax.data.probe import ClipError, input_record
from klingjax.data.records import list_shards, shard_path, write_shards
from klingjax.data.video_io import VideoLimits

MANIFEST = "manifest.json"
PARTS_DIR = ".convert_parts"
FORMAT_VERSION = 1
SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")  # a file-name prefix: no separators, '-' or glob characters


@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    """How each clip is converted: downscale to `max_side` (None: keep), drop clips under `min_frames`."""

    max_side: int | None = None
    min_frames: int = 1
    reencode: bool = False  # re-encode even clips that could be copied as they are
    limits: VideoLimits = VideoLimits()  # clips whose header declares more are skipped before decoding

    def __post_init__(self):
        if self.max_side is not None and self.max_side < 2:
            raise ValueError(f"max_side must be >= 2 (or None), got {self.max_side}")
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be >= 1, got {self.min_frames}")


@dataclasses.dataclass(frozen=True)
class _ShardTask:
    out_dir: str
    split: str
    shard: int
    num_shards: int
    items: tuple[ClipInput, ...]
    options: ConvertOptions
    fingerprint: str


def _part_path(out_dir: str, split: str, shard: int, num_shards: int) -> str:
    return os.path.join(out_dir, PARTS_DIR, f"{split}-{shard:05d}-of-{num_shards:05d}.json")


def _write_json(path: str, obj) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _fingerprint(items: Sequence[ClipInput], options: ConvertOptions) -> str:
    """Hash of a shard's inputs (names, captions, ranges, file sizes and mtimes) and the options."""
    blob = json.dumps([dataclasses.asdict(options), [item.key() for item in items]])
    return hashlib.sha256(blob.encode("utf-8", errors="surrogatepass")).hexdigest()


def convert_item(item: ClipInput, options: ConvertOptions) -> tuple[dict | None, dict]:
    """(record, manifest entry) for one input; record is None when skipped (entry then has the reason)."""
    entry = {"index": item.index, "path": item.name}
    try:
        record, clip = input_record(item, max_side=options.max_side, min_frames=options.min_frames,
                                    reencode=options.reencode, limits=options.limits)
    except ClipError as e:
        return None, {**entry, "reason": str(e)}
    except Exception as e:  # noqa: BLE001 - one strange file must not stop the conversion
        logging.warning("unexpected error converting %s: %r", item.path, e)
        return None, {**entry, "reason": f"unexpected error: {type(e).__name__}: {e}"}
    entry.update(num_frames=clip.num_frames, height=clip.height, width=clip.width, fps=clip.fps,
                 duration=clip.duration, start=item.start, end=item.end, reencoded=clip.reencoded,
                 bytes=len(clip.data))
    return record, entry


def _convert_shard(task: _ShardTask) -> dict:
    """Convert one shard's inputs, write the shard atomically, then its part manifest; returns the part."""
    written, skipped = [], []

    def records():
        for item in task.items:
            record, entry = convert_item(item, task.options)
            if record is None:
                skipped.append(entry)
                logging.info("skipping %s: %s", item.name, entry["reason"])
            else:
                written.append({**entry, "shard": task.shard})
                yield record

    (path,) = write_shards(records(), task.out_dir, task.split, 1, shard_offset=task.shard,
                           total_shards=task.num_shards)
    part = {"shard": task.shard, "num_shards": task.num_shards, "fingerprint": task.fingerprint,
            "file": os.path.basename(path), "file_bytes": os.path.getsize(path), "written": written,
            "skipped": skipped}
    _write_json(_part_path(task.out_dir, task.split, task.shard, task.num_shards), part)
    return part


def _finished_part(task: _ShardTask) -> dict | None:
    """The part manifest of a shard finished by an earlier run with the same inputs and options, else None."""
    try:
        with open(_part_path(task.out_dir, task.split, task.shard, task.num_shards)) as f:
            part = json.load(f)
        path = shard_path(task.out_dir, task.split, task.shard, task.num_shards)
        if part["fingerprint"] == task.fingerprint and os.path.getsize(path) == part["file_bytes"]:
            return part
    except (OSError, ValueError, KeyError):
        pass
    return None


def _remove_stale(out_dir: str, split: str, num_shards: int) -> None:
    """Drop this split's section of the manifest, temporary files, and shards of another shard count."""
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("splits", {}).pop(split, None) is not None:
            _write_json(manifest_path, manifest)  # the split is incomplete until this run rewrites it
    keep = {os.path.basename(shard_path(out_dir, split, k, num_shards)) for k in range(num_shards)}
    stale = [p for p in list_shards(out_dir, split) if os.path.basename(p) not in keep]
    for pattern in (f"{split}-*.array_record.tmp-*", os.path.join(PARTS_DIR, f"{split}-*.json.tmp-*")):
        stale += glob.glob(os.path.join(glob.escape(out_dir), pattern))
    for part in glob.glob(os.path.join(glob.escape(out_dir), PARTS_DIR, f"{split}-*.json")):
        if os.path.basename(part)[: -len(".json")] + ".array_record" not in keep:
            stale.append(part)
    for path in stale:
        logging.info("removing stale %s", path)
        os.remove(path)


def check_paths(source: str, out_dir: str, split: str, input_root: str | None = None) -> str:
    """The input root of `source`; raises ValueError if `split` is not a plain name or `out_dir` overlaps the inputs.

    Run before anything is written: the split is a file-name prefix (no separators, '-', glob characters
    or leading '.'), and OUT may not be the input root, lie inside it or hold it, nor hold the captions file.
    """
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split must be a plain name of letters, digits, '_' and '.' (not starting with '.'), "
                         f"got {split!r}")
    root = os.path.abspath(input_root if input_root is not None else default_root(source))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input root {root} is not a folder")
    out = os.path.abspath(out_dir)
    if inside(out, root) or inside(root, out) or inside(source, out):
        raise ValueError(f"--output {out} overlaps the input root {root} (inputs are only read from there; "
                         f"outputs must not mix with them): write elsewhere, or narrow --input_root to the "
                         f"folder holding the videos")
    return root


def convert_videos(source: str, out_dir: str, *, num_shards: int = 8, num_workers: int = 1, split: str = "train",
                   options: ConvertOptions = ConvertOptions(), input_root: str | None = None) -> dict:
    """Convert `source` (folder / captions csv / jsonl) into `split` shards in `out_dir`; returns the split manifest.

    Only inputs inside `input_root` (default: the folder, or the captions file's folder) are read; see
    `check_paths` for what is refused before anything is written. Shards already finished by an earlier
    run with the same inputs and options are kept as they are. `num_workers > 1` converts shards in that
    many processes; the output does not depend on it.
    """
    if num_shards < 1 or num_workers < 1:
        raise ValueError(f"num_shards and num_workers must be >= 1, got {num_shards}, {num_workers}")
    root = check_paths(source, out_dir, split, input_root)
    items = list_inputs(source, exclude=out_dir, root=root)
    num_shards = max(1, min(num_shards, len(items)))  # no empty shards when there are few inputs
    os.makedirs(os.path.join(out_dir, PARTS_DIR), exist_ok=True)
    _remove_stale(out_dir, split, num_shards)
    tasks = []
    for k in range(num_shards):
        mine = tuple(items[k::num_shards])
        tasks.append(_ShardTask(out_dir, split, k, num_shards, mine, options, _fingerprint(mine, options)))
    parts = {t.shard: part for t in tasks if (part := _finished_part(t)) is not None}
    todo = [t for t in tasks if t.shard not in parts]
    logging.info("%d inputs -> %d shards (%d already done); converting %d with %d workers", len(items),
                 num_shards, len(parts), len(todo), num_workers)
    if num_workers == 1 or len(todo) <= 1:
        for task in todo:
            parts[task.shard] = _convert_shard(task)
    else:
        # spawn, not fork: the parent may hold JAX / Grain threads that a forked child would inherit broken.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(todo)), mp_context=context) as pool:
            for part in pool.map(_convert_shard, todo):
                parts[part["shard"]] = part
                logging.info("finished shard %d of %d", part["shard"], num_shards)
    section = _summarise([parts[k] for k in range(num_shards)], source, options, split)
    manifest_path = os.path.join(out_dir, MANIFEST)
    manifest = {"format_version": FORMAT_VERSION, "splits": {}}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    manifest.setdefault("splits", {})[split] = section
    _write_json(manifest_path, manifest)
    return section


def _summarise(parts: list[dict], source: str, options: ConvertOptions, split: str) -> dict:
    written = sorted((e for p in parts for e in p["written"]), key=lambda e: e["index"])
    skipped = sorted((e for p in parts for e in p["skipped"]), key=lambda e: e["index"])
    totals = {"inputs": len(written) + len(skipped), "written": len(written), "skipped": len(skipped),
              "frames": sum(e["num_frames"] for e in written), "duration": sum(e["duration"] for e in written),
              "bytes": sum(e["bytes"] for e in written)}
    logging.info("%s: wrote %d clips (%d frames), skipped %d", split, totals["written"], totals["frames"],
                 totals["skipped"])
    return {"source": os.path.abspath(source), "options": dataclasses.asdict(options),
            "shards": [p["file"] for p in parts], "written": written, "skipped": skipped, "totals": totals}


def load_manifest(out_dir: str, split: str = "train") -> dict:
    """The manifest section of `split` written by `convert_videos` (KeyError if that split is not complete)."""
    with open(os.path.join(out_dir, MANIFEST)) as f:
        splits = json.load(f)["splits"]
    if split not in splits:
        raise KeyError(f"{out_dir}/{MANIFEST} has no complete split {split!r} (has {sorted(splits)})")
    return splits[split]


def _define_flags() -> dict[str, flags.FlagHolder]:
    # Defined only when run as a script, so importing convert_videos registers no global flags.
    return {
        "input": flags.DEFINE_string("input", None, "Folder of videos + .txt captions, or captions .csv/.jsonl.",
                                     required=True),
        "output": flags.DEFINE_string("output", None, "Output directory (not inside the input root).", required=True),
        "input_root": flags.DEFINE_string("input_root", None, "Only read inputs inside this folder (default: the "
                                          "--input folder, or the captions file's folder)."),
        "num_shards": flags.DEFINE_integer("num_shards", 8, "Number of shards (at most one per input)."),
        "num_workers": flags.DEFINE_integer("num_workers", 1, "Worker processes."),
        "split": flags.DEFINE_string("split", "train", "Split name: the shard file prefix."),
        "max_side": flags.DEFINE_integer("max_side", None, "Downscale so the longer side is at most this."),
        "min_frames": flags.DEFINE_integer("min_frames", 1, "Skip clips with fewer frames."),
        "reencode": flags.DEFINE_bool("reencode", False, "Re-encode every clip (default: copy when possible)."),
    }


def main(argv, fl: dict[str, flags.FlagHolder]):
    """CLI entry: convert, then print the split's totals as JSON."""
    del argv
    v = {k: h.value for k, h in fl.items()}
    options = ConvertOptions(max_side=v["max_side"], min_frames=v["min_frames"], reencode=v["reencode"])
    try:
        section = convert_videos(v["input"], v["output"], num_shards=v["num_shards"], num_workers=v["num_workers"],
                                 split=v["split"], options=options, input_root=v["input_root"])
    except (ValueError, FileNotFoundError) as e:  # bad arguments; bad inputs never raise (they are skipped)
        raise app.UsageError(str(e)) from e
    print(json.dumps(section["totals"]))


if __name__ == "__main__":
    _flags = _define_flags()
    app.run(lambda argv: main(argv, _flags))
