"""The base class of the method layers that wrap a frozen ``nn.Linear`` (MoE-LoRA, HiDe, DISCO, KeepLoRA,
SMoLoRA, CL-MoE): the wrapper stands in for the linear layer, so code that reads ``in_features``,
``out_features`` or ``weight`` off a layer (dtype checks, PEFT-style helpers) keeps working."""

from __future__ import annotations

import torch
from torch import nn


class WrappedLinear(nn.Module):
    """A module holding the frozen linear layer it replaces as ``self.base``."""

    base: nn.Linear

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight."""
        return self.base.weight
