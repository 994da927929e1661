"""Turn a run's ``results`` dict (``<run_dir>/results.json``) into tables, plots and an HTML report.

Every function tolerates missing optional keys (``reference_rows``, ``general``, timing,
``extra_sections``, ...) and ``None`` entries in the accuracy matrix ("not evaluated").
Files are written atomically: a temporary file in the same folder, then :func:`os.replace`.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METRIC_EXPLANATIONS",
    "format_table",
    "write_matrix_csv",
    "plot_heatmap",
    "plot_accuracy_curves",
    "write_report",
]

Results = Mapping[str, Any]
Row = list[float | None]

METRIC_ORDER: tuple[str, ...] = ("ACC", "MFT", "MAA", "BWT", "Forgetting", "FWT")
SIGNED_METRICS: frozenset[str] = frozenset({"BWT", "FWT"})

METRIC_EXPLANATIONS: dict[str, str] = {
    "ACC": "Final average accuracy: mean over all tasks of the accuracy after the last training stage.",
    "MFT": "Mean fine-tuned accuracy: mean accuracy on each task right after learning it.",
    "MAA": "Mean average accuracy: mean over stages of the running average accuracy on the tasks seen so far.",
    "BWT": (
        "Backward transfer (GEM): mean of final minus just-learned accuracy over all but the last task; "
        "negative = forgetting."
    ),
    "Forgetting": (
        "Forgetting (Chaudhry et al. 2018): mean drop from the best earlier accuracy on a task "
        "to its final accuracy (over all but the last task)."
    ),
    "FWT": (
        "Forward transfer (GEM): accuracy on a task just before learning it minus the base model's "
        "accuracy on it, averaged over tasks 2..T."
    ),
    "low_shot_transfer": (
        "Low-shot transfer (CLiMB): mean gain on unseen tasks of few-shot fine-tuning from a trained stage "
        "over few-shot fine-tuning from the base model; positive = earlier tasks help learn new ones."
    ),
    "forgetting_essential": (
        "Essential forgetting (SEFE): drop of the share of answers with the right content on old tasks, "
        "from right after learning each to the final stage."
    ),
    "forgetting_superficial": (
        "Superficial forgetting (SEFE): the rest of the accuracy drop on old tasks, answers whose content "
        "survived but whose format drifted (BWT-style drop minus essential forgetting)."
    ),
    "general_drop": (
        "General-ability drop: score on the general set (held-out questions outside the stream) of the "
        "base model minus that after the last stage; positive = general ability lost."
    ),
}

LEGEND = (
    "R[t][i] = accuracy (%) on task i (column) after training stage t (row); "
    "row 'base' = model before any training; '-' = not evaluated; avg = mean of evaluated entries."
)


# --------------------------------------------------------------------------- helpers


def _num(value: Any) -> float | None:
    """Return ``value`` as a finite float, or ``None`` for null/NaN/non-numeric."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _tasks(results: Results) -> list[str]:
    """Task names; falls back to ``task1..taskN`` from the matrix width."""
    tasks = results.get("tasks")
    if tasks:
        return [str(t) for t in tasks]
    matrix = results.get("matrix") or []
    width = max((len(r) for r in matrix if isinstance(r, Sequence)), default=0)
    return [f"task{i + 1}" for i in range(width)]


def _fit_row(row: Any, n: int) -> Row:
    """Coerce a matrix row to exactly ``n`` optional floats (pad with ``None``, truncate)."""
    values = [_num(v) for v in row] if isinstance(row, Sequence) and not isinstance(row, str) else []
    return (values + [None] * n)[:n]


def _matrix_rows(results: Results) -> list[tuple[str, Row]]:
    """``(label, row)`` pairs for the main matrix (row 0 = base, row t = after stage t)."""
    tasks = _tasks(results)
    matrix = results.get("matrix") or []
    labels = list(results.get("row_labels") or [])
    out: list[tuple[str, Row]] = []
    for i, row in enumerate(matrix):
        if i < len(labels):
            label = str(labels[i])
        elif i == 0:
            label = "base"
        elif i - 1 < len(tasks):
            label = tasks[i - 1]
        else:
            label = f"stage{i}"
        out.append((label, _fit_row(row, len(tasks))))
    return out


