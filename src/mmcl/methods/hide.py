"""``hide``: HiDe-LLaVA, hierarchical decoupling of LoRA experts (Guo, Zeng, Xiang, Zhu, Wang, Zhang and Liu,
"HiDe-LLaVA: Hierarchical Decoupling for Continual Instruction Tuning of Multimodal Large Language Model",
ACL 2025, arXiv:2503.12941; reference code github.com/Ghy0501/HiDe-LLaVA).

The paper's CKA analysis finds that only the top decoder layer of the language model learns task-specific
features; the layers below learn what tasks share. HiDe-LLaVA therefore keeps one LoRA expert per task in
every targeted linear layer and combines the experts differently by depth.

**Training task t** (0-based). Every targeted ``nn.Linear`` (frozen weight ``W``) gets a fresh expert
``(A_t, B_t)`` (``B_t = 0``); the layer computes ``W x + b + s B_t A_t dropout(x)`` with ``s = lora.alpha /
lora.rank``. Only the new expert is trained, and the older experts are not in the forward path at all
(reference: ``HiDe/peft/tuners/clitmoelora.py``, ``HiDeMOELoraLinear.forward`` and ``HiDeMOELinearA/B`` use
``loraA[cur_task]`` / ``loraB[cur_task]`` alone when ``training``). Each task also leaves two anchors: the
mean image feature ``a_t`` and the mean instruction feature ``u_t`` over its training samples
(``llava/model/llava_arch.py``, ``prepare_inputs_labels_for_multimodal``: a running mean over the training
batches).

**Inference** after ``T`` tasks, with no task identity:

- a layer below the top (every target outside the top ``top_layers`` decoder layers: the lower decoder layers
  and, with the backbone's default targets, the projector) uses the *task-general fusion* of the experts.
  Paper Fig. 3(b) draws the fused LoRA as ``alpha_1 LoRA_1 + ... + alpha_t LoRA_t``; the released code sums
  the factors separately with ``alpha_i = 1`` (``merge_weight = 1.0`` in ``HiDeMOELinearA/B.forward``)::

      fuse = "factors" (default):  W x + b + s (sum_i c B_i) (sum_i c A_i) x
      fuse = "updates":            W x + b + s sum_i c B_i A_i x

  with ``c = 1`` (``fusion_coefficient = "one"``, the code) or ``c = 1/T`` (``"mean"``). "factors" contains
  the cross terms ``B_i A_j`` (i != j) that the code's fused matrices produce; "updates" is the plain sum of
  the experts' own updates.
- a layer in the top decoder layer mixes the experts' outputs (*task-specific expansion*)::

      W x + b + sum_i w_i s B_i A_i x,   w = softmax(sim / tau),
      sim_i = (cos(f_img, a_i) + cos(f_txt, u_i)) / 2,   tau = 0.1

  (``llava_arch.py``: ``sim = (image_sim + text_sim) / 2`` and ``F.softmax(sim_tensor / 0.1)``; the weights
  are set on the projections of ``model.layers[-1]``).

**Features.** The paper uses a separate CLIP image and CLIP text encoder. Here they come from
:mod:`mmcl.methods.sample_features`: the image feature is the mean of the backbone's own vision encoder's
last hidden state, the instruction feature the mean input embedding of the final user turn, or the mean last
hidden state of a local encoder (``text_encoder``, e.g. a CLIP text model or sentence encoder saved with
``save_pretrained``). Features are computed with every HiDe layer bypassed, so they never depend on the
experts whatever ``lora.targets`` says.

**Differences from the paper / released code, and why**

- *Per-sample mixing.* The reference computes the cosine similarities for a whole batch and keeps, for each
  anchor, the **maximum over the batch** (``image_sims.max().item()``), so one weight vector serves the batch
  and a sample's answer depends on the samples it is batched with (its evaluation scripts run one question per
  ``generate`` call, where this is the same thing). Here every sample gets its own weights: a ``(batch,
  experts)`` tensor that the top-layer modules read in ``forward`` and broadcast over tokens, so batched answers
  equal one-by-one answers.
- *Experts in the softmax.* The reference mixes a fixed number of expert slots (the stream length at
  evaluation, ``set_eval(num_task)`` in MCITlib; a hard-coded ``expert_num = 6`` in HiDe-LLaVA's
  ``llava_llama.py``), including not-yet-trained slots with random anchors (``0.1 * randn``) and zero ``B``.
  Here only the trained experts take part (forward-transfer rows use the experts learned so far).
- *Exact anchor means.* The reference's running mean starts from the random anchor with a count of 1 (kept in
  bfloat16) and, over several epochs, counts samples once per epoch; here an anchor is the exact mean over the
  task's training samples, each once (the features are frozen, so epochs would not change it). Image anchors
  average the samples that have images (a sample without one has a zero image feature and cosine 0).
- *Projector and rank.* The reference trains the projector fully (shared, task after task) and targets the
  language model's linear layers only; here the projector is whatever ``lora.targets`` holds (by default the
  backbone's targets, which include LLaVA's projector: its experts are fused like any lower layer). The
  reference gives each of its ``expert_num`` experts rank ``lora_r / expert_num`` with scaling
  ``lora_alpha / lora_r`` (``HiDeMOELinearA``); here each expert has rank ``expert_rank`` (default
  ``lora.rank``) and the scaling is ``lora.alpha / lora.rank``: ``lora.rank=64, lora.alpha=128, expert_rank=8``
  reproduces the CoIN set-up of ``scripts/HiDe/Train_CoIN/Task*.sh`` (r 64, alpha 128, 8 experts).
- *Initialisation.* ``A`` is Kaiming-uniform (a = sqrt(5), as PEFT and :mod:`mmcl.methods.moelora`) where the
  reference draws ``N(0, 0.01^2)``; ``B = 0`` in both.

DoRA is refused (the experts are plain A/B pairs read directly). The stage state holds every expert's ``A``
and ``B`` per layer and the two anchor matrices; ``state_json`` the task names and the shape settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmcl.config import LoraSettings, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import Method, register_method
from mmcl.methods.sample_features import TextFeatures, cosine_to, image_features
from mmcl.streams.stream import Task
from mmcl.methods.wrapped_linear import WrappedLinear, wrap_linear_layers

FUSE_CHOICES = ("factors", "updates")
COEFFICIENT_CHOICES = ("one", "mean")


@dataclass
class HiDeConfig:
    """HiDe-LLaVA options; rank, alpha, dropout and targets come from the run's ``lora`` settings."""

    # Paper Sec. 3 / Fig. 1: only the top layer (layer 32 of LLaVA-1.5-7B) is task-specific; llava_arch.py
    # sets the mixing weights on model.layers[-1] only. 0 fuses every layer (the paper's "merge all" ablation).
    top_layers: int = setting(1, "[0, inf)", "top decoder layers of the language model that mix the experts by "
                              "anchor similarity (paper: 1, the top layer); the layers below fuse them")
    # llava_arch.py: F.softmax(sim_tensor / 0.1)
    temperature: float = setting(0.1, "(0, inf)", "softmax temperature over the anchor similarities "
                                 "(reference llava_arch.py: 0.1)")
    # Fig. 3(b) fuses LoRA modules; clitmoelora.py HiDeMOELinearA/B sum the A's and the B's separately.
    fuse: str = setting("factors", help="lower-layer fusion: factors = s (sum B_i)(sum A_i) x as the reference "
                        "code (clitmoelora.py); updates = s sum_i B_i A_i x (each expert's own update)")
    # clitmoelora.py: merge_weight = 1.0
    fusion_coefficient: str = setting("one", help="weight c of every expert in the lower-layer fusion: one = 1 "
                                      "(reference merge_weight = 1.0), mean = 1/(number of experts)")
    # clitmoelora.py HiDeMOELinearA: rank lora_r / expert_num per expert (CoIN scripts: 64 / 8 = 8)
    expert_rank: int | None = setting(None, "[1, inf)", "rank of each task's expert; none = lora.rank (the "
                                      "reference uses lora_r / expert_num, e.g. 64 / 8); scaling stays "
                                      "lora.alpha / lora.rank")
    # The paper uses CLIP's text encoder (llava_arch.py: text_tower = CLIP ViT-L/14-336's text model).
    text_encoder: str | None = setting(None, help="local transformers checkpoint whose mean last hidden state is "
                                       "the instruction feature (the paper: CLIP's text encoder); none = the "
                                       "backbone's mean input embedding")

    def __post_init__(self) -> None:
        if self.fuse not in FUSE_CHOICES:
            raise ConfigError(f"method.options.fuse: expected one of {', '.join(FUSE_CHOICES)}, got {self.fuse!r}")
        if self.fusion_coefficient not in COEFFICIENT_CHOICES:
            raise ConfigError(f"method.options.fusion_coefficient: expected one of "
                              f"{', '.join(COEFFICIENT_CHOICES)}, got {self.fusion_coefficient!r}")
        if self.top_layers < 0:
            raise ConfigError(f"method.options.top_layers: must be >= 0, got {self.top_layers}")
        if not self.temperature > 0:
            raise ConfigError(f"method.options.temperature: must be > 0, got {self.temperature}")
        if self.expert_rank is not None and self.expert_rank < 1:
            raise ConfigError(f"method.options.expert_rank: must be >= 1, got {self.expert_rank}")


