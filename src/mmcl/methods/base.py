"""The method interface the runner knows, and the registry methods join with ``@register_method``.

A method sees one task at a time through hooks (names after Avalanche's vocabulary, without shared
mutable state): ``setup`` once, then per task ``before_task`` -> ``train_data`` -> training with
``extra_loss`` added to the cross-entropy -> ``after_task``. ``generate`` is overridden only when
inference differs from plain batched generation (e.g. routing). Everything a later stage needs is
returned by ``state_tensors`` (safetensors) and ``state_json`` (JSON) so a stage can be resumed.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from mmcl.backbones.backbone import Backbone
from mmcl.streams.stream import Task
from mmcl.config import LoraSettings, TrainingConfig
from mmcl.data.sample import Sample
from mmcl.registry import Registry


@dataclass
class NoOptions:
    """This method has no options of its own."""


class Method(ABC):
    """Base class: sequential training with no protection against forgetting unless hooks add it."""

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type] = NoOptions
    trains_jointly: ClassVar[bool] = False  # True: one stage on the union of all tasks (multitask reference)

    def __init__(self, config: Any, lora: LoraSettings, seed: int):
        self.config = config
        self.lora = lora
        self.seed = seed
        self.log_dir: Path | None = None  # set by the runner: where per-step training scalars go (TensorBoard)
        self.backbone: Backbone | None = None
        self.tasks: list[Task] = []

    # -- hooks -------------------------------------------------------------------------------
    def setup(self, backbone: Backbone, tasks: Sequence[Task]) -> None:
        """Wrap the backbone's model (adapters, frozen parts) before the first task; ``tasks`` is the stream."""
        self.backbone = backbone
        self.tasks = list(tasks)

    def before_task(self, task_index: int, task: Task) -> None:
        """Called before training on ``task`` (0-based ``task_index``)."""

    def train_data(self, task_index: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
        """The samples to train on for this task (replay and data rewriting hook in here)."""
        return list(samples)

    def extra_loss(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> torch.Tensor | None:
        """A term added to the token cross-entropy during training, or None."""
        return None

    def train(self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int) -> dict[str, Any]:
        """Train the model on one stage's ``samples`` (after ``train_data``); returns metrics for stage.json.

        Default: supervised fine-tuning with :meth:`extra_loss` added. Methods that learn from
        rewards (GRPO, EvoLMM) override this; ``work_dir`` is scratch space removed afterwards."""
        from mmcl.training.sft import train_on_samples

        assert self.backbone is not None
        return train_on_samples(self.backbone, samples, config, work_dir, seed=seed, extra_loss=self.extra_loss)

    def after_task(self, task_index: int, task: Task) -> None:
        """Called after training on ``task`` (statistics, experts, routers)."""

    def evaluates_stage(self, index: int, n_stages: int) -> bool:
        """Whether the model after stage ``index`` (0 = the base model) of ``n_stages`` is one the method
        defines and the runner should evaluate; a row it skips stays empty (``None``) in the matrix.
        Only protocols that build their model at the end (MR-LoRA's paper protocol) say no."""
        return True

    def generate(self, samples: Sequence[Sample], task: Task, max_new_tokens: int) -> list[str]:
        """Answers for one batch of test samples of ``task``; the task identity is for oracle methods."""
        assert self.backbone is not None
        return self.backbone.generate(samples, max_new_tokens)

    # -- evaluation summary (stored by the runner in method_summary.json after each evaluation) --
    def evaluation_summary(self) -> dict[str, Any] | None:
        """Method-specific facts about the evaluations so far (e.g. routing statistics), or None."""
        return None

    def load_evaluation_summary(self, summary: dict[str, Any]) -> None:
        """Restore what ``evaluation_summary`` returned when a run is resumed."""

    def report_sections(self) -> list[dict[str, str]]:
        """Extra report sections ``{"title", "html"}`` rendered from the evaluation summary."""
        return []

    # -- state -------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        assert self.backbone is not None
        return sum(p.numel() for p in self.backbone.model.parameters() if p.requires_grad)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that define the model after a stage (adapter weights, statistics)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` returned."""

    def state_json(self) -> dict[str, Any]:
        """JSON-serialisable state (buffers of ids, counters)."""
        return {}

    def load_state_json(self, state: dict[str, Any]) -> None:
        """Restore what ``state_json`` returned."""


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make the method selectable by ``cls.name`` (a taken name is refused)."""
    return METHODS.register(cls.name, cls)
