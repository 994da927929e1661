"""The accuracy matrix R: R[k][j] = score on task j's test set after stage k (row 0 = the base model).

Files: ``predictions/<row>/<task>.jsonl`` (a header naming the scorer, one record per sample); the
scores are recomputed from them, so a changed scorer never needs the model again; so are their per-sample
scores (``MatrixPart.samples``, not stored), from which results.json's uncertainties are bootstrapped. With
``evaluation.forward_transfer`` every row holds every task (needed for FWT), else row k holds the
tasks learned so far (the base row always holds all)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mmcl.evaluation.protocols.base import EvaluationProtocol, Matrix, Row, RunContext, RunView, register_protocol
from mmcl.layout import RunLayout

FOLDER = "predictions"


@dataclass
class MatrixPart:
    matrix: Matrix
    eval_seconds: float  # generation time summed over the matrix's files
    # per row and task, each file's (sample id, score in [0, 1]) (None = not evaluated): the bootstrap's input
    samples: list[list[list[tuple[str, float]] | None]] = field(default_factory=list, repr=False)


def evaluated_positions(row: Row, forward_transfer: bool) -> list[int]:
    """Task positions in row ``row`` of the matrix."""
    return list(range(row.n_tasks if forward_transfer or row.index == 0 else row.seen))


@register_protocol
class AccuracyMatrix(EvaluationProtocol):
    name = "matrix"
    folder = FOLDER
    title = "Accuracy matrix"
    order = 0
    part_class = MatrixPart

    def __init__(self, forward_transfer: bool = True):
        super().__init__(None)
        self.forward_transfer = forward_transfer

    def plan_entry(self) -> dict[str, Any]:
        return {"forward_transfer": self.forward_transfer}

    def planned_files(self, layout: RunLayout, row: Row, tasks: Sequence[str], planned: dict[str, Any]) -> list[Path]:
        positions = evaluated_positions(row, bool(planned.get("forward_transfer", True)))
        return [layout.prediction_file(row.name, tasks[j]) for j in positions]

    def evaluate(self, run: RunContext, row: Row) -> None:
        for position in evaluated_positions(row, self.forward_transfer):
            task = run.tasks[position]
            run.evaluate_file(row.index, task, run.test_samples(task), run.layout.prediction_file(row.name, task.name))

    def collect(self, view: RunView) -> MatrixPart:
        from mmcl.evaluation.evaluator import mean_percent, prediction_seconds, sample_scores

        matrix: Matrix = []
        samples: list[list[list[tuple[str, float]] | None]] = []
        seconds = 0.0
        for row in view.rows:
            cells: list[float | None] = []
            samples.append([])
            for task in view.tasks:
                path = view.layout.prediction_file(row.name, task)
                scores = sample_scores(path) if path.exists() else None
                samples[-1].append(scores)
                cells.append(None if scores is None else round(mean_percent(scores), 4))
                seconds += prediction_seconds(path) if scores is not None else 0.0
            matrix.append(cells)
        return MatrixPart(matrix=matrix, eval_seconds=round(seconds, 3), samples=samples)
