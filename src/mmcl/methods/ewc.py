"""``ewc``: Elastic Weight Consolidation (Kirkpatrick et al. 2017, PNAS) on the trainable parameters
(one LoRA adapter continued across tasks, as in ``seq-lora``).

After each task, a diagonal *empirical* Fisher F is estimated on ``fisher_samples`` training samples of
that task: the per-sample gradient g of the sample's token cross-entropy (mean over its answer tokens,
labels from the data, model in eval mode so no dropout), squared element-wise and averaged over the
samples, F = mean_n g_n ** 2. The parameters theta* at that moment become the anchor. While training a
later task the loss gets the quadratic penalty (no 1/2 factor, no penalty on the first task)

    per_task (Kirkpatrick et al. 2017):  lambda_ * sum_k sum_i F_k,i (theta_i - theta*_k,i) ** 2
                                          one (F_k, theta*_k) pair kept per finished task k;
    online   (Schwarz et al. 2018, "Progress & Compress"; Huszar 2018):
                                          lambda_ * sum_i F_i (theta_i - theta*_i) ** 2
                                          with F <- gamma * F + F_new after every task and theta* the
                                          parameters after the last task (one pair, constant memory).

With gamma = 1 the two modes share the total curvature sum_k F_k and differ only in the anchors.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from mmcl.benchmarks.stream import Task
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import register_method
from mmcl.methods.seq_lora import SequentialLora

FISHER_PREFIX = "fisher::"
ANCHOR_PREFIX = "anchor::"
MODES = ("per_task", "online")

Consolidated = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # (Fisher diagonal, anchor) by name


@dataclass
class EwcConfig:
    """Penalty weight, Fisher estimate and how several tasks are combined."""

    # Penalty weight of lambda_ * sum F (theta - theta*)^2. Calibrated for rank-8 LoRA on the tiny LLaVA
    # with the default training (synth-domain, 300 samples x 3 epochs, lr 2e-3): after a normal,
    # unpenalised stage sum F (theta - theta*)^2 is ~2.5e-4, so 5000 puts the penalty at ~1, the order of
    # the CE loss (~2). The scale depends on the model, LoRA rank, learning rate and stage length:
    # re-calibrate elsewhere; every stage's mean penalty is written to state.json under "penalty".
    lambda_: float = 5000.0
    fisher_samples: int = 200  # training samples of the finished task used for the Fisher (fewer if the task has fewer)
    mode: str = "per_task"  # per_task (Kirkpatrick 2017) | online (Schwarz 2018)
    gamma: float = 1.0  # online mode: decay of the accumulated Fisher, F <- gamma * F + F_new

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"method.options.mode: expected 'per_task' or 'online', got {self.mode!r}")
        if self.lambda_ < 0:
            raise ConfigError(f"method.options.lambda_: expected a weight >= 0, got {self.lambda_}")
        if self.fisher_samples < 1:
            raise ConfigError(f"method.options.fisher_samples: expected at least 1, got {self.fisher_samples}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"method.options.gamma: expected a decay in [0, 1], got {self.gamma}")


# -- pure functions ----------------------------------------------------------------------------------
def ewc_penalty(
    params: Mapping[str, torch.Tensor], consolidated: Sequence[Consolidated], lambda_: float
) -> torch.Tensor | None:
    """``lambda_ * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2`` over the (F_k, theta*_k) pairs, in float32;
    None when nothing is consolidated yet. ``params`` maps names to the current (differentiable) tensors."""
    total: torch.Tensor | None = None
    for fisher, anchor in consolidated:
        for name, weight in fisher.items():
            delta = params[name].float() - anchor[name]
            term = (weight * delta * delta).sum()
            total = term if total is None else total + term
    return None if total is None else lambda_ * total


def online_fisher(
    old: Mapping[str, torch.Tensor] | None, new: Mapping[str, torch.Tensor], gamma: float
) -> dict[str, torch.Tensor]:
    """The online-EWC accumulation ``F <- gamma * F_old + F_new`` (just ``F_new`` for the first task)."""
    if old is None:
        return {name: value.clone() for name, value in new.items()}
    return {name: gamma * old[name] + value for name, value in new.items()}


def empirical_fisher(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], params: Mapping[str, torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over ``batches`` (one sample each) of the squared gradient of
    the model's loss w.r.t. ``params``, in float32. Runs in eval mode; leaves no gradients behind.
    Batches whose loss is not finite (no answer token) are skipped."""
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    names, tensors = list(params), list(params.values())
    was_training = model.training
    model.eval()
    used = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    continue
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        sums[name] += grad.detach().float().pow(2)
                used += 1
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    if used == 0:
        raise RuntimeError("EWC: no sample with a finite loss to estimate the Fisher from")
    return {name: value / used for name, value in sums.items()}


