"""The general-ability set (see :mod:`mmcl.evaluation.general`) scored after every row: one file per row,
``general/<row>.jsonl``; its headline number is ``general_drop`` = base score - score after the last stage.
Each row's score carries its standard error and 95% bootstrap interval over the set's samples, and the drop
its interval (base and last row resampled together, paired by sample id; :mod:`mmcl.evaluation.uncertainty`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mmcl.evaluation.protocols.base import EvaluationProtocol, Row, RunContext, RunView, register_protocol
from mmcl.layout import RunLayout

FOLDER = "general"
UNCERTAINTY_STREAM = 1_000_000  # the bootstrap's random stream of the general set (tasks use their positions)


@dataclass
class GeneralSettings:
    """``evaluation.general``: the general-ability set evaluated after every stage."""

    set: str = field(default="auto", metadata={
        "help": "auto (tiny-llava: held-out questions of its pretraining mix; other backbones: none) | none | a test file"})
    scorer: str = field(default="exact_match", metadata={"help": "scorer of a general test file named by path"})


@dataclass
class GeneralPart:
    scores: list[float | None]  # per row
    drop: float | None  # base minus after the last stage (None until both exist)
    # per row {"se", "low", "high", "n"} (None = not evaluated), and drop's 95% interval: bootstrap over the
    # set's samples, base and last row paired by sample id (see mmcl.evaluation.uncertainty)
    uncertainty: list[dict[str, Any] | None] = field(default_factory=list)
    drop_interval: list[float] | None = None


@register_protocol
class GeneralAbility(EvaluationProtocol):
    name = "general"
    folder = FOLDER
    title = "General ability"
    order = 10
    part_class = GeneralPart
    config_class = GeneralSettings
    template = "general.html.j2"

    def __init__(self, settings: GeneralSettings | None = None, task: Any = None):
        super().__init__(settings or GeneralSettings())
        self.task = task  # the general set as a Task (None: off)

    def enabled(self) -> bool:
        return self.task is not None

    def plan_entry(self) -> dict[str, Any]:
        return {"general": self.enabled()}

    def planned_files(self, layout: RunLayout, row: Row, tasks: Sequence[str], planned: dict[str, Any]) -> list[Path]:
        return [layout.row_file(FOLDER, row.name)] if planned.get("general") else []

    def evaluate(self, run: RunContext, row: Row) -> None:
        run.evaluate_file(row.index, self.task, run.test_samples(self.task), run.layout.row_file(FOLDER, row.name))

    def collect(self, view: RunView) -> GeneralPart | None:
        from mmcl.evaluation import uncertainty
        from mmcl.evaluation.evaluator import mean_percent, sample_scores

        files = [view.layout.row_file(FOLDER, row.name) for row in view.rows]
        if not any(file.exists() for file in files):
            return None
        samples = [sample_scores(file) if file.exists() else None for file in files]
        scores = [None if row is None else round(mean_percent(row), 4) for row in samples]
        base, last = scores[0], scores[-1]  # the final stage only: an unfinished run has no drop yet
        drop = round(base - last, 4) if base is not None and last is not None and len(scores) > 1 else None
        column = uncertainty.align(samples)
        replicates = uncertainty.column_replicates(column, UNCERTAINTY_STREAM)
        cells = [uncertainty.cell_uncertainty(row, replicates[:, i]) for i, row in enumerate(column.scores)]
        interval = None
        if drop is not None and (cells[0] or {}).get("se") is not None and (cells[-1] or {}).get("se") is not None:
            interval = uncertainty.percentile_interval(replicates[:, 0] - replicates[:, -1])
        return GeneralPart(scores=scores, drop=drop, uncertainty=cells, drop_interval=interval)

    def metrics(self, part: GeneralPart) -> dict[str, float]:
        return {"general_drop": part.drop} if part.drop is not None else {}

    def metric_intervals(self, part: GeneralPart) -> dict[str, list[float]]:
        return {"general_drop": part.drop_interval} if part.drop is not None and part.drop_interval is not None else {}
