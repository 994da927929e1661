"""``results.json`` from a run directory's files alone: matrix from stored predictions, metrics, timing.

Light to import (no torch, no transformers), so ``mmcl report`` and ``mmcl compare`` start fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mmcl.errors import RunDirError
from mmcl.evaluation.evaluator import prediction_seconds, score_prediction_file
from mmcl.evaluation.metrics import climb_average_forgetting, compute_all
from mmcl.evaluation.superficial import RATES, judged_rates, summarize
from mmcl.utils import git_commit, package_versions

BASE_LABEL = "base"
METHOD_SUMMARY = "method_summary.json"  # method-specific evaluation facts (e.g. MR-LoRA routing)


def stage_name(index: int, label: str) -> str:
    return f"{index}_{label}"


def general_file(run_dir: Path, row_label: str) -> Path:
    """Predictions on the general-ability set after the stage ``row_label``."""
    return run_dir / "general" / f"{row_label}.jsonl"


def judged_file(run_dir: Path, row_label: str, task: str) -> Path:
    """Format/content judgements of a task's original and probe answers after the stage ``row_label``."""
    return run_dir / "superficial" / row_label / f"{task}.jsonl"


def low_shot_file(run_dir: Path, row_label: str, task: str) -> Path:
    """Predictions on ``task`` after low-shot fine-tuning from the stage ``row_label`` (CLiMB)."""
    return run_dir / "low_shot" / row_label / f"{task}.jsonl"


def planned_row(
    row_index: int, n_tasks: int, joint: bool, forward_transfer: bool, general: bool, superficial: bool, low_shot: int
) -> dict[str, Any]:
    """What the runner evaluates after stage ``row_index`` (0 = the base model): task positions of the
    matrix row, whether the general set, positions of the seen tasks probed for superficial forgetting,
    and positions of the unseen tasks given low-shot fine-tuning. The runner and :func:`planned_files`
    both use it, so "complete" means exactly what the runner would do."""
    seen = n_tasks if joint else row_index
    return {
        "predictions": list(range(n_tasks if forward_transfer or row_index == 0 else seen)),
        "general": general,
        "superficial": list(range(seen)) if superficial and row_index > 0 else [],
        "low_shot": list(range(seen, n_tasks)) if low_shot > 0 else [],
    }


def evaluation_plan(config: dict[str, Any], general: bool) -> dict[str, Any]:
    """The switches that decide which evaluations a run plans, from its resolved config (``config.yaml``)."""
    evaluation = config.get("evaluation") or {}
    return {
        "evaluate_base": bool(evaluation.get("evaluate_base", True)),
        "forward_transfer": bool(evaluation.get("forward_transfer", True)),
        "general": general,
        "superficial": bool(evaluation.get("superficial", False)),
        "low_shot": int(evaluation.get("low_shot", 0) or 0),
    }


def planned_files(run_dir: Path, tasks: list[str], stages: list[str], joint: bool, plan: dict[str, Any]) -> list[Path]:
    """Every evaluation file a finished run holds (``plan`` from :func:`evaluation_plan`)."""
    files: list[Path] = []
    labels = [BASE_LABEL, *stages]
    for row_index, label in enumerate(labels):
        if (row_index == 0 and not plan["evaluate_base"]) or row_index in plan.get("skipped_rows", ()):
            continue
        row = stage_name(row_index, label)
        planned = planned_row(
            row_index, len(tasks), joint, plan["forward_transfer"], plan["general"], plan["superficial"], plan["low_shot"]
        )
        files += [run_dir / "predictions" / row / f"{tasks[j]}.jsonl" for j in planned["predictions"]]
        if planned["general"]:
            files.append(general_file(run_dir, row))
        files += [judged_file(run_dir, row, tasks[j]) for j in planned["superficial"]]
        files += [low_shot_file(run_dir, row, tasks[j]) for j in planned["low_shot"]]
    return files


def _low_shot_results(run_dir: Path, row_labels: list[str], tasks: list[str]) -> dict[str, Any] | None:
    """The low-shot matrix L (row = stage fine-tuned from, column = unseen task) and the mean gain of
    low-shot fine-tuning from a trained stage over low-shot fine-tuning from the base model (row 0)."""
    matrix = [
        [round(score_prediction_file(f), 4) if (f := low_shot_file(run_dir, stage_name(i, label), task)).exists() else None
         for task in tasks]
        for i, label in enumerate(row_labels)
    ]  # fmt: skip
    if not any(value is not None for row in matrix for value in row):
        return None
    gains = [row[j] - matrix[0][j] for row in matrix[1:] for j in range(len(tasks)) if row[j] is not None and matrix[0][j] is not None]
    return {"matrix": matrix, "transfer": round(sum(gains) / len(gains), 4) if gains else None}


def _general_results(run_dir: Path, row_labels: list[str]) -> dict[str, Any] | None:
    files = [general_file(run_dir, stage_name(i, label)) for i, label in enumerate(row_labels)]
    if not any(file.exists() for file in files):
        return None
    scores = [round(score_prediction_file(file), 4) if file.exists() else None for file in files]
    base, last = scores[0], scores[-1]  # the final stage only: an unfinished run has no drop yet
    drop = round(base - last, 4) if base is not None and last is not None and len(scores) > 1 else None
    return {"scores": scores, "drop": drop}


