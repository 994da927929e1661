"""Tests for mmcl.evaluation.official: each scorer pinned on values worked out by hand from the
published definitions (VQA eval script, ANLS paper, Acc@0.5, pix2struct relaxed accuracy)."""

from __future__ import annotations

import subprocess
import sys
from itertools import combinations

import pytest

from mmcl.evaluation.official import (
    VQA_CONTRACTIONS,
    anls,
    box_iou,
    final_answer_text,
    intersection_over_union,
    last_boxed,
    levenshtein_distance,
    math_answer,
    normalize_textvqa_answer,
    normalize_vqa_answer,
    parse_box,
    relaxed_accuracy,
    textvqa_accuracy,
    vqa_accuracy,
    vqa_soft_accuracy,
)
from mmcl.evaluation.scorers import MULTI_REFERENCE, SCORERS, score_one, score_predictions

# ---------------------------------------------------------------------------------------------
# VQA answer processing (vqaEval.py processPunctuation + processDigitArticle)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # periods: removed unless a digit follows
        ("yes", "yes"),
        ("Yes.", "yes"),
        ("3.5", "3.5"),
        ("a.m.", "am"),
        # articles
        ("the dog", "dog"),
        ("A man", "man"),
        ("an apple", "apple"),
        ("(a) dog", "dog"),  # ")" touches a space -> deleted, "(" does not -> space; then "a" dropped
        ("theater", "theater"),
        # number words, zero..ten and "none" only
        ("Two", "2"),
        ("two dogs", "2 dogs"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        # contractions: one missing apostrophe restored
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("couldntve", "couldntve"),  # both apostrophes missing: not in the official table
        ("twas", "'twas"),
        ("yall", "y'all"),
        ("Im", "im"),  # the table's "Im" key can never match the lowercased word
        # punctuation: touching a space -> deleted, otherwise -> space
        ("red, white", "red white"),
        ("red,white", "red white"),
        ("well - known", "well known"),
        ("hello-world", "hello world"),
        ("what?", "what"),
        # a comma between digits deletes every mark, glued or not
        ("1,000", "1000"),
        ("1,000 and 2-3", "1000 and 23"),
        # apostrophes and colons are kept; newlines and tabs are spaces
        ("man's", "man's"),
        ("10:30", "10:30"),
        ("yes\n", "yes"),
        ("two\tdogs", "2 dogs"),
    ],
)
def test_normalize_vqa_answer(text: str, expected: str) -> None:
    assert normalize_vqa_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("red,white", "redwhite"),  # m4c deletes commas before the punctuation step
        ("man's hat", "man 's hat"),
        ("What?", "what"),
        ("The Two Dogs.", "2 dogs"),
    ],
)
def test_normalize_textvqa_answer(text: str, expected: str) -> None:
    assert normalize_textvqa_answer(text) == expected


def test_contraction_table_has_the_official_keys() -> None:
    assert VQA_CONTRACTIONS["ow's'at"] == VQA_CONTRACTIONS["'ows'at"] == VQA_CONTRACTIONS["'ow'sat"] == "'ow's'at"
    assert VQA_CONTRACTIONS["y'allll"] == VQA_CONTRACTIONS["yall'll"] == "y'all'll"
    three_apostrophes = {VQA_CONTRACTIONS[key] for key in ("yall'd've", "y'alld've", "y'all'dve")}
    assert three_apostrophes == {"y'all'd've"}
    assert VQA_CONTRACTIONS["oclock"] == "o'clock"
    for word in ("well", "were", "its", "ill", "id", "hell", "wed", "shed", "lets"):  # real words stay
        assert word not in VQA_CONTRACTIONS


# ---------------------------------------------------------------------------------------------
# VQA soft accuracy
# ---------------------------------------------------------------------------------------------


