"""Uncertainty of scores and metrics: a bootstrap over test samples, with percentile intervals. Pure functions
of per-sample scores (numpy arrays; no files, no model).

**Per-sample scores.** Whatever the scorer, a sample's score is one number in [0, 1]: exact match gives 0 or
1, soft scorers (VQA soft accuracy, ANLS, IoU, partial credit) a fraction, and a multi-reference answer is
already reduced to one score by its scorer. A cell of the accuracy matrix is 100 × their mean, so soft and
multi-reference scores are resampled exactly like right/wrong ones; a cell's standard error is the usual
``100 · s / sqrt(n)`` (``s`` the sample standard deviation, ``n - 1`` in its denominator).

**Pairing.** A task's test samples are the same in every row of the matrix, so a replicate resamples each
task's samples once (with replacement) and applies that one draw to every row of the task's column, the rows
aligned by sample id: the rows stay paired, and a difference such as BWT's ``R[T][k] - R[k][k]`` keeps only
the noise that does not cancel. Every metric is then recomputed on each replicate matrix (by the function the
caller passes: the run's own metrics), and its interval is the percentile interval of the replicates. Each
task draws from its own random stream, seeded by ``(seed, task position)`` and, for a fixed seed, depending
only on the number of samples: two runs over the same test samples get the same draws, which pairs them too
(``mmcl compare`` relies on it). A column whose rows hold different sample ids (or repeated ids) cannot be
aligned: each of its cells is then resampled on its own (unpaired), from ``(seed, task position, row + 1)``.

**Seeds.** :func:`pooled_replicates` and :func:`difference_replicates` resample runs (seeds) as well, for
``mmcl compare``: a hierarchical bootstrap whose replicate ``b`` picks seeds with replacement and takes
replicate ``b`` of each picked run's own bootstrap (one resample of the shared test set for all of them) or,
when the runs do not share their test samples, an independent replicate per pick.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METHOD = "bootstrap over test samples"
REPLICATES = 1000  # bootstrap replicates
LEVEL = 0.95  # coverage of the percentile intervals
SEED = 14  # fixed: results.json is deterministic
MAX_DRAWN = 1 << 21  # sample draws held in memory at once (replicates are drawn in chunks of this size)

SampleScores = Sequence[tuple[str, float]]  # (sample id, score in [0, 1]) of one predictions file
MetricFunction = Callable[[list[list[float | None]]], Mapping[str, float | None]]


@dataclass(frozen=True)
class Column:
    """One task's per-sample scores in every row. ``ids``: the sorted sample ids every evaluated row holds, each
    row's scores in that order (paired); None when the rows hold different or repeated ids (scores in file
    order, resampled per cell). ``scores[row]`` is None for a row that was not evaluated."""

    ids: tuple[str, ...] | None
    scores: list[np.ndarray | None]

    @property
    def paired(self) -> bool:
        return self.ids is not None

    @property
    def key(self) -> str | None:
        """A digest of the sample ids (equal for columns of the same test samples; None when unpaired)."""
        if self.ids is None:
            return None
        return hashlib.sha256("\n".join(self.ids).encode("utf-8")).hexdigest()[:16]


def align(rows: Sequence[SampleScores | None]) -> Column:
    """The column of one task from each row's ``(id, score)`` list (None = row not evaluated), aligned by id."""
    present = [row for row in rows if row is not None]
    id_sets = [[sample_id for sample_id, _ in row] for row in present]
    ids = sorted(id_sets[0]) if id_sets else []
    if all(len(set(row_ids)) == len(row_ids) and sorted(row_ids) == ids for row_ids in id_sets):
        scores: list[np.ndarray | None] = []
        for row in rows:
            if row is None:
                scores.append(None)
                continue
            by_id = dict(row)
            scores.append(np.array([by_id[sample_id] for sample_id in ids], dtype=float))
        return Column(tuple(ids), scores)
    return Column(None, [None if row is None else np.array([score for _, score in row], dtype=float) for row in rows])


def resample_counts(rng: np.random.Generator, n: int, replicates: int) -> np.ndarray:
    """How often each of ``n`` samples is drawn in each replicate (``replicates × n``; rows sum to ``n``)."""
    draws = rng.integers(0, n, size=(replicates, n)) + n * np.arange(replicates)[:, None]
    return np.bincount(draws.ravel(), minlength=replicates * n).reshape(replicates, n)


