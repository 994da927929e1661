"""``results.json``: the typed :class:`Results` of a run, computed from its files alone, written and read
here and nowhere else.

:func:`collect_results` rebuilds everything from the run dir (plan, stage records, every protocol's
files), so ``mmcl report`` and ``mmcl compare`` never need the model, and an older run dir (without a
schema version, or of an older one) is read by rebuilding it. Light to import (no torch, no
transformers), so both commands start fast.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmcl.errors import RunDirError
from mmcl.evaluation.metrics import per_task_forgetting, run_metrics
from mmcl.evaluation.protocols import PROTOCOLS, Row, RunView
from mmcl.evaluation.uncertainty import bootstrap_matrix
from mmcl.layout import BASE_LABEL, RunLayout, row_name
from mmcl.environment import installed_versions, source_state, version_warnings
from mmcl.utils import atomic_write_text

SCHEMA_VERSION = 3  # 1 = the untyped dict of mmcl before results had a schema (no "schema_version" key); 3 = uncertainties
EXAMPLES_PER_KIND = 3  # example predictions shown per old task and kind


@dataclass
class TaskInfo:
    name: str
    description: str
    scorer: str
    max_new_tokens: int | None
    chance: float | None  # chance score (%) on the evaluated test samples (CLiMB's S_rand)
    train_samples: int | None  # None: a run dir from before the counts were recorded
    test_samples: int | None  # evaluated test samples (after evaluation.limit)


@dataclass
class StageInfo:
    index: int
    label: str
    done: bool
    seconds: float | None
    train_samples: int | None
    trainable_parameters: int | None
    train_loss: float | None  # the Trainer's mean training loss over the stage
    train_metrics: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] | None = None  # versions, commit, CPU kernels, threads when trained (mmcl.environment)


@dataclass
class Progress:
    stages_done: int
    stages_planned: int
    evaluations_done: int
    evaluations_planned: int

    @property
    def complete(self) -> bool:
        return self.stages_done == self.stages_planned and self.evaluations_done == self.evaluations_planned


@dataclass
class Timing:
    train_seconds: float  # sum over finished stages
    eval_seconds: float  # generation time of the accuracy matrix
    sessions: list[float]  # wall-clock seconds of every `mmcl run` session on the run dir
    total_seconds: float | None  # their sum (None: a run dir from before sessions were recorded)


@dataclass
class Example:
    """One test sample of an old task: the answer right after learning the task and after the last stage."""

    id: str
    reference: Any
    learned: str  # answer right after the task was learned
    final: str  # answer after the last stage
    kind: str  # kept (right, still right) | lost (right, now wrong) | drifted (right, now in another form)


@dataclass
class Results:
    schema_version: int
    name: str
    method: str
    stream: str
    backbone: str
    seed: int
    joint: bool  # one stage on all tasks
    reference: bool  # the method declares itself a reference row (an upper bound), not a continual learner
    tasks: list[TaskInfo]
    row_labels: list[str]  # "base", then each stage's label
    matrix: list[list[float | None]]  # R[row][task], None = not evaluated
    metrics: dict[str, float | None]  # ACC, MFT, ... and the protocols' headline numbers
    per_task_forgetting: list[float | None]  # max earlier score - final score, per task (None for the last)
    stages: list[StageInfo]
    progress: Progress
    complete: bool  # every planned stage and evaluation is done
    timing: Timing
    settings: dict[str, Any]  # the resolved config (hyperparameters), as config.yaml records it
    evaluation_protocol: dict[str, Any] | None  # run.json's "evaluation": limit, decoding, what was planned
    protocols: dict[str, Any]  # protocol name -> its part (general, superficial, low_shot, plugins' own)
    examples: dict[str, list[Example]]  # old task -> example predictions after the last stage
    method_summary: dict[str, Any] | None  # the method's evaluation facts (e.g. MR-LoRA routing)
    method_sections: list[dict[str, Any]]  # report sections the method returns as data
    config_hash: str | None
    versions: dict[str, str]  # the libraries the last trained stage recorded (older run dirs: installed at collection)
    git_commit: str | None  # and its source commit
    git_dirty: bool | None = None  # the source tree had uncommitted changes then
    environment_warnings: list[str] = field(default_factory=list)  # versions that differ (mmcl.environment)
    # uncertainty (mmcl.evaluation.uncertainty): per matrix cell {"se", "low", "high", "n"} (points; None = not
    # evaluated), per metric its 95% interval [low, high], and how they were computed
    matrix_uncertainty: list[list[dict[str, Any] | None]] = field(default_factory=list)
    metric_intervals: dict[str, list[float]] = field(default_factory=dict)
    uncertainty: dict[str, Any] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    @property
    def reference_rows(self) -> dict[str, list[float | None]]:
        """Rows drawn as references beside the matrix (a jointly trained run's final row)."""
        return {self.method: self.matrix[-1]} if self.joint and self.matrix else {}

    @property
    def trainable_parameters(self) -> int | None:
        done = [stage.trainable_parameters for stage in self.stages if stage.trainable_parameters is not None]
        return done[-1] if done else None

    def part(self, protocol: str) -> Any:
        return self.protocols.get(protocol)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


# -- reading and writing --------------------------------------------------------------------------


def write_results(layout: RunLayout, results: Results) -> Path:
    atomic_write_text(layout.results_file, results.to_json())
    return layout.results_file


def results_from_dict(data: dict[str, Any]) -> Results:
    """A :class:`Results` from the JSON of the current schema (``ValueError``/``TypeError``/``KeyError`` otherwise)."""
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    values = dict(data)
    values["tasks"] = [TaskInfo(**task) for task in data["tasks"]]
    values["stages"] = [StageInfo(**stage) for stage in data["stages"]]
    values["progress"] = Progress(**data["progress"])
    values["timing"] = Timing(**data["timing"])
    values["examples"] = {task: [Example(**e) for e in items] for task, items in data["examples"].items()}
    values["protocols"] = {
        name: PROTOCOLS[name]().load_part(part) if name in PROTOCOLS and part is not None else part
        for name, part in data["protocols"].items()
    }
    return Results(**values)


def load_results(run_dir: Path | str) -> Results:
    """The run's results: ``results.json`` if it holds the current schema, else rebuilt from the run dir
    (an older mmcl's results.json, a missing or unreadable one)."""
    layout = RunLayout(Path(run_dir))
    if layout.results_file.is_file():
        try:
            return results_from_dict(json.loads(layout.results_file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError):
            if not layout.plan_file.is_file():
                raise RunDirError(
                    f"{layout.results_file}: unreadable or of an older mmcl, and no run.json to rebuild it from"
                ) from None
    return collect_results(layout.root)


# -- collecting ----------------------------------------------------------------------------------


def _read_plan(layout: RunLayout) -> tuple[dict[str, Any], dict[str, Any]]:
    if not layout.plan_file.is_file():
        raise RunDirError(f"{layout.root}: not a run directory (no run.json)")
    try:
        plan = json.loads(layout.plan_file.read_text(encoding="utf-8"))
        config = yaml.safe_load(layout.config_file.read_text(encoding="utf-8")) or {}
        if not isinstance(plan, dict) or not isinstance(config, dict):
            raise ValueError("expected a mapping")
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunDirError(f"{layout.root}: unreadable run.json or config.yaml ({reason})") from None
    missing = [key for key in ("name", "method", "stream", "backbone", "seed", "tasks", "stages", "joint") if key not in plan]
    if missing:
        raise RunDirError(f"{layout.plan_file}: not a run plan written by mmcl (missing {', '.join(missing)})")
    return plan, config


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunDirError(f"{path}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _stages(layout: RunLayout, labels: list[str]) -> list[StageInfo]:
    stages = []
    for index, label in enumerate(labels, start=1):
        info_file = layout.stage_info_file(index, label)
        info = _read_json(info_file) if info_file.exists() else None
        if not isinstance(info, dict):
            stages.append(StageInfo(index, label, False, None, None, None, None))
            continue
        metrics = info.get("train_metrics") or {}
        stages.append(StageInfo(
            index=index, label=label, done=True, seconds=info.get("seconds"), train_samples=info.get("train_samples"),
            trainable_parameters=info.get("trainable_parameters"), train_loss=metrics.get("train_loss"),
            train_metrics=metrics, environment=info.get("environment"),
        ))  # fmt: skip
    return stages


def planned_protocols(config: dict[str, Any]) -> list[str]:
    """Protocols a run dir may hold files of: the built-ins, plus plugin protocols its config names."""
    evaluation = config.get("evaluation") or {}
    extra = evaluation.get("protocols") if isinstance(evaluation, dict) else None
    return sorted(PROTOCOLS, key=lambda name: PROTOCOLS[name].order) + [
        name for name in (extra or {}) if name not in PROTOCOLS
    ]


def legacy_plan(config: dict[str, Any], layout: RunLayout) -> dict[str, Any]:
    """The evaluation plan of a run dir from before run.json recorded it, from its config."""
    evaluation = config.get("evaluation") or {}
    superficial, low_shot = evaluation.get("superficial", False), evaluation.get("low_shot", 0)
    return {
        "evaluate_base": bool(evaluation.get("evaluate_base", True)),
        "forward_transfer": bool(evaluation.get("forward_transfer", True)),
        "general": layout.protocol_dir("general").is_dir(),
        "superficial": bool(superficial.get("enabled") if isinstance(superficial, dict) else superficial),
        "low_shot": int((low_shot.get("shots") if isinstance(low_shot, dict) else low_shot) or 0),
    }


def planned_files(layout: RunLayout, tasks: list[str], rows: list[Row], planned: dict[str, Any]) -> list[Path]:
    """Every evaluation file a finished run holds (``planned`` = run.json's ``evaluation.planned``)."""
    files: list[Path] = []
    protocols = [PROTOCOLS[name]() for name in sorted(PROTOCOLS, key=lambda n: PROTOCOLS[n].order)]
    for row in rows:
        if (row.index == 0 and not planned.get("evaluate_base", True)) or row.index in planned.get("skipped_rows", ()):
            continue
        for protocol in protocols:
            files += protocol.planned_files(layout, row, tasks, planned)
    return files


def run_rows(tasks: list[str], stage_labels: list[str], joint: bool) -> list[Row]:
    """Row 0 (the base model) and one row per stage. A jointly trained run counts every task as seen in
    every row: it has no continual sequence, hence no low-shot transfer to unseen tasks."""
    labels = [BASE_LABEL, *stage_labels]
    return [
        Row(index=i, name=row_name(i, label), seen=len(tasks) if joint else i, n_tasks=len(tasks))
        for i, label in enumerate(labels)
    ]


def example_predictions(layout: RunLayout, tasks: list[str], rows: list[Row], per_kind: int = EXAMPLES_PER_KIND) -> dict[str, list[Example]]:
    """For each old task (learned before the last stage): up to ``per_kind`` samples that were right right
    after learning it and, after the last stage, stayed right (kept), became wrong in the same form (lost),
    or came back in another form (drifted: e.g. a sentence for a one-word answer), in file order."""
    from mmcl.evaluation.evaluator import read_records
    from mmcl.evaluation.superficial import answer_kind

    if len(rows) < 3 or rows[-1].seen != rows[-1].n_tasks:
        return {}
    last = rows[-1]
    out: dict[str, list[Example]] = {}
    for position, task in enumerate(tasks[:-1]):
        learned_file = layout.prediction_file(rows[position + 1].name, task)
        final_file = layout.prediction_file(last.name, task)
        if position + 1 >= last.index or not learned_file.is_file() or not final_file.is_file():
            continue
        learned, final = read_records(learned_file), read_records(final_file)
        picked: dict[str, list[Example]] = {"kept": [], "lost": [], "drifted": []}
        for sample_id, before in learned.items():
            after = final.get(sample_id)
            if after is None or not before.get("score"):
                continue
            if after.get("score"):
                kind = "kept"
            elif answer_kind(str(after["prediction"])) != answer_kind(str(before["prediction"])):
                kind = "drifted"
            else:
                kind = "lost"
            if len(picked[kind]) < per_kind:
                picked[kind].append(Example(sample_id, before.get("answer"), before["prediction"], after["prediction"], kind))
        examples = picked["kept"] + picked["lost"] + picked["drifted"]
        if examples:
            out[task] = examples
    return out


def _sessions(layout: RunLayout) -> list[float]:
    if not layout.sessions_file.is_file():
        return []
    data = _read_json(layout.sessions_file)
    return [float(seconds) for seconds in data.get("sessions", [])] if isinstance(data, dict) else []


def record_session(layout: RunLayout, seconds: float) -> None:
    """Add one ``mmcl run`` session's wall-clock seconds to the run dir's record."""
    sessions = _sessions(layout) + [round(seconds, 3)]
    atomic_write_text(layout.sessions_file, json.dumps({"sessions": sessions}, indent=1))


def _environment_fields(stages: list[StageInfo]) -> dict[str, Any]:
    """``versions``, ``git_commit``, ``git_dirty`` as the last trained stage recorded them, and the warnings
    of :func:`mmcl.environment.version_warnings`; a run dir whose stages recorded nothing shows what is
    installed now, and says so."""
    recorded = [stage.environment for stage in stages if stage.done and stage.environment]
    warnings = version_warnings({stage.label: stage.environment for stage in stages if stage.done})
    if recorded:
        last = recorded[-1]
        return {"versions": dict(last.get("versions", {})), "git_commit": last.get("git_commit"),
                "git_dirty": last.get("git_dirty"), "environment_warnings": warnings}
    if any(stage.done for stage in stages):
        warnings.append("the stages recorded no versions (trained by an older mmcl): the versions shown are the "
                        "ones installed now")
    return {"versions": installed_versions(), **source_state(), "environment_warnings": warnings}


def collect_results(run_dir: Path) -> Results:
    """Everything ``results.json`` holds, computed from the run dir alone (no model needed)."""
    layout = RunLayout(Path(run_dir))
    plan, config = _read_plan(layout)
    tasks = [task["name"] for task in plan["tasks"]]
    rows = run_rows(tasks, plan["stages"], plan["joint"])
    view = RunView(layout=layout, tasks=tasks, rows=rows)
    matrix_part = PROTOCOLS["matrix"]().collect(view)
    matrix = matrix_part.matrix
    view = RunView(layout=layout, tasks=tasks, rows=rows, matrix=matrix)
    chance = [task.get("chance") for task in plan["tasks"]]
    metrics = run_metrics(matrix, chance, plan["joint"])
    if metrics.get("T_F") is not None:
        metrics["T_F"] = round(metrics["T_F"], 4)
    bootstrap = bootstrap_matrix(matrix_part.samples, lambda R: run_metrics(R, chance, plan["joint"]))
    intervals = bootstrap.intervals()
    protocols: dict[str, Any] = {}
    for name in planned_protocols(config):
        if name == "matrix" or name not in PROTOCOLS:
            continue
        protocol = PROTOCOLS[name]()
        part = protocol.collect(view)
        protocols[name] = part
        if part is not None:
            metrics.update(protocol.metrics(part))
            intervals.update(protocol.metric_intervals(part))
    stored_plan = (plan.get("evaluation") or {}).get("planned")
    if stored_plan is None:  # a run dir from before the plan was recorded: derive it from its config
        stored_plan = legacy_plan(config, layout)
    expected = planned_files(layout, tasks, rows, stored_plan)
    stages = _stages(layout, plan["stages"])
    progress = Progress(
        stages_done=sum(stage.done for stage in stages),
        stages_planned=len(stages),
        evaluations_done=sum(file.exists() for file in expected),
        evaluations_planned=len(expected),
    )
    sessions = _sessions(layout)
    summary = _read_json(layout.method_summary_file) if layout.method_summary_file.exists() else {}
    train_seconds = sum(stage.seconds for stage in stages if stage.seconds is not None)
    return Results(
        schema_version=SCHEMA_VERSION,
        name=plan["name"],
        method=plan["method"],
        stream=plan["stream"],
        backbone=plan["backbone"],
        seed=plan["seed"],
        joint=plan["joint"],
        reference=bool(plan.get("reference", plan["joint"])),
        tasks=[
            TaskInfo(
                name=task["name"], description=task.get("description", ""), scorer=task["scorer"],
                max_new_tokens=task.get("max_new_tokens"), chance=task.get("chance"),
                train_samples=task.get("train_samples"), test_samples=task.get("test_samples"),
            )
            for task in plan["tasks"]
        ],  # fmt: skip
        row_labels=[BASE_LABEL, *plan["stages"]],
        matrix=matrix,
        metrics=metrics,
        per_task_forgetting=[] if plan["joint"] else per_task_forgetting(matrix),
        stages=stages,
        progress=progress,
        complete=progress.complete,
        timing=Timing(
            train_seconds=round(train_seconds, 3),
            eval_seconds=matrix_part.eval_seconds,
            sessions=sessions,
            total_seconds=round(sum(sessions), 3) if sessions else None,
        ),
        settings={key: value for key, value in config.items() if key not in ("fingerprint", "base_dir")},
        evaluation_protocol=plan.get("evaluation"),
        protocols=protocols,
        examples={} if plan["joint"] else example_predictions(layout, tasks, rows),
        method_summary=summary.get("summary") if isinstance(summary, dict) else None,
        method_sections=list(summary.get("sections", [])) if isinstance(summary, dict) else [],
        config_hash=config.get("fingerprint"),
        **_environment_fields(stages),
        matrix_uncertainty=bootstrap.cells,
        metric_intervals=intervals,
        uncertainty=bootstrap.description(tasks),
    )
