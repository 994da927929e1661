"""Continual-learning metrics over an accuracy matrix.

``R`` has T+1 rows and T columns. ``R[t][i]`` is the score (percent, 0..100) on task
``i`` (0-based column) after training stage ``t`` (1-based row); row 0 is the base model
before any training. ``None`` marks an entry that was not evaluated. With 1-based task
index k, the score just after learning task k is the diagonal entry ``R[k][k-1]``.

Every metric returns ``None`` when an entry it needs is ``None`` (or the metric is
undefined, e.g. transfer metrics with a single task).

An entry may also be a numpy vector, one value per bootstrap replicate (all of the same length; see
:mod:`mmcl.evaluation.uncertainty`): every metric is then computed for all replicates at once, elementwise,
by the same formulas, and returns a vector; a value undefined in some replicates only (CLiMB's T_F: a
task not learned above chance there) is NaN in those.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np

Matrix = Sequence[Sequence[Any]]  # entries: float | None, or numpy vectors of replicates


def _num_tasks(R: Matrix) -> int:
    """Validate the shape and entry types of ``R`` and return T (the number of columns)."""
    if isinstance(R, (str, bytes)) or not isinstance(R, Sequence) or len(R) == 0:
        raise ValueError("accuracy matrix must be a non-empty sequence of rows")
    for t, row in enumerate(R):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"accuracy matrix row {t} is not a sequence")
    T = len(R[0])
    if T == 0:
        raise ValueError("accuracy matrix must have at least one task column")
    for t, row in enumerate(R):
        if len(row) != T:
            raise ValueError(f"ragged accuracy matrix: row {t} has {len(row)} entries, row 0 has {T}")
        for i, v in enumerate(row):
            if v is None or type(v) is float or isinstance(v, np.ndarray):
                continue
            if isinstance(v, bool) or not isinstance(v, Real):
                raise ValueError(f"accuracy matrix entry [{t}][{i}] is not a number or None: {v!r}")
    if len(R) != T + 1:
        raise ValueError(f"accuracy matrix with {T} task columns needs {T + 1} rows, got {len(R)}")
    return T


def _value(v: Any) -> Any:
    """An entry as a float, or as it is when it is a vector of replicates."""
    return v if isinstance(v, np.ndarray) else float(v)


def _mean(values: Sequence[Any]) -> Any:
    """Mean of ``values``; ``None`` if it is empty or any value is ``None``."""
    if not values or any(v is None for v in values):
        return None
    return sum(_value(v) for v in values if v is not None) / len(values)


def _sub(a: Any, b: Any) -> Any:
    return None if a is None or b is None else _value(a) - _value(b)


def _max(values: Sequence[Any]) -> Any:
    if any(isinstance(v, np.ndarray) for v in values):
        return np.maximum.reduce([np.asarray(v, dtype=float) for v in values])
    return max(float(v) for v in values)


def final_average(R: Matrix) -> float | None:
    """ACC / MFN: final average score, ``(1/T) * sum_i R[T][i]``."""
    T = _num_tasks(R)
    return _mean([R[T][i] for i in range(T)])


def mean_finetune_accuracy(R: Matrix) -> float | None:
    """MFT: mean score just after learning each task, ``(1/T) * sum_k R[k][k-1]``."""
    T = _num_tasks(R)
    return _mean([R[k][k - 1] for k in range(1, T + 1)])


def average_incremental_accuracy(R: Matrix) -> float | None:
    """MAA: ``(1/T) * sum_{t=1..T} [(1/t) * sum_{k=1..t} R[t][k-1]]``.

    Average of the mean score on tasks seen so far, taken after every stage
    (average incremental accuracy, Rebuffi et al. 2017, iCaRL).
    """
    T = _num_tasks(R)
    return _mean([_mean([R[t][k - 1] for k in range(1, t + 1)]) for t in range(1, T + 1)])


def backward_transfer(R: Matrix) -> float | None:
    """BWT: ``(1/(T-1)) * sum_{k=1..T-1} (R[T][k-1] - R[k][k-1])``.

    Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory" (GEM). ``None`` if T < 2.
    """
    T = _num_tasks(R)
    if T < 2:
        return None
    return _mean([_sub(R[T][k - 1], R[k][k - 1]) for k in range(1, T)])


def per_task_forgetting(R: Matrix) -> list[float | None]:
    """Forgetting of each task k < T after the last stage T: ``max_{l=k..T-1} R[l][k-1] - R[T][k-1]``
    (Chaudhry et al. 2018, RWalk; the max runs over the stages after task k was learned); ``None`` for the
    last task, for an unfinished run's missing entries, and for every task if T < 2."""
    T = _num_tasks(R)
    if T < 2:
        return [None] * max(T, 0)
    per_task: list[float | None] = []
    for k in range(1, T):
        seen = [R[l][k - 1] for l in range(k, T)]
        best = None if any(v is None for v in seen) else _max(seen)
        per_task.append(_sub(best, R[T][k - 1]))
    return per_task + [None]


