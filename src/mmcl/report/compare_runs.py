"""The runs ``mmcl compare`` reads, how they are grouped into variants, and their table rows.

A run is its :class:`~mmcl.results.Results` (``load_results``: an older run dir is rebuilt from its files)
plus the size of its stored state. Runs are grouped by exactly the settings that enter the run's
fingerprint (``results_settings`` of its stored config) minus ``seed``, the replicate axis."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcl.errors import ConfigError, MmclError, RunDirError
from mmcl.layout import RunLayout
from mmcl.report.formatting import METRIC_ORDER, finite
from mmcl.results import Results, load_results
from mmcl.utils import mean_of_present

# Metrics only some runs have (shown when any compared run has them).
OPTIONAL_METRICS: tuple[str, ...] = (
    "general_drop", "forgetting_essential", "forgetting_superficial", "low_shot_transfer", "T_K", "T_F",
)  # fmt: skip
# Numeric per-run fields besides the metrics, in table order.
EXTRA_FIELDS: tuple[str, ...] = ("trainable_parameters", "stored_bytes_per_task", "train_seconds", "eval_seconds", "total_seconds")
FIELDS: tuple[str, ...] = (*METRIC_ORDER, *OPTIONAL_METRICS, *EXTRA_FIELDS)

MAX_DIFF_KEYS = 2  # a variant label spells out at most this many differing settings ...
MAX_DIFF_CHARS = 48  # ... in at most this many characters, e.g. "seq-lora [lora.rank=16]"


@dataclass
class ComparedRun:
    """One compared run: its results, where it is, its stored state and its variant."""

    results: Results
    run_dir: str
    stored_bytes_per_task: float | None  # mean size of state.safetensors over the finished stages
    stored_bytes_final: int | None  # the last finished stage's state.safetensors
    variant: dict[str, Any]  # flattened settings that enter the fingerprint, without seed
    metrics: dict[str, float | None]  # the run's metrics, plus CLiMB's T_K once computed across runs

    @property
    def method(self) -> str:
        return self.results.method

    @property
    def reference(self) -> bool:
        return self.results.reference

    @property
    def complete(self) -> bool:
        return self.results.complete


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys (an empty mapping stays one value)."""
    if isinstance(data, Mapping) and data:
        return {key: value for name, item in data.items() for key, value in flatten(item, f"{prefix}{name}.").items()}
    return {prefix[:-1]: data}


