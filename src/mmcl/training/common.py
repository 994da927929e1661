"""Terms shared by the reward-learning trainers (:mod:`mmcl.training.grpo`, :mod:`mmcl.methods.evolmm`)."""

from __future__ import annotations

import torch


def k3_kl(logprobs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token, exp(ref - logp) - (ref - logp) - 1, from the
    sampled token's log-probs under the policy and the reference (non-negative, unbiased)."""
    delta = reference - logprobs
    return torch.exp(delta) - delta - 1.0


__all__ = ["k3_kl"]