def _superficial_results(run_dir: Path, row_labels: list[str], tasks: list[str], matrix: list) -> dict[str, Any] | None:
    rates = [
        [judged_rates(f) if (f := judged_file(run_dir, stage_name(i, label), task)).exists() else None for task in tasks]
        for i, label in enumerate(row_labels)
    ]
    if not any(cell for row in rates for cell in row):
        return None
    tables = {
        key: [[round(cell[key], 4) if cell else None for cell in row] for row in rates]
        for key in RATES
    }
    return {**tables, "summary": summarize(matrix, rates)}


def collect_results(run_dir: Path) -> dict[str, Any]:
    """Everything ``results.json`` holds, computed from the run dir alone (no model needed)."""
    plan_file = run_dir / "run.json"
    if not plan_file.is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no run.json)")
    try:
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        if not isinstance(plan, dict) or not isinstance(config, dict):
            raise ValueError("expected a mapping")
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunDirError(f"{run_dir}: unreadable run.json or config.yaml ({reason})") from None
    missing = [key for key in ("name", "method", "stream", "backbone", "seed", "tasks", "stages", "joint") if key not in plan]
    if missing:
        raise RunDirError(f"{plan_file}: not a run plan written by mmcl (missing {', '.join(missing)})")
    tasks = [task["name"] for task in plan["tasks"]]
    row_labels = [BASE_LABEL, *plan["stages"]]
    matrix: list[list[float | None]] = []
    eval_seconds = 0.0
    for row_index, label in enumerate(row_labels):
        row: list[float | None] = []
        for task in tasks:
            path = run_dir / "predictions" / stage_name(row_index, label) / f"{task}.jsonl"
            if path.exists():
                row.append(round(score_prediction_file(path), 4))
                eval_seconds += prediction_seconds(path)
            else:
                row.append(None)
        matrix.append(row)
    stage_seconds, trainable = {}, None
    for index, label in enumerate(plan["stages"], start=1):
        info_file = run_dir / "stages" / stage_name(index, label) / "stage.json"
        if info_file.exists():
            info = json.loads(info_file.read_text(encoding="utf-8"))
            stage_seconds[label] = info["seconds"]
            trainable = info["trainable_parameters"]
    if plan["joint"]:
        final = [value for value in matrix[-1] if value is not None]
        metrics = {"ACC": sum(final) / len(final) if final else None}
        reference_rows = {"joint": matrix[-1]}
    else:
        metrics = compute_all(matrix)
        reference_rows = {}
    chance = [task.get("chance") for task in plan["tasks"]]
    if not plan["joint"] and None not in chance and (value := climb_average_forgetting(matrix, chance)) is not None:
        metrics["T_F"] = round(value, 4)
    general = _general_results(run_dir, row_labels)
    if general is not None and general["drop"] is not None:
        metrics["general_drop"] = general["drop"]
    superficial = _superficial_results(run_dir, row_labels, tasks, matrix)
    split = (superficial or {}).get("summary") or {}
    if split.get("forgetting"):
        metrics["forgetting_essential"] = split["forgetting"]["essential"]
        metrics["forgetting_superficial"] = split["forgetting"]["superficial"]
    low_shot = _low_shot_results(run_dir, row_labels, tasks)
    if low_shot is not None and low_shot["transfer"] is not None:
        metrics["low_shot_transfer"] = low_shot["transfer"]
    stored_plan = (plan.get("evaluation") or {}).get("planned")
    if stored_plan is None:  # a run dir from before the plan was recorded: derive it from its config
        stored_plan = evaluation_plan(config, general_file(run_dir, stage_name(0, BASE_LABEL)).parent.is_dir())
    expected = planned_files(run_dir, tasks, plan["stages"], plan["joint"], stored_plan)
    progress = {
        "stages_done": sum(stage_seconds.get(label) is not None for label in plan["stages"]),
        "stages_planned": len(plan["stages"]),
        "evaluations_done": sum(file.exists() for file in expected),
        "evaluations_planned": len(expected),
    }
    complete = progress["stages_done"] == progress["stages_planned"] and progress["evaluations_done"] == progress["evaluations_planned"]
    summary_file = run_dir / METHOD_SUMMARY
    method_summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.exists() else {}
    return {
        "name": plan["name"],
        "method": plan["method"],
        "stream": plan["stream"],
        "backbone": plan["backbone"],
        "seed": plan["seed"],
        "tasks": tasks,
        "task_descriptions": {task["name"]: task["description"] for task in plan["tasks"]},
        "scorers": {task["name"]: task["scorer"] for task in plan["tasks"]},
        "chance": {task["name"]: task.get("chance") for task in plan["tasks"]},
        "evaluation_protocol": plan.get("evaluation"),
        "row_labels": row_labels,
        "matrix": matrix,
        "metrics": metrics,
        "reference_rows": reference_rows,
        "general": general,
        "superficial": superficial,
        "low_shot": low_shot,
        "complete": complete,
        "progress": progress,
        "stage_seconds": stage_seconds,
        "train_seconds": round(sum(stage_seconds.values()), 3),
        "eval_seconds": round(eval_seconds, 3),
        "trainable_parameters": trainable,
        "config_hash": config.get("fingerprint"),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "method_summary": method_summary.get("summary"),
        "extra_sections": method_summary.get("sections", []),
    }
