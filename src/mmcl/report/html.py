"""The HTML pages (``report.html``, ``comparison.html``) from the Jinja2 templates in
``mmcl/report/templates/`` (autoescaped: every value from a run is escaped; only a method's legacy
``{"title", "html"}`` report section is inserted as it is, since it comes from method code).

The report renders each evaluation protocol's part with the template the protocol declares
(``EvaluationProtocol.template``); a protocol without one (a plugin's) gets its part as a key/value table.

A method's report sections (``Results.method_sections``, from ``Method.report_sections()``) are data:

- ``{"title", "kind": "table", "columns": [...], "rows": [[...], ...], "note"}``: a table (cells as text);
- ``{"title", "kind": "curves", "x_label", "y_label", "series": {name: [y or None, ...]}, "x": [...],
  "note", "y_log": bool, "x_marks": [x, ...]}``: one panel of curves drawn as an embedded PNG (``x``
  optional, default 0, 1, ...; ``y_log`` a log y axis; ``x_marks`` dotted vertical lines, e.g. stage
  boundaries; both optional);
- ``{"title", "html"}`` (legacy): HTML inserted as it is.

``note`` is optional; a section of another shape is shown as a line saying why it cannot be."""

from __future__ import annotations

import base64
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from markupsafe import Markup

from mmcl.evaluation.protocols import PROTOCOLS
from mmcl.report import formatting as fmt
from mmcl.report.plots import curves_png
from mmcl.results import Results
from mmcl.utils import mean_of_present

__all__ = ["environment", "render_report_html", "method_section_view", "hyperparameters", "protocol_views"]

# Sections of the settings shown as hyperparameters, in this order (others follow in stored order).
SETTINGS_ORDER = ("method", "backbone", "lora", "training", "evaluation", "stream")
HIDDEN_SETTINGS = frozenset({"name", "output_dir", "seed", "plugins"})  # shown with the run's facts


def tint(value: Any) -> str:
    """Background colour of an accuracy: light red (0) through yellow (50) to light green (100)."""
    value = fmt.finite(value)
    hue = 120.0 * min(max(value or 0.0, 0.0), 100.0) / 100.0
    return f"hsl({hue:.0f}, 65%, 82%)"


def data_uri(png: bytes) -> str:
    """``png`` as a ``data:`` URI for an ``<img>`` (the page stays one self-contained file)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The templates' environment: autoescape on, undefined names are errors, the formatting filters."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mmcl.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        number=fmt.number, signed=lambda v: fmt.number(v, signed=True), metric=fmt.metric, count=fmt.count,
        duration=fmt.duration, size=fmt.size, loss=fmt.loss, plain=fmt.plain, answer=fmt.answer,
        tint=tint, data_uri=data_uri, finite=fmt.finite, mean=mean_of_present, interval=fmt.metric_interval,
        plus_minus=fmt.plus_minus, cell_title=fmt.cell_title, cell_plus_minus=fmt.cell_plus_minus,
    )  # fmt: skip
    env.globals.update(METRIC_EXPLANATIONS=fmt.METRIC_EXPLANATIONS, LEGEND=fmt.LEGEND, INTERVAL_NOTE=fmt.INTERVAL_NOTE,
                       zip=zip)  # fmt: skip
    return env


# -- parts of the report -----------------------------------------------------------------------


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, Mapping) and data:
        return [item for key, value in data.items() for item in _flatten(value, f"{prefix}{key}.")]
    return [(prefix[:-1], data)]


def hyperparameters(settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run's settings as sections ``{"title", "rows": [(dotted key, value, help)]}``: method (name and
    options), backbone, LoRA, training, evaluation, stream, then any other section."""
    from mmcl.config import ExperimentConfig, describe_fields

    helps = {key: help_text for key, _, _, help_text, _ in describe_fields(ExperimentConfig)}
    names = [name for name in SETTINGS_ORDER if name in settings]
    names += [name for name in settings if name not in SETTINGS_ORDER and name not in HIDDEN_SETTINGS]
    sections = []
    for name in names:
        rows = [(key, fmt.plain(value), helps.get(key, "")) for key, value in _flatten(settings[name], f"{name}.")]
        sections.append({"title": name, "rows": rows})
    return sections


def _part_items(part: Any) -> list[tuple[str, str]]:
    data = dataclasses.asdict(part) if dataclasses.is_dataclass(part) and not isinstance(part, type) else part
    if isinstance(data, Mapping):
        return [(str(key), fmt.plain(value)) for key, value in data.items()]
    return [("value", fmt.plain(data))]


