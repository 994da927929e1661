"""The comparison's table as cells (shared by the terminal text and ``comparison.html``), as text and as CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from mmcl.report.compare_noise import INTERVAL_METRICS, Noise, PairDifference
from mmcl.report.compare_runs import FIELDS, OPTIONAL_METRICS
from mmcl.report.formatting import (
    SIGNED_METRICS,
    duration_unit,
    finite,
    interval,
    metric,
    metric_interval,
    number,
    size_unit,
)
from mmcl.report.text import render_text, text_table

HEADERS: dict[str, str] = {
    "general_drop": "gen.drop",
    "forgetting_essential": "F.essential",
    "forgetting_superficial": "F.superficial",
    "low_shot_transfer": "low-shot",
    "trainable_parameters": "trainable",
    "stored_bytes_per_task": "stored/task",
    "train_seconds": "train time",
    "eval_seconds": "eval time",
    "total_seconds": "total time",
}
DURATIONS = frozenset({"train_seconds", "eval_seconds", "total_seconds"})

FOOTNOTE = (
    "Accuracies in %; BWT/FWT signed (negative BWT = forgetting). trainable = trainable parameters; "
    "stored/task = mean size of state.safetensors per finished stage; times = wall clock "
    "(train: sum over stages; eval: sum over evaluations; total: every `mmcl run` session)."
)
OPTIONAL_NOTES = {
    "general_drop": "gen.drop = general-ability score lost from base to final stage.",
    "forgetting_essential": "F.essential/F.superficial = forgetting on old tasks split into content lost and right "
    "content in the wrong format.",
    "low_shot_transfer": "low-shot = CLiMB low-shot transfer (gain over few-shot tuning from the base model).",
    "T_K": "T_K = CLiMB knowledge transfer vs the compared single-task reference run, mean over tasks.",
    "T_F": "T_F = CLiMB forgetting (% of the learned margin over chance lost by the end), mean over old tasks.",
}
AGGREGATED_NOTE = "a±b = mean ± sample std over n runs (seeds)."
UNFINISHED_NOTE = "* = unfinished run."
REFERENCE_NOTE = "Below the rule: reference runs (upper bounds, not continual learners)."


def format_cell(name: str, value: float | None, std: float | None = None, aggregated: bool = False) -> str:
    """One field shown: ``mean±std`` for aggregated rows (counts and sizes only when they vary); ``n/a``."""
    if value is None:
        return "n/a"
    show_std = aggregated and std is not None
    if name == "trainable_parameters":
        return f"{int(round(value)):,}" + (f"±{std:,.0f}" if show_std and std else "")
    if name == "stored_bytes_per_task":
        unit, scale, digits = size_unit(value)
        return f"{value / scale:.{digits}f}" + (f"±{std / scale:.{digits}f}" if show_std and std else "") + f" {unit}"
    if name in DURATIONS:
        unit, scale, digits = duration_unit(value)
        return f"{value / scale:.{digits}f}" + (f"±{std / scale:.{digits}f}" if show_std else "") + f" {unit}"
    text = f"{value:+.1f}" if name in SIGNED_METRICS else f"{value:.1f}"
    return text + (f"±{std:.1f}" if show_std else "")


def shown_fields(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The fields of the table: all but the optional metrics no row has."""
    return [f for f in FIELDS if f not in OPTIONAL_METRICS or any(finite(row.get(f)) is not None for row in rows)]


def table_cells(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]], list[list[str]], list[str]]:
    """(header, rows of continual runs, rows of reference runs, notes) of the comparison table."""
    aggregated = any(row.get("aggregated") for row in rows)
    fields = shown_fields(rows)
    header = ["method", *(["n"] if aggregated else []), *(HEADERS.get(f, f) for f in fields)]
    runs: list[list[str]] = []
    references: list[list[str]] = []
    for row in rows:
        label = str(row.get("label") or row.get("method") or "?") + (" *" if row.get("complete") is False else "")
        cells = [label, *([str(row.get("n", 1))] if aggregated else [])]
        cells += [format_cell(f, finite(row.get(f)), finite(row.get(f"{f}_std")), bool(row.get("aggregated"))) for f in fields]
        (references if row.get("reference") else runs).append(cells)
    notes = [FOOTNOTE, *(OPTIONAL_NOTES[f] for f in fields if f in OPTIONAL_NOTES)]
    notes += [AGGREGATED_NOTE] if aggregated else []
    notes += [UNFINISHED_NOTE] if any(row.get("complete") is False for row in rows) else []
    notes += [REFERENCE_NOTE] if references and runs else []
    return header, runs, references, notes


