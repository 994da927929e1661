"""``clmoe``: CL-MoE, a dual-router, dual-momentum mixture of LoRA experts (Huai, Zhou, Wu, Chen, Bai, Zhou
and He, "CL-MoE: Enhancing Multimodal Large Language Model with Dual Momentum Mixture-of-Experts for
Continual Visual Question Answering", CVPR 2025, arXiv:2503.00413; reference code ECNU-ICALK/CL-MoE).

Layers. Every targeted ``nn.Linear`` becomes a MoE-LoRA layer of :mod:`mmcl.methods.moelora` (``E``
experts sharing the rank ``r``, a dense token-level softmax gate), one set of modules trained on every
task in turn. The paper calls the experts' output combination RMoE (Dual-Router MoE):

    x_hat = beta * (alpha/r) sum_i G^I(x)_i E_i(x)  +  (1 - beta) * (alpha/r) sum_i G^T(t)_i E_i(x)

* **instance-level router** ``G^I(x) = softmax(W_g x)``: the MoE-LoRA gate, per token (local experts);
* **task-level router** ``G^T(t)``: after task ``t`` is trained, the mean gate weight of every expert over
  the task's training tokens is recorded per layer (its *expert usage*); the ``task_experts`` experts with
  the largest usage are the task's selected set ``S_t`` (global experts), and ``G^T(t)`` is the usage
  restricted to ``S_t`` and renormalised to sum 1 (zero for the other experts).

Training uses ``G^I`` alone (``beta = 1``), as the released layer does (``clitmoelora.py``, forward: the
"train stage" line); inference mixes both routers with ``beta = 0.5`` (the commented "test stage" line of
the same forward: ``alpha * router + (1 - alpha) * arr`` with ``alpha = 0.5`` and ``arr`` "the contribution
of top-2 experts inferred from the statistics").

Task-level routing without a task identity. ``generate`` never reads its ``task`` argument. Each test
sample picks the learned task ``t_hat`` whose prototype is most similar to it: ``cos(image feature, image
prototype) + cos(instruction feature, text prototype)``, the prototypes being the means of the
L2-normalised features of the task's training samples (features from :mod:`mmcl.methods.sample_features`:
the frozen vision encoder's mean hidden state and the mean input embedding of the instruction, or a
local ``text_encoder``). The choice is made per sample (features are computed one sample at a time); the
batch is split by ``t_hat`` and each group answered by one batched generation with ``G^T(t_hat)`` set in
every layer, so batched answers equal one-by-one answers. Before any task is learned the model answers
with the instance router alone.

Momentum merge (MMoE, Dynamic Momentum MoE). The paper's update is ``theta_t = lambda o theta_{t-1} +
(1 - lambda) o phi_t`` per expert (``theta_{t-1}``: the experts before task ``t``, i.e. after the merge of
task ``t-1``; ``phi_t``: the experts after training on task ``t``; ``lambda`` set by the expert's role). As
the released ``params.py`` computes it (``alpha = 0.7``), expert ``i`` of a layer becomes

    new_i = a_i * current_i + (1 - a_i) * previous_i,
    a_i = merge_alpha (0.7) if i is in S_{t-1} and not in S_t (the old task's own experts), else 1 - merge_alpha (0.3)

applied to the expert's rows of ``A`` and columns of ``B`` (the gate is not merged, as in ``params.py``).
``merge_sets: old`` gives ``merge_alpha`` to every expert of ``S_{t-1}`` instead (the wording "0.7 for the
experts of the old task's set, 0.3 otherwise"). No merge after the first task.

Where this differs from the released code, and why:

* ``params.py`` builds the expert prefixes ``loraA.<i>.`` / ``loraB.<i>.`` and tests
  ``name.startswith(prefix)`` on PEFT state-dict keys, which all start with ``base_model.model.``: no key
  matches, so the released merge leaves the current weights unchanged (and with ``--expert_num 4`` and the
  top-8 experts that ``statistic.py`` keeps, every expert is in every task's set, so ``exclusive_indices`` is
  always empty). Here the rule is applied as written. The authors' EasyCL port
  (ECNU-ICALK/EasyCL, ``src/easycl/cl/clmoe/clmoe_workflow.py``) rewrites the matching as a regular
  expression and keeps the same formulas (its comments name the opposite side as the one with "more
  influence"; the formulas, followed here, give the old task's own experts 0.7 of the *new* weights).
* The released statistics count how often each expert is among a token's top-2 gate weights, sampled
  during training at wall-clock instants (``current_second == 30``), summed over all layers into one
  ranking; here the usage is the mean gate weight per layer (each layer's experts are its own), measured
  after training on up to ``statistics_samples`` training samples, one at a time, so it is deterministic.
* The released code never uses the task-level router at test time (the test-stage line is commented out
  and its ``arr`` is left empty); the per-sample choice of ``t_hat`` by feature prototypes is this
  implementation's answer to "which task's ``G^T``" without a task identity.
* The paper's method section was not available when this file was written: the two formulas above are
  the paper's as a published summary quotes them (sciencestack.ai, 2503.00413); the constants, the sets
  and the side that gets 0.7 come from the released code (``params.py``, ``clitmoelora.py``).

The stage state: the MoE parameters (``lora_A``, ``lora_B``, ``gate.weight`` of every layer), and per
learned task its usage matrix (layers x experts) and its two prototypes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmcl.config import LoraSettings, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, DataError, RunDirError
from mmcl.methods.base import Method, register_method
from mmcl.methods.moelora import (
    MoeLoraLinear,
    check_rank,
    moe_layers,
    wrap_moe_layers,
)
from mmcl.methods.mrlora_router import generate_grouped
from mmcl.methods.sample_features import TextFeatures, cosine_to, image_features
from mmcl.streams.stream import Task

MERGE_SETS = ("old-only", "old")


@dataclass
class ClMoeConfig:
    """CL-MoE options; the total rank ``r`` and ``alpha`` come from the run's ``lora`` settings (the released
    scripts use ``--lora_r 32 --lora_alpha 64``)."""

    # scripts/CLMoE/Train_MOE/*.sh: --expert_num 4
    experts: int = setting(4, "[1, inf)", "LoRA experts per layer sharing the rank r (reference scripts: 4)")
    # clitmoelora.py forward: torch.topk(router, 2) is what the usage statistics count
    task_experts: int = setting(2, "[1, inf)", "experts in a task's selected set S_t (top by mean gate weight; "
                                "reference: the top-2 experts of each token)")
    # clitmoelora.py forward, the commented test-stage line: alpha = 0.5 (the paper's beta)
    beta: float = setting(0.5, "[0, 1]", "weight of the instance-level router at inference, 1 - beta for the "
                          "task-level router (reference test stage: 0.5)")
    momentum: bool = setting(True, help="merge the experts after each task (MMoE); off = no merge (what the "
                             "released params.py amounts to, its names never matching)")
    # params.py: alpha = 0.7
    merge_alpha: float = setting(0.7, "[0, 1]", "weight of the new weights for the old task's own experts, "
                                 "1 - merge_alpha for the others (reference params.py: 0.7)")
    merge_sets: str = setting("old-only", help="which experts get merge_alpha: old-only = in S_{t-1} and not "
                              "in S_t (params.py's exclusive_indices); old = every expert of S_{t-1}")
    # not in the paper or the code: the statistics and prototypes are measured after training
    statistics_samples: int = setting(256, "[1, inf)", "training samples of a task (evenly spaced) used for "
                                      "its expert usage and its prototypes (mmcl's choice)")
    text_encoder: str | None = setting(None, help="local transformers checkpoint for the instruction feature; "
                                       "none = the backbone's own input embeddings (see sample_features)")

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ConfigError(f"method.options.experts: must be >= 1, got {self.experts}")
        if not 1 <= self.task_experts <= self.experts:
            raise ConfigError(
                f"method.options.task_experts: must be between 1 and experts ({self.experts}), got {self.task_experts}"
            )
        for key in ("beta", "merge_alpha"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"method.options.{key}: must be in [0, 1], got {getattr(self, key)}")
        if self.merge_sets not in MERGE_SETS:
            raise ConfigError(f"method.options.merge_sets: expected one of {', '.join(MERGE_SETS)}, got {self.merge_sets!r}")
        if self.statistics_samples < 1:
            raise ConfigError(f"method.options.statistics_samples: must be >= 1, got {self.statistics_samples}")


# -- the mechanism as pure functions ---------------------------------------------------------------
def selected_experts(usage: torch.Tensor, k: int) -> list[int]:
    """The ``k`` experts with the largest usage (ties: the lower index first), in increasing order."""
    order = sorted(range(usage.shape[-1]), key=lambda i: (-float(usage[i]), i))
    return sorted(order[:k])


def task_gate(usage: torch.Tensor, k: int) -> torch.Tensor:
    """``G^T``: the usage ``(E,)`` kept on its top-``k`` experts and renormalised to sum 1 (float32)."""
    usage = usage.float()
    gate = torch.zeros_like(usage)
    chosen = selected_experts(usage, k)
    kept = usage[chosen].clamp_min(0)
    total = float(kept.sum())
    gate[chosen] = kept / total if total > 0 else torch.full_like(kept, 1.0 / len(chosen))
    return gate


def dual_router_weights(instance: torch.Tensor, task: torch.Tensor | None, beta: float) -> torch.Tensor:
    """``beta * G^I(x) + (1 - beta) * G^T``: ``instance`` is ``(..., E)``, ``task`` an ``(E,)`` vector or None
    (the instance router alone)."""
    if task is None:
        return instance
    return beta * instance + (1.0 - beta) * task.to(device=instance.device, dtype=instance.dtype)


def merge_coefficients(experts: int, old_set: Iterable[int], new_set: Iterable[int], alpha: float,
                       sets: str = "old-only") -> torch.Tensor:
    """Per expert, the weight ``a_i`` of its current (just trained) weights in the momentum merge:
    ``alpha`` for the old task's experts (``old-only``: those of ``old_set`` not in ``new_set``; ``old``: all of
    ``old_set``), ``1 - alpha`` for the others."""
    old, new = set(old_set), set(new_set)
    favoured = old - new if sets == "old-only" else old
    return torch.tensor([alpha if i in favoured else 1.0 - alpha for i in range(experts)], dtype=torch.float64)


def momentum_merge(previous_A: torch.Tensor, current_A: torch.Tensor, previous_B: torch.Tensor,
                   current_B: torch.Tensor, coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged ``(A, B)`` of one MoE-LoRA layer: expert ``i`` (rows ``i*r/E..`` of A, the same columns of B)
    becomes ``a_i * current + (1 - a_i) * previous``; computed in float64, returned in A's and B's dtypes."""
    experts = coefficients.shape[0]
    per_expert = previous_A.shape[0] // experts
    a = coefficients.double().repeat_interleave(per_expert)  # (r,): each expert's weight over its rank slots
    merged_A = a[:, None] * current_A.double() + (1 - a[:, None]) * previous_A.double()
    merged_B = a[None, :] * current_B.double() + (1 - a[None, :]) * previous_B.double()
    return merged_A.to(current_A.dtype), merged_B.to(current_B.dtype)