def protocol_views(results: Results) -> list[dict[str, Any]]:
    """The protocol sections of the report, in the run's order: ``{"name", "title", "template", "part",
    "items"}``; ``template`` None = show ``items`` (the part as key/value pairs)."""
    views = []
    for name, part in results.protocols.items():
        if part is None:
            continue
        protocol = PROTOCOLS.get(name)
        template = getattr(protocol, "template", None)
        views.append({
            "name": name, "title": getattr(protocol, "title", name), "template": template, "part": part,
            "items": [] if template else _part_items(part),
        })  # fmt: skip
    return views


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def method_section_view(section: Any) -> dict[str, Any]:
    """One of the method's report sections, ready for ``method_section.html.j2``: ``kind`` table (``columns``,
    ``rows``), curves (``png``), html (legacy ``{"title", "html"}``: inserted as it is) or invalid (``problem``)."""
    if not isinstance(section, Mapping):
        return {"title": "Method section", "kind": "invalid", "note": "", "problem": f"not a mapping: {fmt.plain(section)[:200]}"}
    title, note = str(section.get("title") or "Details"), str(section.get("note") or "")
    view: dict[str, Any] = {"title": title, "note": note}
    kind = section.get("kind")
    if kind is None and "html" in section:
        return {**view, "kind": "html", "html": Markup(str(section.get("html") or ""))}
    if kind == "table" and _is_list(section.get("columns")) and _is_list(section.get("rows")):
        rows = [[fmt.plain(cell) if not isinstance(cell, str) else cell for cell in row] if _is_list(row) else [fmt.plain(row)]
                for row in section["rows"]]  # fmt: skip
        return {**view, "kind": "table", "columns": [str(c) for c in section["columns"]], "rows": rows}
    if kind == "curves" and isinstance(section.get("series"), Mapping) and all(map(_is_list, section["series"].values())):
        x = section.get("x")
        png = curves_png(
            {str(name): list(values) for name, values in section["series"].items()},
            list(x) if _is_list(x) else None,
            x_label=str(section.get("x_label") or ""),
            y_label=str(section.get("y_label") or ""),
            y_log=bool(section.get("y_log")),
            x_marks=[m for m in section.get("x_marks") or [] if fmt.finite(m) is not None],
        )
        return {**view, "kind": "curves", "png": png}
    return {**view, "kind": "invalid", "problem": f"unknown kind {kind!r} or missing fields ({', '.join(map(str, section))})"}


def stage_rows(results: Results) -> list[dict[str, Any]]:
    """Per stage: label, done, train samples, training loss, seconds and trainable parameters."""
    return [dataclasses.asdict(stage) for stage in results.stages]


def task_rows(results: Results) -> list[dict[str, Any]]:
    """Per task: its facts, the score right after learning it, the final score and its forgetting."""
    rows = fmt.matrix_rows(results)
    final = rows[-1][1] if len(rows) > 1 else []
    out = []
    for j, task in enumerate(results.tasks):
        learned = rows[j + 1][1][j] if not results.joint and j + 1 < len(rows) else None
        forgetting = results.per_task_forgetting[j] if j < len(results.per_task_forgetting) else None
        out.append({**dataclasses.asdict(task), "position": j + 1, "learned": learned,
                    "final": final[j] if j < len(final) else None, "forgetting": forgetting})  # fmt: skip
    return out


def run_facts(results: Results) -> list[tuple[str, str]]:
    """The run's facts: identity, parameters, times (training, evaluation, total over sessions), progress."""
    timing, progress = results.timing, results.progress
    plugins = results.settings.get("plugins")
    return [
        ("name", results.name), ("method", results.method), ("stream", results.stream),
        ("backbone", results.backbone), ("seed", str(results.seed)), ("reference run", "yes" if results.reference else "no"),
        ("trainable parameters", fmt.count(results.trainable_parameters)),
        ("training time", fmt.duration(timing.train_seconds)),
        ("evaluation time", fmt.duration(timing.eval_seconds)),
        ("total time", fmt.total_time(results)),
        ("progress", (f"{progress.stages_done} of {progress.stages_planned} stages, "
                      f"{progress.evaluations_done} of {progress.evaluations_planned} evaluations")),
        ("config hash", results.config_hash or "n/a"),
        ("git commit", (results.git_commit or "n/a") + (" (with uncommitted changes)" if results.git_dirty else "")),
        ("libraries", ", ".join(f"{name} {found}" for name, found in results.versions.items()) or "n/a"),
        ("kernels", _kernels(results)),
        ("plugins", fmt.plain(plugins) if plugins else "none"),
    ]  # fmt: skip


def _kernels(results: Results) -> str:
    """CPU, kernel set, threads and determinism of the last trained stage."""
    recorded = [stage.environment for stage in results.stages if stage.environment]
    if not recorded:
        return "not recorded"
    env = recorded[-1]
    pinned = "deterministic" if env.get("deterministic") else "not pinned"
    return f"{env.get('cpu', '?')}; {env.get('cpu_capability', '?')}; {env.get('threads', '?')} threads; {pinned}"


def render_report_html(results: Results, heatmap: bytes, curves: bytes) -> str:
    """``report.html``'s text: everything of ``results`` with the two plots embedded."""
    rows = fmt.matrix_rows(results)
    context = {
        "results": results,
        "title": f"mmcl report: {fmt.run_title(results)}",
        "notice": fmt.unfinished_notice(results),
        "warnings": results.environment_warnings,
        "metrics": fmt.metric_items(results),
        "rows": rows,
        "errors": fmt.matrix_errors(results),
        "references": fmt.reference_rows(results),
        "general": fmt.general_scores(results),
        "heatmap": heatmap,
        "curves": curves,
        "tasks": task_rows(results),
        "stages": stage_rows(results),
        "protocols": protocol_views(results),
        "sections": [method_section_view(section) for section in results.method_sections],
        "hyperparameters": hyperparameters(results.settings),
        "evaluation": [(key, fmt.plain(value)) for key, value in _flatten(results.evaluation_protocol or {})],
        "facts": run_facts(results),
    }
    return environment().get_template("report.html.j2").render(context)


def render_comparison_html(context: Mapping[str, Any]) -> str:
    """``comparison.html``'s text from the comparison's context (see :mod:`mmcl.report.compare`)."""
    return environment().get_template("comparison.html.j2").render(context)
