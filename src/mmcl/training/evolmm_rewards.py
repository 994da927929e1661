"""EvoLMM's continuous self-consistency rewards and its controllers, as pure functions.

EvoLMM ("EvoLMM: Self-Evolving Large Multimodal Models with Continuous Rewards", MBZUAI 2025;
defaults from the authors' README and ``src/train.sh``): the Solver's N answers to one question
give an empirical distribution p over normalized answers; each answer is rewarded by how many
others agree with it (softly, ``p(a)^gamma``) with a mild penalty for long answers, and the Proposer
is rewarded for questions of *medium* difficulty: a Gaussian bump on the answer entropy.

The ``<question>``/``<answer>`` tag protocol of the released code (``src/train.py``: ``strip_tags``
L73-79, question parsing L940-943, answer parsing L955-958, ``pre_answer_word_count`` L102-105, its
``normalize_answer`` L81-86) is here too, for ``protocol: reference``.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from typing import Callable, Sequence

from mmcl.evaluation.scorers import normalize_answer

# sources: the authors' src/train.sh and src/train.py (Config L143-153, loop L976-999, L564, L676-678)
SOLVER_GAMMA = 0.7  # --solver_soft_gamma 0.7 (train.sh; train.py L146)
LENGTH_PENALTY = 0.1  # lambda_len (train.py L143 len_penalty_weight)
LENGTH_TAU_WORDS = 6  # tau (train.py L144): up to tau words no penalty, 2 tau words and more the full one
ENTROPY_TARGET = 0.9  # mu in nats (train.py L148, "center for N=5")
ENTROPY_WIDTH = 0.35  # sigma in nats (train.py L149)
BASELINE_DECAY = 0.9  # b <- 0.9 b + 0.1 r (train.py L678 momentum, L847-851)
KL_TARGET = 0.02  # --kl_target 0.020 (train.sh; train.py L152)
KL_ADAPT_RATE = 0.10  # --kl_adapt_rate 0.10 (train.sh; train.py L153)
KL_COEF_MIN, KL_COEF_MAX = 1e-8, 100.0  # beta's clip range (train.py L564)


Normalizer = Callable[[str], str]


def reference_normalize(answer: str) -> str:
    """The released code's answer normalization (train.py L81-86): lowercase, every comma removed,
    whitespace collapsed, punctuation and spaces stripped at both ends (no article dropping)."""
    text = " ".join(answer.lower().replace(",", "").split())
    return text.strip(string.punctuation + " ")


NORMALIZERS: dict[str, Normalizer] = {"scorer": normalize_answer, "reference": reference_normalize}


def tag_content(text: str, tag: str) -> str | None:
    """What lies between the first ``<tag>`` and the first ``</tag>`` after it, stripped; None unless
    both are there (tags are matched case-sensitively, as train.py L73-79 does)."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    start = text.find(opening)
    if start < 0:
        return None
    start += len(opening)
    end = text.find(closing, start)
    return None if end < 0 else text[start:end].strip()


def parse_question(output: str) -> str:
    """The proposer's question: the ``<question>`` tag's content, else the whole output (train.py
    L940), on one line."""
    question = tag_content(output, "question")
    return " ".join((output if question is None else question).split())


def parse_answer(output: str) -> str:
    """The solver's final answer: the ``<answer>`` tag's content, else the last non-empty line, else
    ``"unknown"`` (train.py L955-958)."""
    answer = tag_content(output, "answer")
    if answer is not None:
        return answer
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown"


def pre_answer_word_count(output: str) -> int:
    """Words before the first ``<answer>`` tag (case-insensitive), or in the whole output when there
    is none (train.py L102-105): the length the solver's penalty counts (paper: "w_i is the word
    count preceding the <answer> tag")."""
    cut = output.lower().find("<answer>")
    return len((output if cut < 0 else output[:cut]).split())


def empirical_distribution(answers: Sequence[str], normalize: Normalizer = normalize_answer) -> dict[str, float]:
    """Share of each normalized answer (by default lowercase, outer punctuation stripped, one leading
    article dropped: the same normalization as the exact-match scorer)."""
    if not answers:
        raise ValueError("no answers")
    counts = Counter(normalize(answer) for answer in answers)
    return {answer: count / len(answers) for answer, count in counts.items()}


def answer_entropy(distribution: dict[str, float]) -> float:
    """Shannon entropy H = -sum p log p of an answer distribution, in nats."""
    return -sum(p * math.log(p) for p in distribution.values() if p > 0)


def solver_rewards(
    answers: Sequence[str],
    gamma: float = SOLVER_GAMMA,
    length_penalty: float = LENGTH_PENALTY,
    tau_words: float = LENGTH_TAU_WORDS,
    word_counts: Sequence[int] | None = None,
    normalize: Normalizer = normalize_answer,
    capped: bool = True,
) -> list[float]:
    """r_i = p(a_i)^gamma * (1 - lambda_len * min(1, max(0, (w_i - tau) / tau))), with p the
    empirical distribution of the group's normalized answers and w_i ``word_counts[i]`` (the words
    before the answer tag, :func:`pre_answer_word_count`), by default the word count of answer i.
    The min(1, .) cap is the released code's (train.py L980); the paper's formula, as its summaries
    state it, has none (``capped=False``): past 2 tau words the penalty keeps growing (and the reward
    turns negative past (1 + 1/lambda_len) tau words, 66 for the defaults)."""
    if word_counts is None:
        word_counts = [len(answer.split()) for answer in answers]
    if len(word_counts) != len(answers):
        raise ValueError("one word count per answer expected")
    distribution = empirical_distribution(answers, normalize)
    rewards = []
    for answer, words in zip(answers, word_counts):
        excess = max(0.0, (words - tau_words) / tau_words)
        if capped:
            excess = min(1.0, excess)
        rewards.append(distribution[normalize(answer)] ** gamma * (1.0 - length_penalty * excess))
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