def _reference_rows(results: Results) -> list[tuple[str, Row]]:
    """``(name, row)`` pairs for the optional reference rows (e.g. a joint/multitask model)."""
    refs = results.get("reference_rows") or {}
    if not isinstance(refs, Mapping):
        return []
    n = len(_tasks(results))
    return [(str(name), _fit_row(row, n)) for name, row in refs.items()]


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the non-null entries, ``None`` if there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _general_scores(results: Results, n_rows: int) -> Row | None:
    """Per-row general-capability scores, or ``None`` when absent."""
    general = results.get("general")
    if not isinstance(general, Mapping):
        return None
    scores = general.get("scores")
    if not isinstance(scores, Sequence) or isinstance(scores, str) or not scores:
        return None
    return _fit_row(scores, n_rows)


def _fmt(value: float | None, signed: bool = False, null: str = "-") -> str:
    """One-decimal format, ``null`` for missing values."""
    if value is None:
        return null
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _fmt_seconds(value: Any) -> str:
    """Human-readable duration."""
    s = _num(value)
    if s is None:
        return "n/a"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _metric_items(results: Results) -> list[tuple[str, float | None]]:
    """Metrics in canonical order, followed by any extra metrics in their stored order."""
    metrics = results.get("metrics") or {}
    if not isinstance(metrics, Mapping):
        metrics = {}
    keys = list(METRIC_ORDER) + [str(k) for k in metrics if k not in METRIC_ORDER]
    return [(k, _num(metrics.get(k))) for k in keys]


