"""The run dir's claim on its config and data: a run dir is resumed only by the experiment that made it,
and only on the data it was computed from; with ``--recompute-changed`` exactly what depends on changed
data is deleted (and redone by the runner)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from mmcl.config import ExperimentConfig, config_from_stored
from mmcl.errors import ConfigError, RunDirError
from mmcl.evaluation.protocols import EvaluationProtocol, Row
from mmcl.evaluation.protocols.general import GeneralAbility
from mmcl.evaluation.protocols.low_shot import LowShotTransfer
from mmcl.evaluation.protocols.matrix import AccuracyMatrix
from mmcl.fingerprint import Change, changes, data_fingerprints
from mmcl.layout import RunLayout
from mmcl.streams.stream import Task
from mmcl.utils import atomic_write_text


def same_results_settings(stored: Any, config: ExperimentConfig) -> bool:
    """Whether a run dir's recorded config computes what ``config`` computes: the same fingerprint, or
    (a config.yaml of an older mmcl, whose fingerprint covered other fields) the same fingerprint once
    its config is read by today's rules."""
    if not isinstance(stored, dict):
        return False
    if stored.get("fingerprint") == config.fingerprint():
        return True
    try:
        return config_from_stored(stored, "config.yaml").fingerprint() == config.fingerprint()
    except ConfigError:
        return False


BASE_DIR_KEY = "base_dir"  # config.yaml: the folder the config's relative paths were resolved against


def claim_run_dir(config: ExperimentConfig, overwrite: bool, base_dir: Path | None = None) -> Path:
    """Create the run dir, or reuse it only if it was made by the same config; record the config (with its
    fingerprint and ``base_dir``, for ``mmcl reproduce``) in ``config.yaml``."""
    run_dir = config.run_dir
    layout = RunLayout(run_dir)
    config_file = layout.config_file
    if config_file.exists():
        stored = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        same = same_results_settings(stored, config)
        if not same and not overwrite:
            raise RunDirError(
                f"{run_dir}: holds a run of a different config; pick another --out or pass --overwrite to replace it"
            )
        if not same:  # everything but the lock this run holds
            for child in run_dir.iterdir():
                if child != layout.lock_file:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {"fingerprint": config.fingerprint(), **config.to_dict()}
    if base_dir is not None:
        resolved = {BASE_DIR_KEY: str(Path(base_dir).resolve()), **resolved}
    atomic_write_text(config_file, yaml.safe_dump(resolved, sort_keys=False))
    return run_dir



def reconcile_data(
    layout: RunLayout, tasks: list[Task], general: Task | None, stages: list[tuple[str, list[Task]]], rows: list[Row],
    protocols: list[EvaluationProtocol], recompute_changed: bool, log: Callable[[str], None],
) -> None:
    """Compare the data with the fingerprints the run dir recorded (``data.json``); refuse on a change,
    or with ``recompute_changed`` delete exactly the stages and evaluations that depend on it. A run dir
    from before fingerprints were recorded gets the current data's fingerprints (trusted on first use)."""
    current = data_fingerprints(tasks, general)
    stored_file = layout.data_file
    try:
        stored = json.loads(stored_file.read_text(encoding="utf-8")) if stored_file.is_file() else None
        if stored is not None and not isinstance(stored, dict):
            raise ValueError(f"expected an object, found {type(stored).__name__}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunDirError(
            f"{stored_file}: unreadable data fingerprints ({exc}); delete it to trust the current data, "
            "or use another --out"
        ) from None
    if stored is None and layout.plan_file.exists():
        log(f"{layout.root}: made before data fingerprints were recorded; recording the current data's "
                 f"(results computed earlier are taken to come from it)")
    found = changes(stored, current) if stored is not None else []
    if found and not recompute_changed:
        more = f" (and {len(found) - 1} more file(s))" if len(found) > 1 else ""
        raise RunDirError(
            f"{layout.root}: data changed since its results were computed: {found[0].describe()}{more}; "
            "pass --recompute-changed to redo what depends on it, or use another --out"
        )
    if found:
        stale = stale_outputs(layout, tasks, stages, rows, protocols, found)
        for change in found:
            log(f"data changed: {change.describe()}")
        stages_dir = layout.stages_dir
        log(f"recomputing what depends on it: {sum(1 for p in stale if p.parent == stages_dir)} stage(s), "
                 f"{sum(1 for p in stale if p.parent != stages_dir)} evaluation file(s)/folder(s)")
        prune_method_summary(layout, stale)
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        layout.results_file.unlink(missing_ok=True)
    atomic_write_text(stored_file, json.dumps(current, indent=1))

def stale_outputs(
    layout: RunLayout, tasks: list[Task], stages: list[tuple[str, list[Task]]], rows: list[Row],
    protocols: list[EvaluationProtocol], found: list[Change],
) -> list[Path]:
    """Existing stage dirs and evaluation files that depend on the changed files: a changed train file of
    a task invalidates the stage training it, every later stage and their rows (and low-shot files of
    the task, whose shots it holds); a changed test file, every evaluation of that task in every row;
    a changed general set, every general file."""
    train = {change.task for change in found if change.split == "train"}
    test = {change.task for change in found if change.split == "test"}
    general = any(change.task is None for change in found)
    first = next(
        (index for index, (_, stage_tasks) in enumerate(stages, start=1) if train & {t.name for t in stage_tasks}),
        len(stages) + 1,
    )
    stale: list[Path] = []
    for index in range(first, len(stages) + 1):
        label = stages[index - 1][0]
        stale += [layout.stage_dir(index, label), layout.stage_work_dir(index, label)]
    folders = [protocol.folder for protocol in protocols]
    for row in rows:
        if row.index >= first:  # every file of the row, whichever protocol wrote it
            stale += [layout.row_dir(folder, row.name) for folder in folders]
            stale += [layout.row_file(folder, row.name) for folder in folders]
            continue
        for task in tasks:
            if task.name in test:  # the task's evaluations in every protocol
                stale += [layout.task_file(folder, row.name, task.name) for folder in folders]
            elif task.name in train:  # low-shot files hold shots of the task's training data
                stale.append(layout.task_file(LowShotTransfer.folder, row.name, task.name))
        if general:
            stale.append(layout.row_file(GeneralAbility.folder, row.name))
    return [path for path in stale if path.exists()]

def prune_method_summary(layout: RunLayout, stale_paths: list[Path]) -> None:
    """Drop the method's evaluation facts of the evaluations that are redone, so a resumed method does
    not add new counts to stale ones. Summaries laid out as ``stages -> row label -> tasks -> task``
    (MR-LoRA's routing) lose exactly those entries; any other layout is kept as it is."""
    file = layout.method_summary_file
    if not file.is_file():
        return
    try:
        stored = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return  # unreadable: the next evaluation rewrites it
    summary = stored.get("summary") if isinstance(stored, dict) else None
    rows = summary.get("stages") if isinstance(summary, dict) else None
    if not isinstance(rows, dict):
        return
    stale = {path.relative_to(layout.root).parts for path in stale_paths}
    for row, entry in list(rows.items()):
        predictions = AccuracyMatrix.folder
        if (predictions, row) in stale or any(parts[0] == layout.stages_dir.name and parts[1] == row for parts in stale):
            del rows[row]
        elif isinstance(entry, dict) and isinstance(entry.get("tasks"), dict):
            for task in list(entry["tasks"]):
                if (predictions, row, f"{task}.jsonl") in stale:
                    del entry["tasks"][task]
    atomic_write_text(file, json.dumps(stored, indent=1))

