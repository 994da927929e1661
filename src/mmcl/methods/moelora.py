"""``moelora``: a mixture of LoRA experts on every targeted linear layer, trained task after task.

The MoELoRA baseline of CoIN (Chen et al., 2024, "CoIN: A Benchmark of Continual Instruction tuNing
for Multimodal Large Language Model", arXiv:2403.08350). Each targeted ``nn.Linear`` (weight ``W``,
frozen) is replaced by a :class:`MoeLoraLinear` holding ``E`` LoRA experts that share the total rank
``r`` (expert ``i`` has ``A_i`` of shape ``(r/E, in)`` and ``B_i`` of shape ``(out, r/E)``) and a
token-level dense gate ``g(x) = softmax(W_g x)`` with ``W_g`` an ``(E, in)`` linear map without bias.
The layer computes, for every token ``x``,

    y = W x + b + sum_{i=1..E} g_i(x) * (alpha / r) * B_i A_i dropout(x)

with ``alpha`` and ``r`` the run's ``lora.alpha`` and ``lora.rank`` (the scaling is ``alpha / r`` with
the *total* rank, the same for every expert; not ``alpha / (r/E)``). The gate reads the token
without dropout. ``B`` starts at zero, so the wrapped model equals the base model before training;
``A`` is initialised Kaiming-uniform (``a = sqrt(5)``, as in LoRA/PEFT) and the gate with the default
``nn.Linear`` init.

One set of modules is trained on every task in turn, with no task identity at any time: like
``seq-lora``, but the gate can spread tasks over experts. Everything else in the model is frozen.

Implementation: a small module swap (no PEFT). The forward is fused: the ``E`` experts' ``A_i`` are
stacked into one ``(r, in)`` matrix ``A`` and their ``B_i`` into one ``(out, r)`` matrix ``B``, so

    sum_i g_i s B_i A_i x  =  B ( (g (x) s) * (A x) )

where ``(g (x) s)`` repeats each expert's gate value (times the scaling ``s``) over its ``r/E`` rank
slots: two matmuls whatever ``E`` is. The stage state is the MoE parameters only (``lora_A``,
``lora_B`` and ``gate.weight`` of each wrapper, keyed by full module name).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from mmcl.config import LoraSettings, setting
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import Method, register_method
from mmcl.methods.wrapped_linear import WrappedLinear, wrap_linear_layers


@dataclass
class MoeLoraConfig:
    """MoE-LoRA options; the rank ``r`` and ``alpha`` come from the run's ``lora`` settings."""

    # E, LoRA experts per layer sharing the rank r (r/E each). CoIN (zackschen/CoIN,
    # scripts/LLaVA/Train_MOE/*.sh) uses --expert_num 8 with r = 128 (rank 16 per expert); 4 here keeps
    # rank 2 per expert at the tiny model's r = 8 (8 would leave rank-1 experts). Set 8 to match CoIN.
    experts: int = setting(4, help="LoRA experts per layer sharing the rank r (r/experts each; CoIN uses 8)")

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ConfigError(f"method.options.experts: must be >= 1, got {self.experts}")


def check_rank(rank: int, experts: int) -> None:
    """Refuse a total rank that cannot be split evenly over the experts."""
    if rank < 1:
        raise ConfigError(f"lora.rank: must be >= 1, got {rank}")
    if rank % experts:
        raise ConfigError(
            f"lora.rank: {rank} is not divisible by method.options.experts {experts} "
            f"(MoE-LoRA gives each expert rank/experts; pick e.g. lora.rank {experts * max(1, round(rank / experts))})"
        )


