"""``my-l2``: sequential LoRA plus an L2 penalty pulling the adapter towards its weights after the previous
stage. Run it with ``mmcl run --plugin examples/plugins/l2_anchor.py --method my-l2``."""

from dataclasses import dataclass

import torch

from mmcl.config import setting
from mmcl.methods.base import register_method
from mmcl.methods.seq_lora import SequentialLora


@dataclass
class L2Options:
    weight: float = setting(0.01, "[0, inf)", "strength of the pull towards the previous stage's adapter")


@register_method
class L2Anchor(SequentialLora[L2Options]):
    name = "my-l2"
    description = "Sequential LoRA + an L2 penalty towards the previous stage's adapter weights"

    def init_state(self) -> None:
        self.anchor: dict[str, torch.Tensor] = {}  # trainable parameter name -> its value after the last task

    def extra_loss(self, model, inputs, outputs):
        if not self.anchor:
            return None  # first task: nothing to stay close to
        params = dict(model.named_parameters())
        return self.config.weight * sum(((params[name] - value) ** 2).sum() for name, value in self.anchor.items())

    def after_task(self, task_index, task) -> None:
        model = self.backbone.model
        self.anchor = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def state_tensors(self):
        return {**super().state_tensors(), "anchor": {name: t.cpu() for name, t in self.anchor.items()}}

    def load_state_tensors(self, tensors) -> None:
        super().load_state_tensors({key: value for key, value in tensors.items() if key != "anchor"})
        self.anchor = {name: t.to(self.backbone.device) for name, t in tensors.get("anchor", {}).items()}
