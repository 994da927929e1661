"""The comparison's figure: (left) the final accuracy per task, one bar per variant; (right) the average
accuracy over the tasks seen so far after each stage, one curve per variant, and each reference variant
(``Results.reference``: e.g. joint training, experts) as a dashed line at its final average."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from mmcl.report.compare_runs import ComparedRun, check_comparable, groups
from mmcl.report.formatting import matrix_rows, seen_average
from mmcl.report.plots import new_figure, palette, png_bytes
from mmcl.results import Results
from mmcl.utils import mean_of_present

MAX_LEGEND_CHARS = 60
MAX_BAR_LABELS = 24  # more bars than this: no value labels on them


@dataclass
class VariantSeries:
    """What the figure draws of one variant (means and std over its runs, NaN where no run has a value)."""

    label: str
    n: int
    final: list[float]  # per task, after the last stage
    final_std: list[float]
    curve: list[float]  # per stage 1..T: mean over the tasks seen so far
    curve_std: list[float]
    reference_level: float | None  # a reference variant: its final average, drawn as a line (no curve)


def _final_row(results: Results) -> list[float | None]:
    rows = matrix_rows(results)
    return rows[-1][1] if rows else [None] * len(results.tasks)


def _seen_curve(results: Results) -> list[float | None]:
    """Mean accuracy over the tasks seen so far after each stage 1..T (a joint run: all tasks, stage 1)."""
    curve = seen_average(matrix_rows(results), joint=results.joint)[1:]
    return (curve + [None] * len(results.tasks))[: len(results.tasks)]


def _columnwise(series: Sequence[Sequence[float | None]]) -> tuple[list[float], list[float]]:
    means, stds = [], []
    for column in zip(*series):
        present = [value for value in column if value is not None]
        means.append(sum(present) / len(present) if present else math.nan)
        stds.append(statistics.stdev(present) if len(present) > 1 else 0.0)
    return means, stds


def variant_series(runs: Sequence[ComparedRun]) -> list[VariantSeries]:
    """One :class:`VariantSeries` per variant (see :func:`~mmcl.report.compare_runs.groups`); a variant
    whose runs are all references gets a ``reference_level`` instead of a curve."""
    out = []
    for label, members in groups(runs):
        final, final_std = _columnwise([_final_row(run.results) for run in members])
        reference = all(run.reference for run in members)
        level = mean_of_present([mean_of_present(_final_row(run.results)) for run in members]) if reference else None
        curve, curve_std = ([], []) if reference else _columnwise([_seen_curve(run.results) for run in members])
        out.append(VariantSeries(label, len(members), final, final_std, curve, curve_std, level))
    return out


def _clip(text: str) -> str:
    return text if len(text) <= MAX_LEGEND_CHARS else text[: MAX_LEGEND_CHARS - 3] + "..."


def comparison_png(runs: Sequence[ComparedRun]) -> bytes:
    """The comparison figure as PNG (error bars and bands: ± std over the seeds of a variant)."""
    import numpy as np

    check_comparable(runs)
    tasks = runs[0].results.task_names
    width, series = len(tasks), variant_series(runs)
    colors = palette(len(series))
    figure = new_figure(min(max(11.0, 5.0 + 0.3 * width * len(series) + 0.4 * width), 16.0), 5.2)
    figure.set_layout_engine("constrained")
    bars_ax, curve_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1.0]})

    x = np.arange(max(width, 1))[:width]
    slot = 0.8 / max(len(series), 1)
    for g, variant in enumerate(series):
        many = variant.n > 1
        means, stds = variant.final, variant.final_std
        yerr = [[min(s, m) for m, s in zip(means, stds)], [min(s, 100.0 - m) for m, s in zip(means, stds)]]  # in 0..100
        container = bars_ax.bar(
            x - 0.4 + slot * (g + 0.5), means, width=slot * 0.92, color=colors[g],
            label=_clip(f"{variant.label} (n={variant.n})" if many else variant.label),
            yerr=yerr if many else None, capsize=2 if many else 0, error_kw={"elinewidth": 0.8},
        )  # fmt: skip
        if len(series) * width <= MAX_BAR_LABELS:  # values on the bars (a 0 bar is otherwise invisible)
            bars_ax.bar_label(container, ["" if math.isnan(m) else f"{m:.0f}" for m in means], fontsize=7, padding=1)
    slanted = width > 6
    bars_ax.set_xticks(x, tasks, rotation=30 if slanted else 0, ha="right" if slanted else "center")
    bars_ax.set_ylim(0, 105)
    bars_ax.set_ylabel("accuracy (%)")
    bars_ax.set_xlabel("task")
    bars_ax.set_title("Final accuracy per task (after the last stage)", fontsize=11)
    bars_ax.grid(True, axis="y", alpha=0.3)
    bars_ax.set_axisbelow(True)

    stages = list(range(1, width + 1))
    for g, variant in enumerate(series):
        if variant.reference_level is not None:
            curve_ax.axhline(variant.reference_level, color=colors[g], linestyle="--", linewidth=1.8,
                             label=_clip(f"{variant.label}: final avg (reference)"))  # fmt: skip
            continue
        if not variant.curve:
            continue
        curve_ax.plot(stages, variant.curve, marker="o", markersize=4, linewidth=1.8, color=colors[g], label=_clip(variant.label))
        if variant.n > 1:
            lower = [max(m - s, 0.0) for m, s in zip(variant.curve, variant.curve_std)]
            upper = [min(m + s, 100.0) for m, s in zip(variant.curve, variant.curve_std)]
            curve_ax.fill_between(stages, lower, upper, color=colors[g], alpha=0.15, linewidth=0)
    curve_ax.set_xticks(stages, [f"{i}\n{t}" for i, t in zip(stages, tasks)] if width <= 8 else stages)
    curve_ax.set_xlim(0.7, max(width, 1) + 0.3)
    curve_ax.set_ylim(0, 105)
    curve_ax.set_xlabel("after training stage (task learned)")
    curve_ax.set_ylabel("avg accuracy on seen tasks (%)")
    curve_ax.set_title("Average accuracy over seen tasks", fontsize=11)
    curve_ax.grid(True, alpha=0.3)
    if curve_ax.get_legend_handles_labels()[0]:
        curve_ax.legend(loc="best", fontsize=8, framealpha=0.85)

    handles, labels = bars_ax.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    note = " (shaded / error bars: ± std over seeds)" if any(variant.n > 1 for variant in series) else ""
    figure.suptitle(f"Method comparison on {runs[0].results.stream}{note}", fontsize=12)
    return png_bytes(figure)
