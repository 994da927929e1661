"""``seq-full``: sequential full fine-tuning of the language model and projector (no adapter).

The second forgetting baseline of continual instruction tuning (e.g. the fine-tuning rows in CoIN);
the vision encoder stays frozen as in LLaVA's instruction-tuning stage. "Vision encoder" is the one
definition of :mod:`mmcl.backbones.parts` (LLaVA ``vision_tower``, Qwen-VL ``visual`` without its
``merger``, Idefics3/SmolVLM ``vision_model``); projectors and the whole language model are trained.
"""

from __future__ import annotations

import torch

from mmcl.backbones.parts import vision_encoder_parameter_names
from mmcl.methods.base import Method, NoOptions, register_method


@register_method
class SequentialFullFineTuning(Method[NoOptions]):
    name = "seq-full"
    supports_dora = False
    description = "Full fine-tuning of language model + projector on each task in turn (no adapter)"

    def setup(self, backbone) -> None:
        super().setup(backbone)
        frozen = set(vision_encoder_parameter_names(backbone.model))
        for name, parameter in backbone.model.named_parameters():
            parameter.requires_grad = name not in frozen

    def state_tensors(self) -> dict[str, torch.Tensor]:
        model = self.backbone.model
        return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        parameters = dict(self.backbone.model.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                parameters[name].copy_(value)