# -- the method ---------------------------------------------------------------------------------------
@register_method
class Ewc(SequentialLora):
    name = "ewc"
    description = "Sequential LoRA + Elastic Weight Consolidation (diagonal Fisher penalty; per-task or online)"
    config_class = EwcConfig

    def __init__(self, config: EwcConfig, lora, seed: int):
        super().__init__(config, lora, seed)
        self.consolidated: list[Consolidated] = []  # per_task: one pair per task; online: at most one
        self.tasks_done: list[int] = []  # task indices whose Fisher is in ``consolidated``
        self.penalty_log: list[dict[str, Any]] = []  # per stage: mean / last penalty seen in training
        self._penalty_sum: torch.Tensor | None = None
        self._penalty_last: torch.Tensor | None = None
        self._penalty_steps = 0

    # -- helpers ----------------------------------------------------------------------------------
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.backbone.model.named_parameters() if p.requires_grad}

    def draw_fisher_samples(self, task_index: int, task: Task) -> list[Sample]:
        """A seeded draw of ``fisher_samples`` training samples of the task (all of them if fewer)."""
        samples = list(task.train_samples)
        rng = random.Random(f"ewc-{self.seed}-{task_index}")
        return rng.sample(samples, min(self.config.fisher_samples, len(samples)))

    def single_batches(self, samples: Sequence[Sample]) -> Iterator[dict[str, torch.Tensor]]:
        """One-sample training batches on the model's device, encoded one at a time."""
        backbone, device = self.backbone, self.backbone.device
        for sample in samples:
            yield {k: v.to(device) for k, v in backbone.collate([backbone.encode_for_training(sample)]).items()}

    def compute_fisher(self, task_index: int, task: Task) -> dict[str, torch.Tensor]:
        batches = self.single_batches(self.draw_fisher_samples(task_index, task))
        return empirical_fisher(self.backbone.model, batches, self.trainable())

    # -- hooks ------------------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        super().before_task(task_index, task)
        self._penalty_sum, self._penalty_last, self._penalty_steps = None, None, 0

    def extra_loss(self, model, inputs, outputs) -> torch.Tensor | None:
        if not self.consolidated:
            return None
        params = dict(self.backbone.model.named_parameters())
        penalty = ewc_penalty(params, self.consolidated, self.config.lambda_)
        if penalty is not None:
            value = penalty.detach()
            self._penalty_sum = value if self._penalty_sum is None else self._penalty_sum + value
            self._penalty_last = value
            self._penalty_steps += 1
        return penalty

    def after_task(self, task_index: int, task: Task) -> None:
        if self._penalty_steps:
            self.penalty_log.append(
                {
                    "task": task_index,
                    "calls": self._penalty_steps,
                    "mean": float(self._penalty_sum) / self._penalty_steps,
                    "last": float(self._penalty_last),
                }
            )
        fisher = self.compute_fisher(task_index, task)
        anchor = {name: p.detach().float().clone() for name, p in self.trainable().items()}
        if self.config.mode == "per_task":
            self.consolidated.append((fisher, anchor))
        else:
            old = self.consolidated[0][0] if self.consolidated else None
            self.consolidated = [(online_fisher(old, fisher, self.config.gamma), anchor)]
        self.tasks_done.append(task_index)

    # -- state ------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().state_tensors()
        for slot, (fisher, anchor) in enumerate(self.consolidated):
            for name in fisher:
                tensors[f"{FISHER_PREFIX}{slot}::{name}"] = fisher[name].detach().cpu().contiguous()
                tensors[f"{ANCHOR_PREFIX}{slot}::{name}"] = anchor[name].detach().cpu().contiguous()
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors({k: v for k, v in tensors.items() if "::" not in k})
        params = dict(self.backbone.model.named_parameters())
        slots: dict[int, Consolidated] = {}
        for key, value in tensors.items():
            for prefix, position in ((FISHER_PREFIX, 0), (ANCHOR_PREFIX, 1)):
                if key.startswith(prefix):
                    slot, name = key[len(prefix):].split("::", 1)
                    if name not in params:
                        raise RunDirError(f"EWC state: saved tensor {key!r} matches no parameter of the model")
                    pair = slots.setdefault(int(slot), ({}, {}))
                    pair[position][name] = value.to(device=params[name].device, dtype=torch.float32)
        order = {name: position for position, name in enumerate(params)}  # the model's order: sums as before saving
        self.consolidated = [
            tuple(dict(sorted(part.items(), key=lambda item: order[item[0]])) for part in slots[slot])
            for slot in sorted(slots)
        ]
        expected = self._expected_slots()
        if len(self.consolidated) != expected or any(set(f) != set(a) for f, a in self.consolidated):
            raise RunDirError(f"EWC state: {len(self.consolidated)} Fisher/anchor pairs saved, {expected} expected")

    def _expected_slots(self) -> int:
        if not self.tasks_done:
            return 0
        return len(self.tasks_done) if self.config.mode == "per_task" else 1

    def state_json(self) -> dict[str, Any]:
        return {"mode": self.config.mode, "tasks_done": list(self.tasks_done), "penalty": list(self.penalty_log)}

    def load_state_json(self, state: dict[str, Any]) -> None:
        mode = state.get("mode", self.config.mode)
        if mode != self.config.mode:
            raise RunDirError(f"EWC state: saved with mode {mode!r}, config asks for {self.config.mode!r}")
        self.tasks_done = [int(i) for i in state.get("tasks_done", [])]
        self.penalty_log = [dict(entry) for entry in state.get("penalty", [])]

