"""What every report output shares: the metrics' order and meaning, number/duration/size formatting, and
the rows of a run's accuracy matrix as they are shown (the terminal table, report.html, matrix.csv, the
plots and ``mmcl compare`` all use these)."""

from __future__ import annotations

import json
import math
from typing import Any

from mmcl.results import Results
from mmcl.utils import mean_of_present

Row = list[float | None]

METRIC_ORDER: tuple[str, ...] = ("ACC", "MFT", "MAA", "BWT", "Forgetting", "FWT")
SIGNED_METRICS: frozenset[str] = frozenset({"BWT", "FWT"})

METRIC_EXPLANATIONS: dict[str, str] = {
    "ACC": "Final average accuracy: mean over all tasks of the accuracy after the last training stage.",
    "MFT": "Mean fine-tuned accuracy: mean accuracy on each task right after learning it.",
    "MAA": "Mean average accuracy: mean over stages of the running average accuracy on the tasks seen so far.",
    "BWT": "Backward transfer (GEM): mean of final minus just-learned accuracy over all but the last task; "
    "negative = forgetting.",
    "Forgetting": "Forgetting (Chaudhry et al. 2018): mean drop from the best earlier accuracy on a task to its "
    "final accuracy (over all but the last task).",
    "FWT": "Forward transfer (GEM): accuracy on a task just before learning it minus the base model's accuracy "
    "on it, averaged over tasks 2..T.",
    "T_F": "Forgetting (CLiMB): share (%) of the margin over chance learned on a task that is lost by the end, "
    "mean over the tasks before the last.",
    "T_K": "Knowledge transfer (CLiMB): gain (%) over the single-task score, relative to its margin over chance, "
    "of the score right after learning each task; mean over tasks.",
    "low_shot_transfer": "Low-shot transfer (CLiMB): mean gain on unseen tasks of few-shot fine-tuning from a "
    "trained stage over few-shot fine-tuning from the base model; positive = earlier tasks help learn new ones.",
    "forgetting_essential": "Essential forgetting (SEFE): drop of the share of answers with the right content on "
    "old tasks, from right after learning each to the final stage.",
    "forgetting_superficial": "Superficial forgetting (SEFE): the rest of the accuracy drop on old tasks, answers "
    "whose content survived but whose format drifted (BWT-style drop minus essential forgetting).",
    "general_drop": "General-ability drop: score on the general set (held-out questions outside the stream) of "
    "the base model minus that after the last stage; positive = general ability lost.",
}

LEGEND = (
    "R[t][i] = accuracy (%) on task i (column) after training stage t (row); "
    "row 'base' = model before any training; '-' = not evaluated; avg = mean of evaluated entries."
)
REFERENCE_NOTE = "* = reference row (not part of the sequence)."
INTERVAL_NOTE = (
    "± = half-width of the 95% bootstrap interval over test samples (each task's samples resampled together for "
    "every row)."
)


# -- numbers ---------------------------------------------------------------------------------------


def finite(value: Any) -> float | None:
    """``value`` as a finite float (None for None, NaN, booleans and non-numbers)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def number(value: Any, signed: bool = False, null: str = "-") -> str:
    """One decimal (with a sign if ``signed``); ``null`` for a missing value."""
    value = finite(value)
    if value is None:
        return null
    value = round(value, 1) + 0.0  # a value that rounds to zero shows as 0.0, never -0.0
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def metric(name: str, value: Any) -> str:
    """A metric as shown everywhere: one decimal, BWT/FWT signed, ``n/a`` when missing."""
    return number(value, signed=name in SIGNED_METRICS, null="n/a")


def half_width(interval: Any) -> float | None:
    """Half the width of an interval ``[low, high]`` (None when there is none)."""
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        return None
    low, high = finite(interval[0]), finite(interval[1])
    return None if low is None or high is None else (high - low) / 2


def plus_minus(interval: Any) -> str:
    """``±h`` with h the interval's half-width, one decimal (empty when there is no interval)."""
    half = half_width(interval)
    return "" if half is None else f"±{half:.1f}"


def interval(pair: Any, signed: bool = False) -> str:
    """``[low, high]``, one decimal each (signed for a signed metric); ``n/a`` when there is none."""
    if half_width(pair) is None:
        return "n/a"
    return f"[{number(pair[0], signed=signed)}, {number(pair[1], signed=signed)}]"


def metric_interval(name: str, pair: Any) -> str:
    """A metric's 95% interval as shown everywhere (see :func:`interval`)."""
    return interval(pair, signed=name in SIGNED_METRICS)


def cell_title(cell: Any) -> str:
    """A matrix cell's uncertainty as a tooltip: standard error, 95% interval and sample count."""
    if not isinstance(cell, dict):
        return ""
    parts = []
    if finite(cell.get("se")) is not None:
        parts.append(f"SE {cell['se']:.1f}")
    if half_width([cell.get("low"), cell.get("high")]) is not None:
        parts.append(f"95% interval {interval([cell['low'], cell['high']])}")
    if cell.get("n") is not None:
        parts.append(f"{cell['n']} samples")
    return ", ".join(parts)