def _leave_one_out_by_enumeration(answer: str, humans: list[str]) -> float:
    """The official loop written out: every subset of nine of the ten humans, min(1, matches / 3)."""
    subsets = list(combinations(range(len(humans)), len(humans) - 1))
    return sum(min(1.0, sum(humans[i] == answer for i in subset) / 3) for subset in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("matching", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (9, 1.0), (10, 1.0)],
)
def test_vqa_soft_accuracy_of_k_matching_humans(matching: int, expected: float) -> None:
    humans = ["dog"] * matching + ["cat", "cow", "pig", "hen", "owl", "emu", "elk", "ant", "bee", "yak"][matching:]
    assert len(humans) == 10
    assert _leave_one_out_by_enumeration("dog", humans) == pytest.approx(expected)
    assert vqa_soft_accuracy("dog", humans) == pytest.approx(expected)
    assert vqa_accuracy("Dog.", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalizes_prediction_and_humans() -> None:
    humans = ["2", "two", "Two.", "3", "three", "3", "3", "4", "many", "2"]  # four say 2 once normalized
    assert vqa_accuracy("two", humans) == pytest.approx(1.0)
    assert vqa_accuracy("3", humans) == pytest.approx(1.0)  # also four
    assert vqa_accuracy("4", humans) == pytest.approx(0.3)
    assert vqa_accuracy("5", humans) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("I don't know", ["i dont know"] * 3 + ["no"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_single_reference_counts_as_unanimous() -> None:
    assert score_one("vqa_accuracy", "Yes.", "yes") == 1.0
    assert score_one("vqa_accuracy", "no", "yes") == 0.0
    assert score_one("textvqa_accuracy", "The Coca-Cola", "coca cola") == 1.0


def test_vqa_accuracy_through_the_registry() -> None:
    humans = ["stop"] * 2 + ["stop sign"] * 8
    assert score_one("vqa_accuracy", "Stop", humans) == pytest.approx(0.6)
    assert score_predictions("vqa_accuracy", ["stop", "stop sign"], [humans, humans]) == pytest.approx(80.0)
    assert textvqa_accuracy("STOP!", humans) == pytest.approx(0.6)


# ---------------------------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "distance"),
    [("kitten", "sitting", 3), ("sitting", "kitten", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("same", "same", 0)],
)
def test_levenshtein_distance(first: str, second: str, distance: int) -> None:
    assert levenshtein_distance(first, second) == distance


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("Denver  Broncos ", ["denver broncos"], 1.0),  # case and spacing ignored
        ("abcx", ["abcd"], 0.75),  # NL = 1/4
        ("abcdx", ["abcyz"], 0.6),  # NL = 2/5 < 0.5
        ("hello xxxxx", ["hello world"], 1 - 5 / 11),  # NL = 5/11, just below 0.5
        ("abxy", ["abcd"], 0.0),  # NL = 2/4 exactly: not below the threshold
        ("hello xxxxxx", ["hello world!"], 0.0),  # NL = 6/12
        ("abyz", ["abcde"], 0.0),  # NL = 3/5
        ("12/15/89", ["12/15/88"], 0.875),  # the RRC example, NL = 1/8
        ("Dear dr. Lobo", ["Dear Dr. Lobo", "Dr. Lobo"], 1.0),  # max over references
        ("dr lobo", ["Dear Dr. Lobo", "Dr. Lobo"], 1 - 1 / 8),  # best reference: "dr. lobo"
        ("", ["abc"], 0.0),
        ("", [""], 1.0),
    ],
)
def test_anls(prediction: str, references: list[str], expected: float) -> None:
    assert anls(prediction, references) == pytest.approx(expected)


def test_anls_is_multi_reference_in_the_registry() -> None:
    assert score_one("anls", "abcx", ["zzzz", "abcd"]) == pytest.approx(0.75)
    assert score_one("anls", "abcx", "abcd") == pytest.approx(0.75)
    assert score_predictions("anls", ["abcd", "abcx"], [["abcd"], ["abcd"]]) == pytest.approx(87.5)


# ---------------------------------------------------------------------------------------------
# Grounding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "box"),
    [
        ("[0.12, 0.34, 0.56, 0.78]", (0.12, 0.34, 0.56, 0.78)),
        (" The bounding box is (0.1, 0.2, 0.5, 0.6).", (0.1, 0.2, 0.5, 0.6)),
        ("(0.1,0.2),(0.5,0.6)", (0.1, 0.2, 0.5, 0.6)),
        ("box: 0.1 0.2 0.5 0.6.", (0.1, 0.2, 0.5, 0.6)),
        ("object 1: [0.10, 0.20, 0.30, 0.40] and [0.5, 0.5, 0.6, 0.6]", (0.1, 0.2, 0.3, 0.4)),
        ("[1, 2, 3, 4, 5] then [10, 20, 30, 40]", (10.0, 20.0, 30.0, 40.0)),
        ("[0.1, 0.2, 0.5]", None),
        ("0.1, 0.2, 0.3, 0.4, 0.5", None),
        ("I cannot find it", None),
        ("", None),
    ],
)
def test_parse_box(text: str, box: tuple[float, float, float, float] | None) -> None:
    assert parse_box(text) == box


