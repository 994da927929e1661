"""The REINFORCE update of one EvoLMM role (proposer or solver), for :mod:`mmcl.methods.evolmm`.

EvoLMM ("EvoLMM: Self-Evolving Large Multimodal Models with Continuous Rewards", MBZUAI 2025): each role's
LoRA adapter is updated with REINFORCE against an exponential-moving-average baseline plus beta times the
per-token KL to the adapter-free backbone, beta adapting to a target KL. Both variants are here: the k3 KL
on the sampled token with one batched update (``tiny-calibrated``) and the exact full-vocabulary KL with
one update per completion (``reference``, the authors' released ``src/train.py``).

Several processes: every process holds the whole step's rollouts (gathered after sharded sampling). The
batched update splits them again: each process scores its share, normalised by the tokens of all rollouts,
and the gradients and KL sums are added over the processes, so every process takes the step one process
would take. The per-completion updates are sequential by nature and run in full on every process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mmcl import distributed
from mmcl.methods.evolmm_parts import RoleState
from mmcl.training import evolmm_rewards as rewards
from mmcl.training.common import k3_kl
from mmcl.training.rollouts import Rollout, completion_logprobs, placeholder_token_ids

if TYPE_CHECKING:
    from mmcl.methods.evolmm import EvolmmConfig

__all__ = ["completion_scores", "exact_kl", "k3_kl", "policy_update", "role_update"]


def exact_kl(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) = sum_v pi(v) (log pi(v) - log ref(v)) over the last axis, from two
    log-distributions [..., V] (the reference's per-token KL, train.py L590-598)."""
    return (policy.exp() * (policy - reference)).sum(dim=-1)


