"""``freeze``: CLiMB's "frozen bottom-K" baseline, sequential fine-tuning of the language model above its bottom k
decoder layers, everything below (and the vision side) frozen.

Paper: Tejas Srinivasan, Ting-Yun Chang, Leticia Pinto Alva, Georgios Chochlakis, Mohammad Rostami, Jesse
Thomason, "CLiMB: A Continual Learning Benchmark for Vision-and-Language Tasks", NeurIPS 2022 Datasets and
Benchmarks Track, arXiv:2206.09059. Reference code: github.com/GLAMOR-USC/CLiMB (``src/modeling/vilt.py``,
``ViltEncoderWrapper.freeze_bottom_k_layers``: the encoder's ``embeddings`` and ``encoder.layer[0:k]`` get
``requires_grad = False``, with ``assert k < len(layers)``; ``src/train/train_upstream_continual_learning.py``,
``--cl_algorithm freeze_bottom_k_layers --layers_to_freeze k``; the experiment script
``src/exp_scripts/continual_learning/vqa_nlvr_snlive_vcr/vilt-freeze_bottom9layers.sh`` sets k = 9 of ViLT-B/32's
12 layers). Only the abstract of the paper was read here; the facts above come from the released code.

What is implemented. The model is trained task after task with the ordinary supervised loss (as ``seq-full``),
with these parts frozen for the whole stream:

- the vision encoder (the one definition of :mod:`mmcl.backbones.parts`, as ``seq-full`` freezes it);
- the bottom k decoder layers of the language model: its first ``nn.ModuleList`` with at least one entry (its
  ``layers`` attribute when it has one: Llama, Qwen2, Idefics3's text model), entries 0 .. k-1;
- with ``freeze_embeddings`` (default, CLiMB freezes the encoder's embeddings): the language model's input token
  embeddings (``get_input_embeddings()``). When the checkpoint ties them to the output head (tiny-llava,
  Qwen2-VL-2B: ``tie_word_embeddings``) that one matrix is the head too, which then stays frozen as well;
- with ``freeze_projector`` (default): the projector. ViLT has no separate vision encoder: its image patches are
  embedded by a linear patch projection inside the same ``embeddings`` module that CLiMB freezes, and the
  projector is that projection's counterpart in a LLaVA-type model.

Everything else trains: decoder layers k .. N-1, the final norm, the output head (unless tied and frozen), any
other module. k is ``frozen_layers`` or, when that is null, ``round(frozen_share * N)`` capped at N - 1 (CLiMB
freezes 9 of 12 layers: 0.75; the cap keeps CLiMB's ``k < N``, so at least one layer trains; with N = 1, k = 0).
An explicit ``frozen_layers`` >= N is refused.

``lora: true`` (an addition, not in CLiMB): instead of training those parameters fully, one LoRA adapter (the
run's ``lora`` settings) on the modules matched by ``lora.targets`` (default: the backbone's) that lie inside
decoder layers k .. N-1, continued across tasks as in ``seq-lora``; nothing else trains (the vision side, the
projector, embeddings, head and bottom layers carry no adapter).

Where this differs from CLiMB, and why: CLiMB's model is a single-stream encoder (ViLT) with a new classification
head per task; here the "layers" are the decoder layers of a generative language model whose output head is
shared by all tasks, and k is set relative to the depth (the same share 0.75) unless given. CLiMB keeps the best
epoch on a validation split per task; here the model after the last step is kept, as for every mmcl method.

State: the full variant saves the weights of every trainable parameter (as ``seq-full``); the LoRA variant the
adapter (as ``seq-lora``); state.json records N, k and the options, checked on resume.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from peft import get_peft_model
from torch import nn

from mmcl.backbones.parts import find_layout, part_parameter_names
from mmcl.config import LoraSettings, setting
from mmcl.errors import ConfigError, MmclError, RunDirError
from mmcl.methods.base import Method, register_method
from mmcl.methods.lora_utils import adapter_tensors, load_adapter_tensors, lora_config


@dataclass
class FreezeConfig:
    """Frozen bottom-K options. Source of the defaults: CLiMB's released code (GLAMOR-USC/CLiMB,
    ``src/modeling/vilt.py`` freezes the embeddings with the bottom k layers; ``vilt-freeze_bottom9layers.sh``:
    k = 9 of 12)."""

    frozen_layers: int | None = setting(
        None, "[0, inf)", help="k: decoder layers frozen from the bottom (must be < the number of layers N); none = "
        "round(frozen_share x N), at most N - 1"
    )
    frozen_share: float = setting(
        0.75, "[0, 1]", help="share of the decoder layers frozen when frozen_layers is none (CLiMB: 9 of ViLT's 12)"
    )
    freeze_embeddings: bool = setting(
        True, help="freeze the input token embeddings (CLiMB freezes the encoder's embeddings; a tied output head "
        "is then frozen with them)"
    )
    freeze_projector: bool = setting(
        True, help="freeze the vision-language projector (CLiMB: ViLT's patch projection lies in the frozen embeddings)"
    )
    lora: bool = setting(
        False, help="train one LoRA adapter on the targeted modules of the layers above k instead of full fine-tuning "
        "(an addition, not in CLiMB)"
    )


def resolve_frozen_layers(n_layers: int, frozen_layers: int | None, frozen_share: float) -> int:
    """k for a language model of ``n_layers`` decoder layers: ``frozen_layers`` if given (ConfigError unless
    0 <= k < n_layers), else ``round(frozen_share * n_layers)`` (halves up) capped at ``n_layers - 1``."""
    if n_layers < 1:
        raise MmclError("freeze: the language model has no decoder layers")
    if frozen_layers is None:
        return max(0, min(math.floor(frozen_share * n_layers + 0.5), n_layers - 1))
    if not 0 <= frozen_layers < n_layers:
        raise ConfigError(
            f"method.options.frozen_layers: {frozen_layers} for a language model of {n_layers} decoder layers; "
            f"at most {n_layers - 1} can be frozen (at least one layer must train, as in CLiMB)"
        )
    return frozen_layers


def language_model_module(model: nn.Module) -> nn.Module:
    """The language model submodule of the (possibly PEFT-wrapped) VLM, as :mod:`mmcl.backbones.parts` defines it."""
    layout, root = find_layout(model)
    module = root
    for attribute in layout.language_model.split("."):
        module = getattr(module, attribute)
    return module


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers: its ``layers`` attribute when that is a non-empty ``nn.ModuleList``,
    else the first non-empty ``nn.ModuleList`` in module order."""
    direct = getattr(language_model, "layers", None)
    if isinstance(direct, nn.ModuleList) and len(direct) > 0:
        return direct
    for _, module in language_model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise MmclError(f"freeze: no list of decoder layers found in {type(language_model).__name__}")


