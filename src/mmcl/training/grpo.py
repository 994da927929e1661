"""GRPO (Group Relative Policy Optimization; Shao et al. 2024, "DeepSeekMath", Sec. 4.1) on the
trainable parameters of a backbone (the LoRA adapter), with rollout-based instance filtering.

One optimisation step: take ``prompts_per_step`` prompts, sample ``group_size`` completions for
each with the current policy, score them (reward = accuracy + ``format_weight`` x format), turn the
rewards into group-normalised advantages ``A_i = (r_i - mean(r)) / (std(r) + eps)`` (``std`` with
Bessel's correction, as ``torch.std`` in TRL), then run ``iterations`` (mu) updates of the PPO-clipped
ratio objective with the per-token KL estimator ``k3 = exp(ref - logp) - (ref - logp) - 1`` to the
reference policy, weighted by ``kl_coef`` (beta). Loss normalisation follows TRL's
``loss_type="grpo"`` (the DeepSeekMath formula: mean over a completion's tokens, then mean over
completions); ``loss_type="bnpo"`` (mean over all tokens of the batch) is available too.

Why not TRL's ``GRPOTrainer`` (judged from the TRL docs, version 1.x):

* its reference policy, when a PEFT adapter is trained, is the base model with the adapter
  disabled; here the reference is "the model before the task", i.e. the LoRA adapter continued from
  the previous tasks, which would need a second model copy or patching TRL's internals;
* it reads prompts from a ``datasets.Dataset`` with its own processor call and image column, while
  mmcl samples are in-memory ``Sample`` objects encoded by ``Backbone`` (our chat template, several
  images, multi-turn history) -- both encodings would have to agree token for token;
* rollout-based instance filtering (RFT/RIF) happens before training with the same sampler, and
  the stage must report its kept share; that is outside the trainer;
* it would add ``trl`` and ``datasets`` to the dependencies and its defaults (``beta``,
  ``loss_type``, reward scaling) changed between versions.
This loop is ~200 lines, runs on the CPU, and each term is pinned by tests on known numbers.

The reference log-probabilities are computed by swapping the reference weights into the trainable
parameters in place (:func:`swapped_parameters`) under ``no_grad``; no second adapter is created.
Dropout is off throughout (model in eval mode), so the ratio is exactly 1 on the first iteration.

Several processes (``torchrun``): every process draws the same global batch of prompts per step and takes
every ``world_size``-th prompt from its rank; each completion is sampled from its own random stream,
seeded by (seed, step, the prompt's position in the global batch, completion index), so the rollouts do not
depend on the sharding; a group never spans processes, so advantages are local. Each process's loss is its
share of the global loss (its completions over all completions, or its tokens over all tokens for
``bnpo``), gradients are summed over the processes before clipping, and every process takes the same
optimiser step: the update equals one process's on the whole batch up to float rounding. Instance
filtering shards its instances the same way and gathers their accuracies.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from mmcl import distributed
from mmcl.backbones.backbone import Backbone
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, DataError
from mmcl.training.common import k3_kl
from mmcl.training.rollouts import Rollout, completion_logprobs, prompt_seed, sample_rollouts
from mmcl.utils import ShuffledCycle


@dataclass(frozen=True)
class RewardParts:
    accuracy: float  # the task's own scorer, in [0, 1]
    format: float  # 1 if the completion has the expected shape, else 0


RewardFunction = Callable[[Rollout], RewardParts]


@dataclass
class GrpoConfig:
    """GRPO hyper-parameters; sources of the defaults in the comments (CPU budget where noted). A bad value
    is a :class:`ConfigError` naming its ``method.options`` key."""

    steps: int = 25  # optimisation steps (x iterations updates); CPU budget: ~1 min per task on the tiny model
    prompts_per_step: int = 16  # prompts per step; CPU budget (TRL: per_device_train_batch_size / group size)
    group_size: int = 4  # G completions per prompt; DeepSeekMath G=64, TRL num_generations=8; 4 for CPU budget
    temperature: float = 1.0  # sampling temperature; TRL default 1.0 (plain ancestral sampling)
    top_p: float = 1.0  # nucleus sampling; TRL default 1.0
    max_new_tokens: int = 16  # completion length cap (the method passes the task's own budget)
    clip_epsilon: float = 0.2  # PPO clip range; PPO (Schulman 2017), DeepSeekMath and TRL epsilon=0.2
    kl_coef: float = 0.04  # beta; DeepSeekMath beta=0.04 (TRL's default until it switched to 0.0)
    iterations: int = 1  # mu, updates per batch of rollouts; DeepSeekMath mu=1, TRL num_iterations=1
    learning_rate: float = 1e-3  # AdamW on LoRA; calibrated on the tiny model (TRL's 1e-6 is for full 7B models)
    lr_scheduler: str = "constant"  # constant | linear (linear decay to 0, TRL/Trainer's default shape)
    weight_decay: float = 0.0  # HF TrainingArguments default
    max_grad_norm: float = 1.0  # HF TrainingArguments default
    advantage_eps: float = 1e-4  # eps in A = (r - mean) / (std + eps); TRL's value
    scale_rewards: bool = True  # divide by the group std (DeepSeekMath); False = Dr. GRPO (Liu et al. 2025)
    loss_type: str = "grpo"  # grpo (sequence-level token mean, DeepSeekMath) | bnpo (token mean over the batch)
    format_weight: float = 0.1  # reward = accuracy + format_weight x format; small so it only breaks ties
    rollout_batch_size: int = 64  # sequences per generate call
    train_batch_size: int = 64  # rollouts per forward/backward chunk (gradient accumulation inside a step)

    def __post_init__(self) -> None:
        if self.lr_scheduler not in ("constant", "linear"):
            raise ConfigError(
                f"method.options.lr_scheduler: expected 'constant' or 'linear', got {self.lr_scheduler!r}"
            )
        if self.loss_type not in ("grpo", "bnpo"):
            raise ConfigError(f"method.options.loss_type: expected 'grpo' or 'bnpo', got {self.loss_type!r}")
        if self.group_size < 2:
            raise ConfigError("method.options.group_size: GRPO needs at least 2 completions per prompt")
        positive = ("steps", "prompts_per_step", "iterations", "max_new_tokens", "rollout_batch_size", "train_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                value = getattr(self, name)
                raise ConfigError(f"method.options.{name}: expected a positive integer, got {value}")


# -- the loss, term by term --------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """[N, G] rewards -> advantages (r - group mean) / (group std + eps); std with Bessel's correction."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


