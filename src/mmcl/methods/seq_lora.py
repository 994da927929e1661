"""``seq-lora``: one LoRA adapter trained on task after task with nothing against forgetting.

The standard lower-bound baseline of continual instruction tuning (e.g. "LoRA" rows in MLLM-CL and CoIN).
"""

from __future__ import annotations

import torch

from mmcl.methods.base import ConfigT, Method, register_method
from mmcl.methods.lora_utils import adapter_tensors, add_lora, load_adapter_tensors


@register_method
class SequentialLora(Method[ConfigT]):
    name = "seq-lora"
    description = "One LoRA adapter fine-tuned on each task in turn (the forgetting baseline)"

    def setup(self, backbone) -> None:
        super().setup(backbone)
        add_lora(backbone, self.lora, self.seed)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return adapter_tensors(self.backbone)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_adapter_tensors(self.backbone, tensors)
