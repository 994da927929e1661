"""``evolmm``: label-free self-evolving training of a Proposer and a Solver with continuous rewards.

EvoLMM ("EvoLMM: Self-Evolving Large Multimodal Models with Continuous Rewards", MBZUAI 2025).
Two LoRA adapters on one backbone: per image the Proposer asks a question, the Solver answers it
N times; the Solver is rewarded for agreeing with its own majority (soft self-consistency) and the
Proposer for questions of medium answer entropy (see :mod:`mmcl.training.evolmm_rewards`). Both are
trained with REINFORCE against an exponential-moving-average baseline plus a per-token KL penalty
to the reference policy (the backbone with adapters disabled) whose coefficient adapts to a target
KL. Training reads only the images of a stage's samples (never a question, answer or label), so
the stream's tasks are used for evaluation only; evaluation answers with the Solver adapter.

Two protocols (``method.options.protocol``, see :class:`EvolmmConfig`): ``tiny-calibrated`` (default;
batched updates, k3 KL, sizes calibrated for the tiny CPU backbone) and ``reference`` (the authors'
released ``src/train.py``: exact full-vocabulary KL, one AdamW step per completion with the baseline
and beta updated in between, the ``<question>``/``<answer>`` tag protocol, lr 1e-6, weight decay 0.01).
"""

from __future__ import annotations

import base64
import random
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path
from typing import Any, Sequence

import torch

from mmcl.streams.stream import Task
from mmcl.config import TrainingConfig, setting
from mmcl.data.sample import IMAGE_PLACEHOLDER, Sample
from mmcl.errors import ConfigError
from mmcl.methods.base import Method, register_method
from mmcl.methods.lora_utils import (
    adapter_part,
    add_lora,
    load_adapter_tensors,
    lora_config,
    named_adapters_tensors,
)
from mmcl.training import evolmm_rewards as rewards
from mmcl.training.rollouts import Rollout, completion_logprobs, placeholder_token_ids, sample_rollouts
from mmcl.training.scalars import write_scalars

PROPOSER, SOLVER = "proposer", "solver"
ROLES = (PROPOSER, SOLVER)
PROTOCOLS = ("tiny-calibrated", "reference")

TINY_PROPOSER_PROMPT = "Ask a question about this image."  # the tiny model's pretraining proposal prompt
# our wording of the tag protocol the released prompts ask for (train.py L301-327): the proposer
# replies with <question> and <rationale> tags, the solver wraps its final answer in <answer>
REFERENCE_PROPOSER_PROMPT = (
    "Look at the image and ask one short-answer question about it that the image alone answers: "
    "specific and unambiguous, not trivia, and not a plain counting question if you can avoid it. "
    "Do not give the answer. Reply with exactly two XML tags and nothing else: "
    "<question>the question, one or two sentences</question> "
    "<rationale>why it is not trivial yet answerable from the image</rationale>"
)
REFERENCE_SOLVER_PROMPT = (
    "Answer the question from the image only. Think briefly, then give a short final answer "
    "(a number, a word or a phrase) inside <answer></answer>, with nothing else in the tag.\n"
    "Question: {question}"
)
# asked when the proposer's output holds no question (train.py L942-943 substitutes a stock one)
REFERENCE_FALLBACK_QUESTION = "Which value stands out most in the image?"

# option: (tiny-calibrated, reference). Sources: the EvolmmConfig docstring and the field comments.
PROTOCOL_PRESETS: dict[str, tuple[Any, Any]] = {
    "steps_per_task": (40, None),
    "images_per_step": (8, 1),
    "question_max_new_tokens": (16, 128),
    "answer_max_new_tokens": (12, 128),
    "learning_rate": (1e-3, 1e-6),
    "weight_decay": (0.0, 0.01),
    "kl_estimator": ("k3", "full"),
    "update": ("batch", "per-completion"),
    "proposer_questions": ("since-last", "current-step"),
    "baseline_start": ("first-reward", "zero"),
    "prompt_format": ("plain", "tags"),
    "answer_normalization": ("scorer", "reference"),
    "length_cap": ("released", "paper"),
    "proposer_prompt": (TINY_PROPOSER_PROMPT, REFERENCE_PROPOSER_PROMPT),
    "solver_prompt": ("{question}", REFERENCE_SOLVER_PROMPT),
    "fallback_question": ("", REFERENCE_FALLBACK_QUESTION),
}
CHOICES = {
    "kl_estimator": ("k3", "full"),
    "update": ("batch", "per-completion"),
    "proposer_questions": ("since-last", "current-step"),
    "baseline_start": ("first-reward", "zero"),
    "prompt_format": ("plain", "tags"),
    "answer_normalization": tuple(rewards.NORMALIZERS),
    "length_cap": ("released", "paper"),
}