class MoeLoraLinear(WrappedLinear):
    """``base(x) + sum_i softmax(gate(x))_i * (alpha / rank) * B_i A_i dropout(x)`` (see the module docstring).

    ``lora_A`` is the ``(rank, in)`` stack of the experts' ``A_i`` (expert ``i`` owns rows
    ``i*rank/E .. (i+1)*rank/E``); ``lora_B`` the ``(out, rank)`` stack of their ``B_i`` (the same
    columns). New parameters take the dtype and device of the base layer; the base is frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, experts: int, dropout: float = 0.0):
        super().__init__(base)
        check_rank(rank, experts)
        self.rank = rank
        self.alpha = alpha
        self.experts = experts
        self.expert_rank = rank // experts
        self.scaling = alpha / rank
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        self.gate = nn.Linear(base.in_features, experts, bias=False, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the MoE parameters only, names relative to this module."""
        for name, parameter in self.named_parameters():
            if not name.startswith("base."):
                yield name, parameter

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights ``softmax(W_g x)``, shape ``(..., E)``, summing to 1 over the last dim."""
        return torch.softmax(self.gate(x.to(self.gate.weight.dtype)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        x = x.to(self.lora_A.dtype)
        weights = self.gate_weights(x) * self.scaling  # (..., E)
        hidden = self.dropout(x) @ self.lora_A.T  # (..., r): every expert's A_i x at once
        hidden = hidden.unflatten(-1, (self.experts, self.expert_rank)) * weights.unsqueeze(-1)
        update = hidden.flatten(-2) @ self.lora_B.T  # (..., out): sum over experts in one matmul
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, rank={self.rank} ({self.expert_rank} per expert), scaling={self.scaling:g}"


def wrap_moe_layers(
    model: nn.Module, targets: str, rank: int, alpha: float, experts: int, dropout: float = 0.0
) -> list[str]:
    """Replace every targeted ``nn.Linear`` by a :class:`MoeLoraLinear`; returns the wrapped names."""
    return wrap_linear_layers(model, targets, lambda name, base: MoeLoraLinear(base, rank, alpha, experts, dropout))


def moe_layers(model: nn.Module) -> dict[str, MoeLoraLinear]:
    """Full module name -> MoE-LoRA wrapper, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MoeLoraLinear)}


@register_method
class MoeLora(Method[MoeLoraConfig]):
    name = "moelora"
    supports_dora = False
    description = "Mixture of LoRA experts with a token-level softmax gate, trained on each task in turn (CoIN)"

    def __init__(self, config: MoeLoraConfig, lora: LoraSettings, seed: int):
        super().__init__(config, lora, seed)
        check_rank(lora.rank, config.experts)  # before the runner creates the run dir

    def setup(self, backbone) -> None:
        super().setup(backbone)
        model = backbone.model
        for parameter in model.parameters():
            parameter.requires_grad = False
        torch.manual_seed(self.seed)
        settings = self.lora
        wrap_moe_layers(
            model,
            settings.targets or backbone.lora_targets,
            settings.rank,
            settings.alpha,
            self.config.experts,
            settings.dropout,
        )

    def _parameters(self) -> dict[str, nn.Parameter]:
        assert self.backbone is not None, "setup() first"
        return {
            f"{layer_name}.{name}": parameter
            for layer_name, layer in moe_layers(self.backbone.model).items()
            for name, parameter in layer.adapter_parameters()
        }

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self._parameters().values())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in self._parameters().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        parameters = self._parameters()
        missing = sorted(parameters.keys() - tensors.keys())
        unexpected = sorted(tensors.keys() - parameters.keys())
        if missing or unexpected:
            raise RunDirError(f"moelora state: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
        with torch.no_grad():
            for name, parameter in parameters.items():
                value = tensors[name]
                if value.shape != parameter.shape:
                    shapes = f"{tuple(value.shape)}, expected {tuple(parameter.shape)}"
                    raise RunDirError(f"moelora state: {name} has shape {shapes}")
                parameter.copy_(value)

    def state_json(self) -> dict[str, Any]:
        return {"experts": self.config.experts, "rank": self.lora.rank, "alpha": self.lora.alpha}

    def load_state_json(self, state: dict[str, Any]) -> None:
        if state and (state.get("experts"), state.get("rank")) != (self.config.experts, self.lora.rank):
            raise RunDirError(
                f"moelora state: saved with experts={state.get('experts')} rank={state.get('rank')}, "
                f"this run has experts={self.config.experts} rank={self.lora.rank}"
            )
