"""``evolmm``: label-free self-evolving training of a Proposer and a Solver with continuous rewards.

EvoLMM ("EvoLMM: Self-Evolving Large Multimodal Models with Continuous Rewards", MBZUAI 2025).
Two LoRA adapters on one backbone: per image the Proposer asks a question, the Solver answers it
N times; the Solver is rewarded for agreeing with its own majority (soft self-consistency) and the
Proposer for questions of medium answer entropy (see :mod:`mmcl.training.evolmm_rewards`). Both are
trained with REINFORCE against an exponential-moving-average baseline plus a per-token KL penalty
to the reference policy (the backbone with adapters disabled) whose coefficient adapts to a target
KL. Training reads only the images of a stage's samples (never a question, answer or label), so
the stream's tasks are used for evaluation only; evaluation answers with the Solver adapter.
"""

from __future__ import annotations

import base64
import random
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path
from typing import Any, Sequence

import torch

from mmcl.benchmarks.stream import Task
from mmcl.config import TrainingConfig
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
from mmcl.training.rollouts import Rollout, completion_logprobs, sample_rollouts
from mmcl.training.scalars import write_scalars

PROPOSER, SOLVER = "proposer", "solver"
ROLES = (PROPOSER, SOLVER)


@dataclass
class EvolmmConfig:
    """EvoLMM options. Reward, baseline and KL defaults are the paper's / authors' ``train.sh``
    (N = 5 answers, proposer every 5 steps, gamma 0.7, KL target 0.02 at rate 0.1); the sizes of
    a stage are calibrated for the tiny CPU backbone (about a minute per synth-domain task)."""

    steps_per_task: int = 40  # optimisation steps per stage (the paper runs 16180 steps in total)
    images_per_step: int = 8  # images per step; the stage's images are shuffled and cycled
    solver_samples: int = 5  # N answers per question (--num_solver_samples 5)
    proposer_every: int = 5  # proposer update every k steps, on the questions since the last (--proposer_update_freq 5)
    question_max_new_tokens: int = 16
    answer_max_new_tokens: int = 12
    temperature: float = 1.0  # sampling temperature of both roles (log-probs use the same)
    learning_rate: float = 1e-3  # Adam, per role; LoRA on the tiny model (calibrated)
    max_grad_norm: float = 1.0
    solver_gamma: float = rewards.SOLVER_GAMMA  # 0.7 (--solver_soft_gamma)
    length_penalty: float = rewards.LENGTH_PENALTY  # lambda_len 0.1
    length_tau_words: float = rewards.LENGTH_TAU_WORDS  # tau 6 words
    entropy_target: float = rewards.ENTROPY_TARGET  # mu 0.9 nats
    entropy_width: float = rewards.ENTROPY_WIDTH  # sigma 0.35 nats
    baseline_decay: float = rewards.BASELINE_DECAY  # b <- 0.9 b + 0.1 r
    kl_target: float = rewards.KL_TARGET  # 0.02 nats per token (--kl_target)
    kl_adapt_rate: float = rewards.KL_ADAPT_RATE  # 0.1 (--kl_adapt_rate)
    initial_kl_coef: float = 1e-3  # beta at the start of training, per role
    proposer_prompt: str = "Ask a question about this image."  # the tiny model's pretraining proposal prompt

    def __post_init__(self) -> None:
        for key in ("steps_per_task", "images_per_step", "solver_samples", "proposer_every",
                    "question_max_new_tokens", "answer_max_new_tokens"):  # fmt: skip
            if getattr(self, key) < 1:
                raise ConfigError(f"method.options.{key}: expected a positive integer, got {getattr(self, key)}")
        for key in ("temperature", "learning_rate", "length_tau_words", "entropy_width", "kl_target",
                    "initial_kl_coef"):  # fmt: skip
            if not getattr(self, key) > 0:
                raise ConfigError(f"method.options.{key}: expected a positive number, got {getattr(self, key)}")
        if not 0 <= self.baseline_decay < 1:
            raise ConfigError(f"method.options.baseline_decay: expected a number in [0, 1), got {self.baseline_decay}")


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


def policy_update(
    backbone,
    role: str,
    rollouts: Sequence[Rollout],
    role_rewards: Sequence[float],
    state: RoleState,
    optimizer: torch.optim.Optimizer,
    options: EvolmmConfig,
) -> dict[str, Any]:
    """One REINFORCE step of ``role``'s adapter: token-mean of -(r - b) log pi(token) + beta * KL_t,
    KL_t the k3 estimator exp(ref - logp) - (ref - logp) - 1 against the adapter-free backbone
    (non-negative, unbiased). Then b and beta are updated with the step's mean reward and KL."""
    model = backbone.model
    model.set_adapter(role)  # the only active and trainable adapter
    reward_mean = sum(role_rewards) / len(role_rewards)
    baseline = reward_mean if state.baseline is None else state.baseline
    advantages = torch.tensor([r - baseline for r in role_rewards], dtype=torch.float32, device=backbone.device)
    with torch.no_grad(), model.disable_adapter():
        reference, _ = completion_logprobs(backbone, rollouts, options.temperature)
    logprobs, mask = completion_logprobs(backbone, rollouts, options.temperature)
    mask = mask.to(logprobs.dtype)
    tokens = mask.sum().clamp(min=1.0)
    delta = (reference - logprobs) * mask
    kl = ((torch.exp(delta) - delta - 1.0) * mask).sum() / tokens
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
    return {"reward": reward_mean, "kl": kl_value, "beta": beta, "baseline": state.baseline, "loss": float(loss.detach())}


