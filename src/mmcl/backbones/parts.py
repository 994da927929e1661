"""The one definition of a vision-language model's parts: vision encoder, projector and language model.

Each supported architecture family is described by the attribute names of its parts on the inner
``*Model`` of transformers 5 (``model.model``); a model is matched by asking it which of these submodules
it has, and parameters are assigned to a part by identity (the parameter objects of that submodule), so
names come out exactly as ``model.named_parameters()`` spells them, with or without a PEFT wrapper.

================  ================  ===================================================  ==================
family            vision encoder    projector                                            language model
================  ================  ===================================================  ==================
LLaVA, InternVL   ``vision_tower``  ``multi_modal_projector``                            ``language_model``
Qwen2(.5)-VL      ``visual``        ``visual.merger``                                    ``language_model``
Qwen3-VL          ``visual``        ``visual.merger``, ``visual.deepstack_merger_list``  ``language_model``
Idefics3/SmolVLM  ``vision_model``  ``connector``                                        ``text_model``
================  ================  ===================================================  ==================

The Qwen-VL families keep their projector (the patch merger, an MLP from the ViT width to the language
model's) inside ``visual``. It plays the role of LLaVA's ``multi_modal_projector`` and Idefics3's
``connector``, which instruction tuning trains, so the merger is counted as the projector, not as part of
the vision encoder: "vision encoder" means the same thing (the ViT proper) in every family. Qwen3-VL adds
DeepStack mergers (``visual.deepstack_merger_list``): MLPs of the same shape that map intermediate ViT
layers into the first decoder layers' hidden states; they are projectors too, trained with the merger.
InternVL (the transformers-native ``InternVLForConditionalGeneration``) has LLaVA's attribute names. The
output head (``lm_head``) belongs to the language model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmcl.errors import MmclError


@dataclass(frozen=True)
class PartLayout:
    family: str
    vision_encoder: str  # attribute of the inner model
    projector: str  # dotted attribute path of the inner model (may lie inside the vision encoder)
    language_model: str  # attribute of the inner model
    more_projectors: tuple[str, ...] = ()  # further projector paths (Qwen3-VL's DeepStack mergers)

    @property
    def projectors(self) -> tuple[str, ...]:
        return (self.projector, *self.more_projectors)


# the first layout whose every path exists wins: Qwen3-VL (which also has Qwen2-VL's paths) comes first
LAYOUTS: tuple[PartLayout, ...] = (
    PartLayout("llava", "vision_tower", "multi_modal_projector", "language_model"),
    PartLayout("qwen3-vl", "visual", "visual.merger", "language_model", ("visual.deepstack_merger_list",)),
    PartLayout("qwen-vl", "visual", "visual.merger", "language_model"),
    PartLayout("idefics3", "vision_model", "connector", "text_model"),
)

PARTS = ("vision_encoder", "projector", "language_model")


def top_level_vision_modules() -> list[str]:
    """Names of the inner-model attributes that hold the vision encoder or the projector (every family),
    for settings that take module names before a model exists (e.g. modules left out of quantisation)."""
    names: list[str] = []
    for layout in LAYOUTS:
        for path in (layout.vision_encoder, *layout.projectors):
            head = path.split(".")[0]
            if head not in names:
                names.append(head)
    return names


def _unwrap(model) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _submodule(root: torch.nn.Module, path: str) -> torch.nn.Module | None:
    module = root
    for attribute in path.split("."):
        module = getattr(module, attribute, None)
        if not isinstance(module, torch.nn.Module):
            return None
    return module


def find_layout(model) -> tuple[PartLayout, torch.nn.Module]:
    """The layout of ``model`` and the module its attribute names are relative to (the inner ``model.model``
    of transformers 5, or the top-level model of older layouts). MmclError for an architecture none fits."""
    hf_model = _unwrap(model)
    roots = [root for root in (getattr(hf_model, "model", None), hf_model) if isinstance(root, torch.nn.Module)]
    for root in roots:
        for layout in LAYOUTS:
            paths = (layout.vision_encoder, *layout.projectors, layout.language_model)
            if all(_submodule(root, path) is not None for path in paths):
                return layout, root
    known = ", ".join(f"{layout.family} ({layout.vision_encoder})" for layout in LAYOUTS)
    raise MmclError(
        f"model {type(hf_model).__name__}: cannot tell its vision encoder from its language model (known: {known})"
    )


def vision_encoder_module(model) -> torch.nn.Module:
    """The vision encoder submodule (for Qwen-VL the whole ``visual``, whose ``merger`` (and Qwen3-VL's
    ``deepstack_merger_list``) is the projector)."""
    layout, root = find_layout(model)
    return _submodule(root, layout.vision_encoder)


def part_parameter_names(model) -> dict[str, list[str]]:
    """``{"vision_encoder": [...], "projector": [...], "language_model": [...], "other": [...]}``: every name
    of ``model.named_parameters()`` in exactly one part, in the model's order. The language model includes
    the output head; "other" holds whatever is in none of the three (PEFT adapters are counted with the
    layer they wrap)."""
    layout, root = find_layout(model)
    hf_model = _unwrap(model)
    owner: dict[int, str] = {}
    # the projector first: for Qwen-VL it lies inside the vision encoder and must not be claimed by it
    claims = [("projector", path) for path in layout.projectors]
    claims += [("vision_encoder", layout.vision_encoder), ("language_model", layout.language_model)]
    for part, path in claims:
        for parameter in _submodule(root, path).parameters():
            owner.setdefault(id(parameter), part)
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        for parameter in head.parameters():
            owner.setdefault(id(parameter), "language_model")
    parts: dict[str, list[str]] = {part: [] for part in (*PARTS, "other")}
    for name, parameter in model.named_parameters():
        parts[owner.get(id(parameter), "other")].append(name)
    return parts


def vision_encoder_parameter_names(model) -> list[str]:
    """Names (as ``model.named_parameters()`` gives them) of the vision encoder's parameters."""
    return part_parameter_names(model)["vision_encoder"]


def is_vision_encoder(name: str, model) -> bool:
    """Whether parameter ``name`` of ``model`` belongs to the vision encoder (cheap enough for one-off
    checks; for many names call :func:`vision_encoder_parameter_names` once)."""
    return name in set(vision_encoder_parameter_names(model))


def freeze_vision_encoder(model) -> int:
    """Turn off gradients of the vision encoder; returns how many parameters were frozen."""
    frozen = set(vision_encoder_parameter_names(model))
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad = False
    return len(frozen)