def forgetting(R: Matrix) -> float | None:
    """Average forgetting: ``(1/(T-1)) * sum_{k=1..T-1} (max_{l=k..T-1} R[l][k-1] - R[T][k-1])``.

    Chaudhry et al. 2018, "Riemannian Walk" (RWalk), evaluated after the last stage T;
    the max runs only over stages after task k was learned (l >= k). ``None`` if T < 2.
    """
    if _num_tasks(R) < 2:
        return None
    return _mean(per_task_forgetting(R)[:-1])


def forward_transfer(R: Matrix) -> float | None:
    """FWT: ``(1/(T-1)) * sum_{k=2..T} (R[k-1][k-1] - R[0][k-1])``.

    Lopez-Paz & Ranzato 2017 (GEM), with the base model (row 0) in place of a randomly
    initialised one: score on task k just before learning it minus the base model's
    score on it. ``None`` if T < 2 or a needed entry is ``None``.
    """
    T = _num_tasks(R)
    if T < 2:
        return None
    return _mean([_sub(R[k - 1][k - 1], R[0][k - 1]) for k in range(2, T + 1)])


def climb_knowledge_transfer(
    cl_score: float, single_task_score: float, random_score: float
) -> float | None:
    """CLiMB knowledge transfer ``T_K = 100 * (S_CL - S_ST) / (S_ST - S_rand)``.

    Srinivasan et al. 2022, "CLiMB". ``None`` if ``S_ST <= S_rand``: a single-task model no better than
    chance gives no scale to normalise by (the ratio would flip sign or explode).
    """
    denominator = float(single_task_score) - float(random_score)
    if denominator <= 0.0:
        return None
    return 100.0 * (float(cl_score) - float(single_task_score)) / denominator


def climb_forgetting(R: Matrix, random_scores: Sequence[float], j: int, i: int) -> float | None:
    """CLiMB forgetting of task j after stage i: ``T_F(j<-i) = 100 * (R[j][j-1] - R[i][j-1]) / (R[j][j-1] - S_rand(j))``.

    Srinivasan et al. 2022, "CLiMB". ``j`` and ``i`` are 1-based stages with
    ``1 <= j <= i <= T``; ``random_scores[j-1]`` is the random-chance score S_rand(j).
    ``None`` if a needed entry is ``None`` or the task was not learned above chance (``R[j][j-1] <=
    S_rand(j)``: the ratio would flip sign or explode, e.g. -950 for a task learned to 23 with chance 25).
    """
    T = _num_tasks(R)
    if len(random_scores) != T:
        raise ValueError(f"random_scores has {len(random_scores)} entries, expected {T}")
    if not 1 <= j <= i <= T:
        raise ValueError(f"climb_forgetting needs 1 <= j <= i <= {T}, got j={j}, i={i}")
    learned, later = R[j][j - 1], R[i][j - 1]
    if learned is None or later is None:
        return None
    denominator = _value(learned) - float(random_scores[j - 1])
    if isinstance(denominator, np.ndarray):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denominator > 0.0, 100.0 * (_value(learned) - _value(later)) / denominator, np.nan)
    if denominator <= 0.0:
        return None
    return 100.0 * (_value(learned) - _value(later)) / denominator


def climb_average_forgetting(R: Matrix, random_scores: Sequence[float]) -> float | None:
    """Mean CLiMB forgetting after the last stage over the tasks before it: ``mean_{j<T} T_F(j<-T)``.

    Tasks whose T_F is undefined (not learned above chance, or an entry ``None``) are left out of the
    mean; ``None`` if T < 2 or no task has a defined value.
    """
    T = _num_tasks(R)
    if T < 2:
        return None
    values = [v for j in range(1, T) if (v := climb_forgetting(R, random_scores, j, T)) is not None]
    if any(isinstance(v, np.ndarray) for v in values):  # replicates: the mean over the tasks defined in each
        stacked = np.stack(np.broadcast_arrays(*values))
        defined = np.isfinite(stacked)
        count = defined.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(count > 0, np.where(defined, stacked, 0.0).sum(axis=0) / count, np.nan)
    return sum(values) / len(values) if values else None


def compute_all(R: Matrix) -> dict[str, float | None]:
    """All matrix metrics: keys "ACC", "MFT", "MAA", "BWT", "Forgetting", "FWT"."""
    _num_tasks(R)
    return {
        "ACC": final_average(R),
        "MFT": mean_finetune_accuracy(R),
        "MAA": average_incremental_accuracy(R),
        "BWT": backward_transfer(R),
        "Forgetting": forgetting(R),
        "FWT": forward_transfer(R),
    }


def run_metrics(R: Matrix, random_scores: Sequence[float | None], joint: bool = False) -> dict[str, float | None]:
    """The metrics results.json reports for a run's matrix: :func:`compute_all`, plus CLiMB's ``T_F`` when every
    task has a chance score and it is defined; a jointly trained run (one stage on all tasks) has ACC alone,
    the mean of its final row's evaluated entries."""
    if joint:
        final = [_value(value) for value in R[-1] if value is not None]
        return {"ACC": sum(final) / len(final) if final else None}
    metrics = compute_all(R)
    if None not in random_scores and (value := climb_average_forgetting(R, random_scores)) is not None:  # type: ignore[arg-type]
        metrics["T_F"] = value
    return metrics
