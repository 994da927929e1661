"""The comparison's table as cells (shared by the terminal text and ``comparison.html``), as text and as CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from mmcl.report.compare_runs import FIELDS, OPTIONAL_METRICS
from mmcl.report.formatting import SIGNED_METRICS, duration_unit, finite, size_unit
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
    with ``*_std`` columns)."""
    columns = ["kind", "label", "method", "n", "seeds", "run_dirs", "complete", "reference"]
    columns += [name for field in FIELDS for name in (field, f"{field}_std")]
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
