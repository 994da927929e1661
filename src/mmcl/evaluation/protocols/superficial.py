"""SEFE's superficial-forgetting probes (see :mod:`mmcl.evaluation.superficial` for the judging): after
each stage every task learned so far is asked again in another answer style; format and content of both
answers are judged apart. Files: ``superficial/<row>/<task>.jsonl``. Turning it on for a finished run
only adds files (the setting does not enter the run's fingerprint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mmcl.evaluation.protocols.base import EvaluationProtocol, Row, RunContext, RunView, register_protocol
from mmcl.layout import RunLayout

FOLDER = "superficial"


@dataclass
class SuperficialSettings:
    """``evaluation.superficial``: SEFE's probes of superficial vs essential forgetting."""

    enabled: bool = field(default=False, metadata={
        "help": "also ask seen tasks in another answer format; score format and content apart (adds files only)",
        "affects_results": False})


@dataclass
class SuperficialPart:
    format: list[list[float | None]]  # per row and task: % of own answers in the trained format
    content: list[list[float | None]]  # % with the right content, whatever the format
    right: list[list[float | None]]  # % right in both
    probe_format: list[list[float | None]]  # the same for the answers to the re-asked question
    probe_content: list[list[float | None]]
    summary: dict[str, Any] | None  # after learning vs final, and forgetting split into essential/superficial


@register_protocol
class SuperficialProbes(EvaluationProtocol):
    name = "superficial"
    folder = FOLDER
    title = "Superficial vs essential forgetting"
    order = 20
    part_class = SuperficialPart
    config_class = SuperficialSettings
    template = "superficial.html.j2"

    def __init__(self, settings: SuperficialSettings | None = None):
        super().__init__(settings or SuperficialSettings())

    def enabled(self) -> bool:
        return self.settings.enabled

    def plan_entry(self) -> dict[str, Any]:
        return {"superficial": self.enabled()}

    @staticmethod
    def positions(row: Row) -> list[int]:
        return list(range(row.seen)) if row.index > 0 else []

    def planned_files(self, layout: RunLayout, row: Row, tasks: Sequence[str], planned: dict[str, Any]) -> list[Path]:
        if not planned.get("superficial"):
            return []
        return [layout.task_file(FOLDER, row.name, tasks[j]) for j in self.positions(row)]

    def evaluate(self, run: RunContext, row: Row) -> None:
        from mmcl.evaluation.evaluator import read_predictions
        from mmcl.evaluation.superficial import make_probes, probe_tokens, write_judged

        for position in self.positions(row):
            task = run.tasks[position]
            out_file = run.layout.task_file(FOLDER, row.name, task.name)
            if run.exists_everywhere(out_file):
                continue
            samples = run.test_samples(task)
            probes = make_probes(samples, task.name)
            answers = run.answers(row.index, task, probes, probe_tokens(probes))
            if run.is_main():
                originals = read_predictions(run.layout.prediction_file(row.name, task.name))
                write_judged(out_file, samples, probes, originals, answers)
                run.log(f"  probe [{row.name}] {task.name}: judged {len(probes)} answers in another format")

    def collect(self, view: RunView) -> SuperficialPart | None:
        from mmcl.evaluation.superficial import RATES, judged_rates, summarize

        rates = [
            [judged_rates(f) if (f := view.layout.task_file(FOLDER, row.name, task)).exists() else None for task in view.tasks]
            for row in view.rows
        ]
        if not any(cell for row in rates for cell in row):
            return None
        tables = {key: [[round(cell[key], 4) if cell else None for cell in row] for row in rates] for key in RATES}
        return SuperficialPart(**tables, summary=summarize(view.matrix, rates))

    def metrics(self, part: SuperficialPart) -> dict[str, float]:
        split = (part.summary or {}).get("forgetting")
        if not split:
            return {}
        return {"forgetting_essential": split["essential"], "forgetting_superficial": split["superficial"]}
