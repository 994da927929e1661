"""Compare several runs of the same stream: a methods x metrics table, a CSV and one PNG.

A run is read from ``<run_dir>/results.json`` when present, otherwise rebuilt with
:func:`mmcl.runner.collect_results`. Runs of one method that differ only in their seed are
grouped by :func:`aggregate_by_method` (mean and sample standard deviation over seeds).
Only runs of the same stream and task list can be compared; anything else raises
:class:`mmcl.errors.RunDirError` with a one-line message.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mmcl.errors import RunDirError
from mmcl.report.render import (
    METRIC_ORDER,
    SIGNED_METRICS,
    _atomic_write_bytes,
    _atomic_write_text,
    _new_figure,
    _num,
    _palette,
    _png_bytes,
)

__all__ = [
    "load_run",
    "check_comparable",
    "comparison_rows",
    "aggregate_by_method",
    "format_comparison",
    "plot_comparison",
    "write_comparison",
]

Run = Mapping[str, Any]

# Numeric per-run fields besides the metrics, in table order.
EXTRA_FIELDS: tuple[str, ...] = ("trainable_parameters", "stored_bytes_per_task", "train_seconds", "eval_seconds")
# Metrics only some runs have (shown when any compared run has them).
OPTIONAL_METRICS: tuple[str, ...] = (
    "general_drop", "forgetting_essential", "forgetting_superficial", "low_shot_transfer", "T_K", "T_F",
)  # fmt: skip
FIELDS: tuple[str, ...] = (*METRIC_ORDER, *OPTIONAL_METRICS, *EXTRA_FIELDS)

# Config keys that do not change what a run computes (where it is written, progress output,
# evaluation batching) or that are the replicate axis itself; ignored when grouping runs.
_IGNORED_CONFIG_KEYS = frozenset(
    {
        "fingerprint",
        "name",
        "output_dir",
        "seed",
        "stream.cache_dir",
        "backbone.device",
        "training.progress_bar",
        "training.logging_steps",
        "evaluation.batch_size",
        "evaluation.superficial",
    }
)

JOINT_METHOD = "joint"

# Longest config difference spelled out in a group label, e.g. "seq-lora [lora.rank=16]".
_MAX_DIFF_KEYS = 2
_MAX_DIFF_CHARS = 48
_MAX_LEGEND_CHARS = 60
_MAX_BAR_LABELS = 24  # more bars than this: no value labels on them


# --------------------------------------------------------------------------- loading


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _stored_bytes(run_dir: Path) -> tuple[float | None, int | None]:
    """(mean size of ``state.safetensors`` over finished stages, size of the last finished stage's file).

    A stage is finished when its final folder ``stages/<k>_<label>/`` holds ``stage.json``
    (the runner trains in ``.tmp_<k>_<label>`` and renames the folder only when done).
    """
    stages = run_dir / "stages"
    if not stages.is_dir():
        return None, None
    found: list[tuple[int, str, int]] = []
    for folder in stages.iterdir():
        if not folder.is_dir() or folder.name.startswith(".") or not (folder / "stage.json").is_file():
            continue
        weights = folder / "state.safetensors"
        if not weights.is_file():
            continue
        index, _, _ = folder.name.partition("_")
        order = int(index) if index.isdigit() else 1 << 30
        found.append((order, folder.name, weights.stat().st_size))
    if not found:
        return None, None
    found.sort()
    sizes = [size for _, _, size in found]
    return sum(sizes) / len(sizes), sizes[-1]


def _read_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def load_run(run_dir: Path | str) -> dict[str, Any]:
    """The results dict of a run plus ``run_dir``, ``config`` and stored-state sizes.

    Reads ``results.json`` if present, else rebuilds it with ``collect_results``. Adds
    ``stored_bytes_per_task`` (mean size in bytes of ``state.safetensors`` over the finished
    stages, computed from the files), ``stored_bytes_final`` (the last finished stage's file),
    ``config`` (``config.yaml`` as a dict, or ``None``) and ``run_dir`` (as given, a string).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a run directory (no such directory)")
    results_file = run_dir / "results.json"
    has_plan = (run_dir / "run.json").is_file()
    results: Any = None
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            if not has_plan:
                raise RunDirError(f"{results_file}: unreadable results ({_one_line(exc)})") from exc
            results = None  # rebuild from the run dir below
    if results is None:
        if not has_plan:
            raise RunDirError(f"{run_dir}: not a run directory (no run.json or results.json)")
        from mmcl.results import collect_results

        try:
            results = collect_results(run_dir)
        except RunDirError:
            raise
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError, yaml.YAMLError) as exc:
            raise RunDirError(f"{run_dir}: unreadable run ({type(exc).__name__}: {_one_line(exc)})") from exc
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), list) or not isinstance(
        results.get("matrix"), list
    ):
        raise RunDirError(f"{run_dir}: results.json lacks 'tasks' or 'matrix'; rebuild it with `mmcl report {run_dir}`")
    run = dict(results)
    per_task, final = _stored_bytes(run_dir)
    run["stored_bytes_per_task"] = per_task
    run["stored_bytes_final"] = final
    run["config"] = _read_config(run_dir)
    run["run_dir"] = str(run_dir)
    return run


