"""Chance scores (CLiMB's S_rand) per sample and task, and CLiMB's forgetting T_F in results."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmcl.streams.stream import TaskFiles
from mmcl.config import ExperimentConfig, from_dict
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError
from mmcl.evaluation.chance import sample_chance, task_chance
from mmcl.evaluation.metrics import climb_average_forgetting, climb_forgetting, climb_knowledge_transfer


def sample(prompt: str, answer: str) -> Sample:
    return Sample("s", "t", (), prompt, answer)


@pytest.mark.parametrize(
    ("prompt", "answer", "scorer", "expected"),
    [
        ("<image>\nWhich?\nA. red\nB. blue\nC. green\nD. yellow\nAnswer with the option's letter.", "C", "option_letter", 25.0),
        ("<image>\nWhich?\n(A) red\n(B) blue\nAnswer with the option's letter.", "B", "option_letter", 50.0),
        ("<image>\nWhich?\nA. one\nB. two\nC. three\nD. four\nE. five", "E", "exact_match", 20.0),
        ("<image>\nIs there a river?", "no", "exact_match", 50.0),
        ("<image>\nIs the statement true?", "True", "yes_no", 50.0),
        ("<image>\nHow many cars?", "3", "exact_match", 0.0),
        ("<image>\nWhat is written here?", "stop", "vqa_accuracy", 0.0),
        ("<image>\nWhere is the dog?", "[1,2,3,4]", "box_iou", 0.0),
    ],
)
def test_sample_chance_from_answer_space(prompt: str, answer: str, scorer: str, expected: float) -> None:
    assert sample_chance(sample(prompt, answer), scorer) == pytest.approx(expected)


def test_task_chance_is_the_mean_over_samples_and_an_override_wins() -> None:
    samples = [sample("Is it red?", "yes"), sample("How many?", "2"), sample("Q\nA. x\nB. y\nC. z\nD. w", "A"),
               sample("Is it blue?", "no")]  # fmt: skip
    assert task_chance(samples, "exact_match") == pytest.approx((50 + 0 + 25 + 50) / 4)
    assert task_chance(samples, "exact_match", override=33.3) == 33.3
    assert task_chance([], "exact_match") is None


def test_chance_override_in_a_stream_config_is_range_checked() -> None:
    entry = {"name": "a", "train": "a/train.json", "test": "a/test.json", "chance": 10}
    config = from_dict(ExperimentConfig, {"stream": {"tasks": [entry]}})
    assert config.stream.tasks[0].chance == 10.0
    with pytest.raises(ConfigError, match="stream task a: chance must be a percentage in \\[0, 100\\], got 150"):
        TaskFiles(name="a", train="x", test="y", chance=150.0)


def test_climb_average_forgetting_golden() -> None:
    # CLiMB (Srinivasan et al. 2022), T_F(j<-i) = 100 (R[j][j] - R[i][j]) / (R[j][j] - S_rand(j)), by hand:
    # task 1: 100 (80 - 60) / (80 - 50) = 66.667; task 2: 100 (90 - 72) / (90 - 0) = 20; mean 43.333
    R = [[50.0, 0.0, 0.0], [80.0, 10.0, 5.0], [70.0, 90.0, 20.0], [60.0, 72.0, 85.0]]
    chance = [50.0, 0.0, 25.0]
    assert climb_forgetting(R, chance, 1, 3) == pytest.approx(200 / 3)
    assert climb_average_forgetting(R, chance) == pytest.approx((200 / 3 + 20) / 2)
    # a task learned only to its chance level, or below it, has no defined T_F and is left out of the mean
    R[1][0] = 50.0
    assert climb_average_forgetting(R, chance) == pytest.approx(20.0)
    R[1][0] = 23.0  # the literal ratio would be 100 (23 - 60) / (23 - 50) = +137: meaningless, left out
    assert climb_forgetting(R, chance, 1, 3) is None and climb_average_forgetting(R, chance) == pytest.approx(20.0)
    assert climb_average_forgetting([[0.0], [10.0]], [0.0]) is None


def test_compare_never_uses_the_base_row_as_chance(tmp_path: Path) -> None:
    """A run without recorded chance scores (made before them) gets no T_K; T_F comes with each run's
    results (collect_results), never from compare."""
    from mmcl.report.compare_runs import ComparedRun, with_climb_metrics
    from mmcl.results import TaskInfo
    from test_report import make_results

    base = [40.0, 0.0]

    def runs(chance: dict[str, float | None]) -> list:
        tasks = [TaskInfo(name, "", "exact_match", 4, chance[name], None, None) for name in ("nlvr2", "vcr")]
        made = [
            make_results(tasks=tasks, row_labels=["base", "nlvr2", "vcr"], matrix=[base, [80.0, 30.0], [65.0, 70.0]],
                         per_task_forgetting=[15.0, None], metrics={}),
            make_results(method="experts", reference=True, tasks=tasks, row_labels=["base", "nlvr2", "vcr"],
                         matrix=[base, [90.0, 0.0], [90.0, 65.0]], per_task_forgetting=[0.0, None], metrics={}),
        ]  # fmt: skip
        return [ComparedRun(results, f"dir{i}", None, None, {}, dict(results.metrics)) for i, results in enumerate(made)]

    assert "T_K" not in with_climb_metrics(runs({"nlvr2": None, "vcr": None}))[0].metrics
    metrics = with_climb_metrics(runs({"nlvr2": 50.0, "vcr": 25.0}))[0].metrics
    transfer = [100 * (80 - 90) / (90 - 50), 100 * (70 - 65) / (65 - 25)]
    assert metrics["T_K"] == pytest.approx(sum(transfer) / 2)
    # a single-task score at or below chance gives no scale: that task's T_K is left out
    assert climb_knowledge_transfer(70.0, 20.0, 25.0) is None and climb_knowledge_transfer(70.0, 25.0, 25.0) is None
