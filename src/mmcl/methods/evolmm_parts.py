"""Pieces of EvoLMM's self-play loop for :mod:`mmcl.methods.evolmm`: the role state, the images a stage
trains on and their order, the proposer's and solver's prompts, the stage metrics and the report's data.

EvoLMM ("EvoLMM: Self-Evolving Large Multimodal Models with Continuous Rewards", MBZUAI 2025); the prompts
of the ``reference`` protocol follow the tag protocol of the authors' released ``src/train.py``.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from mmcl.data.sample import IMAGE_PLACEHOLDER, Sample
from mmcl.training import evolmm_rewards as rewards
from mmcl.training.rollouts import Rollout
from mmcl.utils import mean_of_present


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


def image_cycle(count: int, seed: int) -> Iterator[int]:
    """Indices 0..count-1 in a fresh seeded shuffle per pass, forever."""
    rng = random.Random(seed)
    while True:
        order = list(range(count))
        rng.shuffle(order)
        yield from order


def proposal_prompt(item: ImageItem, instruction: str) -> Sample:
    placeholders = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in item.images)
    prompt = placeholders + instruction
    return Sample(id=f"{item.id}#propose", task=item.task, images=item.images, prompt=prompt, answer="")


def question_text(question: Rollout, tags: bool = False) -> str:
    """The proposed question as the solver sees it: with ``tags`` the ``<question>`` tag's content (or
    the whole output), on one line, without image placeholders (one would ask for another image)."""
    text = rewards.parse_question(question.text) if tags else question.text
    return " ".join(text.replace(IMAGE_PLACEHOLDER, " ").split())


def question_prompt(item: ImageItem, question: str) -> Sample:
    placeholders = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in item.images)
    return Sample(id=f"{item.id}#solve", task=item.task, images=item.images, prompt=placeholders + question, answer="")


def stage_metrics(log: list[dict[str, Any]], roles: dict[str, RoleState]) -> dict[str, Any]:
    """What stage.json records: means over the stage and the controllers' final values."""
    return {
        "train_loss": mean_of_present([r["solver_loss"] for r in log]),
        "steps": len(log),
        "solver_reward": mean_of_present([r["solver_reward"] for r in log]),
        "proposer_reward": mean_of_present([r["proposer_reward"] for r in log]),
        "answer_entropy": mean_of_present([r["answer_entropy"] for r in log]),
        "solver_kl": mean_of_present([r["solver_kl"] for r in log]),
        "proposer_kl": mean_of_present([r["proposer_kl"] for r in log]),
        **{f"{role}_beta_final": state.beta for role, state in roles.items()},
        **{f"{role}_baseline_final": state.baseline for role, state in roles.items()},
    }


# -- the report's data (see Evolmm.report_sections) -------------------------------------------------
CURVE_PANELS = (  # (title, step-record keys, log y axis)
    ("rewards", ("solver_reward", "solver_baseline", "proposer_reward", "proposer_baseline"), False),
    ("KL to reference (nats/token)", ("solver_kl", "proposer_kl"), False),
    ("KL coefficient beta", ("solver_beta", "proposer_beta"), True),
)
TITLE = "EvoLMM self-evolution"
MEANS = ("solver_reward", "proposer_reward", "answer_entropy", "solver_kl", "proposer_kl", "distinct_questions")


def curve_sections(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Three panels over the training steps of all stages: rewards and baselines, KL per role, beta per role
    (log scale); dotted lines at the stage boundaries."""
    steps = [record["step"] for record in log]
    boundaries = [r["step"] - 0.5 for prev, r in itertools.pairwise(log) if r["stage"] != prev["stage"]]
    return [
        {
            "title": f"{TITLE}: {title}",
            "kind": "curves",
            "x_label": "step",
            "y_label": title,
            "x": steps,
            "series": {key: [record.get(key) for record in log] for key in keys},
            "x_marks": boundaries,
            "y_log": log_scale,
        }
        for title, keys, log_scale in CURVE_PANELS
    ]


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def stage_table(log: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage: its task(s), steps, the means of rewards, answer entropy, KL and distinct questions, and
    each role's last beta."""
    rows = []
    for stage in sorted({r["stage"] for r in log}):
        part = [r for r in log if r["stage"] == stage]
        last = part[-1]
        proposer_last = next((r for r in reversed(part) if r["proposer_beta"] is not None), {})

        means = {key: _cell(mean_of_present([r[key] for r in part])) for key in MEANS}
        rows.append([
            str(stage), str(last["task"]), str(len(part)), means["solver_reward"], means["proposer_reward"],
            means["answer_entropy"], means["solver_kl"], _cell(last["solver_beta"]), means["proposer_kl"],
            _cell(proposer_last.get("proposer_beta")), means["distinct_questions"],
        ])  # fmt: skip
    columns = ["stage", "task", "steps", "solver reward", "proposer reward", "answer entropy", "solver KL",
               "solver beta (last)", "proposer KL", "proposer beta (last)", "distinct questions"]  # fmt: skip
    return {"title": f"{TITLE}: per stage", "kind": "table", "note": "Means over each stage's steps.",
            "columns": columns, "rows": rows}  # fmt: skip


def examples_table(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The questions of each stage's last step with the solver's answers (no section without any)."""
    rows = [
        [str(example["stage"]), str(example["task"]), pair["question"] or "(empty question)", " | ".join(pair["answers"])]
        for example in examples
        for pair in example["pairs"]
    ]
    if not rows:
        return []
    return [{"title": f"{TITLE}: last step's questions", "kind": "table",
             "note": "Per stage, the proposer's questions of the last training step and the solver's sampled answers.",
             "columns": ["stage", "task", "question", "answers"], "rows": rows}]  # fmt: skip
