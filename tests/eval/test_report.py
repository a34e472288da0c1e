"""Markdown report: metrics, protocols, config and relative sample links; JSONL appends."""

import json
import os

import numpy as np

from klingjax.eval import report


def test_write_report_contains_metrics_and_relative_links(tmp_path):
    out = tmp_path / "run1"
    (out / "samples").mkdir(parents=True)
    path = out / "report.md"
    report.write_report(
        path,
        title="Eval step 1000",
        config_summary={"model": {"variant": "XS", "depth": 4}, "steps": 1000},
        metrics={"fvd": 123.456789, "clip_sim": np.float32(0.25), "note": "a|b"},
        protocols={"fvd": "fvd16_17f_tf1bilinear224", "fid": "fid_unused"},
        samples=[
            {
                "caption": "a red ball moves left",
                "mp4": str(out / "samples" / "0 a.mp4"),
                "gif": str(out / "samples/0.gif"),
            },
            {"caption": "two squares", "mp4": str(out / "samples/1.mp4"), "gif": ""},
        ],
        grid_png=str(out / "grid.png"),
        extra_sections={"Adherence": "colour 0.9, direction 0.8"},
    )
    text = path.read_text()
    assert text.startswith("# Eval step 1000\n")
    assert "| fvd | 123.4568 | fvd16_17f_tf1bilinear224 |" in text
    assert "| clip_sim | 0.2500 | - |" in text
    assert "a\\|b" in text  # pipes in cells are escaped
    assert "`fid`: `fid_unused`" in text
    assert "| model.variant | XS |" in text and "| steps | 1000 |" in text
    assert "![sample grid](grid.png)" in text
    assert "[mp4](samples/0%20a.mp4)" in text and "![sample 0](samples/0.gif)" in text
    assert "| 1 | two squares | [mp4](samples/1.mp4) | - |" in text
    assert "## Adherence\n\ncolour 0.9, direction 0.8" in text
    assert str(tmp_path) not in text  # no absolute paths leak into the report
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_report_links_outside_report_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report.write_report(
        "reports/r.md",
        title="t",
        config_summary={},
        metrics={},
        protocols={},
        samples=[{"caption": "c", "mp4": "media/x.mp4", "gif": "media/x.gif"}],
        grid_png="media/g.png",
    )
    text = (tmp_path / "reports" / "r.md").read_text()
    assert "](../media/x.mp4)" in text and "](../media/g.png)" in text
    assert "_No metrics._" in text


def test_append_jsonl_appends_whole_lines(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    report.append_jsonl(path, {"step": 1, "fvd": np.float64(12.5), "shape": np.array([2, 3])})
    report.append_jsonl(path, {"step": 2, "fvd": 11.0})
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"step": 1, "fvd": 12.5, "shape": [2, 3]}
    assert report.read_jsonl(path)[1] == {"step": 2, "fvd": 11.0}
