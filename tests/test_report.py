"""Tests for mmcl.report.render: csv, text table, PNGs and the self-contained HTML report."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from mmcl.report.render import (
    format_table,
    plot_accuracy_curves,
    plot_heatmap,
    write_matrix_csv,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_results() -> dict[str, Any]:
    """Three tasks, some nulls, one reference row, an extra section."""
    return {
        "name": "default",
        "method": "seq-lora",
        "stream": "synth-domain",
        "backbone": "tiny-llava",
        "seed": 0,
        "tasks": ["rs", "med", "ad"],
        "task_descriptions": {
            "rs": "Remote sensing: count <objects> & ships",
            "med": "Medical VQA",
            "ad": "Autonomous driving",
        },
        "scorers": {"rs": "exact_match", "med": "exact_match", "ad": "exact_match"},
        "row_labels": ["base", "rs", "med", "ad"],
        "matrix": [
            [10.0, 20.0, 30.0],
            [90.0, None, 31.5],
            [60.0, 80.0, None],
            [50.0, 70.25, 95.0],
        ],
        "metrics": {"ACC": 71.75, "MFT": 88.33, "MAA": 73.1, "BWT": -25.0, "Forgetting": 25.0, "FWT": None},
        "reference_rows": {"joint": [85.0, 75.0, 92.0]},
        "stage_seconds": {"rs": 1.5, "med": 2.0, "ad": 2.5},
        "eval_seconds": 3.0,
        "total_seconds": 9.0,
        "trainable_parameters": 123456,
        "config_hash": "abc123",
        "versions": {"torch": "2.13.0"},
        "git_commit": None,
        "extra_sections": [{"title": "Router accuracy", "html": "<p id='router'>router 97%</p>"}],
    }


def test_write_report_outputs(tmp_path: Path) -> None:
    results = _fake_results()
    # Round-trip through JSON like results.json on disk.
    results = json.loads(json.dumps(results))
    html_path = write_report(tmp_path, results)

    assert html_path == tmp_path / "report.html"
    for name in ("matrix.csv", "heatmap.png", "curves.png", "report.html"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "heatmap.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))

    assert (tmp_path / "matrix.csv").read_text() == (
        "stage,rs,med,ad\n"
        "base,10.0,20.0,30.0\n"
        "rs,90.0,,31.5\n"
        "med,60.0,80.0,\n"
        "ad,50.0,70.25,95.0\n"
        "ref:joint,85.0,75.0,92.0\n"
    )

    page = html_path.read_text(encoding="utf-8")
    assert "Remote sensing: count &lt;objects&gt; &amp; ships" in page
    assert "<objects>" not in page
    heatmap_b64 = base64.b64encode((tmp_path / "heatmap.png").read_bytes()).decode("ascii")
    assert f'src="data:image/png;base64,{heatmap_b64}"' in page
    assert page.count("data:image/png;base64,") == 2
    assert "<p id='router'>router 97%</p>" in page  # extra section inserted as-is
    assert "Router accuracy" in page
    assert "seq-lora" in page and "abc123" in page and "123,456" in page
    assert "-25.0" in page and "n/a" in page  # signed BWT, null FWT


def test_format_table() -> None:
    text = format_table(_fake_results())
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "rs", "med", "ad", "avg"]
    rs_row = next(line for line in lines if line.startswith("rs "))
    assert rs_row.split() == ["rs", "90.0", "-", "31.5", "60.8"]  # avg over evaluated entries only
    assert any(line.split()[:1] == ["joint*"] for line in lines)
    assert "ACC 71.8" in text and "BWT -25.0" in text and "FWT n/a" in text
    assert "R[t][i]" in text
    # Columns are aligned: every table line has the same width as the header rule.
    widths = {len(line) for line in lines[:8] if not line.startswith("-")}
    assert len(widths) == 1


def test_tolerates_minimal_results(tmp_path: Path) -> None:
    results: dict[str, Any] = {"tasks": ["a", "b"], "matrix": [[None, 5.0], [50.0, None]]}
    html_path = write_report(tmp_path, results)
    assert html_path.is_file()
    assert (tmp_path / "matrix.csv").read_text() == "stage,a,b\nbase,,5.0\na,50.0,\n"
    assert "n/a" in format_table(results)
    assert write_report(tmp_path / "empty", {}).is_file()


@pytest.mark.parametrize("fn", [plot_heatmap, plot_accuracy_curves])
def test_plots_standalone(tmp_path: Path, fn: Any) -> None:
    out = fn(_fake_results(), tmp_path / "sub" / "plot.png")
    assert Path(out).read_bytes().startswith(PNG_MAGIC)


def test_csv_standalone(tmp_path: Path) -> None:
    results = _fake_results()
    results.pop("reference_rows")
    path = write_matrix_csv(results, tmp_path / "m.csv")
    assert Path(path).read_text().splitlines()[-1] == "ad,50.0,70.25,95.0"


def test_unfinished_run_is_said_first(tmp_path: Path) -> None:
    results = {**_fake_results(), "complete": False,
               "progress": {"stages_done": 2, "stages_planned": 3, "evaluations_done": 7, "evaluations_planned": 12}}
    notice = "UNFINISHED run: 2 of 3 stages, 7 of 12 evaluations"
    assert format_table(results).splitlines()[0].startswith(notice)
    page = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert notice in page and page.index(notice) < page.index("<h2>")
    finished = {**_fake_results(), "complete": True}
    assert "UNFINISHED" not in format_table(finished) and "UNFINISHED" not in write_report(tmp_path, finished).read_text()
