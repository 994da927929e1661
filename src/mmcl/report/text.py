"""Terminal tables drawn with rich: the run's accuracy table (:func:`format_table`) and the one table
helper :mod:`mmcl.report.compare_text` also uses. Plain ASCII text without colour unless stdout is a
terminal (then bold headers, italic reference rows and a red notice)."""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence

from rich import box
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from mmcl.report.formatting import (
    INTERVAL_NOTE,
    LEGEND,
    REFERENCE_NOTE,
    duration,
    general_scores,
    matrix_rows,
    metric,
    metric_items,
    number,
    plus_minus,
    reference_rows,
    total_time,
    unfinished_notice,
)
from mmcl.results import Results
from mmcl.utils import mean_of_present

# Header rule and section rules of dashes, no edges: readable in logs and in any encoding.
RULES = box.Box("    \n    \n -- \n    \n -- \n -- \n    \n    \n", ascii=True)
MIN_WIDTH = 400  # the console's width at least (wider when a table or a line needs it)
UNBOUNDED = 1_000_000  # the width a table is measured in


def stdout_is_terminal() -> bool:
    """Whether ``sys.stdout`` is a terminal (colour and styles are used only then)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def text_table(columns: Sequence[str], sections: Sequence[Sequence[Sequence[str]]], left: int = 1,
               section_styles: Sequence[str] = ()) -> Table:  # fmt: skip
    """A table of ``columns`` whose first ``left`` columns are left-aligned (the others right-aligned) and
    whose row ``sections`` are separated by a rule; section ``i`` is drawn in ``section_styles[i]``."""
    table = Table(box=RULES, show_edge=False, pad_edge=False, header_style="bold")
    for index, name in enumerate(columns):
        table.add_column(name, justify="left" if index < left else "right", no_wrap=True)
    sections = [section for section in sections if section]
    for index, section in enumerate(sections):
        style = section_styles[index] if index < len(section_styles) else None
        for position, row in enumerate(section):
            table.add_row(*row, style=style, end_section=position == len(section) - 1 and index < len(sections) - 1)
    return table


def render_text(*parts: RenderableType | str | None, styles: dict[int, str] | None = None) -> str:
    """``parts`` (rich renderables, or strings printed as they are) one below the other, as text, each table
    closed by a rule; string part ``i`` in ``styles[i]`` on a terminal. None parts are left out."""
    terminal = stdout_is_terminal()
    buffer = io.StringIO()
    console = Console(
        file=buffer, width=MIN_WIDTH, force_terminal=terminal, no_color=not terminal,
        color_system="standard" if terminal else None, markup=False, highlight=False, emoji=False,
    )  # fmt: skip
    unbounded = console.options.update_width(UNBOUNDED)
    widths = [
        len(line) for part in parts if isinstance(part, str) for line in part.splitlines()
    ] + [Measurement.get(console, unbounded, part).maximum for part in parts if part is not None and not isinstance(part, str)]
    console.width = max([MIN_WIDTH, *widths])  # no table is squeezed, no line wrapped
    for index, part in enumerate(parts):
        if part is None:
            continue
        if isinstance(part, str):
            part = Text(part, style=(styles or {}).get(index, ""))
        start = buffer.tell()
        console.print(part, crop=False, overflow="ignore", soft_wrap=isinstance(part, Text))
        if isinstance(part, Table):  # closed by a rule as wide as the table
            width = max(Text.from_ansi(line).cell_len for line in buffer.getvalue()[start:].splitlines())
            console.print(Text("-" * width))
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())


def format_table(results: Results) -> str:
    """The accuracy matrix (rows = stages, plus reference rows), the metrics, the split of forgetting,
    the timing and the legend, as terminal text; an unfinished run's notice comes first."""
    tasks = results.task_names
    rows, refs = matrix_rows(results), reference_rows(results)
    general = general_scores(results)
    columns = ["stage", *tasks, "avg", *(["general"] if general is not None else [])]
    body = [
        [label, *map(number, row), number(mean_of_present(row)), *([number(general[i])] if general is not None else [])]
        for i, (label, row) in enumerate(rows)
    ]
    ref_body = [
        [f"{name}*", *map(number, row), number(mean_of_present(row)), *(["-"] if general is not None else [])]
        for name, row in refs
    ]
    table = text_table(columns, [body, ref_body], section_styles=["", "italic"])
    notice = unfinished_notice(results)
    intervals = results.metric_intervals
    metrics = "  ".join(
        f"{key} {metric(key, value)}{plus_minus(intervals.get(key)) if value is not None else ''}"
        for key, value in metric_items(results)
    )
    split = forgetting_split(results)
    split_line = None
    if split is not None:
        split_line = (
            f"forgetting on old tasks {number(split.get('total'))} = essential {number(split.get('essential'))}"
            f" + superficial {number(split.get('superficial'))} (points; see the report)"
        )
    timing = results.timing
    time_line = (
        f"time: train {duration(timing.train_seconds)}, evaluation {duration(timing.eval_seconds)}, "
        f"total {total_time(results)}"
    )
    legend = LEGEND + (f" {REFERENCE_NOTE}" if refs else "") + (f" {INTERVAL_NOTE}" if intervals else "")
    return render_text(
        f"{notice} (numbers are not final)" if notice else None, table, metrics, split_line, time_line, legend,
        styles={0: "bold red"},
    )


def forgetting_split(results: Results) -> dict | None:
    """The superficial probes' split of forgetting on old tasks (total, essential, superficial), if any."""
    summary = getattr(results.part("superficial"), "summary", None)
    split = summary.get("forgetting") if isinstance(summary, dict) else None
    return split if isinstance(split, dict) else None
