"""Golden tests for mmcl.evaluation.metrics on hand-made accuracy matrices."""

from __future__ import annotations

import pytest

from mmcl.evaluation.metrics import (
    average_incremental_accuracy,
    backward_transfer,
    climb_forgetting,
    climb_knowledge_transfer,
    compute_all,
    final_average,
    forgetting,
    forward_transfer,
    mean_finetune_accuracy,
)

# Rows: stage 0 (base model) .. stage 3; columns: tasks 1..3.
# Task 1 improves after stage 2 (95 > diagonal 80), so its max differs from the diagonal.
R3 = [
    [10.0, 20.0, 30.0],
    [80.0, 25.0, 35.0],
    [95.0, 90.0, 40.0],
    [75.0, 60.0, 85.0],
]


def test_golden_three_tasks() -> None:
    # ACC = (75 + 60 + 85) / 3 = 220/3
    assert final_average(R3) == pytest.approx(220 / 3)
    # MFT = (80 + 90 + 85) / 3 = 85
    assert mean_finetune_accuracy(R3) == pytest.approx(85.0)
    # MAA = (80 + (95+90)/2 + 220/3) / 3 = (80 + 92.5 + 73.33..) / 3 = 1475/18
    assert average_incremental_accuracy(R3) == pytest.approx(1475 / 18)
    # BWT = ((75-80) + (60-90)) / 2 = -17.5
    assert backward_transfer(R3) == pytest.approx(-17.5)
    # Forgetting = ((max(80,95) - 75) + (90 - 60)) / 2 = (20 + 30) / 2 = 25 (!= -BWT)
    assert forgetting(R3) == pytest.approx(25.0)
    # FWT = ((R[1][1] - R[0][1]) + (R[2][2] - R[0][2])) / 2 = ((25-20) + (40-30)) / 2 = 7.5
    assert forward_transfer(R3) == pytest.approx(7.5)


def test_forgetting_equals_minus_bwt_when_diagonal_is_the_max() -> None:
    R = [row[:] for row in R3]
    R[2][0] = 70.0  # max over l of task 1 is now the diagonal 80
    # BWT = ((75-80) + (60-90)) / 2 = -17.5; Forgetting = (5 + 30) / 2 = 17.5
    assert forgetting(R) == pytest.approx(17.5)
    assert backward_transfer(R) == pytest.approx(-17.5)


def test_compute_all_keys_and_values() -> None:
    result = compute_all(R3)
    assert list(result) == ["ACC", "MFT", "MAA", "BWT", "Forgetting", "FWT"]
    assert result["Forgetting"] == pytest.approx(25.0)
    assert result["FWT"] == pytest.approx(7.5)


def test_none_future_entries_and_no_base_row() -> None:
    # Only past/current tasks evaluated; base model not evaluated.
    R = [
        [None, None, None],
        [80.0, None, None],
        [95.0, 90.0, None],
        [75.0, 60.0, 85.0],
    ]
    result = compute_all(R)
    assert result["ACC"] == pytest.approx(220 / 3)
    assert result["MFT"] == pytest.approx(85.0)
    assert result["MAA"] == pytest.approx(1475 / 18)
    assert result["BWT"] == pytest.approx(-17.5)
    assert result["Forgetting"] == pytest.approx(25.0)
    assert result["FWT"] is None


def test_fwt_needs_base_row_and_future_entries() -> None:
    R = [row[:] for row in R3]
    R[0][2] = None  # base score of task 3 missing
    assert forward_transfer(R) is None
    R = [row[:] for row in R3]
    R[1][1] = None  # task 2 not evaluated before it was learned
    assert forward_transfer(R) is None


def test_missing_needed_entry_gives_none() -> None:
    R = [row[:] for row in R3]
    R[3][1] = None  # final score of task 2 missing
    result = compute_all(R)
    assert result["ACC"] is None
    assert result["MAA"] is None
    assert result["BWT"] is None
    assert result["Forgetting"] is None
    assert result["MFT"] == pytest.approx(85.0)  # only needs the diagonal
    assert result["FWT"] == pytest.approx(7.5)


def test_single_task() -> None:
    R = [[50.0], [80.0]]
    assert compute_all(R) == {
        "ACC": 80.0,
        "MFT": 80.0,
        "MAA": 80.0,
        "BWT": None,
        "Forgetting": None,
        "FWT": None,
    }


def test_integer_entries_accepted() -> None:
    # 2 tasks: ACC = (60+70)/2 = 65; BWT = 60-90 = -30; FWT = 20-10 = 10
    R = [[0, 10], [90, 20], [60, 70]]
    assert final_average(R) == pytest.approx(65.0)
    assert backward_transfer(R) == pytest.approx(-30.0)
    assert forward_transfer(R) == pytest.approx(10.0)


@pytest.mark.parametrize(
    "R",
    [
        [[1.0, 2.0], [3.0], [4.0, 5.0]],  # ragged
        [[1.0, 2.0], [3.0, 4.0]],  # T=2 needs 3 rows
        [[1.0], [2.0], [3.0]],  # T=1 needs 2 rows
        [],  # empty
        [[], []],  # no task columns
        [[1.0], ["80"]],  # not a number
    ],
)
def test_bad_shapes_raise(R: list) -> None:
    with pytest.raises(ValueError):
        compute_all(R)
    with pytest.raises(ValueError):
        final_average(R)


def test_climb_knowledge_transfer() -> None:
    # 100 * (70 - 60) / (60 - 20) = 25
    assert climb_knowledge_transfer(70.0, 60.0, 20.0) == pytest.approx(25.0)
    # negative transfer: 100 * (50 - 60) / (60 - 20) = -25
    assert climb_knowledge_transfer(50.0, 60.0, 20.0) == pytest.approx(-25.0)
    assert climb_knowledge_transfer(70.0, 20.0, 20.0) is None


def test_climb_forgetting() -> None:
    random = [25.0, 25.0, 25.0]
    # T_F(1<-3) = 100 * (80 - 75) / (80 - 25) = 500/55
    assert climb_forgetting(R3, random, 1, 3) == pytest.approx(500 / 55)
    # T_F(2<-3) = 100 * (90 - 60) / (90 - 25) = 3000/65
    assert climb_forgetting(R3, random, 2, 3) == pytest.approx(3000 / 65)
    # T_F(1<-2) = 100 * (80 - 95) / (80 - 25) = -1500/55 (score went up)
    assert climb_forgetting(R3, random, 1, 2) == pytest.approx(-1500 / 55)
    assert climb_forgetting(R3, random, 2, 2) == pytest.approx(0.0)


def test_climb_forgetting_edge_cases() -> None:
    # Zero denominator: diagonal equals the random score.
    assert climb_forgetting(R3, [80.0, 25.0, 25.0], 1, 3) is None
    R = [row[:] for row in R3]
    R[3][0] = None
    assert climb_forgetting(R, [25.0, 25.0, 25.0], 1, 3) is None
    with pytest.raises(ValueError):
        climb_forgetting(R3, [25.0, 25.0, 25.0], 3, 2)  # j > i
    with pytest.raises(ValueError):
        climb_forgetting(R3, [25.0, 25.0, 25.0], 0, 2)
    with pytest.raises(ValueError):
        climb_forgetting(R3, [25.0, 25.0], 1, 3)  # wrong number of random scores
