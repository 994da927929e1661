"""EvoLMM's continuous self-consistency rewards and its controllers, as pure functions.

EvoLMM ("EvoLMM: Self-Evolving Large Multimodal Models with Continuous Rewards", MBZUAI 2025;
defaults from the authors' README and ``src/train.sh``): the Solver's N answers to one question
give an empirical distribution p over normalized answers; each answer is rewarded by how many
others agree with it (softly, ``p(a)^gamma``) with a mild penalty for long answers, and the Proposer
is rewarded for questions of *medium* difficulty: a Gaussian bump on the answer entropy.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

from mmcl.evaluation.scorers import normalize_answer

SOLVER_GAMMA = 0.7  # --solver_soft_gamma
LENGTH_PENALTY = 0.1  # lambda_len
LENGTH_TAU_WORDS = 6  # tau: answers up to tau words are not penalised, 2 tau words get the full penalty
ENTROPY_TARGET = 0.9  # mu (nats)
ENTROPY_WIDTH = 0.35  # sigma (nats)
BASELINE_DECAY = 0.9  # b <- 0.9 b + 0.1 r
KL_TARGET = 0.02  # --kl_target
KL_ADAPT_RATE = 0.10  # --kl_adapt_rate
KL_COEF_MIN, KL_COEF_MAX = 1e-8, 100.0


def empirical_distribution(answers: Sequence[str]) -> dict[str, float]:
    """Share of each normalized answer (lowercase, outer punctuation stripped, one leading article
    dropped: the same normalization as the exact-match scorer)."""
    if not answers:
        raise ValueError("no answers")
    counts = Counter(normalize_answer(answer) for answer in answers)
    return {answer: count / len(answers) for answer, count in counts.items()}


def answer_entropy(distribution: dict[str, float]) -> float:
    """Shannon entropy H = -sum p log p of an answer distribution, in nats."""
    return -sum(p * math.log(p) for p in distribution.values() if p > 0)


def solver_rewards(
    answers: Sequence[str],
    gamma: float = SOLVER_GAMMA,
    length_penalty: float = LENGTH_PENALTY,
    tau_words: float = LENGTH_TAU_WORDS,
) -> list[float]:
    """r_i = p(a_i)^gamma * (1 - lambda_len * min(1, max(0, (w_i - tau) / tau))), with p the
    empirical distribution of the group's normalized answers and w_i the word count of answer i."""
    distribution = empirical_distribution(answers)
    rewards = []
    for answer in answers:
        words = len(answer.split())
        excess = min(1.0, max(0.0, (words - tau_words) / tau_words))
        rewards.append(distribution[normalize_answer(answer)] ** gamma * (1.0 - length_penalty * excess))
    return rewards


def proposer_reward(entropy: float, mu: float = ENTROPY_TARGET, sigma: float = ENTROPY_WIDTH) -> float:
    """exp(-(H - mu)^2 / (2 sigma^2)): highest for questions whose answers disagree moderately."""
    return math.exp(-((entropy - mu) ** 2) / (2.0 * sigma**2))


def ema_baseline(baseline: float | None, reward: float, decay: float = BASELINE_DECAY) -> float:
    """b <- decay * b + (1 - decay) * r; the first observed reward starts the average (``None``)."""
    if baseline is None:
        return reward
    return decay * baseline + (1.0 - decay) * reward


def adaptive_kl_coefficient(
    beta: float,
    kl: float,
    target: float = KL_TARGET,
    rate: float = KL_ADAPT_RATE,
    low: float = KL_COEF_MIN,
    high: float = KL_COEF_MAX,
) -> float:
    """beta <- clip(beta * exp(rate * (KL - target) / target), low, high): grows while the policy is
    further than ``target`` nats per token from the reference, shrinks while it is closer."""
    return min(high, max(low, beta * math.exp(rate * (kl - target) / target)))