# --------------------------------------------------------------------------- checks and grouping


def _describe(run: Run) -> str:
    tasks = ",".join(str(t) for t in run.get("tasks") or [])
    return f"{run.get('run_dir', '?')} (stream {run.get('stream') or '?'}, tasks {tasks})"


def check_comparable(runs: Sequence[Run]) -> None:
    """Refuse an empty list and runs of different streams or task lists."""
    if not runs:
        raise RunDirError("compare: no run directories given")
    first = runs[0]
    for run in runs[1:]:
        if run.get("stream") != first.get("stream") or list(run.get("tasks") or []) != list(first.get("tasks") or []):
            raise RunDirError(
                f"{_describe(first)} and {_describe(run)} are runs of different streams/task lists; "
                "compare only runs of the same stream"
            )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _variant(run: Run) -> dict[str, Any]:
    """The run's config without seed, paths and other keys that do not change results; keys a run
    made by an older mmcl lacks count as their defaults."""
    from mmcl.config import ExperimentConfig

    config = run.get("config")
    if not isinstance(config, Mapping):
        return {}
    flat = {**_flatten(ExperimentConfig().to_dict()), **_flatten(config)}
    return {k: v for k, v in flat.items() if k not in _IGNORED_CONFIG_KEYS}


def _variant_key(run: Run) -> str:
    return json.dumps(_variant(run), sort_keys=True, default=str)


def _method(run: Run) -> str:
    return str(run.get("method") or "unknown")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _groups(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    """Runs grouped by (method, config without seed), in order of first appearance, with a label each.

    The label is the method name; when one method comes in several configurations, the config
    keys that tell them apart are appended, e.g. ``seq-lora [lora.rank=16]``.
    """
    keyed: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        keyed.setdefault((_method(run), _variant_key(run)), []).append(run)
    variants_per_method: dict[str, list[tuple[str, str]]] = {}
    for key in keyed:
        variants_per_method.setdefault(key[0], []).append(key)
    out: list[tuple[str, list[Run]]] = []
    for key, members in keyed.items():
        method = key[0]
        siblings = variants_per_method[method]
        label = method
        if len(siblings) > 1:
            flats = [_variant(keyed[k][0]) for k in siblings]
            keys = sorted({k for flat in flats for k in flat})
            differing = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]
            mine = _variant(members[0])
            diff = ", ".join(f"{k}={_short(mine.get(k))}" for k in differing)
            if differing and len(differing) <= _MAX_DIFF_KEYS and len(diff) <= _MAX_DIFF_CHARS:
                label += f" [{diff}]"
            else:  # too many differences to spell out: name the group by its (first) run dir
                dirs = [str(keyed[k][0].get("run_dir") or f"#{i + 1}") for i, k in enumerate(siblings)]
                name = _unique_suffixes(dirs)[siblings.index(key)]
                more = f" and {len(members) - 1} more" if len(members) > 1 else ""
                label += f" ({name}{more})"
        out.append((label, members))
    return out