def _running_average(rows: list[tuple[str, Row]]) -> Row:
    """Per row t: mean accuracy over the tasks seen so far (the first t tasks); ``None`` for base."""
    out: Row = []
    for t, (_, row) in enumerate(rows):
        out.append(_mean(row[:t]) if t > 0 else None)
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with mode 0o666 honours the umask (mkstemp would force 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def _title(results: Results) -> str:
    """``"<method> on <stream>"`` with fallbacks."""
    return f"{results.get('method') or 'unknown method'} on {results.get('stream') or 'unknown stream'}"


def unfinished_notice(results: Results) -> str | None:
    """``"UNFINISHED run: N of M stages, K of L evaluations"`` when ``results`` says the run is not
    complete, else ``None``."""
    if results.get("complete") is not False:
        return None
    progress = results.get("progress")
    if not isinstance(progress, Mapping):
        return "UNFINISHED run"
    return (
        f"UNFINISHED run: {progress.get('stages_done')} of {progress.get('stages_planned')} stages, "
        f"{progress.get('evaluations_done')} of {progress.get('evaluations_planned')} evaluations"
    )


# --------------------------------------------------------------------------- text / csv


def format_table(results: Results) -> str:
    """Plain-text accuracy table, metrics line and legend, for the terminal."""
    tasks = _tasks(results)
    rows = _matrix_rows(results)
    refs = _reference_rows(results)
    general = _general_scores(results, len(rows))

    header = ["stage", *tasks, "avg"] + (["general"] if general is not None else [])
    body: list[list[str]] = []
    for i, (label, row) in enumerate(rows):
        cells = [label, *(_fmt(v) for v in row), _fmt(_mean(row))]
        if general is not None:
            cells.append(_fmt(general[i]))
        body.append(cells)
    ref_body: list[list[str]] = []
    for name, row in refs:
        cells = [f"{name}*", *(_fmt(v) for v in row), _fmt(_mean(row))]
        if general is not None:
            cells.append("-")
        ref_body.append(cells)

    widths = [max(len(r[c]) for r in [header, *body, *ref_body]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(line(header))
    notice = unfinished_notice(results)
    out = [f"{notice} (numbers are not final)"] if notice else []
    out += [line(header), rule, *(line(r) for r in body)]
    if ref_body:
        out.append(rule)
        out.extend(line(r) for r in ref_body)
    out.append(rule)
    out.append(
        "  ".join(f"{k} {_fmt(v, signed=k in SIGNED_METRICS, null='n/a')}" for k, v in _metric_items(results))
    )
    split = _forgetting_split(results)
    if split is not None:
        out.append(
            f"forgetting on old tasks {_fmt(split['total'])} = essential {_fmt(split['essential'])}"
            f" + superficial {_fmt(split['superficial'])} (points; see the report)"
        )
    legend = LEGEND
    if ref_body:
        legend += " * = reference row (not part of the sequence)."
    out.append(legend)
    return "\n".join(out)


def _forgetting_split(results: Results) -> Mapping[str, Any] | None:
    superficial = results.get("superficial")
    summary = superficial.get("summary") if isinstance(superficial, Mapping) else None
    return summary.get("forgetting") if isinstance(summary, Mapping) else None


def _low_shot_html(results: Results, matrix: Sequence[Sequence[float | None]]) -> str:
    """Scores on each unseen task after few-shot fine-tuning from each stage (row = stage)."""
    tasks = _tasks(results)
    labels = [label for label, _ in _matrix_rows(results)]
    head = "".join(f"<th>{_e(task)}</th>" for task in tasks)
    rows = "".join(
        f"<tr><td>{_e(label)}</td>" + "".join(_num_cell(_num(value)) for value in row) + "</tr>"
        for label, row in zip(labels, matrix)
    )
    return (
        "<p>Each cell: score on a task not yet trained after fine-tuning the model of that stage on a few of "
        "the task's training samples (the stage's state is restored afterwards).</p>"
        f"<table><tr><th>fine-tuned from</th>{head}</tr>{rows}</table>"
    )


def _superficial_html(results: Results) -> str:
    """Format vs content of the answers to old tasks, after learning each and after the last stage."""
    superficial = results.get("superficial")
    summary = superficial.get("summary") if isinstance(superficial, Mapping) else None
    if not isinstance(summary, Mapping):
        return ""
    columns = [("accuracy", "task score"), ("format", "format ok"), ("content", "content ok"), ("right", "both ok"),
               ("probe_format", "format ok"), ("probe_content", "content ok")]  # fmt: skip
    head = "".join(f"<th>{_e(title)}</th>" for _, title in columns)
    rows = ""
    for key, label in (("after_learning", "right after learning the task"), ("final", "after the last stage")):
        entry = summary.get(key) or {}
        rows += f"<tr><td>{_e(label)}</td>" + "".join(_num_cell(entry.get(k)) for k, _ in columns) + "</tr>"
    split = summary.get("forgetting") or {}
    tasks = _tasks(results)
    names = ", ".join(_e(tasks[j]) for j in summary.get("tasks", []) if j < len(tasks))
    return (
        f"<p>Old tasks ({names}), mean %. Own format: the task's test questions as trained. Other format: the same "
        "questions asked in another answer style (open question as multiple choice, multiple choice as an open "
        "question, yes/no question answered with a brief explanation). Format and content are judged "
        "separately by one lenient judge (rules in <code>mmcl.evaluation.superficial</code>); the split below "
        "uses only its judgements, the task score is the accuracy matrix's.</p>"
        '<table><tr><th></th><th colspan="4">own format</th><th colspan="2">other format</th></tr>'
        f"<tr><th>when</th>{head}</tr>{rows}</table>"
        f"<p>Forgetting of right answers (both ok) {_e(_fmt(_num(split.get('total'))))} points = essential (content lost) "
        f"{_e(_fmt(_num(split.get('essential'))))} + superficial (right content, wrong format) "
        f"{_e(_fmt(_num(split.get('superficial'))))}. Answers in the asked format fell by "
        f"{_e(_fmt(_num(summary.get('format_drift'))))} points; among the answers still in that format, "
        f"the share right went from {_e(_fmt(_num((summary.get('after_learning') or {}).get('right_given_format'))))}% "
        f"to {_e(_fmt(_num((summary.get('final') or {}).get('right_given_format'))))}%.</p>"
    )


def write_matrix_csv(results: Results, path: Path | str) -> Path:
    """Write the accuracy matrix as CSV (``stage,<tasks...>``; reference rows as ``ref:<name>``)."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["stage", *_tasks(results)])
    for label, row in _matrix_rows(results):
        writer.writerow([label, *("" if v is None else repr(round(v, 4)) for v in row)])
    for name, row in _reference_rows(results):
        writer.writerow([f"ref:{name}", *("" if v is None else repr(round(v, 4)) for v in row)])
    _atomic_write_text(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Any:
    """A pyplot-free Agg figure (no global state, safe in threads and headless runs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig: Any) -> bytes:
    """Render ``fig`` to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _heatmap_png(results: Results) -> bytes:
    """Render the heatmap to PNG bytes."""
    import numpy as np
    from matplotlib import colormaps

    tasks = _tasks(results)
    rows = _matrix_rows(results)
    refs = _reference_rows(results)
    labels = [label for label, _ in rows] + [f"{name} (ref)" for name, _ in refs]
    data = [row for _, row in rows] + [row for _, row in refs]
    n_rows, n_cols = max(len(data), 1), max(len(tasks), 1)
    arr = np.full((n_rows, n_cols), np.nan)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if v is not None:
                arr[i, j] = v

    width = min(max(6.0, 1.6 + 0.75 * n_cols), 14.0)
    height = min(max(4.0, 1.4 + 0.4 * n_rows), 10.0)
    fig = _new_figure(width, height)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, vmin=0.0, vmax=100.0, aspect="auto")
    fig.colorbar(im, ax=ax, label="accuracy (%)", fraction=0.046, pad=0.04)

    fontsize = 9 if n_cols <= 8 else 7
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            v = arr[i, j]
            if np.isnan(v):
                continue
            r, g, b, _ = cmap(min(max(v / 100.0, 0.0), 1.0))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color=color, fontsize=fontsize)

    ax.set_xticks(range(len(tasks)), tasks, rotation=30 if n_cols > 6 else 0, ha="right" if n_cols > 6 else "center")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training stage")
    if refs and rows:
        ax.axhline(len(rows) - 0.5, color="white", linewidth=3)
    ax.set_title(_title(results), fontsize=11)
    fig.tight_layout()
    return _png_bytes(fig)


def plot_heatmap(results: Results, path: Path | str) -> Path:
    """Write a PNG heatmap of the accuracy matrix (stages x tasks, 0..100, nulls grey)."""
    path = Path(path)
    _atomic_write_bytes(path, _heatmap_png(results))
    return path


def _curves_png(results: Results) -> bytes:
    """Render the per-task accuracy curves to PNG bytes."""
    tasks = _tasks(results)
    rows = _matrix_rows(results)
    refs = _reference_rows(results)
    labels = [label for label, _ in rows]
    x = list(range(len(rows)))
    nan = float("nan")

    width = min(max(6.0, 1.5 + 0.6 * len(rows)), 14.0)
    fig = _new_figure(width, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    colors = _palette(len(tasks))
    for j, task in enumerate(tasks):
        ys = [nan if row[j] is None else row[j] for _, row in rows]
        ax.plot(x, ys, marker="o", markersize=4, linewidth=1.5, color=colors[j], label=task)
    avg = [nan if v is None else v for v in _running_average(rows)]
    ax.plot(x, avg, color="black", linestyle="--", linewidth=2.2, marker="s", markersize=4, label="avg (seen tasks)")
    for k, (name, row) in enumerate(refs):
        m = _mean(row)
        if m is not None:
            ax.axhline(m, color="grey", linestyle=":", linewidth=1.2 + 0.3 * k, label=f"{name} avg (ref)")

    ax.set_xticks(x, labels, rotation=30 if len(rows) > 8 else 0)
    ax.set_xlim(-0.3, max(len(rows) - 1, 0) + 0.3)
    ax.set_ylim(0, 102)
    ax.set_xlabel("after training stage")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.set_title(_title(results), fontsize=11)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return _png_bytes(fig)


def _palette(n: int) -> list[Any]:
    """``n`` distinguishable colours."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_accuracy_curves(results: Results, path: Path | str) -> Path:
    """Write a PNG line plot: per-task accuracy across stages plus the running average over seen tasks."""
    path = Path(path)
    _atomic_write_bytes(path, _curves_png(results))
    return path


# --------------------------------------------------------------------------- html


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 4px 9px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.ref td, tr.ref th { font-style: italic; border-top: 2px solid #888; }
td.null { background: #eee; color: #999; text-align: center; }
th { background: #f4f4f4; text-align: left; }
.muted { color: #666; font-size: 0.9em; }
.unfinished { background: #fde8e8; border: 1px solid #e0a0a0; padding: 6px 10px; color: #8a1f1f; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _e(value: Any) -> str:
    """HTML-escape ``str(value)``."""
    return html.escape(str(value), quote=True)


def _tint(value: float) -> str:
    """Background colour for an accuracy: red (0) -> yellow (50) -> green (100), light."""
    hue = 120.0 * min(max(value, 0.0), 100.0) / 100.0
    return f"hsl({hue:.0f}, 65%, 82%)"


def _num_cell(value: float | None, tint: bool = True) -> str:
    """One ``<td>`` with the value (tinted) or a null marker."""
    if value is None:
        return '<td class="null">-</td>'
    style = f' style="background:{_tint(value)}"' if tint else ""
    return f'<td class="num"{style}>{value:.1f}</td>'


def _matrix_html(results: Results) -> str:
    """The accuracy matrix as an HTML table."""
    tasks = _tasks(results)
    rows = _matrix_rows(results)
    refs = _reference_rows(results)
    general = _general_scores(results, len(rows))
    head = "".join(f"<th>{_e(t)}</th>" for t in tasks) + "<th>avg</th>"
    if general is not None:
        head += "<th>general</th>"
    lines = [f"<table><thead><tr><th>stage</th>{head}</tr></thead><tbody>"]
    for i, (label, row) in enumerate(rows):
        cells = "".join(_num_cell(v) for v in row) + _num_cell(_mean(row))
        if general is not None:
            cells += _num_cell(general[i])
        lines.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    for k, (name, row) in enumerate(refs):
        cells = "".join(_num_cell(v) for v in row) + _num_cell(_mean(row))
        if general is not None:
            cells += _num_cell(None)
        cls = ' class="ref"' if k == 0 else ""
        lines.append(f"<tr{cls}><th>{_e(name)} (ref)</th>{cells}</tr>")
    lines.append("</tbody></table>")
    lines.append(f'<p class="muted">{_e(LEGEND)}</p>')
    return "\n".join(lines)


def _metrics_html(results: Results) -> str:
    """Metrics table with a one-line explanation per metric."""
    lines = ["<table><thead><tr><th>metric</th><th>value</th><th>meaning</th></tr></thead><tbody>"]
    for key, value in _metric_items(results):
        shown = _fmt(value, signed=key in SIGNED_METRICS, null="n/a")
        lines.append(
            f'<tr><th>{_e(key)}</th><td class="num">{_e(shown)}</td>'
            f"<td>{_e(METRIC_EXPLANATIONS.get(key, ''))}</td></tr>"
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _kv_table(items: Sequence[tuple[str, Any]]) -> str:
    """Two-column key/value table."""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    return f"<table><tbody>{rows}</tbody></table>"


def _facts_html(results: Results) -> str:
    """Run facts, timing and software versions."""
    params = results.get("trainable_parameters")
    params_s = f"{params:,}" if isinstance(params, int) and not isinstance(params, bool) else (params or "n/a")
    facts: list[tuple[str, Any]] = [
        ("name", results.get("name") or "n/a"),
        ("method", results.get("method") or "n/a"),
        ("stream", results.get("stream") or "n/a"),
        ("backbone", results.get("backbone") or "n/a"),
        ("seed", results.get("seed") if results.get("seed") is not None else "n/a"),
        ("trainable parameters", params_s),
        ("total time", _fmt_seconds(results.get("total_seconds"))),
        ("evaluation time", _fmt_seconds(results.get("eval_seconds"))),
        ("config hash", results.get("config_hash") or "n/a"),
        ("git commit", results.get("git_commit") or "n/a"),
    ]
    parts = [_kv_table(facts)]
    stage_seconds = results.get("stage_seconds")
    if isinstance(stage_seconds, Mapping) and stage_seconds:
        parts.append("<h3>Training time per stage</h3>")
        parts.append(_kv_table([(str(k), _fmt_seconds(v)) for k, v in stage_seconds.items()]))
    versions = results.get("versions")
    if isinstance(versions, Mapping) and versions:
        parts.append("<h3>Versions</h3>")
        parts.append(_kv_table([(str(k), v if v is not None else "n/a") for k, v in versions.items()]))
    return "\n".join(parts)


def _tasks_html(results: Results) -> str:
    """Task list with descriptions and scorers."""
    descriptions = results.get("task_descriptions") or {}
    scorers = results.get("scorers") or {}
    if not isinstance(descriptions, Mapping):
        descriptions = {}
    if not isinstance(scorers, Mapping):
        scorers = {}
    lines = ["<table><thead><tr><th>#</th><th>task</th><th>scorer</th><th>description</th></tr></thead><tbody>"]
    for i, task in enumerate(_tasks(results), start=1):
        lines.append(
            f"<tr><td>{i}</td><th>{_e(task)}</th><td><code>{_e(scorers.get(task, 'n/a'))}</code></td>"
            f"<td>{_e(descriptions.get(task, ''))}</td></tr>"
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _img(png: bytes, alt: str) -> str:
    """An ``<img>`` tag embedding ``png`` as base64."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _render_html(results: Results, heatmap_png: bytes, curves_png: bytes) -> str:
    """Assemble the self-contained HTML report."""
    title = f"mmcl report: {_title(results)}"
    name = results.get("name")
    sub = ", ".join(
        f"{k} {_e(results.get(k))}" for k in ("backbone", "seed") if results.get(k) is not None
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    notice = unfinished_notice(results)
    if notice:
        parts.append(f'<p class="unfinished"><strong>{_e(notice)}</strong>: the numbers below are not final.</p>')
    if name or sub:
        run = f"run <code>{_e(name)}</code>" if name else ""
        parts.append(f'<p class="muted">{run}{"; " if run and sub else ""}{sub}</p>')
    parts += [
        "<h2>Metrics</h2>",
        _metrics_html(results),
        "<h2>Accuracy matrix</h2>",
        _matrix_html(results),
        _img(heatmap_png, "accuracy matrix heatmap"),
        "<h2>Accuracy across stages</h2>",
        _img(curves_png, "per-task accuracy curves"),
        "<h2>Tasks</h2>",
        _tasks_html(results),
        "<h2>Run</h2>",
        _facts_html(results),
    ]
    low_shot = results.get("low_shot")
    if isinstance(low_shot, Mapping) and isinstance(low_shot.get("matrix"), Sequence):
        parts += ["<h2>Low-shot transfer (CLiMB)</h2>", _low_shot_html(results, low_shot["matrix"])]
    superficial = _superficial_html(results)
    if superficial:
        parts += ["<h2>Superficial and essential forgetting</h2>", superficial]
    extra = results.get("extra_sections") or []
    if isinstance(extra, Sequence) and not isinstance(extra, str):
        for section in extra:
            if not isinstance(section, Mapping):
                continue
            parts.append(f"<h2>{_e(section.get('title') or 'Details')}</h2>")
            parts.append(str(section.get("html") or ""))  # method-provided HTML, inserted as-is
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: Path | str, results: Results) -> Path:
    """Write ``matrix.csv``, ``heatmap.png``, ``curves.png`` and ``report.html`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_matrix_csv(results, run_dir / "matrix.csv")
    heatmap = _heatmap_png(results)
    curves = _curves_png(results)
    _atomic_write_bytes(run_dir / "heatmap.png", heatmap)
    _atomic_write_bytes(run_dir / "curves.png", curves)
    html_path = run_dir / "report.html"
    _atomic_write_text(html_path, _render_html(results, heatmap, curves))
    return html_path