def nearest_task(image: torch.Tensor, text: torch.Tensor, image_prototypes: torch.Tensor,
                 text_prototypes: torch.Tensor) -> torch.Tensor:
    """Per sample, the index of the prototype with the largest ``cos(image) + cos(text)`` (ties: the first)."""
    scores = cosine_to(image.float(), image_prototypes.float()) + cosine_to(text.float(), text_prototypes.float())
    return scores.argmax(dim=1)


def prototype(features: torch.Tensor) -> torch.Tensor:
    """Mean of the L2-normalised rows (a zero row, e.g. no image, stays zero)."""
    return torch.nn.functional.normalize(features.float(), dim=-1).mean(dim=0)


def evenly_spaced(samples: Sequence[Sample], count: int) -> list[Sample]:
    """At most ``count`` samples, evenly spaced over ``samples`` (all when there are fewer)."""
    n = len(samples)
    return list(samples) if n <= count else [samples[i * n // count] for i in range(count)]


class DualRouterLinear(MoeLoraLinear):
    """A :class:`MoeLoraLinear` whose gate can mix in a fixed task-level gate (``task`` and ``beta``) and can
    record the instance gate's per-expert sum over the tokens it sees (``usage_sum``, ``usage_tokens``)."""

    task: torch.Tensor | None = None  # (E,) task-level gate G^T, None = instance router only
    beta: float = 1.0
    usage_sum: torch.Tensor | None = None  # (E,) float64 while recording, else None
    usage_tokens: int = 0

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        instance = super().gate_weights(x)
        if self.usage_sum is not None:
            rows = instance.detach().reshape(-1, self.experts)
            self.usage_sum += rows.double().sum(dim=0).cpu()
            self.usage_tokens += rows.shape[0]
        return dual_router_weights(instance, self.task, self.beta)


def dual_router_layers(model: torch.nn.Module) -> dict[str, DualRouterLinear]:
    return {name: layer for name, layer in moe_layers(model).items() if isinstance(layer, DualRouterLinear)}


@register_method
class ClMoe(Method[ClMoeConfig]):
    name = "clmoe"
    state_growth = "per-task"
    supports_dora = False  # MoE-LoRA layers whose A and B the momentum merge mixes directly
    description = ("CL-MoE: MoE-LoRA with instance- and task-level routers (task chosen per sample by feature "
                   "prototypes) and a momentum merge of the experts after each task")

    def __init__(self, config: ClMoeConfig, lora: LoraSettings, seed: int):
        super().__init__(config, lora, seed)
        check_rank(lora.rank, config.experts)  # before the runner creates the run dir
        self.text_features = TextFeatures(config.text_encoder)

    def init_state(self) -> None:
        self.learned: list[str] = []  # task names with statistics, in learning order (index = task-level id)
        self.usage: list[torch.Tensor] = []  # per learned task: (layers, experts) mean gate weights
        self.image_prototypes: list[torch.Tensor] = []
        self.text_prototypes: list[torch.Tensor] = []
        self.previous: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # experts before this stage
        self.last_routes: list[str] = []  # the learned task chosen for each sample of the last batch
        self.last_merge: dict[str, list[float]] = {}  # layer -> a_i of the last merge (for inspection)

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, backbone) -> None:
        super().setup(backbone)
        model = backbone.model
        for parameter in model.parameters():
            parameter.requires_grad = False
        torch.manual_seed(self.seed)
        settings = self.lora
        names = wrap_moe_layers(
            model, settings.targets or backbone.lora_targets, settings.rank, settings.alpha, self.config.experts,
            settings.dropout,
        )  # fmt: skip
        for name in names:
            model.get_submodule(name).__class__ = DualRouterLinear  # same parameters, a gate that can mix

    def layers(self) -> dict[str, DualRouterLinear]:
        assert self.backbone is not None, "setup() first"
        return dual_router_layers(self.backbone.model)

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        return {
            f"{layer_name}.{name}": parameter
            for layer_name, layer in self.layers().items()
            for name, parameter in layer.adapter_parameters()
        }

    def set_task_gates(self, task_index: int | None) -> None:
        """Put ``G^T`` of learned task ``task_index`` (with ``beta``) in every layer; None = instance router only."""
        for position, layer in enumerate(self.layers().values()):
            if task_index is None:
                layer.task, layer.beta = None, 1.0
            else:
                layer.task = task_gate(self.usage[task_index][position], self.config.task_experts)
                layer.beta = self.config.beta

    # -- training hooks --------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        if task.name in self.learned:
            raise DataError(f"clmoe: task {task.name} was learned already (seen twice?)")
        self.set_task_gates(None)  # training uses the instance-level router alone
        if self.previous is None:  # the experts as this stage starts (several tasks in one stage: once)
            self.previous = {
                name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
                for name, layer in self.layers().items()
            }

    def after_task(self, task_index: int, task: Task) -> None:
        samples = evenly_spaced(task.train_samples, self.config.statistics_samples)
        usage = self.expert_usage(samples)
        if self.config.momentum and self.usage and self.previous is not None:
            self.merge(self.usage[-1], usage)
        self.previous = None
        self.learned.append(task.name)
        self.usage.append(usage)
        image, text = self.sample_features(samples)
        self.image_prototypes.append(prototype(image))
        self.text_prototypes.append(prototype(text))

    @torch.no_grad()
    def sample_features(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and instruction features of ``samples`` (computed one sample at a time, model in eval mode)."""
        model = self.backbone.model
        was_training = model.training
        model.eval()
        try:
            return image_features(self.backbone, samples), self.text_features(self.backbone, samples)
        finally:
            model.train(was_training)

    @torch.no_grad()
    def expert_usage(self, samples: Sequence[Sample]) -> torch.Tensor:
        """``(layers, experts)``: per layer the instance gate's mean weight of each expert over every token of
        ``samples`` (training encodings, one sample per forward pass: no padding enters the mean)."""
        backbone = self.backbone
        model = backbone.model
        layers = list(self.layers().values())
        self.set_task_gates(None)
        for layer in layers:
            layer.usage_sum, layer.usage_tokens = torch.zeros(layer.experts, dtype=torch.float64), 0
        was_training = model.training
        model.eval()
        try:
            for sample in samples:
                batch = backbone.collate([backbone.encode_for_training(sample)])
                batch.pop("labels")
                model(**{key: value.to(backbone.device) for key, value in batch.items()})
            rows = [layer.usage_sum / max(layer.usage_tokens, 1) for layer in layers]
        finally:
            for layer in layers:
                layer.usage_sum, layer.usage_tokens = None, 0
            model.train(was_training)
        return torch.stack(rows).float()

    @torch.no_grad()
    def merge(self, old_usage: torch.Tensor, new_usage: torch.Tensor) -> None:
        """The momentum merge of every layer's experts: previous (as the stage started) and current weights,
        the old task's set from ``old_usage``, the new one's from ``new_usage`` (both ``(layers, experts)``)."""
        k, self.last_merge = self.config.task_experts, {}
        for position, (name, layer) in enumerate(self.layers().items()):
            previous_A, previous_B = self.previous[name]
            coefficients = merge_coefficients(
                layer.experts, selected_experts(old_usage[position], k), selected_experts(new_usage[position], k),
                self.config.merge_alpha, self.config.merge_sets,
            )  # fmt: skip
            merged_A, merged_B = momentum_merge(
                previous_A.to(layer.lora_A.device), layer.lora_A, previous_B.to(layer.lora_B.device), layer.lora_B,
                coefficients,
            )  # fmt: skip
            layer.lora_A.copy_(merged_A)
            layer.lora_B.copy_(merged_B)
            self.last_merge[name] = coefficients.tolist()

    # -- inference -------------------------------------------------------------------------------
    def route(self, samples: Sequence[Sample]) -> torch.Tensor:
        """Per sample, the index (in ``learned``) of the most similar learned task (see the module docstring)."""
        if not self.learned:
            raise RuntimeError("clmoe: no task learned yet, nothing to route to")
        image, text = self.sample_features(samples)
        return nearest_task(image, text, torch.stack(self.image_prototypes), torch.stack(self.text_prototypes))

    def _answer(self, task_index: int, samples: list[Sample], max_new_tokens: int) -> list[str]:
        self.set_task_gates(task_index)
        try:
            return self.backbone.generate(samples, max_new_tokens)
        finally:
            self.set_task_gates(None)

    def generate(self, samples: Sequence[Sample], task: Task, max_new_tokens: int) -> list[str]:
        # ``task`` is not used: the task-level router is chosen per sample from its features
        samples = list(samples)
        if not self.learned:
            self.set_task_gates(None)
            self.last_routes = [""] * len(samples)
            return self.backbone.generate(samples, max_new_tokens)
        choices = self.route(samples)
        self.last_routes = [self.learned[int(c)] for c in choices]
        return generate_grouped(samples, choices, lambda t, group: self._answer(t, group, max_new_tokens))

    # -- state -----------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self._parameters().values())

    def state_tensors(self) -> dict[str, Any]:
        def per_task(values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            return {str(i): value.detach().to("cpu", copy=True).contiguous() for i, value in enumerate(values)}

        return {
            "moe": {name: p.detach().to("cpu", copy=True).contiguous() for name, p in self._parameters().items()},
            "usage": per_task(self.usage),
            "image_prototype": per_task(self.image_prototypes),
            "text_prototype": per_task(self.text_prototypes),
        }

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        moe = tensors.get("moe")
        if not isinstance(moe, dict):
            raise RunDirError("clmoe state: no 'moe' group of MoE parameters")
        parameters = self._parameters()
        missing, unexpected = sorted(parameters.keys() - moe.keys()), sorted(moe.keys() - parameters.keys())
        if missing or unexpected:
            raise RunDirError(f"clmoe state: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
        for name, parameter in parameters.items():
            if moe[name].shape != parameter.shape:
                raise RunDirError(f"clmoe state: {name} has shape {tuple(moe[name].shape)}, expected {tuple(parameter.shape)}")
        groups = {}
        expected = [str(i) for i in range(len(self.learned))]
        for group in ("usage", "image_prototype", "text_prototype"):
            values = tensors.get(group, {})
            if not isinstance(values, dict) or sorted(values, key=str) != sorted(expected, key=str):
                raise RunDirError(f"clmoe state: group {group!r} should hold one tensor per learned task "
                                  f"({len(self.learned)}), found {sorted(values) if isinstance(values, dict) else values!r}")
            groups[group] = [values[i] for i in expected]
        shape = (len(self.layers()), self.config.experts)
        for index, usage in enumerate(groups["usage"]):
            if tuple(usage.shape) != shape:
                raise RunDirError(f"clmoe state: usage of task {index} has shape {tuple(usage.shape)}, expected {shape}")
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(moe[name])
        self.usage = [u.float() for u in groups["usage"]]
        self.image_prototypes = [p.float() for p in groups["image_prototype"]]
        self.text_prototypes = [p.float() for p in groups["text_prototype"]]
        self.previous = None
        self.set_task_gates(None)

    def state_json(self) -> dict[str, Any]:
        return {
            "experts": self.config.experts,
            "rank": self.lora.rank,
            "alpha": self.lora.alpha,
            "learned": list(self.learned),
            "selected_experts": {  # per learned task, per layer: S_t (for reading; recomputed from usage)
                name: [selected_experts(row, self.config.task_experts) for row in usage]
                for name, usage in zip(self.learned, self.usage)
            },
            "last_merge": self.last_merge,
        }

    def load_state_json(self, state: dict[str, Any]) -> None:
        if state and (state.get("experts"), state.get("rank")) != (self.config.experts, self.lora.rank):
            raise RunDirError(
                f"clmoe state: saved with experts={state.get('experts')} rank={state.get('rank')}, "
                f"this run has experts={self.config.experts} rank={self.lora.rank}"
            )
        learned = state.get("learned", [])
        if not isinstance(learned, list) or not all(isinstance(name, str) for name in learned):
            raise RunDirError(f"clmoe state: 'learned' must be a list of task names, got {learned!r}")
        self.learned = list(learned)
        merge = state.get("last_merge", {})
        self.last_merge = dict(merge) if isinstance(merge, dict) else {}
        self.previous = None