def run_variant(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The settings of a run that enter its fingerprint, flattened, without ``seed``; when the stored config
    no longer reads, its raw settings without the fields marked as not affecting results."""
    from mmcl.config import ExperimentConfig, config_from_stored, describe_fields, results_settings

    try:
        flat = flatten(results_settings(config_from_stored(dict(settings), where)))
    except (ConfigError, TypeError, ValueError):
        neutral = {key for key, _, _, _, affects in describe_fields(ExperimentConfig) if not affects}
        flat = {key: value for key, value in flatten(dict(settings)).items() if key not in neutral}
    flat.pop("seed", None)
    return flat


def stored_bytes(layout: RunLayout, results: Results) -> tuple[float | None, int | None]:
    """(mean size of ``state.safetensors`` over the finished stages, size of the last finished one)."""
    sizes = []
    for stage in results.stages:
        tensors = layout.stage_state_files(stage.index, stage.label)[0]
        if stage.done and tensors.is_file():
            sizes.append(tensors.stat().st_size)
    return (sum(sizes) / len(sizes), sizes[-1]) if sizes else (None, None)


def load_run(run_dir: Path | str) -> ComparedRun:
    """Read one run dir (results.json of the current schema, else rebuilt from the run dir)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{path}: not a run directory (no such directory)")
    try:
        results = load_results(path)
    except MmclError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise RunDirError(f"{path}: unreadable run ({type(exc).__name__}: {reason})") from None
    per_task, final = stored_bytes(RunLayout(path), results)
    variant = run_variant(results.settings, str(RunLayout(path).config_file))
    return ComparedRun(results, str(run_dir), per_task, final, variant, dict(results.metrics))


# -- checks, variants and labels -------------------------------------------------------------------


def _describe(run: ComparedRun) -> str:
    return f"{run.run_dir} (stream {run.results.stream}, tasks {','.join(run.results.task_names)})"


def check_comparable(runs: Sequence[ComparedRun]) -> None:
    """Refuse an empty list and runs of different streams or task lists."""
    if not runs:
        raise RunDirError("compare: no run directories given")
    first = runs[0]
    for run in runs[1:]:
        if run.results.stream != first.results.stream or run.results.task_names != first.results.task_names:
            raise RunDirError(
                f"{_describe(first)} and {_describe(run)} are runs of different streams/task lists; "
                "compare only runs of the same stream"
            )


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = _key(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def unique_suffixes(paths: Sequence[str]) -> list[str]:
    """Shortest trailing path parts that tell ``paths`` apart (``run`` vs ``a/run`` and ``b/run``)."""
    parts = [Path(p).parts or (p,) for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def groups(runs: Sequence[ComparedRun]) -> list[tuple[str, list[ComparedRun]]]:
    """Runs grouped by (method, variant), in order of first appearance, with a label each: the method,
    plus the settings that tell its variants apart (``seq-lora [lora.rank=16]``) or, when those are too
    many or too long, the group's first run dir."""
    keyed: dict[tuple[str, str], list[ComparedRun]] = {}
    for run in runs:
        keyed.setdefault((run.method, _key(run.variant)), []).append(run)
    out = []
    for key, members in keyed.items():
        siblings = [other for other in keyed if other[0] == key[0]]
        label = key[0]
        if len(siblings) > 1:
            variants = [keyed[other][0].variant for other in siblings]
            differing = [k for k in sorted({k for v in variants for k in v}) if len({_key(v.get(k)) for v in variants}) > 1]
            diff = ", ".join(f"{k}={_short(members[0].variant.get(k))}" for k in differing)
            if differing and len(differing) <= MAX_DIFF_KEYS and len(diff) <= MAX_DIFF_CHARS:
                label += f" [{diff}]"
            else:
                name = unique_suffixes([keyed[other][0].run_dir for other in siblings])[siblings.index(key)]
                label += f" ({name}{f' and {len(members) - 1} more' if len(members) > 1 else ''})"
        out.append((label, members))
    return out


def run_labels(runs: Sequence[ComparedRun]) -> list[str]:
    """The method, plus ``seed=N`` (or the dir name) when several runs share the method."""
    labels = [run.method for run in runs]
    by_method: dict[str, list[int]] = {}
    for index, run in enumerate(runs):
        by_method.setdefault(run.method, []).append(index)
    for method, indices in by_method.items():
        if len(indices) < 2:
            continue
        seeds = [runs[i].results.seed for i in indices]
        if len({_key(runs[i].variant) for i in indices}) == 1 and len(set(seeds)) == len(seeds):
            for i, seed in zip(indices, seeds):
                labels[i] = f"{method} seed={seed}"
        else:
            for i, name in zip(indices, unique_suffixes([runs[i].run_dir for i in indices])):
                labels[i] = f"{method} ({name})"
    return labels


# -- rows ------------------------------------------------------------------------------------------


def field_values(run: ComparedRun) -> dict[str, float | None]:
    """The run's value of every field of :data:`FIELDS` (None when it has none)."""
    values = {key: finite(run.metrics.get(key)) for key in (*METRIC_ORDER, *OPTIONAL_METRICS)}
    timing = run.results.timing
    values.update(
        trainable_parameters=finite(run.results.trainable_parameters), stored_bytes_per_task=run.stored_bytes_per_task,
        train_seconds=finite(timing.train_seconds), eval_seconds=finite(timing.eval_seconds),
        total_seconds=finite(timing.total_seconds),
    )  # fmt: skip
    return values


def comparison_rows(runs: Sequence[ComparedRun]) -> list[dict[str, Any]]:
    """One row per run: ``label``, ``method``, ``seed``, ``run_dir``, ``complete``, ``reference``, ``n`` (1),
    ``aggregated`` (False) and every field of :data:`FIELDS`."""
    check_comparable(runs)
    return [
        {"label": label, "method": run.method, "seed": run.results.seed, "run_dir": run.run_dir, "complete": run.complete,
         "reference": run.reference, "n": 1, "aggregated": False, **field_values(run)}
        for run, label in zip(runs, run_labels(runs))
    ]  # fmt: skip


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (n-1; 0 for one value); ``(None, None)`` if any value is missing."""
    if not values or any(value is None for value in values):
        return None, None
    present = [float(value) for value in values if value is not None]
    return sum(present) / len(present), statistics.stdev(present) if len(present) > 1 else 0.0


def aggregate_by_method(runs: Sequence[ComparedRun]) -> list[dict[str, Any]]:
    """One row per variant (see :func:`groups`): ``label``, ``method``, ``n``, ``seeds``, ``run_dirs``,
    ``complete`` and ``reference`` (all runs), ``aggregated`` (True), and per field the mean under its
    name and the sample std under ``<field>_std`` (None when any run lacks the field)."""
    check_comparable(runs)
    rows = []
    for label, members in groups(runs):
        row: dict[str, Any] = {
            "label": label, "method": members[0].method, "n": len(members), "seeds": [run.results.seed for run in members],
            "run_dirs": [run.run_dir for run in members], "complete": all(run.complete for run in members),
            "reference": all(run.reference for run in members), "aggregated": True,
        }  # fmt: skip
        per_run = [field_values(run) for run in members]
        for name in FIELDS:
            row[name], row[f"{name}_std"] = mean_std([values[name] for values in per_run])
        rows.append(row)
    return rows


# -- CLiMB's knowledge transfer ---------------------------------------------------------------------


def diagonal(results: Results) -> list[float | None]:
    """Each task's score right after learning it (None in a joint run)."""
    size, matrix = len(results.tasks), results.matrix
    return [None if results.joint or len(matrix) <= i + 1 else finite(matrix[i + 1][i]) for i in range(size)]


def single_task_runs(runs: Sequence[ComparedRun]) -> list[ComparedRun]:
    """Finished reference runs that learn one task per stage (e.g. ``experts``): their diagonal is the
    single-task score S_ST of CLiMB's knowledge transfer."""
    return [run for run in runs if run.reference and not run.results.joint and run.complete]


def with_climb_metrics(runs: Sequence[ComparedRun]) -> list[ComparedRun]:
    """The runs with CLiMB's knowledge transfer ``T_K`` (Srinivasan et al. 2022; mean over tasks) in their
    metrics, when a single-task reference run of the same tasks is among them (S_ST = its diagonal, mean
    over such runs; S_rand = each task's recorded chance score). CLiMB's forgetting ``T_F`` comes with
    each run's results."""
    from mmcl.evaluation.metrics import climb_knowledge_transfer

    singles = single_task_runs(runs)
    if not singles:
        return list(runs)
    tasks = singles[0].results.task_names
    single = [mean_of_present([diagonal(run.results)[i] for run in singles]) for i in range(len(tasks))]
    chance = [task.chance for task in singles[0].results.tasks]
    if None in single or None in chance:
        return list(runs)
    out = []
    for run in runs:
        results = run.results
        if results.joint or not run.complete or results.task_names != tasks:
            out.append(run)
            continue
        values = [climb_knowledge_transfer(d, s, c) for d, s, c in zip(diagonal(results), single, chance) if d is not None]
        out.append(dataclasses.replace(run, metrics={**run.metrics, "T_K": mean_of_present(values)}))
    return out
