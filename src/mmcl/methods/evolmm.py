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

The update of a role is in :mod:`mmcl.methods.evolmm_update`, the loop's other pieces (role state, image
order, prompts, stage metrics, the report's data) in :mod:`mmcl.methods.evolmm_parts`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from mmcl import distributed
from mmcl.streams.stream import Task
from mmcl.config import TrainingConfig, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError
from mmcl.methods.base import Method, register_method
from mmcl.methods.evolmm_parts import (
    ImageItem,
    RoleState,
    curve_sections,
    examples_table,
    image_cycle,
    proposal_prompt,
    question_prompt,
    question_text,
    stage_metrics,
    stage_table,
)
from mmcl.methods.evolmm_update import exact_kl, k3_kl, role_update  # noqa: F401  (the KL estimators, re-exported)
from mmcl.methods.lora_utils import (
    adapter_parameter_count,
    adapter_part,
    add_lora,
    ensure_adapter,
    load_adapter_tensors,
    named_adapters_tensors,
)
from mmcl.training import evolmm_rewards as rewards
from mmcl.training.rollouts import Rollout, prompt_seed, sample_rollouts
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

    def initial_role_state(self) -> RoleState:
        return RoleState(baseline=0.0 if self.baseline_start == "zero" else None, beta=self.initial_kl_coef)


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
        ensure_adapter(backbone, PROPOSER, self.lora, self.seed + 1)
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
        order = image_cycle(len(items), seed)
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
            # several processes: each samples its share of the images (every completion from its own seeded
            # stream, see mmcl.training.rollouts) and all gather the rollouts
            positions = distributed.shard(range(len(batch)))
            backbone.model.set_adapter(PROPOSER)
            questions = distributed.gather_shards([group[0] for group in sample_rollouts(
                backbone, [proposal_prompt(batch[i], options.proposer_prompt) for i in positions], 1,
                options.question_max_new_tokens, options.temperature,
                prompt_seeds=[prompt_seed(seed, 2 * step, i) for i in positions])], len(batch))  # fmt: skip
            asked = [question_text(q, tags) or options.fallback_question for q in questions]
            backbone.model.set_adapter(SOLVER)
            groups = distributed.gather_shards(sample_rollouts(
                backbone,
                [question_prompt(batch[i], options.solver_prompt.replace("{question}", asked[i])) for i in positions],
                options.solver_samples, options.answer_max_new_tokens, options.temperature,
                batch_size=max(32, options.solver_samples),
                prompt_seeds=[prompt_seed(seed, 2 * step + 1, i) for i in positions],
            ), len(batch))  # fmt: skip
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
        return stage_metrics(stage_log, self.roles)

    def trainable_parameters(self) -> int:
        return adapter_parameter_count(self.backbone.model, ROLES)

    # -- report ------------------------------------------------------------------------------
    def evaluation_summary(self) -> dict[str, Any] | None:
        if not self.step_log:
            return None
        roles = {role: asdict(state) for role, state in self.roles.items()}
        return {"steps": self.step_log, "examples": self.examples, "roles": roles}

    def report_sections(self) -> list[dict[str, Any]]:
        """Reward, KL and beta curves over all training steps, a per-stage table and sample questions."""
        if not self.step_log:
            return []
        return [*curve_sections(self.step_log), stage_table(self.step_log), *examples_table(self.examples)]

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
