"""``smolora``: Separable Mixture of LoRA, two pools of LoRA experts per layer, one routed by what the
layer sees and one routed by the instruction.

Paper: Ziqi Wang, Chang Che, Qi Wang, Yangyang Li, Zenglin Shi, Meng Wang, "SMoLoRA: Exploring and
Defying Dual Catastrophic Forgetting in Continual Visual Instruction Tuning" (first version titled
"Separable Mixture of Low-Rank Adaptation for Continual Visual Instruction Tuning"), ICCV 2025,
arXiv:2411.13949. Reference code: github.com/Minato-Zackie/SMoLoRA (``PEFT_SMoLoRA/peft/tuners/smolora.py``
holds the layer, ``scripts/SMoLoRA/Train_Eval/*.sh`` the settings, ``scripts/SMoLoRA/ins_gen.py`` the
instruction embeddings). Only the abstract of the paper could be read here; every detail below is taken
from the released code.

Mechanism (per targeted linear layer ``W``, frozen; ``s = alpha / r`` with the run's ``lora.rank`` r
and ``lora.alpha``; ``E_v`` visual-understanding experts and ``E_i`` instruction-following experts, each
of rank ``k = r / (E_v + E_i)``, as the released layer splits r over all its ``expert_num`` experts):

    m_b   = mean of the layer input x over the tokens of sample b          (visual gate input)
    e_b   = instruction feature of sample b                                 (instruction gate input)
    i_b   = argmax_e (G_v m_b)_e,   j_b = argmax_e (G_i e_b)_e              (hard top-1, one expert each)
    v     = s B^v_{i_b} A^v_{i_b} dropout(x),   u = s B^i_{j_b} A^i_{j_b} dropout(x)    (per token)
    fusion "adaptive" (released code):  [a_v, a_u] = softmax([w_v . v, w_u . u]) per token,
                                        y = W x + b + a_v v + a_u u
    fusion "sum":                       y = W x + b + v + u

``G_v`` is an ``(E_v, in)`` and ``G_i`` an ``(E_i, d)`` bias-free linear map, ``w_v`` and ``w_u`` two
bias-free ``(1, out)`` maps (the released ``lora_fc_A`` / ``lora_fc_B``). Init as released: ``A`` ~
N(0, 0.01^2), ``B`` = 0 (the wrapped model equals the base model), gates and fusion maps with the default
``nn.Linear`` init (seeded by the run's seed).

Gates. The released layer builds the top-1 routing as a one-hot written with ``scatter_`` of the
constant 1.0, so no gradient reaches ``G_v`` or ``G_i``: the gates keep their random initialisation
(``gate_gradient: none``, the default here, reproduces exactly that). They are marked trainable only
while the first task trains (``ins_type == 0`` in the released scripts) and frozen afterwards; this is
kept (the trainable-parameter count follows it). ``gate_gradient: straight-through`` is an addition of
this implementation: the forward still uses the exact one-hot, the backward the gradient of the softmax
over the gate logits (``one_hot + p - stop_grad(p)``), so the gates do learn on the first task.
Everything else (both pools, the fusion maps) trains on every task.

Where this differs from the released code, and why:

- Instruction feature per sample, no task identity. The released code routes the instruction pool by a
  *task-level* embedding (``ins_emb[ins_type]``, the all-MiniLM-L6-v2 embedding, 384-d, of each task's
  instruction template) and picks ``ins_type`` from the task being trained *or tested*. Here ``e_b`` is
  :class:`mmcl.methods.sample_features.TextFeatures` of the sample's own instruction (its final user turn
  without image placeholders): by default the backbone's mean input embedding of that text, or, with
  ``text_encoder: PATH``, the mean last hidden state of a local encoder (e.g. a saved all-MiniLM-L6-v2,
  the released code's kind of feature). The feature covers the whole user turn (question and
  instruction), not the instruction template alone.
- Padding. The released visual gate averages over the whole padded sequence. Here ``m_b`` is the mean
  over sample b's non-padding tokens of the current forward chunk (the last T positions of the model's
  ``attention_mask``), so a sample's route does not depend on the batch it is in (both gates are evaluated
  in float32 whatever the model's dtype, so bf16 rounding does not flip an argmax). As in the released
  code, a decoding step with the KV cache sees one new token, and that token alone routes the visual pool
  for that step.
- Layers. The released code also wraps the LLaVA projector (``mm_projector.0/.2``), whose rows are
  images, not samples; with a per-sample instruction route they cannot be routed without an image-to-
  sample map, so vision-side modules (vision tower, projector) matching ``lora.targets`` are left out and
  stay frozen: SMoLoRA wraps the language model's linear layers only. (The released LLaVA training also
  trains the projector fully at lr 2e-5; not done here.)
- Settings scale. The released scripts use r = 128, alpha = 256, 8 experts (4 + 4, rank 16 each); here
  r and alpha come from the run's ``lora`` settings (the tiny model's default r = 8 gives rank-1 experts).

How the per-sample instruction features reach the layers: every :class:`SMoLoraLinear` reads a shared
:class:`RoutingContext`. A forward pre-hook on the top-level model (registered when the model is wrapped)
stores the ``attention_mask`` of each forward there and pops the extra batch key ``smolora_instruction``
(a ``(batch, d)`` tensor) into it. :meth:`SMoLora.train` runs the ordinary supervised trainer
(:func:`mmcl.training.sft.train_on_samples`, so ``extra_loss`` and the Trainer are unchanged) on a thin
view of the backbone whose ``encode_for_training`` adds that key to each sample's encoding (the
backbone's ``collate`` stacks ``(1, d)`` tensors into ``(batch, d)``); :meth:`SMoLora.generate` puts the
batch's features into the context around ``backbone.generate``. A forward without them (e.g. the
``evaluation.low_shot`` protocol, which trains the backbone directly) is refused with a ConfigError.
The model is wrapped once a task is known (``see_tasks``), so the base-model row of the matrix is the
plain backbone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.backbones.parts import top_level_vision_modules
from mmcl.config import LoraSettings, TrainingConfig, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import Method, register_method
from mmcl.methods.sample_features import TextFeatures
from mmcl.streams.stream import Task
from mmcl.methods.wrapped_linear import WrappedLinear
from mmcl.methods.encoding_view import EncodingView, with_feature

INSTRUCTION_KEY = "smolora_instruction"  # the extra batch key carrying (batch, d) instruction features
FUSIONS = ("adaptive", "sum")
GATE_GRADIENTS = ("none", "straight-through")


@dataclass
class SMoLoraConfig:
    """SMoLoRA options; the rank r, alpha and dropout come from the run's ``lora`` settings. Source of the
    defaults: the released scripts (Minato-Zackie/SMoLoRA, ``scripts/SMoLoRA/Train_Eval/*.sh``:
    ``--expert_num 8``, split half/half by ``PEFT_SMoLoRA/peft/tuners/smolora.py``) and layer."""

    visual_experts: int = setting(
        4, "[1, inf)", help="visual-understanding LoRA experts per layer (released scripts: expert_num 8, half of them)"
    )
    instruction_experts: int = setting(
        4, "[1, inf)",
        help="instruction-following LoRA experts per layer (released scripts: expert_num 8, half of them)",
    )
    fusion: str = setting(
        "adaptive",
        help="how the two chosen experts' outputs combine per token: adaptive = softmax over two learned scores "
        "(released layer's lora_fc_A/lora_fc_B) | sum = plain addition",
    )
    gate_gradient: str = setting(
        "none",
        help="gradient to the hard top-1 gates on the first task: none = released code (one-hot, gates stay at "
        "init) | straight-through = one-hot forward, softmax backward (an addition, not in the released code)",
    )
    text_encoder: str | None = setting(
        None,
        help="local transformers checkpoint for the instruction feature (mean last hidden state; released code: "
        "all-MiniLM-L6-v2); none = the backbone's mean input embedding of the instruction",
    )

    def __post_init__(self) -> None:
        for key in ("visual_experts", "instruction_experts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.options.{key}: must be >= 1, got {getattr(self, key)}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"method.options.fusion: expected one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.gate_gradient not in GATE_GRADIENTS:
            raise ConfigError(
                f"method.options.gate_gradient: expected one of {', '.join(GATE_GRADIENTS)}, got {self.gate_gradient!r}"
            )

    @property
    def experts(self) -> int:
        return self.visual_experts + self.instruction_experts


def check_rank(rank: int, experts: int) -> None:
    """Refuse a total rank that cannot be split evenly over all experts of both pools."""
    if rank < 1:
        raise ConfigError(f"lora.rank: must be >= 1, got {rank}")
    if rank % experts:
        raise ConfigError(
            f"lora.rank: {rank} is not divisible by the {experts} experts of both pools (SMoLoRA gives each expert "
            f"rank/experts); pick e.g. lora.rank {experts * max(1, round(rank / experts))}"
        )


class RoutingContext:
    """What every SMoLoRA layer of one model reads besides its input: the current batch's instruction
    features ``(batch, d)`` and the ``attention_mask`` ``(batch, length)`` of the current forward."""

    def __init__(self) -> None:
        self.instruction: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None

    def clear(self) -> None:
        self.instruction = None
        self.token_mask = None

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook of the top-level model: takes the instruction features out of the batch (the
        model itself does not know the key) and remembers the attention mask."""
        instruction = kwargs.pop(INSTRUCTION_KEY, None)
        if instruction is not None:
            self.instruction = instruction
        self.token_mask = kwargs.get("attention_mask")
        return args, kwargs


def hard_top1(logits: torch.Tensor, straight_through: bool) -> torch.Tensor:
    """One-hot of the argmax over the last dim (ties: the first). ``straight_through``: the value is the
    same one-hot, the gradient that of ``softmax(logits)``."""
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0).detach()
    if not straight_through:
        return one_hot
    probabilities = torch.softmax(logits, dim=-1)
    return one_hot + (probabilities - probabilities.detach())  # exactly one_hot in value


class SMoLoraLinear(WrappedLinear):
    """A frozen ``nn.Linear`` plus the two SMoLoRA expert pools, their top-1 gates and the fusion (see the
    module docstring). ``visual_A`` is the ``(E_v k, in)`` stack of the visual experts' ``A`` (expert e owns
    rows ``e k .. (e+1) k``), ``visual_B`` the ``(out, E_v k)`` stack of their ``B`` (same columns); the
    ``instruction_*`` parameters likewise. Parameters take the base layer's dtype and device."""

    def __init__(
        self,
        base: nn.Linear,
        context: RoutingContext,
        rank: int,
        alpha: float,
        visual_experts: int,
        instruction_experts: int,
        instruction_width: int,
        fusion: str = "adaptive",
        gate_gradient: str = "none",
        dropout: float = 0.0,
    ):
        super().__init__(base)
        check_rank(rank, visual_experts + instruction_experts)
        self.context = context
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.expert_rank = rank // (visual_experts + instruction_experts)
        self.visual_experts = visual_experts
        self.instruction_experts = instruction_experts
        self.fusion = fusion
        self.straight_through = gate_gradient == "straight-through"
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        k = self.expert_rank
        self.visual_A = nn.Parameter(torch.empty(visual_experts * k, base.in_features, **factory))
        self.visual_B = nn.Parameter(torch.zeros(base.out_features, visual_experts * k, **factory))
        self.instruction_A = nn.Parameter(torch.empty(instruction_experts * k, base.in_features, **factory))
        self.instruction_B = nn.Parameter(torch.zeros(base.out_features, instruction_experts * k, **factory))
        self.visual_gate = nn.Linear(base.in_features, visual_experts, bias=False, **factory)
        self.instruction_gate = nn.Linear(instruction_width, instruction_experts, bias=False, **factory)
        if fusion == "adaptive":
            self.visual_score = nn.Linear(base.out_features, 1, bias=False, **factory)
            self.instruction_score = nn.Linear(base.out_features, 1, bias=False, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.normal_(self.visual_A, mean=0.0, std=0.01)  # released reset_lora_parameters: N(0, 0.01), B = 0
        nn.init.normal_(self.instruction_A, mean=0.0, std=0.01)

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the SMoLoRA parameters only, names relative to this module."""
        for name, parameter in self.named_parameters():
            if not name.startswith("base."):
                yield name, parameter

    def gate_parameters(self) -> list[nn.Parameter]:
        return [self.visual_gate.weight, self.instruction_gate.weight]

    # -- routing ---------------------------------------------------------------------------------
    def visual_summary(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, in)`` float32: per sample, the mean of ``x`` over its non-padding tokens of this forward
        chunk (the last ``T`` positions of the context's attention mask; all tokens without a mask)."""
        x = x.float()
        mask = self.context.token_mask
        if mask is None or mask.dim() != 2 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            return x.mean(dim=1)
        valid = mask[:, -x.shape[1] :].to(device=x.device, dtype=x.dtype).unsqueeze(-1)
        return (x * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)

    def instruction_features(self, batch: int) -> torch.Tensor:
        instruction = self.context.instruction
        if instruction is None:
            raise ConfigError(
                "smolora: the model was run without per-sample instruction features; only SMoLoRA's own train "
                "and generate provide them (evaluation.low_shot trains the backbone directly: set "
                "evaluation.low_shot.shots=0 with this method)"
            )
        if instruction.dim() != 2 or instruction.shape[0] != batch:
            raise RuntimeError(
                f"smolora: instruction features of shape {tuple(instruction.shape)} for a batch of {batch} rows"
            )
        return instruction

    def gate_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual gate logits ``(batch, E_v)``, instruction gate logits ``(batch, E_i)``), in float32."""
        summary = self.visual_summary(x)
        instruction = self.instruction_features(x.shape[0]).to(device=x.device, dtype=torch.float32)
        visual = summary @ self.visual_gate.weight.float().T
        return visual, instruction @ self.instruction_gate.weight.float().T

    def routes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample one-hot routes ``(batch, E_v)`` and ``(batch, E_i)`` (straight-through if configured)."""
        visual, instruction = self.gate_logits(x)
        return hard_top1(visual, self.straight_through), hard_top1(instruction, self.straight_through)

    # -- forward ---------------------------------------------------------------------------------
    def _pool(self, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """``s B_e A_e h`` with e the expert ``route`` picks per sample (the other experts times exactly 0)."""
        hidden = (h @ A.T).unflatten(-1, (route.shape[-1], self.expert_rank))  # (batch, T, E, k)
        hidden = hidden * route.to(hidden.dtype)[:, None, :, None]
        return (hidden.flatten(-2) @ B.T) * self.scaling

    def branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(visual expert output ``v``, instruction expert output ``u``), each ``(batch, T, out)``."""
        visual_route, instruction_route = self.routes(x)
        h = self.dropout(x.to(self.visual_A.dtype))
        v = self._pool(h, self.visual_A, self.visual_B, visual_route)
        u = self._pool(h, self.instruction_A, self.instruction_B, instruction_route)
        return v, u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if x.dim() != 3:
            raise RuntimeError(f"smolora: expected a (batch, tokens, features) input, got shape {tuple(x.shape)}")
        v, u = self.branches(x)
        if self.fusion == "adaptive":
            scores = torch.cat([self.visual_score(v), self.instruction_score(u)], dim=-1)
            weights = torch.softmax(scores, dim=-1)
            update = weights[..., :1] * v + weights[..., 1:] * u
        else:
            update = v + u
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return (
            f"visual_experts={self.visual_experts}, instruction_experts={self.instruction_experts}, "
            f"rank={self.rank} ({self.expert_rank} per expert), scaling={self.scaling:g}, fusion={self.fusion}"
        )


def language_model_linears(model: nn.Module, targets: str) -> list[str]:
    """Names of the ``nn.Linear`` layers whose full name ``re.fullmatch``-es ``targets``, vision-side modules
    (vision tower, projector: their rows are images, not samples) left out."""
    try:
        pattern = re.compile(targets)
    except re.error as exc:
        raise ConfigError(f"lora.targets: invalid regex {targets!r} ({exc})") from None
    vision = set(top_level_vision_modules())
    names = [
        name
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and pattern.fullmatch(name) and not vision & set(name.split("."))
    ]
    if not names:
        raise ConfigError(f"lora.targets: regex {targets!r} matches no language-model linear layer of the model")
    return names


def smolora_layers(model: nn.Module) -> dict[str, SMoLoraLinear]:
    """Full module name -> SMoLoRA wrapper, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SMoLoraLinear)}


@register_method
class SMoLora(Method[SMoLoraConfig]):
    name = "smolora"
    supports_dora = False  # the SMoLoRA layers are plain LoRA experts of their own
    description = (
        "Separable mixture of LoRA: per layer a visual pool routed by the token mean and an instruction pool "
        "routed by the instruction, hard top-1 each, fused per token (SMoLoRA, ICCV 2025)"
    )

    def __init__(self, config: SMoLoraConfig, lora: LoraSettings, seed: int):
        super().__init__(config, lora, seed)
        check_rank(lora.rank, config.experts)  # before the runner creates the run dir

    def init_state(self) -> None:
        self.context = RoutingContext()
        self.text_features = TextFeatures(self.config.text_encoder)
        self.instruction_width: int | None = None
        self._hook = None
        self._stage_positions: list[int] = []  # task positions of the stage about to train (before_task)

    # -- wrapping --------------------------------------------------------------------------------
    def setup(self, backbone) -> None:
        super().setup(backbone)
        self._wrap()

    def see_tasks(self, tasks: Sequence[Task], n_tasks: int) -> None:
        super().see_tasks(tasks, n_tasks)
        self._wrap()

    @property
    def wrapped(self) -> bool:
        return self._hook is not None

    def _wrap(self) -> None:
        """Swap in the SMoLoRA layers once the backbone and a first task are known (the base-model row of
        the matrix is evaluated on the plain backbone before that)."""
        if self.backbone is None or not self.tasks or self.wrapped:
            return
        backbone = self.backbone
        model = backbone.model
        probe = Sample(id="smolora-width", task="", images=(), prompt="instruction", answer="")
        self.instruction_width = int(self.text_features(backbone, [probe]).shape[1])
        for parameter in model.parameters():
            parameter.requires_grad = False
        torch.manual_seed(self.seed)
        settings, options = self.lora, self.config
        for name in language_model_linears(model, settings.targets or backbone.lora_targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = SMoLoraLinear(
                getattr(parent, child),
                self.context,
                settings.rank,
                settings.alpha,
                options.visual_experts,
                options.instruction_experts,
                self.instruction_width,
                options.fusion,
                options.gate_gradient,
                settings.dropout,
            )
            setattr(parent, child, layer)
        self._hook = model.register_forward_pre_hook(self.context.pre_forward, with_kwargs=True)

    def _layers(self) -> dict[str, SMoLoraLinear]:
        assert self.backbone is not None, "setup() first"
        return smolora_layers(self.backbone.model)

    def _parameters(self) -> dict[str, nn.Parameter]:
        return {
            f"{layer_name}.{name}": parameter
            for layer_name, layer in self._layers().items()
            for name, parameter in layer.adapter_parameters()
        }

    # -- training ----------------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        self._stage_positions.append(task_index)

    def set_gates_trainable(self, trainable: bool) -> None:
        for layer in self._layers().values():
            for parameter in layer.gate_parameters():
                parameter.requires_grad = trainable

    def train(self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int) -> dict[str, Any]:
        """Supervised fine-tuning as usual, with each batch carrying its samples' instruction features;
        the gates train only in the stage holding the first task (released code: ``ins_type == 0``)."""
        from mmcl.training.sft import train_on_samples

        assert self.backbone is not None and self.wrapped, "setup() and see_tasks() first"
        self.set_gates_trainable(0 in self._stage_positions)
        self._stage_positions = []
        view = EncodingView(self.backbone, with_feature(INSTRUCTION_KEY, self.backbone, self.text_features))
        try:
            return train_on_samples(
                view, samples, config, work_dir, seed=seed, extra_loss=self.extra_loss, log_dir=self.sft_log_dir()
            )
        finally:
            self.context.clear()

    @contextmanager
    def instructions(self, samples: Sequence[Sample]) -> Iterator[torch.Tensor]:
        """The samples' instruction features set in the routing context (cleared afterwards)."""
        assert self.backbone is not None
        features = self.text_features(self.backbone, samples).to(self.backbone.device)
        self.context.instruction = features
        try:
            yield features
        finally:
            self.context.clear()

    def generate(self, samples: Sequence[Sample], task: Task, max_new_tokens: int) -> list[str]:
        """Answers routed per sample by its own tokens and instruction; ``task`` is not used."""
        assert self.backbone is not None
        if not self.wrapped:
            return self.backbone.generate(samples, max_new_tokens)
        with self.instructions(samples):
            return self.backbone.generate(samples, max_new_tokens)

    # -- state -------------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self._parameters().values() if p.requires_grad)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in self._parameters().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        parameters = self._parameters()
        missing = sorted(parameters.keys() - tensors.keys())
        unexpected = sorted(tensors.keys() - parameters.keys())
        if missing or unexpected:
            raise RunDirError(f"smolora state: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
        with torch.no_grad():
            for name, parameter in parameters.items():
                value = tensors[name]
                if not isinstance(value, torch.Tensor) or value.shape != parameter.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise RunDirError(f"smolora state: {name} has shape {shape}, expected {tuple(parameter.shape)}")
                parameter.copy_(value)

    def _shape(self) -> dict[str, Any]:
        return {
            "visual_experts": self.config.visual_experts,
            "instruction_experts": self.config.instruction_experts,
            "fusion": self.config.fusion,
            "rank": self.lora.rank,
            "instruction_width": self.instruction_width,
        }

    def state_json(self) -> dict[str, Any]:
        return {**self._shape(), "alpha": self.lora.alpha, "gate_gradient": self.config.gate_gradient}

    def load_state_json(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if not isinstance(state, dict):
            raise RunDirError(f"smolora state: expected a JSON object, got {type(state).__name__}")
        expected = self._shape()
        saved = {key: state.get(key) for key in expected}
        if expected["instruction_width"] is None:  # not wrapped yet: the width is not known to compare
            saved.pop("instruction_width")
            expected.pop("instruction_width")
        if saved != expected:
            raise RunDirError(f"smolora state: saved with {saved}, this run has {expected}")
