"""A run's report files from its :class:`~mmcl.results.Results`: ``matrix.csv``, ``heatmap.png``,
``accuracy_curves.png`` and the self-contained ``report.html`` (paths from :class:`~mmcl.layout.RunLayout`),
plus the terminal table (:func:`format_table`, drawn in :mod:`mmcl.report.text`). Every file is written
atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from mmcl.layout import RunLayout
from mmcl.report.formatting import METRIC_EXPLANATIONS, matrix_rows, reference_rows, unfinished_notice
from mmcl.report.html import render_report_html
from mmcl.report.plots import accuracy_curves_png, heatmap_png
from mmcl.report.text import format_table
from mmcl.results import Results
from mmcl.utils import atomic_write_bytes, atomic_write_text

__all__ = [
    "METRIC_EXPLANATIONS",
    "format_table",
    "unfinished_notice",
    "write_matrix_csv",
    "plot_heatmap",
    "plot_accuracy_curves",
    "write_report",
]


def matrix_csv_text(results: Results) -> str:
    """The accuracy matrix as CSV: ``stage,<tasks...>``, one line per row, reference rows as ``ref:<name>``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["stage", *results.task_names])
    labelled = [*matrix_rows(results), *((f"ref:{name}", row) for name, row in reference_rows(results))]
    for label, row in labelled:
        writer.writerow([label, *("" if value is None else repr(round(value, 4)) for value in row)])
    return buffer.getvalue()


def write_matrix_csv(results: Results, path: Path | str) -> Path:
    """Write :func:`matrix_csv_text` to ``path``."""
    atomic_write_text(Path(path), matrix_csv_text(results))
    return Path(path)


def plot_heatmap(results: Results, path: Path | str) -> Path:
    """Write the accuracy matrix's heatmap PNG to ``path``."""
    atomic_write_bytes(Path(path), heatmap_png(results))
    return Path(path)


def plot_accuracy_curves(results: Results, path: Path | str) -> Path:
    """Write the per-task accuracy curves PNG to ``path``."""
    atomic_write_bytes(Path(path), accuracy_curves_png(results))
    return Path(path)


def write_report(run_dir: Path | str, results: Results) -> Path:
    """Write ``matrix.csv``, ``heatmap.png``, ``accuracy_curves.png`` and ``report.html`` into ``run_dir``;
    the path of ``report.html``."""
    layout = RunLayout(Path(run_dir))
    heatmap, curves = heatmap_png(results), accuracy_curves_png(results)
    atomic_write_text(layout.matrix_csv, matrix_csv_text(results))
    atomic_write_bytes(layout.heatmap_png, heatmap)
    atomic_write_bytes(layout.curves_png, curves)
    atomic_write_text(layout.report_file, render_report_html(results, heatmap, curves))
    return layout.report_file