def completion_scores(
    backbone, rollouts: Sequence[Rollout], temperature: float, full: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logprobs [B, L], mask [B, L], full [B, L, V'] or None): the sampled tokens' log-probs as
    :func:`completion_logprobs` computes them and, with ``full``, the whole next-token log-distribution
    at each completion position (over the vocabulary minus the image placeholders, which are never
    sampled). The full rows come from the logits of that same forward pass (caught by a forward
    hook), so they follow whatever inputs and position ids the shared scorer uses; their values at
    the sampled ids are checked against ``logprobs``."""
    if not full:
        logprobs, mask = completion_logprobs(backbone, rollouts, temperature)
        return logprobs, mask, None
    caught: list[torch.Tensor] = []
    handle = backbone.model.register_forward_hook(lambda module, args, output: caught.append(output.logits))
    try:
        logprobs, mask = completion_logprobs(backbone, rollouts, temperature)
    finally:
        handle.remove()
    if not caught:
        raise RuntimeError("evolmm: completion_logprobs did not call backbone.model; no logits for the full KL")
    width = mask.shape[1]
    # the completion ends every row and the logit at position p predicts token p + 1
    logits = caught[-1][:, -(width + 1) : -1, :].float() / temperature
    vocabulary = logits.shape[-1]
    suppressed = set(placeholder_token_ids(backbone))
    keep = torch.tensor([v for v in range(vocabulary) if v not in suppressed], device=logits.device)
    full_logprobs = torch.log_softmax(logits.index_select(-1, keep), dim=-1)
    column = torch.full((vocabulary,), -1, dtype=torch.long, device=logits.device)
    column[keep] = torch.arange(keep.numel(), device=logits.device)
    ids = torch.zeros_like(mask)
    for row, rollout in enumerate(rollouts):
        ids[row, : rollout.completion_ids.numel()] = rollout.completion_ids.to(ids.device)
    at_ids = full_logprobs.gather(-1, column[ids].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    real = mask.bool()
    if not torch.allclose(at_ids[real].detach(), logprobs[real].detach(), atol=1e-4, rtol=1e-4):
        raise RuntimeError("evolmm: full-vocabulary scores disagree with completion_logprobs (layout changed?)")
    return logprobs, mask, full_logprobs


def policy_update(
    backbone,
    role: str,
    rollouts: Sequence[Rollout],
    role_rewards: Sequence[float],
    state: RoleState,
    optimizer: torch.optim.Optimizer,
    options: EvolmmConfig,
    shard: bool = False,
) -> dict[str, Any]:
    """One REINFORCE step of ``role``'s adapter on ``rollouts``: token-mean of -(r - b) log pi(token)
    plus beta times the token-mean KL to the adapter-free backbone, KL_t either the k3 estimator
    exp(ref - logp) - (ref - logp) - 1 on the sampled token (non-negative, unbiased) or the exact
    sum_v pi(v) (log pi(v) - log ref(v)) (``options.kl_estimator``). Then b and beta are updated with
    the step's mean reward and KL. ``shard``: the processes split the rollouts (see the module doc)."""
    model = backbone.model
    model.set_adapter(role)  # the only active and trainable adapter
    full = options.kl_estimator == "full"
    reward_mean = sum(role_rewards) / len(role_rewards)
    baseline = reward_mean if state.baseline is None else state.baseline
    tokens = max(sum(int(r.completion_ids.numel()) for r in rollouts), 1)  # of all rollouts, on every process
    mine = distributed.shard(range(len(rollouts))) if shard else list(range(len(rollouts)))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(2, dtype=torch.float64)  # KL and loss, summed over tokens
    beta = state.beta
    if mine:
        own = [rollouts[i] for i in mine]
        advantages = torch.tensor([role_rewards[i] - baseline for i in mine], dtype=torch.float32,
                                  device=backbone.device)
        with torch.no_grad(), model.disable_adapter():
            reference, _, reference_full = completion_scores(backbone, own, options.temperature, full)
        logprobs, mask, policy_full = completion_scores(backbone, own, options.temperature, full)
        mask = mask.to(logprobs.dtype)
        if full:
            kl_per_token = exact_kl(policy_full, reference_full)
        else:
            kl_per_token = k3_kl(logprobs, reference)
        kl_sum = (kl_per_token * mask).sum()
        loss_sum = -(advantages[:, None] * logprobs * mask).sum() + beta * kl_sum
        (loss_sum / tokens).backward()
        sums += torch.tensor([float(kl_sum.detach()), float(loss_sum.detach())], dtype=torch.float64)
    if shard and distributed.active():
        for parameter in parameters:
            if parameter.requires_grad:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
                distributed.all_reduce_sum(parameter.grad)
        distributed.all_reduce_sum(sums)
    torch.nn.utils.clip_grad_norm_(parameters, options.max_grad_norm)
    optimizer.step()
    kl_value, loss_value = (float(value) / tokens for value in sums)
    state.baseline = rewards.ema_baseline(state.baseline, reward_mean, options.baseline_decay)
    state.beta = rewards.adaptive_kl_coefficient(beta, kl_value, options.kl_target, options.kl_adapt_rate)
    return {"reward": reward_mean, "kl": kl_value, "beta": beta, "baseline": state.baseline,
            "loss": loss_value, "updates": 1}  # fmt: skip


def role_update(
    backbone,
    role: str,
    rollouts: Sequence[Rollout],
    role_rewards: Sequence[float],
    state: RoleState,
    optimizer: torch.optim.Optimizer,
    options: EvolmmConfig,
) -> dict[str, Any]:
    """``options.update``: ``batch`` is one :func:`policy_update` on all ``rollouts``;
    ``per-completion`` is one per rollout in order, each against the baseline and beta the previous
    one left (the reference's loop, train.py L993-999). Returns the mean reward, KL and loss, beta
    before the first update, the baseline after the last, the number of optimizer steps and (per
    completion) each update's record under ``"each"``."""
    if options.update == "batch":
        return policy_update(backbone, role, rollouts, role_rewards, state, optimizer, options, shard=True)
    each = [
        policy_update(backbone, role, [rollout], [reward], state, optimizer, options)
        for rollout, reward in zip(rollouts, role_rewards, strict=True)
    ]
    return {
        "reward": sum(role_rewards) / len(role_rewards),
        "kl": sum(u["kl"] for u in each) / len(each),
        "beta": each[0]["beta"],
        "baseline": state.baseline,
        "loss": sum(u["loss"] for u in each) / len(each),
        "updates": len(each),
        "each": each,
    }