@register_method
class Evolmm(Method):
    name = "evolmm"
    description = "EvoLMM: label-free proposer/solver self-evolution with continuous self-consistency rewards"
    config_class = EvolmmConfig

    def __init__(self, config: EvolmmConfig, lora, seed: int):
        super().__init__(config, lora, seed)
        self.roles = {role: RoleState(beta=config.initial_kl_coef) for role in ROLES}
        self.step_log: list[dict[str, Any]] = []  # one record per training step, all stages
        self.examples: list[dict[str, Any]] = []  # a few (question, answers) per stage, for the report
        self.stage = 0
        self.stage_tasks: list[str] = []  # names of the tasks of the stage being trained

    def setup(self, backbone, tasks) -> None:
        super().setup(backbone, tasks)
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
        """``steps_per_task`` self-play steps on the stage's images (labels are never read)."""
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
        optimizers = {
            role: torch.optim.Adam(self._role_parameters(role), lr=options.learning_rate) for role in ROLES
        }
        pending_questions: list[Rollout] = []
        pending_rewards: list[float] = []
        was_training = backbone.model.training
        backbone.model.eval()  # no dropout: log-probs are those of the sampled policy
        stage_log = []
        for step in range(options.steps_per_task):
            batch = [items[next(order)] for _ in range(options.images_per_step)]
            step_seed = seed * 1_000_003 + step * 2
            backbone.model.set_adapter(PROPOSER)
            questions = [group[0] for group in sample_rollouts(
                backbone, [_proposal_prompt(item, options.proposer_prompt) for item in batch], 1,
                options.question_max_new_tokens, options.temperature, seed=step_seed)]  # fmt: skip
            backbone.model.set_adapter(SOLVER)
            groups = sample_rollouts(
                backbone, [_question_prompt(item, _question_text(q)) for item, q in zip(batch, questions)],
                options.solver_samples, options.answer_max_new_tokens, options.temperature,
                batch_size=max(32, options.solver_samples), seed=step_seed + 1,
            )  # fmt: skip
            answer_rewards, entropies, question_rewards = [], [], []
            for question, group in zip(questions, groups):
                texts = [rollout.text for rollout in group]
                answer_rewards.append(rewards.solver_rewards(
                    texts, options.solver_gamma, options.length_penalty, options.length_tau_words))  # fmt: skip
                entropy = rewards.answer_entropy(rewards.empirical_distribution(texts))
                entropies.append(entropy)
                # an empty question asks nothing: no proposer reward whatever the answers
                question_rewards.append(
                    rewards.proposer_reward(entropy, options.entropy_target, options.entropy_width)
                    if _question_text(question) else 0.0
                )
            flat_rollouts = [rollout for group in groups for rollout in group]
            flat_rewards = [r for group in answer_rewards for r in group]
            solver = policy_update(
                backbone, SOLVER, flat_rollouts, flat_rewards, self.roles[SOLVER], optimizers[SOLVER], options
            )
            pending_questions.extend(questions)
            pending_rewards.extend(question_rewards)
            record: dict[str, Any] = {
                "stage": self.stage,
                "task": task_label,
                "step": len(self.step_log) + 1,
                "solver_reward": solver["reward"],
                "solver_kl": solver["kl"],
                "solver_beta": solver["beta"],
                "solver_baseline": solver["baseline"],
                "solver_loss": solver["loss"],
                "proposer_reward": sum(question_rewards) / len(question_rewards),
                "answer_entropy": sum(entropies) / len(entropies),
                "distinct_questions": len({q.text for q in questions}) / len(questions),
                "proposer_kl": None,
                "proposer_beta": None,
                "proposer_baseline": None,
            }
            if (step + 1) % options.proposer_every == 0:
                proposer = policy_update(
                    backbone, PROPOSER, pending_questions, pending_rewards, self.roles[PROPOSER],
                    optimizers[PROPOSER], options,
                )  # fmt: skip
                record.update(proposer_kl=proposer["kl"], proposer_beta=proposer["beta"],
                              proposer_baseline=proposer["baseline"])  # fmt: skip
                pending_questions, pending_rewards = [], []
            self.step_log.append(record)
            stage_log.append(record)
            if step == options.steps_per_task - 1:
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
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return named_adapters_tensors(self.backbone, list(ROLES))

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
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


def _question_text(question: Rollout) -> str:
    """The proposed question as the solver sees it (an image placeholder in it would ask for another image)."""
    return " ".join(question.text.replace(IMAGE_PLACEHOLDER, " ").split())


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