def test_intersection_over_union_values() -> None:
    assert intersection_over_union((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert intersection_over_union((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert intersection_over_union((0.5, 0.5, 0.1, 0.9), (0, 0, 1, 1)) == 0.0  # x2 < x1
    # the same two boxes in normalized and in pixel coordinates (640 x 480) have the same IoU
    first, second = (0.1, 0.2, 0.5, 0.6), (0.3, 0.1, 0.7, 0.5)
    in_pixels = [(a * 640, b * 480, c * 640, d * 480) for a, b, c, d in (first, second)]
    assert intersection_over_union(*in_pixels) == pytest.approx(intersection_over_union(first, second))
    assert intersection_over_union(first, second) == pytest.approx(0.06 / (0.16 + 0.16 - 0.06))  # overlap 0.2 x 0.3


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("[0.10, 0.20, 0.50, 0.60]", "[0.10, 0.20, 0.50, 0.60]", 1.0),
        ("[0.00, 0.00, 1.00, 1.00]", "[0.00, 0.00, 0.50, 1.00]", 1.0),  # IoU = 0.5 exactly
        ("[0.00, 0.00, 1.00, 1.00]", "[0.00, 0.00, 0.51, 1.00]", 1.0),  # IoU = 0.51
        ("[0.00, 0.00, 1.00, 1.00]", "[0.00, 0.00, 0.49, 1.00]", 0.0),  # IoU = 0.49
        ("[0.10, 0.20, 0.50, 0.60]", "[0.20, 0.30, 0.60, 0.70]", 0.0),  # IoU = 0.09 / 0.23
        ("It is at (0.1, 0.2, 0.5, 0.6).", "[0.1, 0.2, 0.5, 0.6]", 1.0),
        ("[0.50, 0.60, 0.10, 0.20]", "[0.10, 0.20, 0.50, 0.60]", 0.0),  # corners swapped
        ("the man on the left", "[0.10, 0.20, 0.50, 0.60]", 0.0),
        ("[0.10, 0.20, 0.50, 0.60]", "no box", 0.0),
    ],
)
def test_box_iou(prediction: str, reference: str, expected: float) -> None:
    assert box_iou(prediction, reference) == expected
    assert score_one("box_iou", prediction, reference) == expected


# ---------------------------------------------------------------------------------------------
# Math final answers
# ---------------------------------------------------------------------------------------------


def test_final_answer_extraction() -> None:
    assert last_boxed(r"first \boxed{\frac{1}{2}} then \boxed{2^{10}} done") == "2^{10}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert final_answer_text("Some steps.\nThe answer is 42.\nThanks") == "42"
    assert final_answer_text("Final Answer: (C)") == "(C)"
    assert final_answer_text("answer: 3. The answer is 7") == "7"  # the last statement wins
    assert final_answer_text("We need to answer this carefully") is None


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # numbers from the stated answer, else the last number
        ("The answer is 42.", "42", 1.0),
        ("so x = 3, and y = 7", "7", 1.0),
        ("so x = 3, and y = 7", "3", 0.0),
        ("The answer is 7, not 3", "3", 0.0),
        (r"Thus \boxed{\frac{3}{4}}", "0.75", 1.0),
        (r"Thus $\dfrac{3}{4}$", "3/4", 1.0),
        ("3/4", "0.75", 1.0),
        (r"-\frac{1}{2}", "-0.5", 1.0),
        ("The answer is 0.5.", "1/2", 1.0),
        ("answer: 1,000 meters", "1000", 1.0),
        ("The answer is 50%", "50", 1.0),
        (r"The angle is 30^\circ", "30", 1.0),
        ("12 cm", "12", 1.0),
        ("2.0", "2", 1.0),
        ("2.4", "2", 0.0),  # an integer reference is not rounded to
        ("1/3", "0.33", 1.0),  # rounded to the reference's two decimals
        ("0.34", "0.33", 0.0),
        ("I am not sure", "5", 0.0),
        # option letters
        ("The answer is (B) 12", "B", 1.0),
        ("Final Answer: C", "B", 0.0),
        ("B", "(B)", 1.0),
        ("Looking at the options, I think it is D", "D", 1.0),
        # other text
        (r"The answer is $\sqrt{3}$", r"\sqrt{3}", 1.0),
        ("The answer is y = 2x + 1", "y=2x+1", 1.0),
        ("The answer is y = 2x + 2", "y=2x+1", 0.0),
        (r"\boxed{\text{Paris}}", "paris", 1.0),
    ],
)
def test_math_answer(prediction: str, reference: str, expected: float) -> None:
    assert math_answer(prediction, reference) == expected


# ---------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("12.5", "12", 1.0),  # 4.2 % off
        ("12.7", "12", 0.0),  # 5.8 % off
        ("105", "100", 1.0),  # exactly 5 %
        ("106", "100", 0.0),
        ("95", "100", 1.0),
        ("40%", "0.4", 1.0),  # a percentage is divided by 100
        (" 12.0 ", "12", 1.0),
        ("Yes", "yes", 1.0),
        ("twelve", "12", 0.0),
        ("0", "0", 1.0),
        ("0.0", "0", 0.0),  # a zero reference falls back to string equality (pix2struct)
    ],
)
def test_relaxed_accuracy(prediction: str, reference: str, expected: float) -> None:
    assert relaxed_accuracy(prediction, reference) == expected


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def test_registered_names_and_reference_modes() -> None:
    names = {"vqa_accuracy", "textvqa_accuracy", "anls", "box_iou", "math_answer", "relaxed_accuracy"}
    assert names <= set(SCORERS)
    assert {"vqa_accuracy", "textvqa_accuracy", "anls"} <= MULTI_REFERENCE
    assert not {"box_iou", "math_answer", "relaxed_accuracy"} & MULTI_REFERENCE


@pytest.mark.parametrize("first_import", ["mmcl.evaluation.official", "mmcl.evaluation.scorers"])
def test_either_import_order_registers_the_scorers(first_import: str) -> None:
    code = (
        f"import {first_import}\n"
        "from mmcl.evaluation.scorers import SCORERS, MULTI_REFERENCE\n"
        "assert {'vqa_accuracy', 'anls', 'box_iou', 'math_answer', 'relaxed_accuracy'} <= set(SCORERS)\n"
        "assert 'vqa_accuracy' in MULTI_REFERENCE\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
