"""The noise in ``mmcl compare``: per variant, a 95% interval of each metric's mean over its seeds; per pair of
variants, the 95% interval of their difference, "within noise" when it contains 0.

Every run is bootstrapped over its test samples exactly as its results.json is (read again from its
predictions files, :func:`mmcl.evaluation.uncertainty.bootstrap_matrix`: same replicates, same seed, so two
runs of the same test samples draw the same resamples). On top of that:

- a variant's interval is a hierarchical bootstrap: each replicate picks the variant's seeds with replacement
  and averages the picked runs' replicates (:func:`~mmcl.evaluation.uncertainty.pooled_replicates`);
- a pair's difference ``A - B`` is a paired bootstrap (:func:`~mmcl.evaluation.uncertainty.difference_replicates`):
  over seeds paired by seed value when both variants have the same seeds (else each side's seeds are resampled
  on their own), and over test samples paired by sample id when every run of both was evaluated on the same
  test samples of every task; runs evaluated on different samples (another ``evaluation.limit`` subset or data
  seed) are paired over seeds only, their samples resampled independently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcl.evaluation.metrics import run_metrics
from mmcl.evaluation.protocols import PROTOCOLS, RunView
from mmcl.evaluation.uncertainty import (
    SEED,
    bootstrap_matrix,
    difference_replicates,
    percentile_interval,
    pooled_replicates,
    within_noise,
)
from mmcl.layout import RunLayout
from mmcl.report.compare_runs import ComparedRun, groups
from mmcl.report.formatting import METRIC_ORDER
from mmcl.results import run_rows

INTERVAL_METRICS: tuple[str, ...] = (*METRIC_ORDER, "T_F")  # metrics of the matrix: bootstrapped in compare


@dataclass
class RunNoise:
    """One run's bootstrap over its test samples: metric -> replicates (NaN where undefined), and per task the
    digest of its sample ids (None: the run's rows hold different ids for that task)."""

    replicates: dict[str, np.ndarray]
    sample_keys: list[str | None]

    def interval(self, metric: str) -> list[float] | None:
        values = self.replicates.get(metric)
        return None if values is None else percentile_interval(values)


@dataclass
class Variant:
    """A variant's runs (in ``seeds`` order), their bootstraps, and whether they all share their test samples."""

    label: str
    runs: list[ComparedRun]
    noise: list[RunNoise]

    @property
    def seeds(self) -> list[int]:
        return [run.results.seed for run in self.runs]

    def mean(self, metric: str) -> float | None:
        values = [run.metrics.get(metric) for run in self.runs]
        return None if not values or any(v is None for v in values) else float(np.mean(values))

    def replicates(self, metric: str) -> list[np.ndarray] | None:
        per_run = [noise.replicates.get(metric) for noise in self.noise]
        return None if any(values is None for values in per_run) else per_run  # type: ignore[return-value]


@dataclass
class PairDifference:
    """``a - b`` of one metric: the difference of the variants' means, its 95% interval, whether that contains 0,
    and over what it was paired."""

    a: str
    b: str
    metric: str
    difference: float | None
    interval: list[float] | None
    within_noise: bool | None
    paired_seeds: bool
    paired_samples: bool


def run_noise(run: ComparedRun) -> RunNoise:
    """The run's bootstrap over its test samples, from its predictions files (as ``collect_results`` makes it)."""
    results = run.results
    layout = RunLayout(Path(run.run_dir))
    rows = run_rows(results.task_names, list(results.row_labels[1:]), results.joint)
    part = PROTOCOLS["matrix"]().collect(RunView(layout=layout, tasks=results.task_names, rows=rows))
    chance = [task.chance for task in results.tasks]
    bootstrap = bootstrap_matrix(part.samples, lambda R: run_metrics(R, chance, results.joint))
    return RunNoise(bootstrap.metrics, bootstrap.sample_keys)


def shared_samples(noises: Sequence[RunNoise]) -> bool:
    """Whether every run was evaluated on the same test samples of every task (paired by sample id)."""
    keys = [noise.sample_keys for noise in noises]
    return bool(keys) and None not in keys[0] and all(other == keys[0] for other in keys)


def variants(runs: Sequence[ComparedRun]) -> list[Variant]:
    """The compared variants (as :func:`~mmcl.report.compare_runs.groups` makes them), each run bootstrapped."""
    noises = {id(run): run_noise(run) for run in runs}
    return [Variant(label, members, [noises[id(run)] for run in members]) for label, members in groups(runs)]


def metrics_of(variants_: Sequence[Variant]) -> list[str]:
    """The bootstrapped metrics any run has a value of, in table order."""
    return [m for m in INTERVAL_METRICS if any(run.metrics.get(m) is not None for v in variants_ for run in v.runs)]


def variant_interval(variant: Variant, metric: str, position: int) -> list[float] | None:
    """The 95% interval of the variant's mean over seeds and test samples (hierarchical bootstrap)."""
    per_run = variant.replicates(metric)
    if per_run is None or variant.mean(metric) is None:
        return None
    rng = np.random.default_rng([SEED, position, INTERVAL_METRICS.index(metric)])
    return percentile_interval(pooled_replicates(per_run, rng, shared_samples(variant.noise)))


def pair_difference(a: Variant, b: Variant, metric: str, positions: tuple[int, int]) -> PairDifference:
    """``a - b`` of ``metric`` with its paired-bootstrap interval (see the module's text)."""
    paired_seeds = sorted(a.seeds) == sorted(b.seeds) and len(set(a.seeds)) == len(a.seeds)
    paired_samples = shared_samples([*a.noise, *b.noise])
    mean_a, mean_b = a.mean(metric), b.mean(metric)
    first, second = a.replicates(metric), b.replicates(metric)
    if mean_a is None or mean_b is None or first is None or second is None:
        return PairDifference(a.label, b.label, metric, None, None, None, paired_seeds, paired_samples)
    if paired_seeds:  # b's runs in the order of a's seeds
        order = {seed: index for index, seed in enumerate(b.seeds)}
        second = [second[order[seed]] for seed in a.seeds]
    rng = np.random.default_rng([SEED, *positions, INTERVAL_METRICS.index(metric)])
    interval = percentile_interval(difference_replicates(first, second, rng, paired_seeds, paired_samples))
    return PairDifference(a.label, b.label, metric, mean_a - mean_b, interval, within_noise(interval), paired_seeds,
                          paired_samples)  # fmt: skip


@dataclass
class Noise:
    """What compare shows of the noise: per variant its label, seeds and per metric ``(mean, interval)``; the
    differences of every pair of variants (one per metric); the metrics; and per run its own intervals."""

    metrics: list[str]
    variants: list[dict[str, Any]]
    pairs: list[list[PairDifference]]  # per pair of variants, one per metric
    run_intervals: list[dict[str, list[float] | None]]  # per run, in the order given


def noise(runs: Sequence[ComparedRun]) -> Noise:
    """Intervals of every variant and run, and every pair's differences, for the compared ``runs``."""
    found = variants(runs)
    metrics = metrics_of(found)
    by_run = {id(run): noise for variant in found for run, noise in zip(variant.runs, variant.noise)}
    rows = [
        {"label": v.label, "seeds": v.seeds, "n": len(v.runs), "reference": all(r.reference for r in v.runs),
         "shared_samples": shared_samples(v.noise),
         "metrics": {m: (v.mean(m), variant_interval(v, m, i)) for m in metrics}}
        for i, v in enumerate(found)
    ]  # fmt: skip
    pairs = [
        [pair_difference(found[i], found[j], m, (i, j)) for m in metrics]
        for i in range(len(found))
        for j in range(i + 1, len(found))
    ]
    run_intervals = [{m: by_run[id(run)].interval(m) for m in metrics} for run in runs]
    return Noise(metrics, rows, pairs, run_intervals)
