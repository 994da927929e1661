"""``olora``: O-LoRA, orthogonal subspace learning (Wang et al., 2023, "Orthogonal Subspace Learning
for Language Model Continual Learning", Findings of EMNLP 2023, arXiv:2310.14152).

Every task gets a fresh LoRA adapter. The adapters of earlier tasks stay in the model, frozen but
active: each LoRA layer outputs ``W x + sum_k s B_k A_k x`` over all adapters, so no task identity is
needed at test time. While task ``t`` trains, the loss is

    CE + lambda1 * sum_layers sum_{k<t} sum_ij |(A_k A_t^T)_ij| + lambda2 * sum_{P in {A_t, B_t}} ||P||_F

The first term pushes the row space of the new ``A_t`` (the input directions it reads) to be
orthogonal to those of the old adapters, so that the new update interferes little with what the
old adapters compute; the second is the paper's optional L2 on the new adapter (off by default, as
in the authors' released scripts for LLaMA/T5). Summing the elementwise absolute values over the
old adapters one by one equals the authors' code, which concatenates the old A matrices along the
rank dimension.

PEFT set-up: adapters are named ``olora_0``, ``olora_1``, ... (by task position). All of them are made
active in the LoRA layers with ``LoraModel.set_adapter([...], inference_mode=True)`` (several active
adapters are summed by PEFT's LoRA forward), then ``set_requires_grad`` re-enables the newest one
only. ``PeftModel.active_adapter`` (a single name PEFT uses to look up the adapter config) is set to
the newest adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from mmcl.streams.stream import Task
from mmcl.config import setting
from mmcl.errors import ConfigError, DataError
from mmcl.methods.base import Method, register_method
from mmcl.methods.lora_utils import (
    adapter_parameter_count,
    add_lora,
    ensure_adapter,
    named_adapters_tensors,
    restore_adapters,
)

PREFIX = "olora_"


@dataclass
class OLoraConfig:
    """O-LoRA options. Sources: the authors' scripts (cmnfriend/O-LoRA, ``scripts_llama/order_1.sh``:
    ``--lamda_1 0.5 --lamda_2 0``) and ``src/run_uie_lora.py`` (LLaMA: PEFT's default LoRA modules for
    LLaMA, ``q_proj`` and ``v_proj``; r = 8, alpha 32, dropout 0.1 -- rank, alpha and dropout come from the
    run's ``lora`` settings here)."""

    lambda1: float = setting(0.5, help="weight of the orthogonality penalty sum |A_old A_new^T| (authors' scripts: 0.5)")
    lambda2: float = setting(0.0, help="weight of the L2 (Frobenius norm) penalty on the new adapter's A and B "
                             "(authors' scripts: 0)")
    modules: str = setting("attention-qv", help="layers with adapters when lora.targets is not set: attention-qv = "
                           "the language model's query and value projections (the authors' LLaMA set-up); backbone = "
                           "the backbone's default LoRA targets (as seq-lora)")

    def __post_init__(self) -> None:
        for key in ("lambda1", "lambda2"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.options.{key}: must be >= 0, got {getattr(self, key)}")
        if self.modules not in ("attention-qv", "backbone"):
            raise ConfigError(f"method.options.modules: expected 'attention-qv' or 'backbone', got {self.modules!r}")


def query_value_only(targets: str) -> str:
    """``targets`` (a PEFT full-match regex over module names) narrowed to modules named ``q_proj``/``v_proj``."""
    return rf"(?=.*\.(?:q_proj|v_proj)$)(?:{targets})"


def adapter_name(task_index: int) -> str:
    return f"{PREFIX}{task_index}"


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """A LoRA ``A`` weight as an (r, in_features) matrix (Linear is already 2-D; Conv kernels are flattened)."""
    return weight.reshape(weight.shape[0], -1)


def orthogonality_penalty(old_As: Sequence[torch.Tensor], new_A: torch.Tensor) -> torch.Tensor:
    """``sum_k sum_ij |(A_k A_new^T)_ij|`` for the old ``A_k`` (r_k, in) and the new ``A_new`` (r, in).

    Zero exactly when every row of ``new_A`` is orthogonal to every row of every old ``A_k``. The old
    matrices are detached (their subspaces are fixed); the gradient flows to ``new_A`` only. Computed
    in float32 whatever the weights' dtype."""
    new = _rows(new_A).float()
    total = new.new_zeros(())
    for old in old_As:
        total = total + (_rows(old).detach().float() @ new.T).abs().sum()
    return total


def l2_penalty(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the Frobenius norms of ``weights`` (as ``torch.norm(param, p=2)`` in the authors' code)."""
    total = torch.zeros(())
    for weight in weights:
        total = total.to(weight.device) + torch.linalg.vector_norm(weight.float())
    return total


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The PEFT LoRA layers of ``model`` (modules holding a ``lora_A`` ModuleDict keyed by adapter name)."""
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


@register_method
class OLora(Method[OLoraConfig]):
    name = "olora"
    state_growth = "per-task"
    supports_dora = False
    description = "O-LoRA: a new LoRA per task, old ones frozen and summed, new A kept orthogonal to the old As"

    def init_state(self) -> None:
        self.adapters: list[str] = []  # trained adapters, in task order
        self.current: str | None = None  # the adapter being trained (None between tasks)

    # -- PEFT bookkeeping ----------------------------------------------------------------------
    def setup(self, backbone) -> None:
        super().setup(backbone)
        if self.lora.targets is None and self.config.modules == "attention-qv":
            self.lora = replace(self.lora, targets=query_value_only(backbone.lora_targets))
        add_lora(backbone, self.lora, self.seed, adapter_name=adapter_name(0))

    def _activate(self, active: list[str], trainable: str | None) -> None:
        """Make ``active`` the adapters summed in every LoRA layer; only ``trainable`` gets gradients."""
        model = self.backbone.model
        model.base_model.set_adapter(active, inference_mode=True)  # all active, all frozen
        if trainable is not None:
            model.base_model.set_requires_grad(trainable, True)
        model.active_adapter = trainable or active[-1]  # the single name PEFT uses for config lookups

    def before_task(self, task_index: int, task: Task) -> None:
        name = adapter_name(task_index)
        if name in self.adapters:
            raise DataError(f"olora: adapter {name} was already trained (task {task.name} seen twice?)")
        ensure_adapter(self.backbone, name, self.lora, self.seed + task_index)
        self.current = name
        self._activate([*self.adapters, name], trainable=name)

    def after_task(self, task_index: int, task: Task) -> None:
        name = adapter_name(task_index)
        self.adapters.append(name)
        self.current = None
        self._activate(self.adapters, trainable=None)

    # -- loss ----------------------------------------------------------------------------------
    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """lambda1 * orthogonality + lambda2 * L2 of the adapter being trained (None if both are zero)."""
        new = self.current
        if new is None:
            return None
        use_orthogonality = self.config.lambda1 > 0 and bool(self.adapters)
        if not use_orthogonality and self.config.lambda2 <= 0:
            return None
        orthogonality, l2 = [], []
        for layer in lora_layers(model):
            if new not in layer.lora_A:
                continue
            new_A = layer.lora_A[new].weight
            if use_orthogonality:
                old_As = [layer.lora_A[old].weight for old in self.adapters if old in layer.lora_A]
                if old_As:
                    orthogonality.append(orthogonality_penalty(old_As, new_A))
            if self.config.lambda2 > 0:
                l2.append(l2_penalty([new_A, layer.lora_B[new].weight]))
        total = None
        if orthogonality:
            total = self.config.lambda1 * torch.stack(orthogonality).sum()
        if l2:
            term = self.config.lambda2 * torch.stack(l2).sum()
            total = term if total is None else total + term
        return total

    def extra_loss(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> torch.Tensor | None:
        return self.penalty(model)

    # -- state ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        """Parameters of the newest adapter (the one trained in the last stage)."""
        name = self.current or (self.adapters[-1] if self.adapters else adapter_name(0))
        return adapter_parameter_count(self.backbone.model, [name])

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return named_adapters_tensors(self.backbone, self.adapters)

    def load_state_tensors(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        restore_adapters(self.backbone, tensors, self.adapters, self.lora, self.seed)
        if self.adapters:
            self._activate(self.adapters, trainable=None)

    def state_json(self) -> dict[str, Any]:
        return {"adapters": list(self.adapters)}

    def load_state_json(self, state: dict[str, Any]) -> None:
        self.adapters = list(state.get("adapters", []))
        self.current = None
