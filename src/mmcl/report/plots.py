"""Figures as PNG bytes: the report's heatmap and accuracy curves, the curves of a method's report section,
and the public helpers a method may use for a figure of its own (:func:`new_figure`, :func:`plot_series`,
:func:`png_bytes`, :func:`curves_png`).

Figures are drawn on matplotlib's Agg canvas without pyplot (no global state: safe in threads and on
machines without a display)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from mmcl.report.formatting import finite, matrix_rows, reference_rows, run_title, seen_average
from mmcl.results import Results
from mmcl.utils import mean_of_present

__all__ = ["new_figure", "png_bytes", "palette", "plot_series", "curves_png", "heatmap_png", "accuracy_curves_png"]

MARKERS_BELOW = 40  # series with fewer points than this get a marker on each point


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches on an Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Any) -> bytes:
    """``figure`` rendered as PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def palette(n: int) -> list[Any]:
    """``n`` distinguishable colours (tab10, tab20 beyond ten)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_series(
    ax: Any,
    series: Mapping[str, Sequence[float | None]],
    x: Sequence[float] | None = None,
    *,
    y_log: bool = False,
    x_marks: Sequence[float] = (),
) -> None:
    """Draw one line per named series on ``ax`` (x = ``x`` or 0, 1, ...), joining the points that are not
    None; dotted vertical lines at ``x_marks`` (e.g. stage boundaries); a log y axis with ``y_log``."""
    colors = palette(len(series))
    for color, (name, values) in zip(colors, series.items()):
        xs = list(x) if x is not None else list(range(len(values)))
        points = [(px, py) for px, py in zip(xs, map(finite, values)) if py is not None and (py > 0 or not y_log)]
        if not points:
            continue
        px, py = zip(*points)
        ax.plot(px, py, marker="." if len(points) < MARKERS_BELOW else None, linewidth=1.3, color=color, label=str(name))
    for mark in x_marks:
        ax.axvline(mark, color="grey", linestyle=":", linewidth=1)
    if y_log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=7, frameon=False)


def curves_png(
    series: Mapping[str, Sequence[float | None]],
    x: Sequence[float] | None = None,
    *,
    x_label: str = "",
    y_label: str = "",
    title: str | None = None,
    y_log: bool = False,
    x_marks: Sequence[float] = (),
    width: float = 8.0,
    height: float = 3.6,
) -> bytes:
    """One panel of named curves (see :func:`plot_series`) as PNG."""
    figure = new_figure(width, height)
    ax = figure.add_subplot(1, 1, 1)
    plot_series(ax, series, x, y_log=y_log, x_marks=x_marks)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if title:
        ax.set_title(title, fontsize=10)
    figure.tight_layout()
    return png_bytes(figure)


def heatmap_png(results: Results) -> bytes:
    """The accuracy matrix as a heatmap (rows = stages, then reference rows; 0..100; grey = not evaluated)."""
    import numpy as np
    from matplotlib import colormaps

    tasks = results.task_names
    rows, refs = matrix_rows(results), reference_rows(results)
    labels = [label for label, _ in rows] + [f"{name} (ref)" for name, _ in refs]
    data = [row for _, row in rows] + [row for _, row in refs]
    values = np.full((max(len(data), 1), max(len(tasks), 1)), np.nan)
    for i, row in enumerate(data):
        for j, value in enumerate(row):
            if value is not None:
                values[i, j] = value

    n_rows, n_cols = values.shape
    figure = new_figure(min(max(6.0, 1.6 + 0.75 * n_cols), 14.0), min(max(4.0, 1.4 + 0.4 * n_rows), 10.0))
    ax = figure.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto")
    figure.colorbar(image, ax=ax, label="accuracy (%)", fraction=0.046, pad=0.04)
    fontsize = 9 if n_cols <= 8 else 7
    for i in range(n_rows):
        for j in range(n_cols):
            if np.isnan(values[i, j]):
                continue
            r, g, b, _ = cmap(min(max(values[i, j] / 100.0, 0.0), 1.0))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color=color, fontsize=fontsize)
    slanted = n_cols > 6
    ax.set_xticks(range(len(tasks)), tasks, rotation=30 if slanted else 0, ha="right" if slanted else "center")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training stage")
    if refs and rows:
        ax.axhline(len(rows) - 0.5, color="white", linewidth=3)
    ax.set_title(run_title(results), fontsize=11)
    figure.tight_layout()
    return png_bytes(figure)


def accuracy_curves_png(results: Results) -> bytes:
    """Per-task accuracy after each stage, the running average over the tasks seen so far, and each
    reference row's mean as a dotted line."""
    nan = float("nan")
    tasks = results.task_names
    rows, refs = matrix_rows(results), reference_rows(results)
    x = list(range(len(rows)))
    figure = new_figure(min(max(6.0, 1.5 + 0.6 * len(rows)), 14.0), 4.0)
    ax = figure.add_subplot(1, 1, 1)
    for j, (task, color) in enumerate(zip(tasks, palette(len(tasks)))):
        ys = [nan if row[j] is None else row[j] for _, row in rows]
        ax.plot(x, ys, marker="o", markersize=4, linewidth=1.5, color=color, label=task)
    average = [nan if v is None else v for v in seen_average(rows, joint=results.joint)]
    ax.plot(x, average, color="black", linestyle="--", linewidth=2.2, marker="s", markersize=4, label="avg (seen tasks)")
    for k, (name, row) in enumerate(refs):
        mean = mean_of_present(row)
        if mean is not None:
            ax.axhline(mean, color="grey", linestyle=":", linewidth=1.2 + 0.3 * k, label=f"{name} avg (ref)")
    ax.set_xticks(x, [label for label, _ in rows], rotation=30 if len(rows) > 8 else 0)
    ax.set_xlim(-0.3, max(len(rows) - 1, 0) + 0.3)
    ax.set_ylim(0, 102)
    ax.set_xlabel("after training stage")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.set_title(run_title(results), fontsize=11)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    figure.tight_layout()
    return png_bytes(figure)
