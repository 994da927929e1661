"""``mmcl compare``: several runs of the same stream side by side, written to ``comparison.csv``,
``comparison.png`` and ``comparison.html``, with the table as text.

Runs are read with :func:`mmcl.results.load_results` (older run dirs are rebuilt from their files) and
grouped into variants by the settings that enter their fingerprint, seed aside (mean and sample std over
the seeds of a variant); runs of different streams or task lists are refused with a one-line
:class:`~mmcl.errors.RunDirError`. Each variant's mean gets a 95% interval over seeds and test samples, and
every pair of variants the interval of its difference, marked within noise when it contains 0
(``comparison_pairs.csv``). Reading, grouping and rows: :mod:`mmcl.report.compare_runs`; the noise:
:mod:`mmcl.report.compare_noise`; the tables: :mod:`mmcl.report.compare_text`; the figure:
:mod:`mmcl.report.compare_plot`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmcl.layout import RunLayout
from mmcl.report.compare_noise import Noise, noise
from mmcl.report.compare_plot import comparison_png, variant_series
from mmcl.report.compare_runs import (
    FIELDS,
    ComparedRun,
    aggregate_by_method,
    check_comparable,
    comparison_rows,
    groups,
    load_run,
    with_climb_metrics,
)
from mmcl.report.compare_text import (
    csv_text,
    format_comparison,
    format_noise,
    interval_cells,
    pair_cells,
    pairs_csv_text,
    table_cells,
)
from mmcl.report.html import render_comparison_html
from mmcl.utils import atomic_write_bytes, atomic_write_text, make_dirs

__all__ = [
    "FIELDS",
    "ComparedRun",
    "Comparison",
    "aggregate_by_method",
    "check_comparable",
    "compare_runs",
    "comparison_rows",
    "format_comparison",
    "groups",
    "load_run",
    "plot_comparison",
    "variant_series",
    "with_climb_metrics",
    "write_comparison",
]


@dataclass
class Comparison:
    """What :func:`compare_runs` wrote: the tables as text and the paths of the files."""

    text: str
    csv_path: Path
    png_path: Path
    html_path: Path
    pairs_path: Path | None = None  # comparison_pairs.csv: the differences between variants


def plot_comparison(runs: Sequence[ComparedRun], path: Path | str) -> Path:
    """Write the comparison figure (see :mod:`mmcl.report.compare_plot`) to ``path``."""
    atomic_write_bytes(Path(path), comparison_png(runs))
    return Path(path)


def _report_link(run: ComparedRun, out_dir: Path) -> str | None:
    report = RunLayout(Path(run.run_dir)).report_file
    if not report.is_file():
        return None
    try:
        return Path(os.path.relpath(report.resolve(), out_dir.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return report.resolve().as_uri()


def _comparison_page(runs: Sequence[ComparedRun], run_rows: list[dict], method_rows: list[dict], png: bytes,
                     out_dir: Path, found: Noise) -> str:  # fmt: skip
    header, continual, references, notes = table_cells(run_rows)
    tables = [{"title": "Runs", "header": header, "rows": continual, "references": references, "notes": notes}]
    if any(row["n"] > 1 for row in method_rows):
        header, continual, references, notes = table_cells(method_rows)
        tables.append({"title": "Per variant, mean ± std over seeds", "header": header, "rows": continual,
                       "references": references, "notes": notes})  # fmt: skip
    header, continual, references, notes = interval_cells(found)
    tables.append({"title": "Per variant, mean and 95% interval over seeds and test samples", "header": header,
                   "rows": continual, "references": references, "notes": notes})  # fmt: skip
    pairs = None
    if found.pairs:
        header, rows, notes = pair_cells(found)
        within = [[d.within_noise for d in differences] for differences in found.pairs]
        pairs = {"header": header, "rows": rows, "within": within, "notes": list(dict.fromkeys(notes))}
    stream = runs[0].results.stream
    return render_comparison_html({
        "title": f"mmcl compare: {len(runs)} run{'s' * (len(runs) != 1)} on {stream}",
        "stream": stream, "tasks": runs[0].results.task_names, "tables": tables, "png": png, "pairs": pairs,
        "runs": [{"label": row["label"], "run_dir": run.run_dir, "report": _report_link(run, out_dir),
                  "complete": run.complete, "reference": run.reference} for run, row in zip(runs, run_rows)],
    })  # fmt: skip


def compare_runs(run_dirs: Sequence[Path | str], out_dir: Path | str) -> Comparison:
    """Read the runs (a repeated dir once), write ``comparison.csv``, ``comparison_pairs.csv``,
    ``comparison.png`` and ``comparison.html`` into ``out_dir`` and return them with the table text (the
    per-run table; when a variant has several runs, the per-variant mean ± std table; the per-variant
    intervals; with several variants, the differences of every pair)."""
    unique: dict[Path, Path] = {}
    for run_dir in run_dirs:
        unique.setdefault(Path(run_dir).resolve(), Path(run_dir))
    runs = with_climb_metrics([load_run(run_dir) for run_dir in unique.values()])
    check_comparable(runs)
    run_rows, method_rows = comparison_rows(runs), aggregate_by_method(runs)
    found = noise(runs)
    for row, intervals in zip(run_rows, found.run_intervals):
        _add_intervals(row, intervals)
    for row, variant in zip(method_rows, found.variants):
        _add_intervals(row, {name: interval for name, (_, interval) in variant["metrics"].items()})
    text = format_comparison(run_rows)
    if any(row["n"] > 1 for row in method_rows):
        text += "\n\nPer method, mean ± std over seeds:\n" + format_comparison(method_rows)
    text += "\n\n" + format_noise(found)
    png = comparison_png(runs)

    out = make_dirs(Path(out_dir))
    comparison = Comparison(text, out / "comparison.csv", out / "comparison.png", out / "comparison.html",
                            out / "comparison_pairs.csv")  # fmt: skip
    atomic_write_text(comparison.csv_path, csv_text(run_rows, method_rows))
    atomic_write_text(out / "comparison_pairs.csv", pairs_csv_text(found))
    atomic_write_bytes(comparison.png_path, png)
    atomic_write_text(comparison.html_path, _comparison_page(runs, run_rows, method_rows, png, out, found))
    return comparison


def _add_intervals(row: dict, intervals: dict) -> None:
    for name, interval in intervals.items():
        row[f"{name}_low"], row[f"{name}_high"] = interval if interval is not None else (None, None)


def write_comparison(run_dirs: Sequence[Path | str], out_dir: Path | str) -> tuple[str, Path, Path]:
    """:func:`compare_runs`, returning ``(table_text, csv_path, png_path)`` (``comparison.html`` is written
    beside them)."""
    comparison = compare_runs(run_dirs, out_dir)
    return comparison.text, comparison.csv_path, comparison.png_path
