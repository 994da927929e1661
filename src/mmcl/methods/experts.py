"""``experts``: a fresh LoRA adapter per task, trained from the base model on that task alone, and
evaluated with the true task identity (oracle routing).

No parameter is shared between tasks, so BWT = 0 by construction; the diagonal gives the
single-task fine-tune scores S_ST that CLiMB's knowledge-transfer metric needs. Tasks without an
expert yet (forward-transfer evaluations) are answered by the base model. The PEFT wrapper is made
once the first task is known (its expert is the wrapper's first adapter).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from peft import PeftModel

from mmcl.streams.stream import Task
from mmcl.data.sample import Sample
from mmcl.methods.base import ConfigT, Method, register_method
from mmcl.methods.lora_utils import (
    adapter_parameter_count,
    add_lora,
    ensure_adapter,
    named_adapters_tensors,
    restore_adapters,
)


def adapter_name(task: Task) -> str:
    return f"expert_{task.name}".replace(".", "_")


@register_method
class TaskExperts(Method[ConfigT]):
    name = "experts"
    state_growth = "per-task"
    description = "A fresh LoRA per task, chosen by the true task identity at test time (oracle upper bound)"
    reference = True  # an oracle: it knows the task at test time

    def init_state(self) -> None:
        self.trained: list[str] = []  # adapter names, in task order

    def setup(self, backbone) -> None:
        super().setup(backbone)
        self._wrap()

    def see_tasks(self, tasks: Sequence[Task], n_tasks: int) -> None:
        super().see_tasks(tasks, n_tasks)
        self._wrap()

    def _wrap(self) -> None:
        """Wrap the model in PEFT with the first task's expert, once the backbone and that task are known."""
        if self.backbone is not None and self.tasks and not isinstance(self.backbone.model, PeftModel):
            add_lora(self.backbone, self.lora, self.seed, adapter_name=adapter_name(self.tasks[0]))

    def before_task(self, task_index: int, task: Task) -> None:
        name = adapter_name(task)
        ensure_adapter(self.backbone, name, self.lora, self.seed + task_index)
        self.backbone.model.set_adapter(name)  # makes this adapter the only trainable one

    def after_task(self, task_index: int, task: Task) -> None:
        self.trained.append(adapter_name(task))

    def generate(self, samples: Sequence[Sample], task: Task, max_new_tokens: int) -> list[str]:
        name = adapter_name(task)
        model = self.backbone.model
        if name not in self.trained:
            with model.disable_adapter():
                return self.backbone.generate(samples, max_new_tokens)
        model.set_adapter(name)
        return self.backbone.generate(samples, max_new_tokens)

    def trainable_parameters(self) -> int:
        model = self.backbone.model
        return adapter_parameter_count(model, [model.active_adapter])

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return named_adapters_tensors(self.backbone, self.trained)

    def load_state_tensors(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        restore_adapters(self.backbone, tensors, self.trained, self.lora, self.seed)

    def state_json(self) -> dict[str, Any]:
        return {"trained": self.trained}

    def load_state_json(self, state: dict[str, Any]) -> None:
        self.trained = list(state.get("trained", []))
