"""``llaca``: the self-adaptive EMA of LLaCA (Qiao, Zhang, Tan, Qu, Ding and Xie, "Large Continual Instruction
Assistant", ICML 2025, PMLR 267:50189-50213, arXiv:2410.10868; the earlier arXiv versions were titled "LLaCA:
Multimodal Large Language Continual Assistant"; code: JingyangQiao/CoIN) on one LoRA adapter continued across
tasks, as in ``seq-lora``.

The trained parameters theta follow the ordinary optimiser; an exponential moving average theta* of them is
kept alongside, with a weight alpha_t chosen afresh at every optimiser step t, separately for every trainable
parameter tensor. Right after the optimiser step (theta_t the updated tensor, g_t its gradient as the
optimiser used it, i.e. after gradient clipping, g_{t-1} the one of the previous step, norms L1 over the
tensor's entries):

    alpha_t = c (1 + ||g_t||_1) / (||theta_t - theta*_{t-1}||_1 * ||g_t - g_{t-1}||_1),       c = ``scale`` = 2
    alpha_t <- ``fallback`` = 0.01 when it is not in the open interval (0, 1) (also inf / nan, e.g. a zero
               denominator) or cannot be formed (the stage's first step, no g_{t-1}; a tensor without gradient)
    theta*_t = (1 - alpha_t) theta*_{t-1} + alpha_t theta_t

and when the stage has trained, theta <- theta* (the EMA is the model that is evaluated and continued).

Sources. The paper derives the optimal EMA weight from a second-order Taylor expansion of the loss under
the "ideal" plasticity condition (the EMA model's loss equals the trained one's) and stability condition
(theta* does not move), solved with a Lagrange multiplier: beta_t = (L'(theta_t) + 1) / ((theta_t -
theta*_{t-1}) L''(theta_t)); it then approximates L'' by the difference of consecutive gradients and takes
L1 norms over a layer's parameters to get one scalar per layer, and falls back to the fixed EMA weight 0.99
when beta leaves (0, 1). The concrete formula above, its constant c = 2, the weight 0.01 given to theta_t by
the fallback (0.99 kept on theta*), the per-parameter-tensor granularity (a LoRA layer's A and B each get
their own alpha) and the place of the update (after ``optimizer.step()``, before the gradients are zeroed)
are those of the released code (``CoIN/peft/tuners/lora.py``, ``LoraModel.ema_update`` / ``ema_replace``,
called from ``llava/train/transformers/trainer.py``). I could read the paper only through its abstract and
secondary summaries, not its equations, so the formula is checked against the released code, which the
constants follow. (The same group's later toolkit, ECNU-SII/Continual-NExT, ``peft/tuners/lora/model.py``,
uses c = 0.01 and a fallback of 0.001; ``scale`` and ``fallback`` reproduce it.)

Differences from the released code, on purpose:
- theta* starts each stage as the parameters the stage starts from (the previous stage's result: the
  "previous parameters" the EMA is meant to trace) and the first step takes the fallback weight. The released
  code creates theta* lazily as a copy of the parameters after the first optimiser step (so the first step
  sets theta* = theta_1), one optimiser step later.
- theta* and g_{t-1} are kept in float32 (the released code copies the parameters' own dtype; with bf16
  weights a weight of 0.01 would mostly round away).
- a tensor whose gradient is missing at a step takes the fallback weight and forgets g_{t-1} (the released
  code reaches the same fallback through a caught exception).
- the EMA does not run on the first stage (``first_stage: false``). The released training scripts
  (``scripts/CoIN/Train_CIA/*.sh``) pass ``--dema False`` for ScienceQA, TextVQA, ImageNet and Grounding and
  ``--dema True`` for GQA, VizWiz, VQAv2 and OCR-VQA: judging by CoIN's instructions, off where a new
  instruction group (a fresh LoRA) starts, on where an earlier group's LoRA is continued. With one LoRA
  continued over the stream, that is every stage but the first.

Not implemented: the instruction grouping (``instruct/LoRASelect.py``). There, a task's whole set of
distinct instructions is compared with a codebook of earlier groups by the mean pairwise TF-IDF cosine
similarity (threshold 0.9 for CoIN's original instructions, 0.3 for its diverse ones); a similar group's LoRA
is continued (with the EMA), otherwise a new LoRA is trained; at test time the group is chosen the same way
from a whole test set's instructions, i.e. per task, which is task identity at test time. A per-sample
version (one instruction feature, :class:`mmcl.methods.sample_features.TextFeatures`, against per-group
prototypes, several PEFT adapters, generate grouped by the chosen adapter) would be a different method.

Per-step hook: :func:`mmcl.training.sft.train_on_samples` takes no Trainer callbacks, so :meth:`Llaca.train`
registers a global ``torch.optim`` step post-hook for the duration of the call (it acts only on an optimiser
that holds this adapter's parameters). It runs where a ``TrainerCallback.on_optimizer_step`` would (after
``optimizer.step()``, before ``model.zero_grad()``; ``on_step_end`` comes after the zeroing and sees no
gradients). A step the optimiser skips (fp16 overflow) updates nothing, as in the released code.

State: the adapter weights only. theta <- theta* is applied before the stage is saved, and the EMA starts
again from the saved weights at the next stage (theta* = theta, no g_{t-1}), exactly as an uninterrupted
run does; nothing else carries over between stages. state.json logs each stage's EMA statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from mmcl.config import TrainingConfig, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError
from mmcl.methods.base import register_method
from mmcl.methods.seq_lora import SequentialLora
from mmcl.streams.stream import Task


@dataclass
class LlacaConfig:
    """The adaptive EMA's constants (sources: the released code, JingyangQiao/CoIN ``CoIN/peft/tuners/lora.py``
    and ``scripts/CoIN/Train_CIA/*.sh``)."""

    scale: float = setting(2.0, "(0, inf)", "c in alpha = c (1 + |g_t|_1) / (|theta_t - theta*|_1 |g_t - g_{t-1}|_1) "
                           "(released code: 2; ECNU-SII/Continual-NExT: 0.01)")
    fallback: float = setting(0.01, "(0, 1]", "alpha when the formula leaves (0, 1) or cannot be formed (released "
                              "code: 0.01, the paper's fixed EMA weight 0.99 on theta*; Continual-NExT: 0.001)")
    first_stage: bool = setting(False, help="run the EMA on the first stage too (released scripts: off while a fresh "
                                "LoRA learns its first task, on when a LoRA is continued)")

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ConfigError(f"method.options.scale: expected a constant > 0, got {self.scale}")
        if not 0.0 < self.fallback <= 1.0:
            raise ConfigError(f"method.options.fallback: expected a weight in (0, 1], got {self.fallback}")


# -- pure functions ----------------------------------------------------------------------------------
def ema_weight(
    theta: torch.Tensor, anchor: torch.Tensor, grad: torch.Tensor, previous_grad: torch.Tensor,
    scale: float = 2.0, fallback: float = 0.01,
) -> torch.Tensor:
    """alpha = scale (1 + |grad|_1) / (|theta - anchor|_1 |grad - previous_grad|_1) as a float32 0-d tensor,
    ``fallback`` unless it lies in the open interval (0, 1) (a zero denominator gives inf, a NaN fails the
    test: both fall back). No host synchronisation."""
    theta, anchor = theta.float(), anchor.float()
    grad, previous_grad = grad.float(), previous_grad.float()
    distance = (theta - anchor).abs().sum()
    gradient = grad.abs().sum()
    change = (grad - previous_grad).abs().sum()
    alpha = scale * (1.0 + gradient) / (distance * change)
    inside = (alpha > 0) & (alpha < 1)
    return torch.where(inside, alpha, torch.full_like(alpha, fallback))


def ema_update(anchor: torch.Tensor, theta: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """theta* <- (1 - alpha) theta* + alpha theta, in place on ``anchor`` (float32), which is returned."""
    anchor.mul_(1 - alpha).add_(theta.detach().float() * alpha)
    return anchor


class AdaptiveEma:
    """The self-adaptive EMA theta* of ``params`` (one alpha per tensor and step), in float32.

    theta* starts as the parameters' current values; :meth:`step` is called after every optimiser step
    (gradients still in ``.grad``); :meth:`apply` copies theta* into the parameters."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], scale: float = 2.0, fallback: float = 0.01):
        self.params = dict(params)
        self.scale, self.fallback = scale, fallback
        self.anchor = {name: p.detach().float().clone() for name, p in self.params.items()}
        self.previous_grad: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.alpha_sum: torch.Tensor | None = None  # summed over steps and tensors (statistics only)
        self.fallbacks: torch.Tensor | None = None  # how many (step, tensor) pairs took the fallback

    @torch.no_grad()
    def step(self) -> None:
        alphas = []
        for name, p in self.params.items():
            grad = p.grad
            previous = self.previous_grad.get(name)
            if grad is None or previous is None:
                alpha = torch.tensor(self.fallback, dtype=torch.float32, device=p.device)
            else:
                alpha = ema_weight(p, self.anchor[name], grad, previous, self.scale, self.fallback)
            ema_update(self.anchor[name], p, alpha)
            if grad is None:
                self.previous_grad.pop(name, None)
            else:
                self.previous_grad[name] = grad.detach().float().clone()
            alphas.append(alpha)
        if alphas:
            stacked = torch.stack([a.to(alphas[0].device) for a in alphas])
            total, fell_back = stacked.sum(), (stacked == self.fallback).sum()
            self.alpha_sum = total if self.alpha_sum is None else self.alpha_sum + total
            self.fallbacks = fell_back if self.fallbacks is None else self.fallbacks + fell_back
        self.steps += 1

    @torch.no_grad()
    def apply(self) -> None:
        """theta <- theta* (cast to each parameter's dtype)."""
        for name, p in self.params.items():
            p.copy_(self.anchor[name].to(dtype=p.dtype, device=p.device))

    def statistics(self) -> dict[str, Any]:
        """Steps, mean alpha and the share of fallback weights over every (step, tensor) pair."""
        pairs = self.steps * len(self.params)
        if not pairs or self.alpha_sum is None:
            return {"ema_steps": self.steps, "ema_mean_alpha": None, "ema_fallback_share": None}
        return {
            "ema_steps": self.steps,
            "ema_mean_alpha": float(self.alpha_sum) / pairs,
            "ema_fallback_share": float(self.fallbacks) / pairs,
        }


def optimizer_step_hook(ema: AdaptiveEma):
    """A ``torch.optim`` step post-hook calling ``ema.step()`` after a step of an optimiser holding the EMA's
    parameters (checked once per optimiser); other optimisers are left alone."""
    ours = {id(p) for p in ema.params.values()}
    owns: dict[int, bool] = {}

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        if key not in owns:
            owns[key] = any(id(p) in ours for group in optimizer.param_groups for p in group["params"])
        if owns[key]:
            ema.step()

    return hook


# -- the method ---------------------------------------------------------------------------------------
@register_method
class Llaca(SequentialLora[LlacaConfig]):
    name = "llaca"
    description = "Sequential LoRA + LLaCA's self-adaptive EMA of the weights (theta <- EMA after each stage)"

    def init_state(self) -> None:
        self.stage_tasks: list[int] = []  # the tasks of the stage about to train (before_task)
        self.ema_log: list[dict[str, Any]] = []  # per trained stage: its tasks, whether the EMA ran, statistics

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.backbone.model.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable().values())

    def before_task(self, task_index: int, task: Task) -> None:
        super().before_task(task_index, task)
        self.stage_tasks.append(task_index)

    def ema_runs(self, stage_tasks: Sequence[int]) -> bool:
        """Whether the stage of these tasks trains with the EMA: all but the stage holding the first task,
        unless ``first_stage``."""
        return self.config.first_stage or 0 not in stage_tasks

    def train(self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int) -> dict[str, Any]:
        stage_tasks, self.stage_tasks = list(self.stage_tasks), []
        if config.deepspeed or config.fsdp:  # refused on the first stage already, before anything is trained
            raise ConfigError("llaca: training.deepspeed / training.fsdp shard the gradients, and the adaptive EMA reads "
                              "each parameter's whole gradient after the optimiser step; train without them")
        if not self.ema_runs(stage_tasks):
            metrics = super().train(samples, config, work_dir, seed)
            self.ema_log.append({"tasks": stage_tasks, "ema": False})
            return metrics
        ema = AdaptiveEma(self.trainable(), self.config.scale, self.config.fallback)
        handle = register_optimizer_step_post_hook(optimizer_step_hook(ema))
        try:
            metrics = super().train(samples, config, work_dir, seed)
        finally:
            handle.remove()
        ema.apply()
        statistics = ema.statistics()
        self.ema_log.append({"tasks": stage_tasks, "ema": True, **statistics})
        return {**metrics, **{key: value for key, value in statistics.items() if value is not None}}

    def state_json(self) -> dict[str, Any]:
        return {"ema_log": [dict(entry) for entry in self.ema_log]}

    def load_state_json(self, state: dict[str, Any]) -> None:
        self.ema_log = [dict(entry) for entry in state.get("ema_log", [])]
        self.stage_tasks = []