def _module_name(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise MmclError("freeze: the decoder layers are not a submodule of the model")


@register_method
class FreezeBottomLayers(Method[FreezeConfig]):
    name = "freeze"
    description = (
        "Sequential fine-tuning of the language model above its bottom k decoder layers; those layers, the "
        "embeddings, projector and vision encoder frozen (CLiMB's frozen bottom-K; option: LoRA above k)"
    )

    def __init__(self, config: FreezeConfig, lora: LoraSettings, seed: int):
        super().__init__(config, lora, seed)
        if getattr(lora, "use_dora", False) and not config.lora:
            raise ConfigError(
                "lora.use_dora: method freeze trains no LoRA unless method.options.lora is true; set lora.use_dora: "
                "false (or method.options.lora: true)"
            )

    def init_state(self) -> None:
        self.n_layers = 0  # N, the language model's decoder layers
        self.k = 0  # frozen bottom layers
        self.trained: list[str] = []  # full variant: names of the trained parameters, in model order

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self, backbone) -> None:
        super().setup(backbone)
        model = backbone.model
        layers = decoder_layers(language_model_module(model))
        self.n_layers = len(layers)
        self.k = resolve_frozen_layers(self.n_layers, self.config.frozen_layers, self.config.frozen_share)
        if self.config.lora:
            self._add_lora_above(layers)
            return
        frozen = self._frozen_parameters(layers)
        self.trained = []
        for name, parameter in model.named_parameters():
            parameter.requires_grad = id(parameter) not in frozen
            if parameter.requires_grad:
                self.trained.append(name)

    def _frozen_parameters(self, layers: nn.ModuleList) -> set[int]:
        """ids of the parameters frozen in the full variant."""
        model = self.backbone.model
        parts = part_parameter_names(model)
        named = dict(model.named_parameters())
        frozen = {id(named[name]) for name in parts["vision_encoder"]}
        if self.config.freeze_projector:
            frozen |= {id(named[name]) for name in parts["projector"]}
        if self.config.freeze_embeddings:
            frozen |= {id(p) for p in language_model_module(model).get_input_embeddings().parameters()}
        for layer in layers[: self.k]:
            frozen |= {id(p) for p in layer.parameters()}
        return frozen

    def lora_target_names(self, layers: nn.ModuleList) -> list[str]:
        """Full names of the modules matched by the LoRA targets regex that lie inside decoder layers k .. N-1."""
        model = self.backbone.model
        targets = self.lora.targets or self.backbone.lora_targets
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise ConfigError(f"lora.targets: invalid regex {targets!r} ({exc})") from None
        base = _module_name(model, layers)
        prefixes = tuple(f"{base}.{index}." for index in range(self.k, len(layers)))
        names = [name for name, _ in model.named_modules() if name.startswith(prefixes) and pattern.fullmatch(name)]
        if not names:
            raise ConfigError(
                f"lora.targets: regex {targets!r} matches no module in decoder layers {self.k}..{len(layers) - 1}"
            )
        return names

    def _add_lora_above(self, layers: nn.ModuleList) -> None:
        backbone = self.backbone
        config = dataclasses.replace(lora_config(self.lora, backbone), target_modules=self.lora_target_names(layers))
        torch.manual_seed(self.seed)
        backbone.model = get_peft_model(backbone.model, config)

    # -- state ---------------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        assert self.backbone is not None
        return sum(p.numel() for p in self.backbone.model.parameters() if p.requires_grad)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.config.lora:
            return adapter_tensors(self.backbone)
        parameters = dict(self.backbone.model.named_parameters())
        return {name: parameters[name].detach().to("cpu", copy=True).contiguous() for name in self.trained}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = set(adapter_tensors(self.backbone)) if self.config.lora else set(self.trained)
        if not tensors and expected:
            raise RunDirError("freeze state: no saved weights")
        missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
        if missing or unexpected:
            raise RunDirError(f"freeze state: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
        if self.config.lora:
            load_adapter_tensors(self.backbone, tensors)
            return
        parameters = dict(self.backbone.model.named_parameters())
        with torch.no_grad():
            for name in self.trained:
                value, parameter = tensors[name], parameters[name]
                if not isinstance(value, torch.Tensor) or value.shape != parameter.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise RunDirError(f"freeze state: {name} has shape {shape}, expected {tuple(parameter.shape)}")
                parameter.copy_(value)

    def _shape(self) -> dict[str, Any]:
        return {
            "layers": self.n_layers,
            "frozen_layers": self.k,
            "lora": self.config.lora,
            "freeze_embeddings": self.config.freeze_embeddings,
            "freeze_projector": self.config.freeze_projector,
        }

    def state_json(self) -> dict[str, Any]:
        return self._shape()

    def load_state_json(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise RunDirError(f"freeze state: expected a JSON object, got {type(state).__name__}")
        expected = self._shape()
        saved = {key: state.get(key) for key in expected}
        if saved != expected:
            raise RunDirError(f"freeze state: saved with {saved}, this run has {expected}")
