"""Local video-text inputs: list captioned files (folder + sidecars, CSV, JSONL) without opening any video.

    list_inputs(source)   folder (video.mp4 + video.txt), captions.csv or captions.jsonl -> [ClipInput]

Problems with one input never raise out of `list_inputs`: they land in `ClipInput.error` (with `root`,
that includes rows whose path, symlinks resolved, lies outside the input root). `klingjax.data.probe` then
validates and cuts each listed clip.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os

import numpy as np

VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp", ".gif"})

# ---------------------------------------------------------------------------------------------------
# Captioned inputs
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipInput:
    """One input row: `name` as listed (relative path), absolute `path`, caption, optional [start, end) seconds."""

    index: int
    name: str
    path: str
    caption: str | None = None
    start: float | None = None
    end: float | None = None
    error: str | None = None  # set when the row is unusable before any decoding
    size: int | None = None  # file size and mtime: a changed source invalidates converted shards
    mtime_ns: int | None = None

    def key(self) -> list:
        """Everything that determines this input's converted record (JSON-serialisable)."""
        return [self.index, self.name, self.caption, self.start, self.end, self.error, self.size, self.mtime_ns]


def _caption_error(caption) -> str | None:
    if caption is None:
        return "no caption"
    if not isinstance(caption, str):
        return f"caption must be a string, got {type(caption).__name__}"
    if any("\udc80" <= ch <= "\udcff" for ch in caption):  # surrogateescape'd bytes: not UTF-8
        return "caption is not valid UTF-8"
    if not caption.strip():
        return "empty caption"
    return None


def _seconds(value, what: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}") from None
    if not np.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return seconds


def inside(path: str, root: str) -> bool:
    """Whether `path` is `root` or below it, after resolving symlinks and `..` in both."""
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def _row(index: int, base: str, name, caption, start=None, end=None, *, where: str = "",
         error: str | None = None, root: str | None = None) -> ClipInput:
    """A ClipInput from raw row values, with `error` or else the first problem found in them.

    `name` is resolved against `base`; with `root`, a path outside it (symlinks resolved) is refused
    unread: not even its size or existence is looked at.
    """
    if not isinstance(name, str) or not name.strip():
        return ClipInput(index, where or str(name), "", error=error or "row has no path")
    if "\0" in name:
        return ClipInput(index, where or repr(name), "", error="path contains a NUL byte")
    path = os.path.normpath(os.path.join(base, name))  # absolute names stay absolute
    if root is not None and not inside(path, root):
        return ClipInput(index, name, path, error=f"path escapes the input root {root} (resolves to "
                                                  f"{os.path.realpath(path)})")
    try:
        start, end = _seconds(start, "start"), _seconds(end, "end")
    except ValueError as e:
        return ClipInput(index, name, path, error=error or str(e))
    error = error or _caption_error(caption)
    if error is None and start is not None and end is not None and end <= start:
        error = f"end ({end:g} s) must be after start ({start:g} s)"
    caption = caption.strip() if error is None else None
    try:
        st = os.stat(path)
    except OSError:
        return ClipInput(index, name, path, caption, start, end, error=error or "file not found")
    if error is None and not os.path.isfile(path):
        error = "not a regular file"
    return ClipInput(index, name, path, caption, start, end, error, st.st_size, st.st_mtime_ns)


def _read_sidecar(video_path: str) -> tuple[str | None, str | None]:
    """(caption, None) from VIDEO.txt next to the video, or (None, reason)."""
    txt = os.path.splitext(video_path)[0] + ".txt"
    name = os.path.basename(txt)
    try:
        with open(txt, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, f"no caption file {name}"
    try:
        caption = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        return None, f"caption file {name} is not valid UTF-8 ({e.reason} at byte {e.start})"
    return (caption, None) if caption else (None, f"caption file {name} is empty")


def _from_folder(root: str, exclude: str | None, bound: str | None) -> list[ClipInput]:
    skip = os.path.realpath(exclude) if exclude else None
    names = []
    for d, subdirs, files in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs
                            if not s.startswith(".") and os.path.realpath(os.path.join(d, s)) != skip)
        names += [os.path.relpath(os.path.join(d, f), root) for f in files
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() != ".txt"]
    inputs = []
    for i, name in enumerate(sorted(names)):
        ext = os.path.splitext(name)[1].lower()
        if ext not in VIDEO_EXTENSIONS:
            inputs.append(_row(i, root, name, None, error=f"not a video file (extension {ext!r})", root=bound))
            continue
        if bound is not None and not inside(os.path.join(root, name), bound):
            inputs.append(_row(i, root, name, None, root=bound))  # an outside symlink: its sidecar is not read
            continue
        caption, error = _read_sidecar(os.path.join(root, name))
        inputs.append(_row(i, root, name, caption, error=error, root=bound))
    return inputs


def _from_csv(path: str, bound: str | None) -> list[ClipInput]:
    with open(path, "rb") as f:
        text = f.read().decode("utf-8-sig", errors="surrogateescape")  # bad bytes fail only their own row
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"path", "caption"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{path}: captions CSV needs a header with columns path, caption[, start, end]; "
                         f"missing {sorted(missing)} in {reader.fieldnames}")
    root = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    return [_row(i, root, r["path"], r["caption"], r.get("start"), r.get("end"), where=f"{name}:{reader.line_num}",
                 root=bound) for i, r in enumerate(reader)]


def _from_jsonl(path: str, bound: str | None) -> list[ClipInput]:
    root = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        lines = [(n, line) for n, line in enumerate(f.read().split(b"\n"), start=1) if line.strip()]
    inputs = []
    for i, (n, line) in enumerate(lines):
        where = f"{os.path.basename(path)}:{n}"
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            inputs.append(ClipInput(i, where, "", error=f"line {n} is not valid UTF-8"))
            continue
        except json.JSONDecodeError as e:
            inputs.append(ClipInput(i, where, "", error=f"line {n} is not valid JSON: {e.msg}"))
            continue
        if not isinstance(row, dict):
            inputs.append(ClipInput(i, where, "", error=f"line {n} is a JSON {type(row).__name__}, not an object"))
            continue
        inputs.append(_row(i, root, row.get("path"), row.get("caption"), row.get("start"), row.get("end"),
                           where=where, root=bound))
    return inputs


def default_root(source: str) -> str:
    """The input root of `source`: the folder itself, or the folder holding the captions file."""
    return source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))


def list_inputs(source: str, *, exclude: str | None = None, root: str | None = None) -> list[ClipInput]:
    """Inputs of a folder (videos + sidecar .txt captions), a captions .csv or a .jsonl, in a fixed order.

    CSV/JSONL rows carry `path` (relative to the captions file's folder, or absolute), `caption` and
    optionally `start`/`end` in seconds. A folder is walked recursively (hidden entries and `exclude`
    skipped; symlinked folders not followed); every non-.txt file is an input, and non-video extensions
    come back with an error. With `root` (e.g. `default_root(source)`), every input whose path resolves
    outside it (`..`, an absolute path elsewhere, a symlink pointing out) comes back with an error instead.
    """
    if os.path.isdir(source):
        return _from_folder(source, exclude, root)
    ext = os.path.splitext(source)[1].lower()
    if not os.path.isfile(source):
        raise FileNotFoundError(f"input {source!r} does not exist")
    if ext == ".csv":
        return _from_csv(source, root)
    if ext == ".jsonl":
        return _from_jsonl(source, root)
    raise ValueError(f"input {source!r} must be a folder, a .csv or a .jsonl captions file")