per_token_kl = k3_kl  # Schulman's k3 estimator of KL(pi || pi_ref) per token


def clipped_objective(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate min(rho A, clip(rho, 1-eps, 1+eps) A) with rho = exp(logp - old), and
    where the clipped term is the smaller one (the token's gradient is cut). ``advantages`` is [B]."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages.unsqueeze(1)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantage
    return torch.minimum(unclipped, clipped), clipped < unclipped


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    beta: float,
    loss_type: str = "grpo",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Negative GRPO objective on [B, L] log-probs; returns (loss, {kl, clip_fraction}) with means over
    real tokens. ``grpo``: per-completion token mean, then mean over completions; ``bnpo``: one mean."""
    mask = mask.to(logprobs.dtype)
    objective, was_clipped = clipped_objective(logprobs, old_logprobs, advantages, epsilon)
    per_token = -objective
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None and beta != 0.0:
        kl = per_token_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    else:
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    tokens = mask.sum().clamp(min=1.0)
    stats = {
        "kl": float((kl.detach() * mask).sum() / tokens),
        "clip_fraction": float((was_clipped.to(mask.dtype) * mask).sum() / tokens),
    }
    return loss, stats


# -- instance filtering (RFT's RIF) -----------------------------------------------------------------
def keep_instances(mean_accuracy: Sequence[float], drop_all_correct: bool = False) -> list[bool]:
    """Rollout-based instance filtering: drop instances no rollout solved (mean 0) and, optionally,
    those every rollout solved (mean 1); both give a group without signal."""
    return [m > 0.0 and not (drop_all_correct and m >= 1.0) for m in mean_accuracy]


@dataclass
class FilterResult:
    kept: list[Sample]
    mean_accuracy: list[float]  # per instance, in the order of the input samples

    @property
    def kept_share(self) -> float:
        return len(self.kept) / len(self.mean_accuracy) if self.mean_accuracy else 0.0


def filter_instances(
    backbone: Backbone,
    samples: Sequence[Sample],
    reward: RewardFunction,
    rollouts_per_instance: int,
    max_new_tokens: int,
    temperature: float,
    drop_all_correct: bool,
    seed: int,
    batch_size: int = 64,
) -> FilterResult:
    """Sample ``rollouts_per_instance`` completions per instance with the current policy and keep the
    instances :func:`keep_instances` accepts (accuracy reward only). Several processes share the instances
    (every ``world_size``-th from the rank) and gather the accuracies."""
    positions = distributed.shard(range(len(samples)))
    groups = sample_rollouts(
        backbone, [samples[i] for i in positions], rollouts_per_instance, max_new_tokens, temperature,
        batch_size=batch_size, prompt_seeds=[prompt_seed(seed, -1, i) for i in positions],
    )  # fmt: skip
    mine = [sum(reward(r).accuracy for r in group) / len(group) for group in groups]
    means = distributed.gather_shards(mine, len(samples))
    kept = [s for s, keep in zip(samples, keep_instances(means, drop_all_correct)) if keep]
    return FilterResult(kept=kept, mean_accuracy=means)


# -- the loop ----------------------------------------------------------------------------------------
@contextmanager
def swapped_parameters(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily copy ``tensors`` (parameter name -> value) into the model's parameters in place."""
    parameters = dict(model.named_parameters())
    saved = {}
    with torch.no_grad():
        for name, value in tensors.items():
            saved[name] = parameters[name].detach().clone()
            parameters[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                parameters[name].copy_(value)


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every trainable parameter (the reference policy's weights)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@dataclass
class StepLog:
    step: int
    reward: float
    accuracy: float
    format: float
    kl: float
    clip_fraction: float
    loss: float
    learning_rate: float


def _prompt_order(samples: Sequence[Sample], count: int, rng: random.Random) -> Iterator[list[Sample]]:
    """Batches of ``count`` prompts, reshuffled at every pass over ``samples``."""
    cycle = ShuffledCycle(rng, samples)
    while True:
        yield [cycle.next() for _ in range(count)]


def train_grpo(
    backbone: Backbone,
    samples: Sequence[Sample],
    reward: RewardFunction,
    config: GrpoConfig,
    seed: int,
    reference: dict[str, torch.Tensor] | None = None,
    log: Callable[[StepLog], None] | None = None,
) -> list[StepLog]:
    """GRPO on ``samples`` (prompts) updating the model's trainable parameters in place; ``reference``
    holds the reference policy's values of those parameters (None: the policy at the start)."""
    if not samples:
        raise DataError("grpo: no prompts to train on")
    model = backbone.model
    parameters = [p for p in model.parameters() if p.requires_grad]
    if reference is None:
        reference = trainable_snapshot(model)
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
    )
    updates = config.steps * config.iterations
    if config.lr_scheduler == "linear":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: max(0.0, 1.0 - done / updates))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0)
    batches = _prompt_order(samples, min(config.prompts_per_step, len(samples)), random.Random(seed))
    use_reference = config.kl_coef != 0.0
    history: list[StepLog] = []
    was_training = model.training
    model.eval()  # dropout off: sampling, old, reference and current log-probs are the same function
    try:
        for step in range(config.steps):
            prompts = next(batches)
            positions = distributed.shard(range(len(prompts)))  # this process's prompts of the global batch
            groups = sample_rollouts(
                backbone, [prompts[i] for i in positions], config.group_size, config.max_new_tokens,
                config.temperature, config.top_p, batch_size=config.rollout_batch_size,
                prompt_seeds=[prompt_seed(seed, step, i) for i in positions],
            )  # fmt: skip
            rollouts = [r for group in groups for r in group]
            parts = [reward(r) for r in rollouts]
            totals = torch.tensor([p.accuracy + config.format_weight * p.format for p in parts])
            advantages = group_advantages(
                totals.view(len(groups), config.group_size), config.advantage_eps, config.scale_rewards
            ).flatten()
            # [completions, tokens, reward, accuracy, format] summed over every process
            local_tokens = sum(int(r.completion_ids.numel()) for r in rollouts)
            sums = distributed.all_reduce_sum(torch.tensor(
                [len(rollouts), local_tokens, float(totals.sum()), sum(p.accuracy for p in parts),
                 sum(p.format for p in parts)], dtype=torch.float64))  # fmt: skip
            completions, total_tokens = int(sums[0]), int(sums[1])
            chunks = [
                range(start, min(start + config.train_batch_size, len(rollouts)))
                for start in range(0, len(rollouts), config.train_batch_size)
            ]
            def frozen_logprobs() -> list[torch.Tensor]:
                with torch.no_grad():
                    return [completion_logprobs(backbone, [rollouts[i] for i in c], config.temperature)[0] for c in chunks]

            ref_lp: list[torch.Tensor] = []
            if use_reference:
                with swapped_parameters(model, reference):
                    ref_lp = frozen_logprobs()
            old_lp = frozen_logprobs() if config.iterations > 1 else []
            stats = torch.zeros(3, dtype=torch.float64)  # kl, clip fraction, loss: weighted shares of the step
            for _ in range(config.iterations):
                optimizer.zero_grad(set_to_none=True)
                for index, chunk in enumerate(chunks):
                    chunk_rollouts = [rollouts[i] for i in chunk]
                    logprobs, mask = completion_logprobs(backbone, chunk_rollouts, config.temperature)
                    old = old_lp[index] if old_lp else logprobs.detach()
                    loss, chunk_stats = grpo_loss(
                        logprobs, old, ref_lp[index] if ref_lp else None, advantages[chunk.start : chunk.stop],
                        mask, config.clip_epsilon, config.kl_coef, config.loss_type,
                    )  # fmt: skip
                    # chunks are parts of one global batch: weight by their share of its completions (grpo)
                    # or tokens (bnpo)
                    if config.loss_type == "grpo":
                        share = len(chunk) / completions
                    else:
                        share = float(mask.sum()) / max(total_tokens, 1)
                    (loss * share).backward()
                    weight = share / config.iterations
                    stats += torch.tensor([chunk_stats["kl"], chunk_stats["clip_fraction"], float(loss.detach())],
                                          dtype=torch.float64) * weight
                if distributed.active():
                    for parameter in parameters:
                        if parameter.grad is None:
                            parameter.grad = torch.zeros_like(parameter)
                        distributed.all_reduce_sum(parameter.grad)
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                learning_rate = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
            kl, clip_fraction, loss_value = distributed.all_reduce_sum(stats).tolist()
            entry = StepLog(
                step=step + 1,
                reward=float(sums[2]) / completions,
                accuracy=float(sums[3]) / completions,
                format=float(sums[4]) / completions,
                kl=kl,
                clip_fraction=clip_fraction,
                loss=loss_value,
                learning_rate=learning_rate,
            )
            history.append(entry)
            if log is not None:
                log(entry)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return history


def steps_for_epochs(epochs: float, prompts: int, prompts_per_step: int) -> int:
    """Steps that cover ``epochs`` passes over ``prompts`` prompts (at least one)."""
    return max(1, math.ceil(epochs * prompts / prompts_per_step))
