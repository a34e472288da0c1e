"""Markdown evaluation report and JSONL metric records.

Paths given to `write_report` (sample videos, grid PNG) are absolute or relative to the current working
directory; the report links them relative to its own folder so the output folder can be moved as a whole.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence

import numpy as np


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def append_jsonl(path: str | os.PathLike, record: Mapping) -> None:
    """Append `record` as one JSON line with a single O_APPEND write (atomic per line on local disks)."""
    line = (json.dumps(dict(record), default=_json_default) + "\n").encode("utf-8")
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        while written < len(line):  # only on exotic filesystems; keeps the line whole
            written += os.write(fd, line[written:])
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL file, skipping blank lines."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- markdown helpers


def _cell(value) -> str:
    """Format a table cell: numbers compactly, text with pipes and newlines escaped."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v) or v == 0.0:
            return str(v)
        return f"{v:.4f}" if 1e-3 <= abs(v) < 1e6 else f"{v:.4e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _link(target: str | os.PathLike, report_dir: pathlib.Path) -> str:
    """URL-quoted posix path of `target` relative to the report's folder."""
    rel = os.path.relpath(os.path.abspath(os.fspath(target)), report_dir)
    return urllib.parse.quote(pathlib.Path(rel).as_posix())


def _flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# ----------------------------------------------------------------------------- report


def render_report(
    report_dir: str | os.PathLike,
    *,
    title: str,
    config_summary: Mapping,
    metrics: Mapping[str, float | str],
    protocols: Mapping[str, str],
    samples: Sequence[Mapping[str, str]],
    grid_png: str | os.PathLike | None,
    extra_sections: Mapping[str, str] | None = None,
) -> str:
    """The markdown text of an evaluation report whose links are relative to `report_dir`."""
    base = pathlib.Path(os.path.abspath(os.fspath(report_dir)))
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"# {title}", "", f"_Generated {now}._", "", "## Metrics", ""]
    if metrics:
        rows = [(_cell(k), _cell(v), _cell(protocols.get(k, "-"))) for k, v in metrics.items()]
        lines += _table(("metric", "value", "protocol"), rows)
    else:
        lines.append("_No metrics._")
    orphans = {k: v for k, v in protocols.items() if k not in metrics}
    if orphans:
        lines += ["", "Other protocols: " + ", ".join(f"`{k}`: `{v}`" for k, v in orphans.items())]

    lines += ["", "## Configuration", ""]
    flat = _flatten(config_summary)
    lines += _table(("key", "value"), [(_cell(k), _cell(v)) for k, v in flat.items()]) if flat else ["_Empty._"]

    lines += ["", "## Samples", ""]
    if grid_png:
        lines += [f"![sample grid]({_link(grid_png, base)})", ""]
    if samples:
        rows = []
        for i, sample in enumerate(samples):
            mp4 = f"[mp4]({_link(sample['mp4'], base)})" if sample.get("mp4") else "-"
            gif = f"![sample {i}]({_link(sample['gif'], base)})" if sample.get("gif") else "-"
            rows.append((str(i), _cell(sample.get("caption", "")), mp4, gif))
        lines += _table(("#", "caption", "video", "preview"), rows)
    elif not grid_png:
        lines.append("_No samples._")

    for heading, body in (extra_sections or {}).items():
        lines += ["", f"## {heading}", "", body.rstrip()]
    return "\n".join(lines) + "\n"


def scorer_sections(skipped: Mapping[str, str], timings: Mapping[str, float]) -> dict[str, str]:
    """Report sections for a scorer's skipped metrics (if any) and throughput (`eval.scoring.Scores`)."""
    sections = {}
    if skipped:
        sections["Skipped metrics"] = "\n".join(f"- `{k}`: {v}" for k, v in skipped.items())
    sections["Throughput"] = "\n".join(f"- `{k}`: {v:.3g}" for k, v in timings.items()) or "_none_"
    return sections


def write_report(
    path: str | os.PathLike,
    *,
    title: str,
    config_summary: Mapping,
    metrics: Mapping[str, float | str],
    protocols: Mapping[str, str],
    samples: Sequence[Mapping[str, str]],
    grid_png: str | os.PathLike | None,
    extra_sections: Mapping[str, str] | None = None,
) -> None:
    """Write a markdown report (metrics + protocols, config, sample links, extra sections) atomically."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = render_report(
        target.parent,
        title=title,
        config_summary=config_summary,
        metrics=metrics,
        protocols=protocols,
        samples=samples,
        grid_png=grid_png,
        extra_sections=extra_sections,
    )
    write_text_atomic(target, text)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` whole or not at all: a temp file in the same folder, then a rename (a crash or a
    kill mid-write leaves the previous file, never a truncated one)."""
    target = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=target.suffix + ".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, target)


REFERENCE_SUFFIXES = ("_on_reference", "_on_real", "_on_vae")  # the same metric on a reference / ceiling set


def plot_metrics(path: str | os.PathLike, values: dict[str, float]) -> None:
    """One bar panel per metric (generated vs `*_on_reference` / `*_on_real` when they exist), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in values if not k.endswith(REFERENCE_SUFFIXES) and np.isfinite(values[k])]
    if not names:
        names = ["(none)"]
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        labels, heights = ["generated"], [values.get(name, 0.0)]
        for suffix in REFERENCE_SUFFIXES:
            if name + suffix in values:
                labels.append("reference")
                heights.append(values[name + suffix])
        bars = ax.bar(labels, heights, color=["tab:blue", "tab:gray"][: len(labels)])
        ax.bar_label(bars, fmt="%.4g", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