def replicate_means(scores: Sequence[np.ndarray], rng: np.random.Generator, replicates: int = REPLICATES) -> np.ndarray:
    """Bootstrap replicates (percent, ``replicates × len(scores)``) of the means of equally long score vectors,
    every vector resampled with the same draw (paired)."""
    n = len(scores[0]) if scores else 0
    if n == 0:
        return np.zeros((replicates, len(scores)))
    stacked = np.stack(scores)  # vectors × n
    chunk = max(1, MAX_DRAWN // n)
    parts = [  # einsum, not BLAS: no thread start-up for these small products, and the same sums on every machine
        np.einsum("bn,vn->bv", resample_counts(rng, n, min(chunk, replicates - start)).astype(float), stacked)
        for start in range(0, replicates, chunk)
    ]
    return 100.0 * np.concatenate(parts) / n


def column_replicates(column: Column, position: int, replicates: int = REPLICATES, seed: int = SEED) -> np.ndarray:
    """Bootstrap replicates of every cell of a column (percent, ``replicates × rows``; NaN = not evaluated):
    one draw shared by all rows when the column is paired, else one draw per cell. ``position`` (the task's)
    chooses the random stream."""
    out = np.full((replicates, len(column.scores)), np.nan)
    evaluated = [row for row, scores in enumerate(column.scores) if scores is not None]
    if column.paired and evaluated:
        rng = np.random.default_rng([seed, position])
        out[:, evaluated] = replicate_means([column.scores[row] for row in evaluated], rng, replicates)
    else:
        for row in evaluated:
            rng = np.random.default_rng([seed, position, row + 1])
            out[:, row] = replicate_means([column.scores[row]], rng, replicates)[:, 0]
    return out


def standard_error(scores: np.ndarray) -> float | None:
    """Standard error of the mean score, in points (``100 · s / sqrt(n)``); None for fewer than 2 samples."""
    n = len(scores)
    return None if n < 2 else float(100.0 * np.std(scores, ddof=1) / np.sqrt(n))


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float] | None:
    """The ``level`` percentile interval ``[low, high]`` of bootstrap replicates, over those that are defined
    (finite); None when fewer than half are (the statistic is mostly undefined)."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    if len(finite) == 0 or 2 * len(finite) < len(values):
        return None
    low, high = np.percentile(finite, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return [round(float(low), 4), round(float(high), 4)]


def cell_uncertainty(scores: np.ndarray | None, replicates: np.ndarray, level: float = LEVEL) -> dict[str, Any] | None:
    """``{"se", "low", "high", "n"}`` of one cell (points; None when not evaluated; se/low/high None for fewer
    than 2 samples)."""
    if scores is None:
        return None
    se = standard_error(scores)
    interval = percentile_interval(replicates, level) if se is not None else None
    return {
        "se": None if se is None else round(se, 4),
        "low": None if interval is None else interval[0],
        "high": None if interval is None else interval[1],
        "n": len(scores),
    }


def metric_replicates(matrices: np.ndarray, metric_function: MetricFunction) -> dict[str, np.ndarray]:
    """Every metric of every replicate matrix (``replicates × rows × tasks``, NaN = not evaluated): metric name ->
    its replicates (NaN where undefined). ``metric_function`` gets the matrix once, each evaluated entry the
    vector of its replicates and each other entry None (:mod:`mmcl.evaluation.metrics` computes on such
    entries elementwise)."""
    replicates, rows, tasks = matrices.shape
    evaluated = ~np.isnan(matrices).all(axis=0)
    matrix = [[matrices[:, r, t] if evaluated[r, t] else None for t in range(tasks)] for r in range(rows)]
    out = {}
    for name, value in metric_function(matrix).items():
        values = np.full(replicates, np.nan) if value is None else np.asarray(value, dtype=float)
        out[name] = np.broadcast_to(values, (replicates,)).copy()
    return out


@dataclass
class MatrixBootstrap:
    """A run's bootstrap over test samples: ``matrices`` (percent, ``replicates × rows × tasks``, NaN = not
    evaluated), each cell's ``{"se", "low", "high", "n"}``, each metric's replicates, and per task its
    ``sample_keys`` (digest of the aligned sample ids; None when its rows hold different ids)."""

    matrices: np.ndarray
    cells: list[list[dict[str, Any] | None]]
    metrics: dict[str, np.ndarray]
    sample_keys: list[str | None]
    seed: int

    @property
    def replicates(self) -> int:
        return len(self.matrices)

    def intervals(self, level: float = LEVEL) -> dict[str, list[float]]:
        """Metric name -> its percentile interval ``[low, high]`` (metrics without one are left out)."""
        out = {name: percentile_interval(values, level) for name, values in self.metrics.items()}
        return {name: interval for name, interval in out.items() if interval is not None}

    def description(self, tasks: Sequence[str] | None = None, level: float = LEVEL) -> dict[str, Any]:
        """What results.json's ``uncertainty`` records: method, replicates, level, seed, and the tasks (names,
        else positions) whose rows could not be paired by sample id."""
        unpaired = [tasks[i] if tasks else i for i, key in enumerate(self.sample_keys) if key is None]
        return {"method": METHOD, "replicates": self.replicates, "level": level, "seed": self.seed,
                "unpaired_tasks": unpaired}  # fmt: skip


def bootstrap_matrix(samples: Sequence[Sequence[SampleScores | None]], metric_function: MetricFunction,
                     replicates: int = REPLICATES, seed: int = SEED, level: float = LEVEL) -> MatrixBootstrap:  # fmt: skip
    """The bootstrap of a run's matrix from ``samples[row][task]`` (each file's ``(id, score)`` list, None =
    not evaluated): each task's samples resampled once per replicate for all rows (see the module's text), the
    cells summarised and every metric of ``metric_function`` recomputed on every replicate matrix."""
    n_tasks = len(samples[0]) if samples else 0
    columns = [align([row[task] for row in samples]) for task in range(n_tasks)]
    matrices = np.stack([column_replicates(column, task, replicates, seed) for task, column in enumerate(columns)], axis=2)
    cells = [
        [cell_uncertainty(columns[task].scores[row], matrices[:, row, task], level) for task in range(n_tasks)]
        for row in range(len(samples))
    ]
    return MatrixBootstrap(matrices, cells, metric_replicates(matrices, metric_function), [c.key for c in columns], seed)


# -- over seeds (mmcl compare) -------------------------------------------------------------------------


def _draws(rng: np.random.Generator, replicates: int, picks: int, shared_samples: bool) -> np.ndarray:
    """Which replicate of a picked run each pick uses: replicate b itself (one resample of the shared test
    set), or independent replicates (an independent permutation per pick: with one pick, every replicate once)."""
    if shared_samples:
        return np.broadcast_to(np.arange(replicates)[:, None], (replicates, picks))
    return np.stack([rng.permutation(replicates) for _ in range(picks)], axis=1)


def pooled_replicates(per_run: Sequence[np.ndarray], rng: np.random.Generator, shared_samples: bool) -> np.ndarray:
    """Hierarchical bootstrap of a mean over runs (seeds): replicate b picks ``len(per_run)`` runs with
    replacement and averages their bootstrap replicates (each run's replicates over its test samples, all of
    the same length); ``shared_samples``: the runs were evaluated on the same test samples and drew the same
    resamples, so replicate b of every run is one resample of that test set. A run's replicates may be NaN
    (metric undefined there): the mean is then NaN."""
    stacked = np.stack(per_run)  # runs × replicates
    runs, replicates = stacked.shape
    picks = rng.integers(0, runs, size=(replicates, runs))
    return stacked[picks, _draws(rng, replicates, runs, shared_samples)].mean(axis=1)


def difference_replicates(a: Sequence[np.ndarray], b: Sequence[np.ndarray], rng: np.random.Generator,
                          paired_seeds: bool, shared_samples: bool) -> np.ndarray:  # fmt: skip
    """Bootstrap replicates of ``mean(a) - mean(b)`` over runs (seeds) and test samples. ``paired_seeds``:
    ``a[i]`` and ``b[i]`` share a seed, and one pick of seeds serves both; else each side's seeds are
    resampled on their own. ``shared_samples``: every run of both sides was evaluated on the same test samples
    (and drew the same resamples), so replicate b is one resample of that test set for both sides; else each
    pick draws its own replicate. Two identical sides give exactly 0 in every replicate."""
    if not paired_seeds:
        return pooled_replicates(a, rng, shared_samples) - pooled_replicates(b, rng, shared_samples)
    if len(a) != len(b):
        raise ValueError(f"paired seeds need as many runs on both sides, got {len(a)} and {len(b)}")
    first, second = np.stack(a), np.stack(b)
    runs, replicates = first.shape
    picks = rng.integers(0, runs, size=(replicates, runs))
    draws_a = _draws(rng, replicates, runs, shared_samples)
    draws_b = draws_a if shared_samples else _draws(rng, replicates, runs, shared_samples)
    return (first[picks, draws_a] - second[picks, draws_b]).mean(axis=1)


def within_noise(interval: Sequence[float] | None) -> bool | None:
    """Whether a difference's interval contains 0 (None when there is no interval)."""
    return None if interval is None else bool(interval[0] <= 0.0 <= interval[1])