def _unique_suffixes(paths: Sequence[str]) -> list[str]:
    """Shortest trailing path parts that tell ``paths`` apart (``run`` vs ``a/run`` and ``b/run``)."""
    parts = [Path(p).parts or (p,) for p in paths]
    longest = max((len(p) for p in parts), default=1)
    for depth in range(1, longest + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def _run_labels(runs: Sequence[Run]) -> list[str]:
    """Method name, plus ``seed=N`` (or the dir name) when several runs share the method."""
    labels = [_method(run) for run in runs]
    by_method: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        by_method.setdefault(_method(run), []).append(i)
    for method, indices in by_method.items():
        if len(indices) < 2:
            continue
        seeds = [runs[i].get("seed") for i in indices]
        same_config = len({_variant_key(runs[i]) for i in indices}) == 1
        if same_config and None not in seeds and len(set(map(str, seeds))) == len(seeds):
            for i, seed in zip(indices, seeds):
                labels[i] = f"{method} seed={seed}"
        else:
            names = _unique_suffixes([str(runs[i].get("run_dir") or f"run{i}") for i in indices])
            for i, name in zip(indices, names):
                labels[i] = f"{method} ({name})"
    return labels


# --------------------------------------------------------------------------- rows


def _train_seconds(run: Run) -> float | None:
    value = _num(run.get("train_seconds"))
    if value is not None:
        return value
    stage_seconds = run.get("stage_seconds")
    if isinstance(stage_seconds, Mapping) and stage_seconds:
        values = [_num(v) for v in stage_seconds.values()]
        if all(v is not None for v in values):
            return sum(v for v in values if v is not None)
    return None


def _field_values(run: Run) -> dict[str, float | None]:
    metrics = run.get("metrics")
    metrics = metrics if isinstance(metrics, Mapping) else {}
    values: dict[str, float | None] = {k: _num(metrics.get(k)) for k in (*METRIC_ORDER, *OPTIONAL_METRICS)}
    values["trainable_parameters"] = _num(run.get("trainable_parameters"))
    values["stored_bytes_per_task"] = _num(run.get("stored_bytes_per_task"))
    values["train_seconds"] = _train_seconds(run)
    values["eval_seconds"] = _num(run.get("eval_seconds"))
    return values


def _complete(run: Run) -> bool:
    return run.get("complete") is not False


def comparison_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run: ``label``, ``method``, ``seed``, ``run_dir``, ``complete``, ``n`` (1),
    ``aggregated`` (False), the metrics ``ACC``..``FWT`` and ``trainable_parameters``,
    ``stored_bytes_per_task``, ``train_seconds``, ``eval_seconds`` (numbers or ``None``)."""
    check_comparable(runs)
    rows = []
    for run, label in zip(runs, _run_labels(runs)):
        row: dict[str, Any] = {
            "label": label,
            "method": _method(run),
            "seed": run.get("seed"),
            "run_dir": run.get("run_dir"),
            "complete": _complete(run),
            "n": 1,
            "aggregated": False,
        }
        row.update(_field_values(run))
        rows.append(row)
    return rows


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (n-1; 0 for one value); ``(None, None)`` if any value is missing."""
    if not values or any(v is None for v in values):
        return None, None
    present = [float(v) for v in values if v is not None]
    mean = sum(present) / len(present)
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return mean, std


def aggregate_by_method(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per method (and configuration) with mean and std over its runs (seeds).

    Keys: ``label``, ``method``, ``n``, ``seeds``, ``run_dirs``, ``complete`` (all runs),
    ``aggregated`` (True), and for every field of :func:`comparison_rows` the mean under its
    name and the sample standard deviation (n-1; 0.0 for a single run) under ``<field>_std``.
    A field is ``None`` when any run of the group lacks it (e.g. an unfinished run).
    """
    check_comparable(runs)
    rows = []
    for label, members in _groups(runs):
        row: dict[str, Any] = {
            "label": label,
            "method": _method(members[0]),
            "n": len(members),
            "seeds": [run.get("seed") for run in members],
            "run_dirs": [run.get("run_dir") for run in members],
            "complete": all(_complete(run) for run in members),
            "aggregated": True,
        }
        per_run = [_field_values(run) for run in members]
        for name in FIELDS:
            mean, std = _mean_std([values[name] for values in per_run])
            row[name] = mean
            row[f"{name}_std"] = std
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- text


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _duration_unit(seconds: float) -> tuple[str, float]:
    if abs(seconds) < 60:
        return "s", 1.0
    if abs(seconds) < 3600:
        return "min", 60.0
    return "h", 3600.0


def _fmt_cell(name: str, value: float | None, std: float | None, aggregated: bool) -> str:
    """Display one field; ``mean±std`` for aggregated rows (counts and sizes only when they vary)."""
    if value is None:
        return "n/a"
    show_std = aggregated and std is not None
    if name == "trainable_parameters":
        text = f"{int(round(value)):,}"
        return text + (f"±{std:,.0f}" if show_std and std else "")
    if name == "stored_bytes_per_task":
        text = _fmt_bytes(value)
        if show_std and std:
            number, _, unit = text.partition(" ")
            scale = {"GB": 1e9, "MB": 1e6, "KB": 1e3}.get(unit, 1.0)
            digits = 0 if unit == "B" else 1
            text = f"{number}±{std / scale:.{digits}f} {unit}"
        return text
    if name in ("train_seconds", "eval_seconds"):
        unit, scale = _duration_unit(value)
        digits = 2 if unit == "h" else 1
        text = f"{value / scale:.{digits}f}"
        if show_std:
            text += f"±{std / scale:.{digits}f}"
        return f"{text} {unit}"
    text = f"{value:+.1f}" if name in SIGNED_METRICS else f"{value:.1f}"
    return text + (f"±{std:.1f}" if show_std else "")


_HEADERS: dict[str, str] = {
    "general_drop": "gen.drop",
    "forgetting_essential": "F.essential",
    "forgetting_superficial": "F.superficial",
    "low_shot_transfer": "low-shot",
    "trainable_parameters": "trainable",
    "stored_bytes_per_task": "stored/task",
    "train_seconds": "train time",
    "eval_seconds": "eval time",
}

FOOTNOTE = (
    "Accuracies in %; BWT/FWT signed (negative BWT = forgetting). trainable = trainable parameters; "
    "stored/task = mean size of state.safetensors per finished stage; times = wall clock "
    "(train: sum over stages; eval: sum over evaluations)."
)


OPTIONAL_NOTES = {
    "general_drop": " gen.drop = general-ability score lost from base to final stage.",
    "forgetting_essential": " F.essential/F.superficial = forgetting on old tasks split into content lost and right content in the wrong format.",
    "low_shot_transfer": " low-shot = CLiMB low-shot transfer (gain over few-shot tuning from the base model).",
    "T_K": " T_K = CLiMB knowledge transfer vs the compared experts run (single-task), mean over tasks.",
    "T_F": " T_F = CLiMB forgetting (% of the learned margin over chance lost by the end), mean over old tasks.",
}


def with_climb_metrics(runs: Sequence[Run]) -> list[Run]:
    """Runs with CLiMB's metrics (Srinivasan et al. 2022) in their metrics: forgetting ``T_F`` (mean over
    the tasks before the last of T_F(j <- T)) as results.json holds it, and knowledge transfer ``T_K``
    (mean over tasks) when an ``experts`` run of the same tasks is among them (single-task scores S_ST =
    its diagonal, averaged over its seeds). Both are normalised by each task's chance score S_rand from
    results.json (``chance``); a run that records none (made before chance scores) gets neither."""
    from mmcl.evaluation.metrics import climb_average_forgetting, climb_knowledge_transfer

    def chance(run: Run) -> list[float | None]:
        recorded = run.get("chance") or {}
        return [_num(recorded.get(task)) for task in run.get("tasks") or []]

    def diagonal(run: Run) -> list[float | None]:
        matrix, size = run.get("matrix") or [], len(run.get("tasks") or [])
        return [_num(matrix[i + 1][i]) if len(matrix) > i + 1 else None for i in range(size)]

    experts = [run for run in runs if _method(run) == "experts" and _complete(run)]
    tasks = list(experts[0].get("tasks") or []) if experts else []
    single = [_present_mean([diagonal(run)[i] for run in experts]) for i in range(len(tasks))]
    expert_chance = chance(experts[0]) if experts else []
    out = []
    for run in runs:
        run, metrics = dict(run), dict(run.get("metrics") or {})
        matrix, size = run.get("matrix") or [], len(run.get("tasks") or [])
        if _is_joint(run) or not _complete(run) or len(matrix) != size + 1:
            out.append(run)
            continue
        floor = chance(run)
        if "T_F" not in metrics and size > 1 and floor and None not in floor:
            metrics["T_F"] = climb_average_forgetting(matrix, floor)
        if experts and list(run.get("tasks") or []) == tasks and None not in single and expert_chance and None not in expert_chance:
            values = [climb_knowledge_transfer(d, s, c) for d, s, c in zip(diagonal(run), single, expert_chance) if d is not None]
            metrics["T_K"] = _present_mean(values)
        run["metrics"] = metrics
        out.append(run)
    return out


def format_comparison(rows: Sequence[Mapping[str, Any]]) -> str:
    """Aligned plain-text table (one line per row, one column per metric); ``n/a`` for missing values.

    Aggregated rows (from :func:`aggregate_by_method`) show ``mean±std`` and a column ``n``.
    """
    any_aggregated = any(row.get("aggregated") for row in rows)
    any_incomplete = any(row.get("complete") is False for row in rows)
    fields = [f for f in FIELDS if f not in OPTIONAL_METRICS or any(_num(row.get(f)) is not None for row in rows)]
    header = ["method", *(["n"] if any_aggregated else []), *(_HEADERS.get(f, f) for f in fields)]
    body: list[list[str]] = []
    for row in rows:
        aggregated = bool(row.get("aggregated"))
        label = str(row.get("label") or row.get("method") or "?") + (" *" if row.get("complete") is False else "")
        cells = [label]
        if any_aggregated:
            cells.append(str(row.get("n", 1)))
        for name in fields:
            cells.append(_fmt_cell(name, _num(row.get(name)), _num(row.get(f"{name}_std")), aggregated))
        body.append(cells)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(line(header))
    out = [line(header), rule, *(line(r) for r in body), rule]
    notes = FOOTNOTE + "".join(OPTIONAL_NOTES[f] for f in fields if f in OPTIONAL_NOTES)
    if any_aggregated:
        notes += " a±b = mean ± sample std over n runs (seeds)."
    if any_incomplete:
        notes += " * = unfinished run."
    out.append(notes)
    return "\n".join(out)


# --------------------------------------------------------------------------- csv


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


def _csv_text(run_rows: Sequence[Mapping[str, Any]], method_rows: Sequence[Mapping[str, Any]]) -> str:
    """``kind`` = ``run`` (one per run dir) or ``mean`` (per method over seeds, with ``*_std`` columns)."""
    columns = ["kind", "label", "method", "n", "seeds", "run_dirs", "complete"]
    for name in FIELDS:
        columns += [name, f"{name}_std"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for kind, rows in (("run", run_rows), ("mean", method_rows)):
        for row in rows:
            record = dict(row)
            if kind == "run":
                record["seeds"] = [row.get("seed")]
                record["run_dirs"] = [row.get("run_dir")]
            record["kind"] = kind
            writer.writerow([_csv_value(record.get(c)) for c in columns])
    return buf.getvalue()


# --------------------------------------------------------------------------- plot


def _is_joint(run: Run) -> bool:
    """A one-stage multitask reference run (method ``joint``, or its single stage row)."""
    labels = list(run.get("row_labels") or [])
    return _method(run) == JOINT_METHOD or (labels[1:] == [JOINT_METHOD] and len(run.get("tasks") or []) > 1)


def _row(run: Run, index: int, width: int) -> list[float | None]:
    matrix = run.get("matrix") or []
    if not matrix or not isinstance(matrix[index], Sequence):
        return [None] * width
    values = [_num(v) for v in matrix[index]]
    return (values + [None] * width)[:width]


def _present_mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _seen_average_curve(run: Run, width: int) -> list[float | None]:
    """Mean accuracy over the tasks seen so far after each stage 1..T (evaluated entries only)."""
    matrix = run.get("matrix") or []
    curve: list[float | None] = []
    for t in range(1, width + 1):
        curve.append(_present_mean(_row(run, t, width)[:t]) if t < len(matrix) else None)
    return curve


def _columnwise(series: Sequence[Sequence[float | None]]) -> tuple[list[float], list[float]]:
    """Per position: mean and std (n-1) over the runs with a value; NaN where none has one."""
    nan = float("nan")
    means, stds = [], []
    for column in zip(*series):
        present = [v for v in column if v is not None]
        means.append(sum(present) / len(present) if present else nan)
        stds.append(statistics.stdev(present) if len(present) > 1 else 0.0)
    return means, stds


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_LEGEND_CHARS else text[: _MAX_LEGEND_CHARS - 3] + "..."


def _comparison_png(runs: Sequence[Run]) -> bytes:
    import numpy as np

    tasks = [str(t) for t in runs[0].get("tasks") or []]
    width = len(tasks)
    groups = _groups(runs)
    colors = _palette(len(groups))

    fig_width = min(max(11.0, 5.0 + 0.3 * width * len(groups) + 0.4 * width), 16.0)
    fig = _new_figure(fig_width, 5.2)
    fig.set_layout_engine("constrained")
    bars_ax, curve_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1.0]})

    # Left: final per-task accuracy (last matrix row), one bar per method in each task group.
    x = np.arange(max(width, 1))
    slot = 0.8 / max(len(groups), 1)
    for g, (label, members) in enumerate(groups):
        final = [_row(run, len(run.get("matrix") or [[]]) - 1, width) for run in members]
        means, stds = _columnwise(final)
        offsets = x[:width] - 0.4 + slot * (g + 0.5)
        n = len(members)
        # Error bars (std over seeds) clipped to the 0..100 range of an accuracy.
        yerr = [[min(s, m) for m, s in zip(means, stds)], [min(s, 100.0 - m) for m, s in zip(means, stds)]]
        container = bars_ax.bar(
            offsets,
            means,
            width=slot * 0.92,
            color=colors[g],
            label=_clip(f"{label} (n={n})" if n > 1 else label),
            yerr=yerr if n > 1 else None,
            capsize=2 if n > 1 else 0,
            error_kw={"elinewidth": 0.8},
        )
        if len(groups) * width <= _MAX_BAR_LABELS:  # values on the bars (a 0 bar is otherwise invisible)
            texts = ["" if math.isnan(m) else f"{m:.0f}" for m in means]
            bars_ax.bar_label(container, texts, fontsize=7, padding=1)
    bars_ax.set_xticks(x[:width], tasks, rotation=30 if width > 6 else 0, ha="right" if width > 6 else "center")
    bars_ax.set_ylim(0, 105)
    bars_ax.set_ylabel("accuracy (%)")
    bars_ax.set_xlabel("task")
    bars_ax.set_title("Final accuracy per task (after the last stage)", fontsize=11)
    bars_ax.grid(True, axis="y", alpha=0.3)
    bars_ax.set_axisbelow(True)

    # Right: mean accuracy over the tasks seen so far, after each stage; joint runs as reference lines.
    stages = list(range(1, width + 1))
    for g, (label, members) in enumerate(groups):
        n = len(members)
        if all(_is_joint(run) for run in members):
            finals = [_present_mean(_row(run, len(run.get("matrix") or [[]]) - 1, width)) for run in members]
            present = [v for v in finals if v is not None]
            if present:
                curve_ax.axhline(
                    sum(present) / len(present),
                    color=colors[g],
                    linestyle="--",
                    linewidth=1.8,
                    label=_clip(f"{label}: final avg (reference)"),
                )
            continue
        curves = [_seen_average_curve(run, width) for run in members if not _is_joint(run)]
        means, stds = _columnwise(curves)
        curve_ax.plot(stages, means, marker="o", markersize=4, linewidth=1.8, color=colors[g], label=_clip(label))
        if n > 1:
            lower = [max(m - s, 0.0) for m, s in zip(means, stds)]
            upper = [min(m + s, 100.0) for m, s in zip(means, stds)]
            curve_ax.fill_between(stages, lower, upper, color=colors[g], alpha=0.15, linewidth=0)
    curve_ax.set_xticks(stages, [f"{i}\n{t}" for i, t in zip(stages, tasks)] if width <= 8 else stages)
    curve_ax.set_xlim(0.7, max(width, 1) + 0.3)
    curve_ax.set_ylim(0, 105)
    curve_ax.set_xlabel("after training stage (task learned)")
    curve_ax.set_ylabel("avg accuracy on seen tasks (%)")
    curve_ax.set_title("Average accuracy over seen tasks", fontsize=11)
    curve_ax.grid(True, alpha=0.3)
    curve_ax.legend(loc="best", fontsize=8, framealpha=0.85)

    handles, labels = bars_ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(handles), 6), fontsize=9, frameon=False)
    stream = runs[0].get("stream") or "unknown stream"
    note = " (shaded / error bars: ± std over seeds)" if any(len(m) > 1 for _, m in groups) else ""
    fig.suptitle(f"Method comparison on {stream}{note}", fontsize=12)
    return _png_bytes(fig)


def plot_comparison(runs: Sequence[Run], path: Path | str) -> Path:
    """Write one PNG: (left) grouped bars of the final per-task accuracy per method, (right) the
    average accuracy over seen tasks after each stage per method; ``joint`` runs appear on the
    right as dashed horizontal lines at their final average. Seeds of a method are averaged
    (error bars / shaded band = std)."""
    check_comparable(runs)
    path = Path(path)
    _atomic_write_bytes(path, _comparison_png(runs))
    return path


# --------------------------------------------------------------------------- all at once


def write_comparison(run_dirs: Sequence[Path | str], out_dir: Path | str) -> tuple[str, Path, Path]:
    """Load the runs, write ``comparison.csv`` and ``comparison.png`` into ``out_dir`` (atomically)
    and return ``(table_text, csv_path, png_path)``.

    The text holds the per-run table and, when a method has several runs, the per-method
    mean±std table below it. The CSV holds both (column ``kind``: ``run`` or ``mean``).
    """
    unique: list[Path] = []
    seen: set[Path] = set()
    for run_dir in run_dirs:
        resolved = Path(run_dir).resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(Path(run_dir))
    runs = with_climb_metrics([load_run(run_dir) for run_dir in unique])
    check_comparable(runs)
    run_rows = comparison_rows(runs)
    method_rows = aggregate_by_method(runs)

    text = format_comparison(run_rows)
    if any(row["n"] > 1 for row in method_rows):
        text += "\n\nPer method, mean ± std over seeds:\n" + format_comparison(method_rows)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "comparison.csv"
    png_path = out_dir / "comparison.png"
    _atomic_write_text(csv_path, _csv_text(run_rows, method_rows))
    plot_comparison(runs, png_path)
    return text, csv_path, png_path