def format_comparison(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison table as terminal text (one line per row, reference runs below a rule), then its notes;
    aggregated rows (:func:`~mmcl.report.compare_runs.aggregate_by_method`) show ``mean±std`` and ``n``."""
    header, runs, references, notes = table_cells(rows)
    return render_text(text_table(header, [runs, references], section_styles=["", "italic"]), " ".join(notes))


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(round(value, 4))
    if isinstance(value, (list, tuple)):
        return ";".join("" if v is None else str(v) for v in value)
    return str(value)


def csv_text(run_rows: Sequence[Mapping[str, Any]], method_rows: Sequence[Mapping[str, Any]]) -> str:
    """Both tables as CSV; column ``kind`` = ``run`` (one per run dir) or ``mean`` (per variant over seeds,
    with ``*_std`` columns); then each bootstrapped metric's 95% interval, ``<metric>_low`` and
    ``<metric>_high`` (a run's over its test samples, a variant's mean's over seeds and test samples)."""
    columns = ["kind", "label", "method", "n", "seeds", "run_dirs", "complete", "reference"]
    columns += [name for field in FIELDS for name in (field, f"{field}_std")]
    columns += [f"{name}_{end}" for name in INTERVAL_METRICS for end in ("low", "high")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for kind, rows in (("run", run_rows), ("mean", method_rows)):
        for row in rows:
            record = {**row, "kind": kind}
            if kind == "run":
                record.update(seeds=[row.get("seed")], run_dirs=[row.get("run_dir")])
            writer.writerow([_csv_value(record.get(column)) for column in columns])
    return buffer.getvalue()


# -- noise: intervals of the variants' means, differences of pairs -------------------------------------

INTERVALS_NOTE = (
    "mean [low, high] = mean over the variant's seeds and its 95% interval: hierarchical bootstrap resampling the "
    "seeds, then each run's test samples (one resample of shared test samples per replicate)."
)
PAIRS_NOTE = (
    "A - B = difference of the variants' means [its 95% bootstrap interval]; ~ = the interval contains 0: within "
    "noise. Paired over seeds (by seed value) when both variants ran the same seeds, else each side's seeds are "
    "resampled on their own; paired over test samples (by sample id) when all their runs share them."
)
UNPAIRED_SAMPLES_NOTE = (
    "Runs evaluated on different test samples (another evaluation.limit subset or data seed) are compared over "
    "seeds only, their test samples resampled independently (pairs marked 'seeds' or 'none')."
)


def interval_cells(noise: Noise) -> tuple[list[str], list[list[str]], list[list[str]], list[str]]:
    """(header, rows of continual variants, rows of reference variants, notes) of the intervals table."""
    header = ["variant", "n", *(HEADERS.get(m, m) for m in noise.metrics)]
    runs: list[list[str]] = []
    references: list[list[str]] = []
    for row in noise.variants:
        cells = [row["label"], str(row["n"])]
        for name in noise.metrics:
            mean, interval = row["metrics"][name]
            cells.append("n/a" if mean is None else f"{metric(name, mean)} {metric_interval(name, interval)}")
        (references if row["reference"] else runs).append(cells)
    notes = [INTERVALS_NOTE]
    if not all(row["shared_samples"] for row in noise.variants):
        notes.append(UNPAIRED_SAMPLES_NOTE)
    return header, runs, references, notes


def paired_over(pair: PairDifference) -> str:
    return ", ".join(name for name, on in (("seeds", pair.paired_seeds), ("samples", pair.paired_samples)) if on) or "none"


def headline(noise: Noise) -> str | None:
    """The metric whose verdict a pair's row spells out: ACC, else the first metric."""
    return "ACC" if "ACC" in noise.metrics else (noise.metrics[0] if noise.metrics else None)


def difference_cell(pair: PairDifference) -> str:
    """``-3.2 [-8.1, +1.5] ~`` (``~``: within noise); ``n/a`` when a side lacks the metric."""
    if pair.difference is None:
        return "n/a"
    return f"{number(pair.difference, signed=True)} {interval(pair.interval, signed=True)}" + (" ~" if pair.within_noise else "")


def pair_cells(noise: Noise) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes) of the table of differences between every pair of variants."""
    main = headline(noise)
    header = ["A - B", *(HEADERS.get(m, m) for m in noise.metrics), f"{main} verdict", "paired over"]
    rows = []
    for differences in noise.pairs:
        first = differences[0]
        verdict = next((d for d in differences if d.metric == main), None)
        if verdict is None or verdict.within_noise is None:
            word = "n/a"
        else:
            word = "within noise" if verdict.within_noise else "separated"
        rows.append([f"{first.a} - {first.b}", *map(difference_cell, differences), word, paired_over(first)])
    notes = [PAIRS_NOTE]
    if any(not differences[0].paired_samples for differences in noise.pairs):
        notes.append(UNPAIRED_SAMPLES_NOTE)
    return header, rows, notes


def format_noise(noise: Noise) -> str:
    """The intervals table and, with two variants or more, the differences table, as terminal text."""
    header, runs, references, notes = interval_cells(noise)
    parts: list[Any] = ["Per variant, mean and 95% interval over seeds and test samples:",
                        text_table(header, [runs, references], section_styles=["", "italic"]), " ".join(notes)]  # fmt: skip
    if noise.pairs:
        header, rows, notes = pair_cells(noise)
        parts += ["", "Differences between variants (A - B), 95% bootstrap interval:", text_table(header, [rows]),
                  " ".join(dict.fromkeys(notes))]  # fmt: skip
    return render_text(*parts)


def pairs_csv_text(noise: Noise) -> str:
    """One line per pair of variants and metric: ``a``, ``b``, ``metric``, ``difference``, ``low``, ``high``,
    ``within_noise``, ``paired_seeds``, ``paired_samples``."""
    columns = ["a", "b", "metric", "difference", "low", "high", "within_noise", "paired_seeds", "paired_samples"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for differences in noise.pairs:
        for d in differences:
            low, high = d.interval if d.interval is not None else (None, None)
            values = [d.a, d.b, d.metric, d.difference, low, high, d.within_noise, d.paired_seeds, d.paired_samples]
            writer.writerow([_csv_value(value) for value in values])
    return buffer.getvalue()