class HiDeLinear(WrappedLinear):
    """A frozen ``nn.Linear`` plus a list of per-task LoRA experts, combined as the module docstring says.

    What ``forward`` computes is set from outside (by :class:`HiDe`):

    - ``bypass`` true: the base layer alone;
    - ``train_expert = t``: ``base(x) + s B_t A_t dropout(x)`` (training task t);
    - otherwise, with ``n`` experts: a lower layer (``top`` false) adds the fusion, a top layer adds
      ``sum_i w[b, i] s B_i A_i x`` with ``w = mix`` of shape ``(batch, n)`` (one row per sample, the same
      for all its tokens); a top layer without ``mix`` refuses to run.
    """

    def __init__(self, base: nn.Linear, rank: int, scaling: float, fuse: str = "factors",
                 coefficient: str = "one", dropout: float = 0.0, top: bool = False):
        super().__init__(base)
        self.rank = rank
        self.scaling = scaling
        self.fuse = fuse
        self.coefficient = coefficient
        self.top = top
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bypass = False
        self.train_expert: int | None = None
        self.mix: torch.Tensor | None = None

    @property
    def experts(self) -> int:
        return len(self.lora_A)

    def add_expert(self, generator: torch.Generator | None = None) -> int:
        """Append a fresh expert (``A`` Kaiming-uniform with ``a = sqrt(5)`` drawn from ``generator``, ``B = 0``),
        in the base layer's dtype and device; returns its index."""
        factory = {"dtype": self.base.weight.dtype, "device": self.base.weight.device}
        a = torch.empty(self.rank, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.append(nn.Parameter(a.to(**factory)))
        self.lora_B.append(nn.Parameter(torch.zeros(self.out_features, self.rank, **factory)))
        return self.experts - 1

    def truncate(self, count: int) -> None:
        """Keep the first ``count`` experts only."""
        if self.experts > count:
            self.lora_A = nn.ParameterList(list(self.lora_A)[:count])
            self.lora_B = nn.ParameterList(list(self.lora_B)[:count])

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c sum_i A_i, c sum_i B_i)``: the fused ``(rank, in)`` and ``(out, rank)`` factors."""
        c = 1.0 / self.experts if self.coefficient == "mean" else 1.0
        return c * torch.stack(list(self.lora_A)).sum(0), c * torch.stack(list(self.lora_B)).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.bypass or self.experts == 0:
            return result
        dtype = self.lora_A[0].dtype
        x = self.dropout(x.to(dtype))
        if self.train_expert is not None:
            t = self.train_expert
            update = (x @ self.lora_A[t].T) @ self.lora_B[t].T * self.scaling
        elif not self.top:
            if self.fuse == "factors":
                a, b = self.fused_factors()
                update = (x @ a.T) @ b.T * self.scaling
            else:  # sum_i B_i A_i x: the stacked A's and B's give every expert's product summed in two matmuls
                c = 1.0 / self.experts if self.coefficient == "mean" else 1.0
                hidden = x @ torch.cat(list(self.lora_A)).T
                update = hidden @ torch.cat(list(self.lora_B), dim=1).T * (self.scaling * c)
        else:
            if self.mix is None:
                raise RuntimeError("hide: the top-layer mixing weights are not set (answer through "
                                   "HiDe.generate or inside HiDe.mixing(samples))")
            weights = self.mix
            if weights.shape != (x.shape[0], self.experts):
                raise RuntimeError(f"hide: mixing weights of shape {tuple(weights.shape)} for a batch of "
                                   f"{x.shape[0]} and {self.experts} experts")
            hidden = (x @ torch.cat(list(self.lora_A)).T).unflatten(-1, (self.experts, self.rank))
            shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.experts, 1)  # broadcast over tokens
            hidden = hidden * (weights.to(dtype=dtype, device=x.device) * self.scaling).reshape(shape)
            update = hidden.flatten(-2) @ torch.cat(list(self.lora_B), dim=1).T
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return (f"experts={self.experts}, rank={self.rank}, scaling={self.scaling:g}, top={self.top}, "
                f"fuse={self.fuse}, coefficient={self.coefficient}")


def hide_layers(model: nn.Module) -> dict[str, HiDeLinear]:
    """Full module name -> HiDe wrapper, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, HiDeLinear)}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's list of decoder layers (``language_model.layers`` / ``text_model.layers``)."""
    from mmcl.backbones.parts import _submodule, find_layout

    layout, root = find_layout(model)
    layers = getattr(_submodule(root, layout.language_model), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(f"hide: the language model of {type(model).__name__} has no list of decoder layers")
    return layers


def mixing_weights(image: torch.Tensor, text: torch.Tensor, image_anchors: torch.Tensor,
                   text_anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(n, experts)``: ``softmax(((cos(image, a_i) + cos(text, u_i)) / 2) / temperature)`` per row."""
    similarity = (cosine_to(image.float(), image_anchors.float()) + cosine_to(text.float(), text_anchors.float())) / 2
    return torch.softmax(similarity / temperature, dim=-1)


@register_method
class HiDe(Method[HiDeConfig]):
    name = "hide"
    state_growth = "per-task"
    supports_dora = False  # the experts are plain A/B pairs, fused and mixed directly
    description = ("HiDe-LLaVA: a LoRA expert per task; lower layers fuse the experts, the top layer mixes them "
                   "by image/instruction anchor similarity (per sample)")

    def __init__(self, config: HiDeConfig, lora: LoraSettings, seed: int):
        super().__init__(config, lora, seed)
        self.text_features = TextFeatures(config.text_encoder)

    def init_state(self) -> None:
        self.trained: list[str] = []  # task names, one per expert, in training order
        self.image_anchors = torch.zeros(0, 0)  # (experts, vision width)
        self.text_anchors = torch.zeros(0, 0)  # (experts, text width)
        self._pending: tuple[int, list[Sample]] | None = None  # (expert index, training samples) of the task

    # -- set-up ------------------------------------------------------------------------------
    @property
    def expert_rank(self) -> int:
        return self.config.expert_rank or self.lora.rank

    def setup(self, backbone) -> None:
        super().setup(backbone)
        model = backbone.model
        for parameter in model.parameters():
            parameter.requires_grad = False
        scaling = self.lora.alpha / self.lora.rank

        def make(name: str, linear: nn.Linear) -> HiDeLinear:
            return HiDeLinear(linear, self.expert_rank, scaling, self.config.fuse, self.config.fusion_coefficient,
                              self.lora.dropout)

        wrap_linear_layers(model, self.lora.targets or backbone.lora_targets, make)
        top = self.config.top_layers
        if top:
            layers = decoder_layers(model)
            if top > len(layers):
                raise ConfigError(f"method.options.top_layers: {top} exceeds the {len(layers)} decoder layers")
            wrapped = [m for layer in layers[len(layers) - top:] for m in layer.modules() if isinstance(m, HiDeLinear)]
            if not wrapped:
                raise ConfigError(f"hide: no LoRA target (lora.targets) lies in the top {top} decoder layer(s), "
                                  "where the experts are mixed")
            for module in wrapped:
                module.top = True

    def _layers(self) -> dict[str, HiDeLinear]:
        assert self.backbone is not None, "setup() first"
        return hide_layers(self.backbone.model)

    def _set_mode(self, train_expert: int | None = None) -> None:
        for layer in self._layers().values():
            layer.train_expert = train_expert
            layer.bypass = False
            layer.mix = None
            for index, (a, b) in enumerate(zip(layer.lora_A, layer.lora_B)):
                a.requires_grad = b.requires_grad = index == train_expert

    @contextmanager
    def _bypassed(self) -> Iterator[None]:
        layers = list(self._layers().values())
        for layer in layers:
            layer.bypass = True
        try:
            yield
        finally:
            for layer in layers:
                layer.bypass = False

    # -- features and weights ------------------------------------------------------------------
    def features(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, text)`` features of ``samples`` (one row each), computed with the experts bypassed."""
        assert self.backbone is not None
        with self._bypassed():
            return image_features(self.backbone, samples), self.text_features(self.backbone, samples)

    def weights_for(self, samples: Sequence[Sample]) -> torch.Tensor:
        """``(len(samples), experts)`` top-layer mixing weights, each row from that sample alone."""
        image, text = self.features(samples)
        return mixing_weights(image, text, self.image_anchors, self.text_anchors, self.config.temperature)

    @contextmanager
    def mixing(self, samples: Sequence[Sample]) -> Iterator[torch.Tensor]:
        """Set the per-sample weights of ``samples`` (in this order, as the batch rows) on the top layers."""
        assert self.backbone is not None
        weights = self.weights_for(samples)
        top = [layer for layer in self._layers().values() if layer.top]
        on_device = weights.to(self.backbone.device)
        for layer in top:
            layer.mix = on_device
        try:
            yield weights
        finally:
            for layer in top:
                layer.mix = None

    # -- hooks ---------------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        index = len(self.trained)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        for layer in self._layers().values():
            layer.truncate(index)  # an expert left by an interrupted stage is dropped
            layer.add_expert(generator)
        self._set_mode(train_expert=index)

    def train_data(self, task_index: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
        self._pending = (len(self.trained), list(samples))
        return list(samples)

    def after_task(self, task_index: int, task: Task) -> None:
        if self._pending is None or self._pending[0] != len(self.trained):
            raise RuntimeError("hide: after_task without the task's training samples (train_data not called)")
        samples = self._pending[1]
        image, text = self._anchor_means(samples)
        self.image_anchors = image[None] if not self.trained else torch.cat([self.image_anchors, image[None]])
        self.text_anchors = text[None] if not self.trained else torch.cat([self.text_anchors, text[None]])
        self.trained.append(task.name)
        self._pending = None
        self._set_mode(None)

    def _anchor_means(self, samples: Sequence[Sample], chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean image feature over the samples with images and mean instruction feature over all samples,
        accumulated chunk by chunk (a running sum: the features of a large task are never held at once)."""
        if not samples:
            raise ConfigError("hide: a task without training samples has no anchors")
        image_sum = text_sum = None
        with_images = 0
        for start in range(0, len(samples), chunk):
            part = samples[start:start + chunk]
            image, text = self.features(part)
            has_image = torch.tensor([bool(s.images) for s in part])
            image_part = image[has_image].sum(0)
            image_sum = image_part if image_sum is None else image_sum + image_part
            text_sum = text.sum(0) if text_sum is None else text_sum + text.sum(0)
            with_images += int(has_image.sum())
        return image_sum / max(with_images, 1), text_sum / len(samples)

    def generate(self, samples: Sequence[Sample], task: Task, max_new_tokens: int) -> list[str]:
        """Answers with per-sample top-layer weights; ``task`` is not used (no task identity at test time)."""
        assert self.backbone is not None
        if not self.trained:
            return self.backbone.generate(samples, max_new_tokens)
        with self.mixing(samples):
            return self.backbone.generate(samples, max_new_tokens)

    # -- state ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        """Parameters one task trains: one expert in every wrapped layer."""
        return sum(self.expert_rank * (layer.in_features + layer.out_features) for layer in self._layers().values())

    def state_tensors(self) -> dict[str, Any]:
        if not self.trained:
            return {}
        layers = self._layers()
        experts = {
            str(index): {
                name: {"A": layer.lora_A[index].detach().to("cpu", copy=True).contiguous(),
                       "B": layer.lora_B[index].detach().to("cpu", copy=True).contiguous()}
                for name, layer in layers.items()
            }
            for index in range(len(self.trained))
        }
        return {"experts": experts, "anchors": {"image": self.image_anchors.clone(), "text": self.text_anchors.clone()}}

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        count = len(self.trained)
        layers = self._layers()
        if not count and tensors:
            raise RunDirError(f"hide state: no trained task in state.json but saved tensors {sorted(tensors)[:3]}")
        experts = tensors.get("experts", {}) if count else {}
        if not isinstance(experts, dict) or sorted(experts) != sorted(str(i) for i in range(count)):
            raise RunDirError(f"hide state: expected experts 0..{count - 1} for tasks {self.trained}, "
                              f"found {sorted(experts) if isinstance(experts, dict) else experts!r}")
        for layer in layers.values():
            layer.truncate(0)
        placeholder = torch.Generator().manual_seed(0)  # every value is overwritten below
        for index in range(count):
            saved = experts[str(index)]
            missing, unexpected = sorted(layers.keys() - saved.keys()), sorted(saved.keys() - layers.keys())
            if missing or unexpected:
                raise RunDirError(f"hide state: expert {index}: missing layers {missing[:3]}, "
                                  f"unexpected layers {unexpected[:3]}")
            for name, layer in layers.items():
                pair = saved[name]
                if not isinstance(pair, dict) or set(pair) != {"A", "B"}:
                    raise RunDirError(f"hide state: expert {index}, layer {name}: expected tensors A and B")
                layer.add_expert(placeholder)
                for key, parameter in (("A", layer.lora_A[index]), ("B", layer.lora_B[index])):
                    if pair[key].shape != parameter.shape:
                        raise RunDirError(f"hide state: expert {index}, {name}.{key} has shape "
                                          f"{tuple(pair[key].shape)}, expected {tuple(parameter.shape)}")
                    with torch.no_grad():
                        parameter.copy_(pair[key])
        if count:
            anchors = tensors.get("anchors")
            if not isinstance(anchors, dict) or set(anchors) != {"image", "text"}:
                raise RunDirError("hide state: expected anchors image and text")
            for key in ("image", "text"):
                value = anchors[key]
                if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != count:
                    raise RunDirError(f"hide state: {key} anchors must be a ({count}, width) matrix")
            self.image_anchors = anchors["image"].float().clone()
            self.text_anchors = anchors["text"].float().clone()
        else:
            self.image_anchors, self.text_anchors = torch.zeros(0, 0), torch.zeros(0, 0)
        self._pending = None
        self._set_mode(None)

    def _shape_settings(self) -> dict[str, Any]:
        return {"expert_rank": self.expert_rank, "top_layers": self.config.top_layers}

    def state_json(self) -> dict[str, Any]:
        return {"tasks": list(self.trained), **self._shape_settings()}

    def load_state_json(self, state: dict[str, Any]) -> None:
        tasks = state.get("tasks", [])
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise RunDirError(f"hide state: 'tasks' must be a list of task names, got {tasks!r}")
        saved = {key: state.get(key) for key in self._shape_settings()}
        if tasks and saved != self._shape_settings():
            raise RunDirError(f"hide state: saved with {saved}, this run has {self._shape_settings()}")
        self.trained = list(tasks)
