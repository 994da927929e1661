"""PEFT helpers shared by the LoRA-based methods."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from mmcl.backbones.backbone import Backbone
from mmcl.errors import RunDirError
from mmcl.methods.base import LoraSettings


def lora_config(settings: LoraSettings, backbone: Backbone) -> LoraConfig:
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.targets or backbone.lora_targets,
        bias="none",
        use_dora=settings.use_dora,
    )


def add_lora(backbone: Backbone, settings: LoraSettings, seed: int, adapter_name: str = "default") -> None:
    """Wrap ``backbone.model`` in a PEFT model with one freshly initialised LoRA adapter."""
    torch.manual_seed(seed)
    backbone.model = get_peft_model(backbone.model, lora_config(settings, backbone), adapter_name=adapter_name)


def ensure_adapter(backbone: Backbone, name: str, settings: LoraSettings, init_seed: int) -> None:
    """Add a freshly initialised LoRA adapter ``name`` to the PEFT model (torch seeded with ``init_seed``
    first, so its initial weights depend on that seed alone) unless the model has it already."""
    model = backbone.model
    if name not in model.peft_config:
        torch.manual_seed(init_seed)
        model.add_adapter(name, lora_config(settings, backbone))


def adapter_parameter_count(model: torch.nn.Module, names: Sequence[str]) -> int:
    """How many parameters the named adapters have (the parameters whose name holds ``.<adapter>.``)."""
    return sum(p.numel() for n, p in model.named_parameters() if any(f".{name}." in n for name in names))


def adapter_tensors(backbone: Backbone, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    state = get_peft_model_state_dict(backbone.model, adapter_name=adapter_name)
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def named_adapters_tensors(backbone: Backbone, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The weights of several named adapters, one group per adapter (saved as ``<adapter>::<PEFT key>``)."""
    return {name: adapter_tensors(backbone, name) for name in names}


def adapter_part(tensors: dict[str, dict[str, torch.Tensor]], name: str) -> dict[str, torch.Tensor]:
    """The weights of adapter ``name`` out of a :func:`named_adapters_tensors` dict; error if absent."""
    own = tensors.get(name)
    if not isinstance(own, dict) or not own:
        raise RunDirError(f"saved state has no weights for adapter {name!r}")
    return own


def restore_adapters(
    backbone: Backbone, tensors: dict[str, dict[str, torch.Tensor]], names: Sequence[str], settings: LoraSettings, seed: int
) -> None:
    """Load the saved weights of the adapters ``names`` (a :func:`named_adapters_tensors` dict), adding each
    missing one first as :func:`ensure_adapter` does, the i-th with init seed ``seed + i``."""
    for index, name in enumerate(names):
        ensure_adapter(backbone, name, settings, seed + index)
        load_adapter_tensors(backbone, adapter_part(tensors, name), name)


def load_adapter_tensors(backbone: Backbone, tensors: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    result = set_peft_model_state_dict(backbone.model, tensors, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RunDirError(f"adapter {adapter_name}: unexpected keys in saved state: {unexpected[:3]}")
