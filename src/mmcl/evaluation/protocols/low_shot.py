"""CLiMB's low-shot transfer: after each stage, a copy of the model is fine-tuned on ``shots`` training
samples of each task not learned yet (plain SFT of whatever the method trains), evaluated on that task,
and the stage's state restored. Files: ``low_shot/<row>/<task>.jsonl``. Headline number:
``low_shot_transfer`` = mean over trained rows of (score from that stage - score from the base model).

``extra_tasks`` adds tasks outside the stream, e.g. CLiMB's language-only and vision-only tasks (the
``synth-unimodal`` stream ships one of each): they get the same treatment after every row, the base row
included, and their gain is reported per task (score after a stage - score from the base model, averaged
over the trained rows). CLiMB reports unimodal results relative to the pretrained model; the difference
in points is reported here, with the matrix it comes from."""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mmcl.errors import ConfigError
from mmcl.evaluation.protocols.base import EvaluationProtocol, Row, RunContext, RunView, register_protocol
from mmcl.layout import RunLayout
from mmcl.streams.stream import StreamConfig

FOLDER = "low_shot"


@dataclass
class LowShotSettings:
    """``evaluation.low_shot``: CLiMB's low-shot transfer to the tasks not learned yet."""

    shots: int = field(default=0, metadata={
        "range": "[0, inf)",
        "help": "after each stage, fine-tune a copy on this many samples of each unseen task (0 = off)"})
    extra_tasks: StreamConfig | None = field(default=None, metadata={
        "help": "tasks outside the stream treated the same way after every row (CLiMB's language-only and "
                "vision-only tasks): a stream, e.g. {name: synth-unimodal} or {tasks: [...files...]}"})

    def check_values(self, where: str) -> None:
        if self.extra_tasks is not None and self.shots == 0:
            raise ConfigError(f"{where}.extra_tasks: needs {where}.shots > 0 (the number of samples each extra "
                              "task is fine-tuned on)")


@dataclass
class LowShotPart:
    matrix: list[list[float | None]]  # row = stage fine-tuned from, column = unseen task
    transfer: float | None  # mean gain over low-shot fine-tuning from the base model
    extra_tasks: list[str] = field(default_factory=list)  # tasks outside the stream, in file-name order
    extra_matrix: list[list[float | None]] = field(default_factory=list)  # row = stage, column = extra task
    extra_gain: dict[str, float | None] = field(default_factory=dict)  # per extra task: mean gain over the base row


def low_shot_samples(task: Any, k: int, seed: int) -> list:
    """``k`` training samples of ``task`` drawn once per seed (the same for every stage)."""
    samples = list(task.train_samples)
    random.Random(f"low-shot/{seed}/{task.name}").shuffle(samples)
    return samples[:k]