@dataclass
class EvolmmConfig:
    """EvoLMM options under one of two protocols; an option left out takes the protocol's value.

    ``protocol: tiny-calibrated`` (the default: what the tiny CPU backbone learns from in about a
    minute per synth-domain task; the existing runs and examples use it) and ``protocol: reference``
    (the authors' released ``src/train.py``, commit de5b0f8, and ``src/train.sh``). They share the
    rewards and controllers (N = 5 answers, gamma 0.7, lambda_len 0.1, tau 6 words, mu 0.9 and
    sigma 0.35 nats, baseline decay 0.9, beta from 1e-3 adapted to KL 0.02 per token at rate 0.1
    and clipped to [1e-8, 100], proposer updated every 5th step, temperature 1, grad-norm clip 1).
    They differ in (tiny-calibrated / reference, with the reference's lines):

    - KL to the adapter-free backbone per completion token: the k3 estimator on the sampled token
      (non-negative, unbiased) / the exact full-vocabulary KL(pi || ref) = sum_v pi (log pi - log ref)
      (L590-599), both averaged over the completion's tokens;
    - updates: one AdamW step per role on the token-mean over all of the step's rollouts / one AdamW
      step per completion, the EMA baseline and beta updated after each (L993-999, L611-614);
    - the proposer learns from: all questions asked since its last update / the current step's
      question(s) only (L1015-1020);
    - baseline start: the first mean reward / 0 (L676-677);
    - AdamW lr 1e-3, no weight decay (calibrated for the tiny LoRA: at 1e-6 nothing moves within a
      stage; with weight decay 0 AdamW is exactly the Adam the tiny runs were calibrated with) / lr
      1e-6, weight decay 0.01 (L131-132, L549, L1112-1113);
    - prompts: a bare proposal prompt, the question as the solver's prompt, the whole completion as
      the answer / the ``<question>``/``<answer>`` tag protocol (prompts L301-327, parsing L940-943 and
      L955-958), our own wording of the prompts; the length penalty counts the words before the
      ``<answer>`` tag (L102-105, L980; the paper's w_i), which is the whole completion when there is
      no tag;
    - answer normalization for agreement: the exact-match scorer's / the released one (L81-86);
    - length penalty: capped at lambda_len from 2 tau words on (the released min(1, .), L980) / not
      capped, the paper's formula (where paper and code disagree the paper wins by default; the
      paper's text could only be checked through summaries of its equations here);
    - sizes: 8 images per step, 40 steps a stage, 16 + 12 new tokens / one image per step (L929-931),
      one pass over the stage's images (the reference walks a seeded permutation of its pool,
      L252-255, L286-287; ``steps_per_task`` unset), 128 new tokens for both roles (L138-139).

    Known differences that remain under ``reference`` (the project's protocol table): AdamW moments
    start afresh every stage (the reference keeps one optimizer for its whole single-stream run);
    LoRA dropout is off during the update forward (the reference trains in train mode, L585);
    completions are scored on the sampled token ids including EOS (the reference re-tokenizes the
    decoded text, L571-580); image placeholder tokens are excluded from the distributions; the N
    answers are drawn in one batched ``generate``; the image order is reshuffled every pass. The
    paper's full text was not at hand: its formulas were checked through summaries (rewards, KL-
    regularized REINFORCE with moving baselines); the one disagreement found is the length penalty's
    cap (``length_cap``).
    """

    protocol: str = setting("tiny-calibrated", help="tiny-calibrated | reference (the authors' released "
                            "train.py); fills every option left unset, see the class doc")
    # tiny: 40 (calibrated: ~1 min per synth task); reference: unset = one pass over the stage's images (the
    # paper runs 16180 steps over its whole pool, train.sh)
    steps_per_task: int | None = setting(None, help="optimisation steps per stage (null: the protocol's; "
                                         "reference: one pass over the stage's images)")
    images_per_step: int | None = setting(None, help="images per step (tiny: 8; reference: 1, train.py L929-931)")
    solver_samples: int = setting(5, help="N answers per question (--num_solver_samples 5, train.sh)")
    proposer_every: int = setting(5, help="proposer update every k-th step (--proposer_update_freq 5, train.sh; L1015)")
    question_max_new_tokens: int | None = setting(None, help="question length cap (tiny: 16; reference: 128, L139)")
    answer_max_new_tokens: int | None = setting(None, help="answer length cap (tiny: 12; reference: 128, L138)")
    temperature: float = setting(1.0, help="sampling temperature of both roles; log-probs use the same (L136)")
    learning_rate: float | None = setting(None, help="AdamW per role (tiny: 1e-3, calibrated; reference: 1e-6, L131)")
    weight_decay: float | None = setting(None, help="AdamW weight decay (tiny: 0, i.e. Adam; reference: 0.01, L132)")
    max_grad_norm: float = setting(1.0, "(0, inf)", "gradient-norm clip (train.py L133, L607)")
    kl_estimator: str | None = setting(None, help="k3 (tiny) or full (reference, train.py L590-599)")
    update: str | None = setting(None, help="batch (tiny) or per-completion (reference, train.py L993-999)")
    proposer_questions: str | None = setting(None, help="since-last (tiny) or current-step (reference, L1015-1020)")
    baseline_start: str | None = setting(None, help="first-reward (tiny) or zero (reference, train.py L676-677)")
    prompt_format: str | None = setting(None, help="plain (tiny) or tags (reference, train.py L301-327, L940-958)")
    answer_normalization: str | None = setting(None, help="scorer (tiny) or reference (train.py L81-86)")
    length_cap: str | None = setting(None, help="released (tiny; min(1, .) of train.py L980) or paper (reference: no cap)")
    solver_gamma: float = setting(rewards.SOLVER_GAMMA, "[0, inf)", "gamma of the solver reward, 0.7 (--solver_soft_gamma)")
    length_penalty: float = setting(rewards.LENGTH_PENALTY, "[0, inf)", "lambda_len 0.1 (train.py L143)")
    length_tau_words: float = setting(rewards.LENGTH_TAU_WORDS, help="tau, 6 words (train.py L144)")
    entropy_target: float = setting(rewards.ENTROPY_TARGET, "[0, inf)", "mu of the proposer reward, 0.9 nats (L148)")
    entropy_width: float = setting(rewards.ENTROPY_WIDTH, help="sigma of the proposer reward, 0.35 nats (L149)")
    baseline_decay: float = setting(rewards.BASELINE_DECAY, help="b <- 0.9 b + 0.1 r (train.py L678, L847-851)")
    kl_target: float = setting(rewards.KL_TARGET, help="KL target of the adaptive beta, 0.02 nats per token (train.sh)")
    kl_adapt_rate: float = setting(rewards.KL_ADAPT_RATE, "[0, inf)", "adaptation rate of beta, 0.1 (train.sh)")
    initial_kl_coef: float = setting(1e-3, help="beta at the start of training, per role (train.py L135 kl_coef)")
    proposer_prompt: str | None = setting(None, help="tiny: the tiny model's pretraining proposal prompt; "
                                          "reference: the tag protocol (our wording)")
    solver_prompt: str | None = setting(None, help="{question} is replaced by the question; tiny: the question alone")
    fallback_question: str | None = setting(None, help="asked when no question was proposed; tiny: none (reward 0)")

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"method.options.protocol: expected one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        preset = PROTOCOLS.index(self.protocol)
        for key, values in PROTOCOL_PRESETS.items():
            if getattr(self, key) is None:
                setattr(self, key, values[preset])
        for key, choices in CHOICES.items():
            value = getattr(self, key)
            if value not in choices:
                raise ConfigError(f"method.options.{key}: expected one of {', '.join(choices)}, got {value!r}")
        for key in ("steps_per_task", "images_per_step", "solver_samples", "proposer_every",
                    "question_max_new_tokens", "answer_max_new_tokens"):  # fmt: skip
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"method.options.{key}: expected a positive integer, got {value}")
        for key in ("temperature", "learning_rate", "length_tau_words", "entropy_width", "kl_target",
                    "initial_kl_coef"):  # fmt: skip
            if not getattr(self, key) > 0:
                raise ConfigError(f"method.options.{key}: expected a positive number, got {getattr(self, key)}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"method.options.weight_decay: expected a number >= 0, got {self.weight_decay}")
        if not 0 <= self.baseline_decay < 1:
            raise ConfigError(f"method.options.baseline_decay: expected a number in [0, 1), got {self.baseline_decay}")
        if "{question}" not in self.solver_prompt:
            raise ConfigError("method.options.solver_prompt: must contain {question}")

    def initial_role_state(self) -> "RoleState":
        return RoleState(baseline=0.0 if self.baseline_start == "zero" else None, beta=self.initial_kl_coef)


@dataclass
class RoleState:
    """What a role carries from step to step and stage to stage."""

    baseline: float | None = None  # EMA of the mean reward; None until the first update
    beta: float = 1e-3  # adaptive KL coefficient


@dataclass(frozen=True)
class ImageItem:
    """The only things training takes from a sample: its id, its task name (for error messages) and images."""

    id: str
    task: str
    images: tuple[Path, ...]


def exact_kl(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(pi || ref) = sum_v pi(v) (log pi(v) - log ref(v)) over the last axis, from two
    log-distributions [..., V] (the reference's per-token KL, train.py L590-598)."""
    return (policy.exp() * (policy - reference)).sum(dim=-1)


def k3_kl(logprobs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The k3 estimate exp(ref - logp) - (ref - logp) - 1 of KL(pi || ref) from the sampled token's
    log-probs under both (non-negative, unbiased)."""
    delta = reference - logprobs
    return torch.exp(delta) - delta - 1.0


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
) -> dict[str, Any]:
    """One REINFORCE step of ``role``'s adapter on ``rollouts``: token-mean of -(r - b) log pi(token)
    plus beta times the token-mean KL to the adapter-free backbone, KL_t either the k3 estimator
    exp(ref - logp) - (ref - logp) - 1 on the sampled token (non-negative, unbiased) or the exact
    sum_v pi(v) (log pi(v) - log ref(v)) (``options.kl_estimator``). Then b and beta are updated with
    the step's mean reward and KL."""
    model = backbone.model
    model.set_adapter(role)  # the only active and trainable adapter
    full = options.kl_estimator == "full"
    reward_mean = sum(role_rewards) / len(role_rewards)
    baseline = reward_mean if state.baseline is None else state.baseline
    advantages = torch.tensor([r - baseline for r in role_rewards], dtype=torch.float32, device=backbone.device)
    with torch.no_grad(), model.disable_adapter():
        reference, _, reference_full = completion_scores(backbone, rollouts, options.temperature, full)
    logprobs, mask, policy_full = completion_scores(backbone, rollouts, options.temperature, full)
    mask = mask.to(logprobs.dtype)
    tokens = mask.sum().clamp(min=1.0)
    if full:
        kl_per_token = exact_kl(policy_full, reference_full)
    else:
        kl_per_token = k3_kl(logprobs, reference)
    kl = (kl_per_token * mask).sum() / tokens
    policy_loss = -(advantages[:, None] * logprobs * mask).sum() / tokens
    beta = state.beta
    loss = policy_loss + beta * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(parameters, options.max_grad_norm)
    optimizer.step()
    kl_value = float(kl.detach())
    state.baseline = rewards.ema_baseline(state.baseline, reward_mean, options.baseline_decay)
    state.beta = rewards.adaptive_kl_coefficient(beta, kl_value, options.kl_target, options.kl_adapt_rate)
    return {"reward": reward_mean, "kl": kl_value, "beta": beta, "baseline": state.baseline,
            "loss": float(loss.detach()), "updates": 1}  # fmt: skip


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
        return policy_update(backbone, role, rollouts, role_rewards, state, optimizer, options)
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


@register_method
class Evolmm(Method[EvolmmConfig]):
    name = "evolmm"
    description = "EvoLMM: label-free proposer/solver self-evolution with continuous self-consistency rewards"

    def init_state(self) -> None:
        self.roles = {role: self.config.initial_role_state() for role in ROLES}
        self.step_log: list[dict[str, Any]] = []  # one record per training step, all stages
        self.examples: list[dict[str, Any]] = []  # a few (question, answers) per stage, for the report
        self.stage = 0
        self.stage_tasks: list[str] = []  # names of the tasks of the stage being trained

    def setup(self, backbone) -> None:
        super().setup(backbone)
        add_lora(backbone, self.lora, self.seed, adapter_name=SOLVER)
        torch.manual_seed(self.seed + 1)
        backbone.model.add_adapter(PROPOSER, lora_config(self.lora, backbone))
        backbone.model.set_adapter(SOLVER)

    def before_task(self, task_index: int, task: Task) -> None:
        self.stage_tasks.append(task.name)

    # -- training ----------------------------------------------------------------------------
    def _role_parameters(self, role: str) -> list[torch.nn.Parameter]:
        marker = f".{role}."
        return [p for name, p in self.backbone.model.named_parameters() if marker in name]

    def train(self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int) -> dict[str, Any]:
        """``steps_per_task`` self-play steps (unset: one pass) on the stage's images; labels are never read."""
        options: EvolmmConfig = self.config
        backbone = self.backbone
        assert backbone is not None
        items = [ImageItem(id=s.id, task=s.task, images=tuple(s.images)) for s in samples]
        if not items:
            raise ConfigError("evolmm: the stage has no training images")
        self.stage += 1
        task_label = "+".join(self.stage_tasks) or f"stage {self.stage}"
        self.stage_tasks = []
        order = _image_cycle(len(items), seed)
        images_per_step = options.images_per_step
        steps = options.steps_per_task or -(-len(items) // images_per_step)  # unset: one pass over the images
        optimizers = {
            role: torch.optim.AdamW(
                self._role_parameters(role), lr=options.learning_rate, weight_decay=options.weight_decay
            )
            for role in ROLES
        }
        normalize = rewards.NORMALIZERS[options.answer_normalization]
        tags = options.prompt_format == "tags"
        pending_questions: list[Rollout] = []
        pending_rewards: list[float] = []
        was_training = backbone.model.training
        backbone.model.eval()  # no dropout: log-probs are those of the sampled policy
        stage_log = []
        for step in range(steps):
            batch = [items[next(order)] for _ in range(images_per_step)]
            step_seed = seed * 1_000_003 + step * 2
            backbone.model.set_adapter(PROPOSER)
            questions = [group[0] for group in sample_rollouts(
                backbone, [_proposal_prompt(item, options.proposer_prompt) for item in batch], 1,
                options.question_max_new_tokens, options.temperature, seed=step_seed)]  # fmt: skip
            asked = [_question_text(q, tags) or options.fallback_question for q in questions]
            backbone.model.set_adapter(SOLVER)
            groups = sample_rollouts(
                backbone,
                [_question_prompt(item, options.solver_prompt.replace("{question}", question))
                 for item, question in zip(batch, asked)],
                options.solver_samples, options.answer_max_new_tokens, options.temperature,
                batch_size=max(32, options.solver_samples), seed=step_seed + 1,
            )  # fmt: skip
            answer_rewards, entropies, question_rewards = [], [], []
            for question, group in zip(asked, groups):
                texts = [rollout.text for rollout in group]
                answers = [rewards.parse_answer(text) for text in texts] if tags else texts
                answer_rewards.append(rewards.solver_rewards(
                    answers, options.solver_gamma, options.length_penalty, options.length_tau_words,
                    word_counts=[rewards.pre_answer_word_count(text) for text in texts], normalize=normalize,
                    capped=options.length_cap == "released",
                ))  # fmt: skip
                entropy = rewards.answer_entropy(rewards.empirical_distribution(answers, normalize))
                entropies.append(entropy)
                # an empty question asks nothing: no proposer reward whatever the answers
                question_rewards.append(
                    rewards.proposer_reward(entropy, options.entropy_target, options.entropy_width)
                    if question else 0.0
                )
            flat_rollouts = [rollout for group in groups for rollout in group]
            flat_rewards = [r for group in answer_rewards for r in group]
            solver = role_update(
                backbone, SOLVER, flat_rollouts, flat_rewards, self.roles[SOLVER], optimizers[SOLVER], options
            )
            if options.proposer_questions == "since-last":
                pending_questions.extend(questions)
                pending_rewards.extend(question_rewards)
            else:
                pending_questions, pending_rewards = list(questions), list(question_rewards)
            record: dict[str, Any] = {
                "stage": self.stage,
                "task": task_label,
                "step": len(self.step_log) + 1,
                "solver_reward": solver["reward"],
                "solver_kl": solver["kl"],
                "solver_beta": solver["beta"],
                "solver_baseline": solver["baseline"],
                "solver_loss": solver["loss"],
                "solver_updates": solver["updates"],
                "proposer_reward": sum(question_rewards) / len(question_rewards),
                "answer_entropy": sum(entropies) / len(entropies),
                "distinct_questions": len({q.text for q in questions}) / len(questions),
                "proposer_kl": None,
                "proposer_beta": None,
                "proposer_baseline": None,
            }
            if (step + 1) % options.proposer_every == 0:
                proposer = role_update(
                    backbone, PROPOSER, pending_questions, pending_rewards, self.roles[PROPOSER],
                    optimizers[PROPOSER], options,
                )  # fmt: skip
                record.update(proposer_kl=proposer["kl"], proposer_beta=proposer["beta"],
                              proposer_baseline=proposer["baseline"])  # fmt: skip
                pending_questions, pending_rewards = [], []
            self.step_log.append(record)
            stage_log.append(record)
            if step == steps - 1:
                self.examples.append({
                    "stage": self.stage, "task": task_label,
                    "pairs": [{"question": q.text, "answers": [r.text for r in g]}
                              for q, g in zip(questions[:4], groups)],
                })  # fmt: skip
        backbone.model.set_adapter(SOLVER)
        backbone.model.train(was_training)
        write_scalars(self.log_dir, "evolmm", stage_log, first_step=stage_log[0]["step"] if stage_log else 0)
        return _stage_metrics(stage_log, self.roles)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for role in ROLES for p in self._role_parameters(role))

    # -- report ------------------------------------------------------------------------------
    def evaluation_summary(self) -> dict[str, Any] | None:
        if not self.step_log:
            return None
        roles = {role: asdict(state) for role, state in self.roles.items()}
        return {"steps": self.step_log, "examples": self.examples, "roles": roles}

    def report_sections(self) -> list[dict[str, str]]:
        """Reward, KL and beta curves over all training steps, a per-stage table and sample questions."""
        if not self.step_log:
            return []
        html = [_curves_html(self.step_log), _stage_table_html(self.step_log), _examples_html(self.examples)]
        return [{"title": "EvoLMM self-evolution", "html": "".join(html)}]

    # -- state -------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return named_adapters_tensors(self.backbone, list(ROLES))

    def load_state_tensors(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        for role in ROLES:
            load_adapter_tensors(self.backbone, adapter_part(tensors, role), role)
        self.backbone.model.set_adapter(SOLVER)

    def state_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "roles": {role: asdict(state) for role, state in self.roles.items()},
            "steps": self.step_log,
            "examples": self.examples,
        }

    def load_state_json(self, state: dict[str, Any]) -> None:
        self.stage = int(state.get("stage", 0))
        self.roles = {role: RoleState(**state["roles"][role]) for role in ROLES} if "roles" in state else self.roles
        self.step_log = list(state.get("steps", []))
        self.examples = list(state.get("examples", []))


# -- helpers -------------------------------------------------------------------------------------
def _image_cycle(count: int, seed: int):
    """Indices 0..count-1 in a fresh seeded shuffle per pass, forever."""
    rng = random.Random(seed)
    while True:
        order = list(range(count))
        rng.shuffle(order)
        yield from order


def _proposal_prompt(item: ImageItem, instruction: str) -> Sample:
    placeholders = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in item.images)
    prompt = placeholders + instruction
    return Sample(id=f"{item.id}#propose", task=item.task, images=item.images, prompt=prompt, answer="")


def _question_text(question: Rollout, tags: bool = False) -> str:
    """The proposed question as the solver sees it: with ``tags`` the ``<question>`` tag's content (or
    the whole output), on one line, without image placeholders (one would ask for another image)."""
    text = rewards.parse_question(question.text) if tags else question.text
    return " ".join(text.replace(IMAGE_PLACEHOLDER, " ").split())


def _question_prompt(item: ImageItem, question: str) -> Sample:
    placeholders = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in item.images)
    return Sample(id=f"{item.id}#solve", task=item.task, images=item.images, prompt=placeholders + question, answer="")


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _stage_metrics(log: list[dict[str, Any]], roles: dict[str, RoleState]) -> dict[str, Any]:
    """What stage.json records: means over the stage and the controllers' final values."""
    return {
        "train_loss": _mean([r["solver_loss"] for r in log]),
        "steps": len(log),
        "solver_reward": _mean([r["solver_reward"] for r in log]),
        "proposer_reward": _mean([r["proposer_reward"] for r in log]),
        "answer_entropy": _mean([r["answer_entropy"] for r in log]),
        "solver_kl": _mean([r["solver_kl"] for r in log]),
        "proposer_kl": _mean([r["proposer_kl"] for r in log]),
        **{f"{role}_beta_final": state.beta for role, state in roles.items()},
        **{f"{role}_baseline_final": state.baseline for role, state in roles.items()},
    }


def _curves_png(log: list[dict[str, Any]]) -> bytes:
    """Three panels over training steps: rewards and baselines, KL per role, beta per role (log scale)."""
    from mmcl.report.render import _new_figure, _png_bytes

    fig = _new_figure(11.0, 3.4)
    panels = [
        ("rewards", ["solver_reward", "solver_baseline", "proposer_reward", "proposer_baseline"], False),
        ("KL to reference (nats/token)", ["solver_kl", "proposer_kl"], False),
        ("KL coefficient beta", ["solver_beta", "proposer_beta"], True),
    ]
    boundaries = [r["step"] - 0.5 for prev, r in zip(log, log[1:]) if r["stage"] != prev["stage"]]
    for index, (title, keys, log_scale) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 3, index)
        for key in keys:
            points = [(r["step"], r[key]) for r in log if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(points) < 40 else None, linewidth=1.2, label=key)
        for x in boundaries:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        if log_scale:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _png_bytes(fig)


def _curves_html(log: list[dict[str, Any]]) -> str:
    data = base64.b64encode(_curves_png(log)).decode("ascii")
    return f'<img alt="EvoLMM reward, KL and beta curves" src="data:image/png;base64,{data}">'


def _stage_table_html(log: list[dict[str, Any]]) -> str:
    def cell(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}g}"

    rows = []
    for stage in sorted({r["stage"] for r in log}):
        part = [r for r in log if r["stage"] == stage]
        last = part[-1]
        proposer_last = next((r for r in reversed(part) if r["proposer_beta"] is not None), {})
        rows.append(
            f"<tr><td>{stage}</td><td>{escape(str(last['task']))}</td><td>{len(part)}</td>"
            f"<td>{cell(_mean([r['solver_reward'] for r in part]))}</td>"
            f"<td>{cell(_mean([r['proposer_reward'] for r in part]))}</td>"
            f"<td>{cell(_mean([r['answer_entropy'] for r in part]))}</td>"
            f"<td>{cell(_mean([r['solver_kl'] for r in part]))}</td><td>{cell(last['solver_beta'])}</td>"
            f"<td>{cell(_mean([r['proposer_kl'] for r in part]))}</td>"
            f"<td>{cell(proposer_last.get('proposer_beta'))}</td>"
            f"<td>{cell(_mean([r['distinct_questions'] for r in part]))}</td></tr>"
        )
    header = "".join(
        f"<th>{h}</th>" for h in ("stage", "task", "steps", "solver reward", "proposer reward", "answer entropy",
                                  "solver KL", "solver beta (last)", "proposer KL", "proposer beta (last)",
                                  "distinct questions")
    )  # fmt: skip
    return f"<p>Means over each stage's steps.</p><table><tr>{header}</tr>{''.join(rows)}</table>"


def _examples_html(examples: list[dict[str, Any]]) -> str:
    parts = []
    for example in examples:
        items = "".join(
            f"<li>{escape(pair['question'] or '(empty question)')} &rarr; {escape(' | '.join(pair['answers']))}</li>"
            for pair in example["pairs"]
        )
        title = f"stage {example['stage']} ({escape(str(example['task']))}): last step's questions"
        parts.append(f"<h3>{title}</h3><ul>{items}</ul>")
    return "".join(parts)
