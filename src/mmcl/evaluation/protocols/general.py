"""The general-ability set (see :mod:`mmcl.evaluation.general`) scored after every row: one file per row,
``general/<row>.jsonl``; its headline number is ``general_drop`` = base score - score after the last stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mmcl.evaluation.protocols.base import EvaluationProtocol, Row, RunContext, RunView, register_protocol
from mmcl.layout import RunLayout

FOLDER = "general"


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
        from mmcl.evaluation.evaluator import score_prediction_file

        files = [view.layout.row_file(FOLDER, row.name) for row in view.rows]
        if not any(file.exists() for file in files):
            return None
        scores = [round(score_prediction_file(file), 4) if file.exists() else None for file in files]
        base, last = scores[0], scores[-1]  # the final stage only: an unfinished run has no drop yet
        drop = round(base - last, 4) if base is not None and last is not None and len(scores) > 1 else None
        return GeneralPart(scores=scores, drop=drop)

    def metrics(self, part: GeneralPart) -> dict[str, float]:
        return {"general_drop": part.drop} if part.drop is not None else {}