@register_protocol
class LowShotTransfer(EvaluationProtocol):
    name = "low_shot"
    folder = FOLDER
    title = "Low-shot transfer (CLiMB)"
    order = 30
    part_class = LowShotPart
    config_class = LowShotSettings
    template = "low_shot.html.j2"

    def __init__(self, settings: LowShotSettings | None = None, extra: Sequence[Any] = ()):
        super().__init__(settings or LowShotSettings())
        self.extra = list(extra)  # the built extra tasks (Task objects)

    def enabled(self) -> bool:
        return self.settings.shots > 0

    def plan_entry(self) -> dict[str, Any]:
        return {"low_shot": self.settings.shots, "low_shot_extra": [task.name for task in self.extra]}

    @staticmethod
    def positions(row: Row) -> list[int]:
        return list(range(row.seen, row.n_tasks))

    def planned_files(self, layout: RunLayout, row: Row, tasks: Sequence[str], planned: dict[str, Any]) -> list[Path]:
        if not int(planned.get("low_shot", 0) or 0):
            return []
        names = [tasks[j] for j in self.positions(row)] + list(planned.get("low_shot_extra") or [])
        return [layout.task_file(FOLDER, row.name, name) for name in names]

    def evaluate(self, run: RunContext, row: Row) -> None:
        for task in [run.tasks[position] for position in self.positions(row)] + self.extra:
            self.evaluate_task(run, row, task)

    def evaluate_task(self, run: Any, row: Row, task: Any) -> None:
        import torch

        from mmcl.evaluation.evaluator import write_predictions
        from mmcl.training.sft import train_on_samples

        out_file = run.layout.task_file(FOLDER, row.name, task.name)
        if run.exists_everywhere(out_file):
            return
        run.ensure_stage_loaded(row.index)
        method = run.method
        if not any(p.requires_grad for p in run.backbone.model.parameters()):
            raise ConfigError(
                f"evaluation.low_shot: method {run.config.method.name} leaves nothing trainable between tasks "
                f"(after stage {row.name}), so there is no model to fine-tune on the low-shot samples; set "
                "evaluation.low_shot.shots=0 for this method"
            )
        # a copy: the method's state and every parameter low-shot training may change come back afterwards
        # (before its first task a method may not have wrapped the model yet: then the model itself trains)
        trained = {name: p for name, p in run.backbone.model.named_parameters() if p.requires_grad}
        weights = {name: p.detach().clone() for name, p in trained.items()}
        tensors = {name: tensor.detach().clone() for name, tensor in method.saved_tensors().items()}
        state = json.loads(json.dumps(method.state_json()))
        config = run.config
        shots = low_shot_samples(task, self.settings.shots, config.seed)
        with tempfile.TemporaryDirectory(prefix="mmcl-low-shot-") as work:
            train_on_samples(run.backbone, shots, config.training, Path(work), seed=config.seed)
        samples = run.test_samples(task)
        started = time.perf_counter()
        answers = run.answers(row.index, task, samples, config.evaluation.max_new_tokens or task.max_new_tokens)
        with torch.no_grad():
            for name, parameter in trained.items():
                parameter.copy_(weights[name])
        method.load_state_json(state)
        method.restore_tensors(tensors)
        if run.is_main():
            score = write_predictions(out_file, samples, answers, task.scorer, time.perf_counter() - started)
            run.log(f"  low-shot [{row.name}] {task.name} after {len(shots)} samples: {score:.1f}")

    def collect(self, view: RunView) -> LowShotPart | None:
        from mmcl.evaluation.evaluator import score_prediction_file

        matrix = [
            [round(score_prediction_file(f), 4) if (f := view.layout.task_file(FOLDER, row.name, task)).exists() else None
             for task in view.tasks]
            for row in view.rows
        ]  # fmt: skip
        stream = set(view.tasks)
        extra = sorted({f.stem for row in view.rows if (folder := view.layout.row_dir(FOLDER, row.name)).is_dir()
                        for f in folder.glob("*.jsonl") if f.stem not in stream})
        extra_matrix = [
            [round(score_prediction_file(f), 4) if (f := view.layout.task_file(FOLDER, row.name, task)).exists() else None
             for task in extra]
            for row in view.rows
        ]  # fmt: skip
        if not any(value is not None for row in matrix + extra_matrix for value in row):
            return None
        return LowShotPart(matrix=matrix, transfer=mean_gain(matrix, range(len(view.tasks))), extra_tasks=extra,
                           extra_matrix=extra_matrix if extra else [],
                           extra_gain={task: mean_gain(extra_matrix, [j]) for j, task in enumerate(extra)})

    def metrics(self, part: LowShotPart) -> dict[str, float]:
        return {"low_shot_transfer": part.transfer} if part.transfer is not None else {}


def mean_gain(matrix: list[list[float | None]], columns: Any) -> float | None:
    """Mean over the rows after the base row and the given columns of (cell - base row's cell)."""
    gains = [row[j] - matrix[0][j] for row in matrix[1:] for j in columns
             if row[j] is not None and matrix[0][j] is not None]  # fmt: skip
    return round(sum(gains) / len(gains), 4) if gains else None
