"""Tests for mmcl.evaluation.scorers."""

from __future__ import annotations

import pytest

from mmcl.errors import ConfigError

from mmcl.evaluation.scorers import (
    SCORERS,
    contains,
    exact_match,
    extract_option_letter,
    get_scorer,
    normalize_answer,
    numeric,
    option_letter,
    parse_first_number,
    register_scorer,
    score_predictions,
    yes_no,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The Cat. ", "cat"),
        ("A   red\tball!", "red ball"),
        ("an apple", "apple"),
        ('"Paris"', "paris"),
        ("an", "an"),
        ("theory", "theory"),
        ("3.5", "3.5"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The cat.", "cat", 1.0),
        ("CAT", "a cat", 1.0),
        ("two  cats", "two cats", 1.0),
        ("cats", "cat", 0.0),
        ("a black cat", "cat", 0.0),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: float) -> None:
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("Yes, it is", "yes", 1.0),
        ("YES.", "Yes", 1.0),
        ("No", "no", 1.0),
        ("no, yes", "no", 1.0),  # first yes/no word wins
        ("Not sure, but yes", "yes", 1.0),  # "not" is not "no"
        ("Nope", "no", 0.0),
        ("Yesterday", "yes", 0.0),
        ("Yes", "no", 0.0),
        ("maybe", "no", 0.0),
        ("yes", "unknown", 0.0),
    ],
)
def test_yes_no(prediction: str, reference: str, expected: float) -> None:
    assert yes_no(prediction, reference) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B) circle", "B"),
        ("(C) a red square", "C"),
        ("D: triangle", "D"),
        ("A", "A"),
        ("A.", "A"),
        ("A) circle", "A"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("Answer: b", "B"),
        ("answer: (c)", "C"),
        ("The correct answer is option D", "D"),
        ("I think it's C", "C"),
        ("I'm sure: E", "E"),
        ("A circle", None),  # article, not option A
        ("the answer is a circle", None),
        ("The answers are B and C", "B"),  # "answers" is not "answer"
        ("circle", None),
        ("", None),
    ],
)
def test_extract_option_letter(text: str, expected: str | None) -> None:
    assert extract_option_letter(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("B", "B", 1.0),
        ("(b)", "B", 1.0),
        ("The answer is B", "(B)", 1.0),
        ("A", "a", 1.0),
        ("A circle", "A", 0.0),
        ("C", "B", 0.0),
        ("none of them", "A", 0.0),
    ],
)
def test_option_letter(prediction: str, reference: str, expected: float) -> None:
    assert option_letter(prediction, reference) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42.0),
        ("There are 3 dogs and 4 cats", 3.0),
        ("-2.5 degrees", -2.5),
        ("x = -7", -7.0),
        ("covid-19", 19.0),  # a hyphen after a word is not a minus sign
        ("1,000 people", 1000.0),
        ("0.5", 0.5),
        (".5", 0.5),
        ("3.", 3.0),
        ("Three", 3.0),
        ("I see twenty birds, not 21", 20.0),
        ("seventeen", 17.0),
        ("someone", None),  # "one" inside a word is not a number
        ("no number", None),
    ],
)
def test_parse_first_number(text: str, expected: float | None) -> None:
    assert parse_first_number(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("4", "4", 1.0),
        ("There are four apples.", "4", 1.0),
        ("4.0", "4", 1.0),
        ("2", "two", 1.0),
        ("0", "0", 1.0),
        ("1000000.5", "1000000", 1.0),  # within 1e-6 relative tolerance
        ("1000.5", "1000", 0.0),
        ("5", "4", 0.0),
        ("many", "4", 0.0),
        ("4", "n/a", 0.0),
    ],
)
def test_numeric(prediction: str, reference: str, expected: float) -> None:
    assert numeric(prediction, reference) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("It is a red car.", "red", 1.0),
        ("The color is Red, I think", "red", 1.0),
        ("I see a red car", "the red car", 1.0),
        ("It is reddish", "red", 0.0),
        ("bored", "red", 0.0),
        ("Paris", "Paris.", 1.0),
        ("", "", 1.0),
        ("something", "", 0.0),
    ],
)
def test_contains(prediction: str, reference: str, expected: float) -> None:
    assert contains(prediction, reference) == expected


def test_registry_and_get_scorer() -> None:
    assert set(SCORERS) >= {"exact_match", "yes_no", "option_letter", "numeric", "contains"}
    assert get_scorer("numeric") is numeric
    with pytest.raises(KeyError, match="exact_match"):
        get_scorer("bleu")


def test_register_scorer() -> None:
    def always(prediction: str, reference: str) -> float:
        return 1.0

    register_scorer("_test_always", always)
    try:
        assert get_scorer("_test_always") is always
        register_scorer("_test_always", always)  # the same definition again (a re-import) is a no-op
        with pytest.raises(ConfigError, match="already registered by .*always"):
            register_scorer("_test_always", exact_match)
        assert get_scorer("_test_always") is always
    finally:
        SCORERS.unregister("_test_always")


def test_score_predictions() -> None:
    assert score_predictions("yes_no", ["Yes", "no", "yes"], ["yes", "yes", "yes"]) == pytest.approx(200 / 3)
    assert score_predictions("option_letter", ["(A)", "B"], ["A", "B"]) == 100.0
    assert score_predictions("exact_match", [], []) == 0.0
    with pytest.raises(ValueError):
        score_predictions("exact_match", ["a"], [])
    with pytest.raises(KeyError):
        score_predictions("nope", ["a"], ["a"])