def cell_plus_minus(cell: Any) -> str:
    """A matrix cell's ``±`` (half-width of its 95% interval; empty when it has none)."""
    return plus_minus([cell.get("low"), cell.get("high")]) if isinstance(cell, dict) else ""


def count(value: Any) -> str:
    """An integer with thousands separators (``n/a`` when missing)."""
    value = finite(value)
    return "n/a" if value is None else f"{int(round(value)):,}"


def duration_unit(seconds: float) -> tuple[str, float, int]:
    """(unit, seconds per unit, decimals) that show ``seconds`` best: s below a minute, min below an hour, h."""
    if abs(seconds) < 60:
        return "s", 1.0, 1
    if abs(seconds) < 3600:
        return "min", 60.0, 1
    return "h", 3600.0, 2


def duration(seconds: Any, null: str = "n/a") -> str:
    """A human-readable duration (``12.5 s``, ``3.2 min``, ``1.25 h``)."""
    seconds = finite(seconds)
    if seconds is None:
        return null
    unit, scale, digits = duration_unit(seconds)
    return f"{seconds / scale:.{digits}f} {unit}"


SIZE_UNITS: tuple[tuple[str, float], ...] = (("GB", 1e9), ("MB", 1e6), ("KB", 1e3))


def size_unit(size: float) -> tuple[str, float, int]:
    """(unit, bytes per unit, decimals) that show ``size`` bytes best."""
    for unit, scale in SIZE_UNITS:
        if abs(size) >= scale:
            return unit, scale, 1
    return "B", 1.0, 0


def size(value: Any) -> str:
    """A byte count in B/KB/MB/GB (``n/a`` when missing)."""
    value = finite(value)
    if value is None:
        return "n/a"
    unit, scale, digits = size_unit(value)
    return f"{value / scale:.{digits}f} {unit}"


def loss(value: Any) -> str:
    """A training loss with four significant digits (``n/a`` when missing)."""
    value = finite(value)
    return "n/a" if value is None else f"{value:.4g}"


def plain(value: Any) -> str:
    """A setting's value as text: scalars as they are, lists and mappings as compact JSON."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str, separators=(", ", ": "))
    return str(value)


def answer(value: Any) -> str:
    """A reference answer (a list of accepted answers joined by `` | ``) or a prediction."""
    if isinstance(value, (list, tuple)):
        return " | ".join(str(item) for item in value)
    return "" if value is None else str(value)


# -- the run -----------------------------------------------------------------------------------


def run_title(results: Results) -> str:
    """``<method> on <stream>``."""
    return f"{results.method} on {results.stream}"


def unfinished_notice(results: Results) -> str | None:
    """``UNFINISHED run: N of M stages, K of L evaluations`` for an unfinished run, else None."""
    if results.complete:
        return None
    progress = results.progress
    return (
        f"UNFINISHED run: {progress.stages_done} of {progress.stages_planned} stages, "
        f"{progress.evaluations_done} of {progress.evaluations_planned} evaluations"
    )


def metric_items(results: Results) -> list[tuple[str, float | None]]:
    """The metrics in their usual order, then any other metric in its stored order."""
    keys = [*METRIC_ORDER, *(key for key in results.metrics if key not in METRIC_ORDER)]
    return [(key, finite(results.metrics.get(key))) for key in keys]


def matrix_rows(results: Results) -> list[tuple[str, Row]]:
    """(label, scores) of every row of the accuracy matrix, padded or cut to the task count."""
    width = len(results.tasks)
    labels = list(results.row_labels)
    return [
        (labels[i] if i < len(labels) else f"stage{i}", ([finite(v) for v in row] + [None] * width)[:width])
        for i, row in enumerate(results.matrix)
    ]


def matrix_errors(results: Results) -> list[list[dict[str, Any] | None]]:
    """Each matrix cell's uncertainty (``{"se", "low", "high", "n"}`` or None), shaped like :func:`matrix_rows`."""
    width = len(results.tasks)
    stored = list(results.matrix_uncertainty)
    return [((list(stored[i]) if i < len(stored) else []) + [None] * width)[:width] for i in range(len(results.matrix))]


def reference_rows(results: Results) -> list[tuple[str, Row]]:
    """(name, scores) of the rows drawn as references beside the matrix."""
    width = len(results.tasks)
    return [(name, ([finite(v) for v in row] + [None] * width)[:width]) for name, row in results.reference_rows.items()]


def general_scores(results: Results) -> Row | None:
    """The general-ability score of every matrix row (None when the run has no general set)."""
    part = results.part("general")
    scores = getattr(part, "scores", None)
    if not scores:
        return None
    return ([finite(v) for v in scores] + [None] * len(results.matrix))[: len(results.matrix)]


def seen_average(rows: list[tuple[str, Row]], joint: bool = False) -> Row:
    """Per row t: mean over the tasks learned by then (the first t; all of them in a joint run); None for base."""
    return [None if t == 0 else mean_of_present(row if joint else row[:t]) for t, (_, row) in enumerate(rows)]



def total_time(results: Results) -> str:
    """The wall-clock time of every ``mmcl run`` session on the run dir, with their count."""
    sessions = len(results.timing.sessions)
    over = f" over {sessions} session{'s' * (sessions != 1)}" if sessions else ""
    return duration(results.timing.total_seconds) + over
