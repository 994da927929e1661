"""The base class of the method layers that wrap a frozen ``nn.Linear`` (MoE-LoRA, HiDe, DISCO, KeepLoRA,
SMoLoRA, CL-MoE): the wrapper stands in for the linear layer, so code that reads ``in_features``,
``out_features`` or ``weight`` off a layer (dtype checks, PEFT-style helpers) keeps working."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from mmcl.errors import ConfigError


class WrappedLinear(nn.Module):
    """A module holding the frozen linear layer it replaces as ``self.base``."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad = False

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


def wrap_linear_layers(model: nn.Module, targets: str, make: Callable[[str, nn.Linear], nn.Module]) -> list[str]:
    """Replace every ``nn.Linear`` whose full module name ``re.fullmatch``-es ``targets`` by ``make(name, linear)``;
    returns the wrapped names, in module order. ConfigError for a bad regex or when nothing matches."""
    try:
        pattern = re.compile(targets)
    except re.error as exc:
        raise ConfigError(f"lora.targets: invalid regex {targets!r} ({exc})") from None
    names = [name for name, module in model.named_modules()
             if name and isinstance(module, nn.Linear) and pattern.fullmatch(name)]
    if not names:
        raise ConfigError(f"lora.targets: regex {targets!r} matches no linear layer of the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))
    return names


def float_weights(method: str, name: str, base: nn.Linear) -> nn.Linear:
    """``base``, or ConfigError when its weights are not floating point (a quantised layer cannot be merged into)."""
    if not base.weight.dtype.is_floating_point:
        raise ConfigError(f"{method}: layer {name} holds {base.weight.dtype} weights (quantised?); merging needs "
                          "float weights (set backbone.load_in_4bit: false)")
    return base
