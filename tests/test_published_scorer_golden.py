"""Golden cases of every published stream's default scorer.

Each expected value was obtained by running the published scoring code itself on the case (outside this
repository, on throwaway copies): CoIN's ``ETrain/Eval/LLaVA/CoIN/eval_*.py`` and ``m4c_evaluator.py``
(github.com/zackschen/CoIN), MLLM-CL's ``ETrain/Eval/LLaVA/CoIN/eval_*.py`` (github.com/bjzhb666/MLLM-CL),
and CLiMB's ``get_score`` / ``normalize_word`` (github.com/GLAMOR-USC/CLiMB, ``src/utils/``). Each case
went through the script as one-item annotation and result files, with the reply stripped as the
generation scripts write it. Exceptions, said where they occur:

* MLLM-CL Math: the GPT judge cannot be run; the cases are those the script decides without it (its
  "prefetch": a multiple-choice reply naming one option letter, or a reply that parses as the exact
  integer/float answer), with the choices ``3/11, 8/11, 6/11, 3/5, 1/2``.
* MLLM-CL APP: scored on the eval.ai server; the values follow the submitted option
  (``convert_result_to_submission.py``: ``reply.strip().upper()``) compared with the gold letter.
* CLiMB nlvr2 / snli-ve / vcr: classification heads, no text rule; the values are the label the reply
  names against the gold label (NLVR2 True/False, SNLI-VE 3 classes, VCR 4 options).
"""

from __future__ import annotations

import warnings

import pytest

from mmcl.streams.climb import CLIMB_TASKS
from mmcl.streams.coin import COIN_TASKS
from mmcl.streams.mllm_cl import ABILITY, DOMAIN
from mmcl.evaluation import published_scorers
from mmcl.evaluation.published_scorers import OCR_HME, PublishedRuleWarning, sci_rule_tag
from mmcl.evaluation.scorers import MULTI_REFERENCE, SCORERS, score_one

COIN_SCIENCEQA = [
    ('A', 'A', 1.0),
    ('B', 'A', 0.0),
    ('C. The moon', 'C', 1.0),
    ('(B)', 'B', 1.0),
    ('The answer is B.', 'B', 1.0),
    ("I think it's C", 'C', 0.0),
    ('b', 'B', 1.0),
    ('E', 'E', 1.0),
    ('', 'A', 0.0),
    ("It's a D", 'D', 0.0),
    ('D) circle', 'D', 1.0),
    ('A.', 'A', 1.0),
    ('1', 'A', 0.0),
    (' A ', 'A', 1.0),
    ('A or B', 'B', 0.0),
]

COIN_IMAGENET = [
    ('tabby cat', 'tabby cat', 1.0),
    ('a tabby cat', 'tabby cat', 1.0),
    ('cat', 'tabby cat', 1.0),
    ('', 'tabby cat', 1.0),
    ('Tabby cat', 'tabby cat', 0.0),
    ('dog', 'tabby cat', 0.0),
    ('tabby', 'tabby cat', 1.0),
    ('tabby cats', 'tabby cat', 1.0),
    ('fish', 'goldfish', 1.0),
    ('golden retriever dog', 'golden retriever', 1.0),
    ('tabby, cat', 'tabby cat', 0.0),
    (' tabby cat ', 'tabby cat', 1.0),
    ('goldfish.', 'goldfish', 1.0),
]

COIN_GQA = [
    ('yes', 'yes', 1.0),
    ('Yes.', 'yes', 1.0),
    ('yes..', 'yes', 1.0),
    ('no', 'yes', 0.0),
    ('the table', 'table', 0.0),
    ('Table', 'table', 1.0),
    ('table!', 'table', 0.0),
    ('left.', 'left', 1.0),
    ('white and black', 'black and white', 0.0),
    ('2', 'two', 0.0),
    ('', 'yes', 0.0),
    ('YES .', 'yes', 0.0),
    (' no ', 'no', 1.0),
]

COIN_UPPER_MATCH = [
    ('red', 'red', 1.0),
    ('Red', 'red', 1.0),
    ('red.', 'red', 0.0),
    ('unanswerable', 'unanswerable', 1.0),
    ('Unanswerable', 'unanswerable', 1.0),
    ('2', 'two', 0.0),
    ('the red', 'red', 0.0),
    ('straße', 'STRASSE', 1.0),
    ('', 'red', 0.0),
    ('red ', 'red', 1.0),
    ('yes', 'no', 0.0),
]

COIN_GROUNDING = [
    ('[0.10, 0.20, 0.50, 0.60]', '[0.10, 0.20, 0.50, 0.60]', 1.0),
    ('[0.10, 0.20, 0.50, 0.66]', '[0.10, 0.20, 0.50, 0.60]', 1.0),
    ('[0.1, 0.2, 0.5, 0.6]', '[0.10, 0.20, 0.50, 0.60]', 0.0),
    ('[0.12, 0.22, 0.52, 0.62]', '[0.10, 0.20, 0.50, 0.60]', 1.0),
    ('[0.50, 0.50, 0.90, 0.90]', '[0.10, 0.20, 0.50, 0.60]', 0.0),
    ('no box', '[0.10, 0.20, 0.50, 0.60]', 0.0),
    ('[0.10, 0.20, 0.50]', '[0.10, 0.20, 0.50, 0.60]', 0.0),
    ('[0.30, 0.20, 0.70, 0.60]', '[0.10, 0.20, 0.50, 0.60]', 0.0),
    ('[0.10, 0.20, 0.45, 0.60]', '[0.10, 0.20, 0.50, 0.60]', 1.0),
    ('[1.00, 0.20, 0.50, 0.60]', '[0.10, 0.20, 0.50, 0.60]', 1.0),
    ('0.10, 0.20, 0.50, 0.60', '[0.10, 0.20, 0.50, 0.60]', 1.0),
    ('[0.10,0.20,0.50,0.60]', '[0.10, 0.20, 0.50, 0.60]', 1.0),
    ('[0.10, 0.20, 0.50, 0.60].', '[0.10, 0.20, 0.50, 0.60]', 1.0),
    ('[0.1, 0.2, 0.5, 0.65]', '[0.1, 0.2, 0.5, 0.6]', 1.0),
]

COIN_OCRVQA = [
    ('Harry Potter', 'Harry Potter', 1.0),
    ('harry potter', 'Harry Potter', 1.0),
    ('Harry Potter.', 'Harry Potter', 0.0),
    ('Unanswerable', 'Unanswerable', 0.0),
    ('unanswerable', 'unanswerable', 1.0),
    ('The Hobbit', 'Hobbit', 0.0),
    ('Yes', 'yes', 1.0),
    ('Fiction', 'Literature & Fiction', 0.0),
    ('', 'x', 0.0),
    ('  Yes ', 'yes', 1.0),
    ('2', '2', 1.0),
]

TEXTVQA = [
    ('stop', ['stop'] * 7 + ['stop sign'] * 3, 1.0),
    ('stop sign', ['stop'] * 7 + ['stop sign'] * 3, 0.9),
    ('Stop.', ['stop'] * 7 + ['stop sign'] * 3, 1.0),
    ('STOP SIGN!', ['stop'] * 7 + ['stop sign'] * 3, 0.9),
    ('the stop', ['stop'] * 7 + ['stop sign'] * 3, 1.0),
    ('yield', ['stop'] * 7 + ['stop sign'] * 3, 0.0),
    ('two', ['2'] * 10, 1.0),
    ('coca-cola', ['coca cola'] * 5 + ['coca-cola'] * 5, 1.0),
    ("man's", ["man's"] * 2 + ['man'] * 8, 0.6),
    ('1,000', ['1000'] * 10, 1.0),
    ('dont', ["don't"] * 3 + ['no'] * 7, 0.9),
    ('', ['stop'] * 7 + ['stop sign'] * 3, 0.0),
    ('3.5', ['3.5'] + ['3'] * 9, 0.3),
]

MLLM_CL_AI2D = [
    ('Yes', 'yes', 1.0),
    ('no', 'yes', 0.0),
    ('The answer is yes.', 'yes', 1.0),
    ('yesterday', 'yes', 1.0),
    ('eyes are open', 'yes', 1.0),
    ('B', 'b', 1.0),
    ('Unanswerable', 'unanswerable', 0.0),
    ('parking lot', 'parking lot', 1.0),
    ('a large parking lot here', 'parking lot', 1.0),
    ('Parking', 'parking lot', 0.0),
    ('3.5', '3.5', 0.0),
    ('It is 3.', '3.', 1.0),
    ('2, 3', '2', 1.0),
    ('', 'yes', 0.0),
]

MLLM_CL_PVQA = [
    ('yes', 'yes', 1.0),
    ('Yes, it is.', 'yes', 1.0),
    ('no', 'yes', 0.0),
    ('eyes', 'yes', 1.0),
    ('Unanswerable', 'x', 0.0),
    ('unanswerable', 'unanswerable', 1.0),
    ('fibrosis', 'Fibrosis', 1.0),
    ('pulmonary fibrosis', 'fibrosis', 1.0),
    ('fibrosis', 'pulmonary fibrosis', 0.0),
    ('', 'yes', 0.0),
    ('the liver', 'liver', 1.0),
]

MLLM_CL_SCI = [
    ('A', 'A', 'AI2D_12.png', 'Which label shows the sun?', 1.0),
    ('a', 'A', 'TQA_3.png', 'Which is it?', 1.0),
    ('A.', 'A', 'VQA_7.png', 'Which is it?', 0.0),
    ('The answer is A', 'A', 'SciVerse_1.png', 'Which is it?', 0.0),
    ('Unanswerable', 'unanswerable', 'AI2D_2.png', 'Which is it?', 0.0),
    ('Texas has the highest value', 'Texas', 'MapQA_1.png', 'Which state has the highest value?', 1.0),
    ('no', 'yes', 'MapQA_2.png', 'Does Ohio have the lowest value?', 0.0),
    ('Yes', 'yes', 'MapQA_3.png', 'Does Ohio have the lowest value?', 1.0),
    ('alabama, texas', 'Alabama, Texas', 'MapQA_4.png', 'Which states have a value above 5?', 1.0),
    ('alabama,texas', 'Alabama, Texas', 'MapQA_4.png', 'Which states have a value above 5?', 0.5),
    ('texas, alabama', 'alabama, texas', 'MapQA_5.png', 'Which states have a value above 5?', 0.0),
    ('alabama, texas, ohio', 'alabama, texas, utah', 'MapQA_6.png', 'Which states are in the top group?', 2 / 3),
    ('Alabama', 'alabama, texas', 'MapQA_7.png', 'Which states are in the top group?', 0.5),
    ('', 'alabama, texas', 'MapQA_8.png', 'Which states are in the top group?', 0.0),
    ('A', 'a', 'images/AI2D_12.png', 'Which states are shown?', 1.0),
]

MLLM_CL_FINVIS = [
    ('A', 'A', 1.0),
    ('A.', 'A', 1.0),
    ('(A)', 'A', 0.0),
    ('yes', 'Yes', 1.0),
    ('Y es', 'yes', 1.0),
    ('B', 'A', 0.0),
    ('Unanswerable', 'A', 0.0),
    ('a', 'A', 1.0),
    ('True.', 'true', 1.0),
    ('The answer is A', 'A', 0.0),
    ('', 'A', 0.0),
    ('no answer', 'no answer', 0.0),
]

MLLM_CL_OCR = [
    ('open', ['open', 'opened'], False, 1.0),
    ('It says OPEN', ['open', 'opened'], False, 1.0),
    ('closed', ['open'], False, 0.0),
    ('reopened', ['open'], False, 1.0),
    ('', ['open'], False, 0.0),
    ('x^2+1', ['x ^ 2 + 1'], True, 1.0),
    ('X^2+1', ['x^2+1'], True, 0.0),
    ('The answer is 42', ['42'], False, 1.0),
    ('4 2', ['42'], False, 0.0),
    ('Line1\nLine2', ['line1line2'], False, 1.0),
    ('Unanswerable', ['unanswerable'], False, 1.0),
    ('\\frac{1}{2}', ['\\frac { 1 } { 2 }'], True, 1.0),
    ('open', ['open'], False, 1.0),
]

MLLM_CL_SAT = [
    ('2', '2', 1.0),
    ('(A) left', '(A)', 1.0),
    ('A', '(A)', 0.0),
    ('There are 3 cars.', '3', 1.0),
    ('13', '3', 1.0),
    ('Left', 'left', 1.0),
    ('l e f t', 'left', 1.0),
    ('right', 'left', 0.0),
    ('3.0', '3', 1.0),
    ('', '3', 0.0),
    ('Unanswerable', 'unanswerable', 1.0),
]

MLLM_CL_MATH = [
    ('B', 'B', 1.0),
    ('(B) 8/11', 'B', 1.0),
    ('The correct answer is C', 'B', 0.0),
    ('A', 'B', 0.0),
    ('B.', 'B', 1.0),
    ('Answer: (D)', 'D', 1.0),
    ('14', '14', 1.0),
    ('14 ', '14', 1.0),
    ('1.50', '1.5', 1.0),
    ('1.5', '1.5', 1.0),
    ('-3', '-3', 1.0),
    ('E', 'E', 1.0),
]

MLLM_CL_APP = [
    ('A', 'A', 1.0),
    ('a', 'A', 1.0),
    (' B ', 'B', 1.0),
    ('A.', 'A', 0.0),
    ('B', 'A', 0.0),
    ('(A)', 'A', 0.0),
    ('', 'A', 0.0),
    ('c', 'C', 1.0),
    ('The answer is A', 'A', 0.0),
    ('D\n', 'D', 1.0),
]

CLIMB_VQA = [
    ('red', ['red'] * 8 + ['pink'] * 2, 1.0),
    ('pink', ['red'] * 8 + ['pink'] * 2, 0.6),
    ('Red.', ['red'] * 8 + ['pink'] * 2, 1.0),
    ('the red', ['red'] * 8 + ['pink'] * 2, 1.0),
    ('two', ['2'] * 3 + ['two'] * 7, 0.9),
    ('blue', ['red'] * 8 + ['pink'] * 2, 0.0),
    ('1,000', ['1000'] * 4 + ['1'] * 6, 1.0),
    ('yes', ['yes'] + ['no'] * 9, 0.3),
    ('dont know', ["don't know"] * 3 + ['no'] * 7, 0.9),
    ('Red', ['Red'] * 10, 0.0),
    ('', ['red'] * 8 + ['pink'] * 2, 0.0),
    ('coca-cola', ['coca cola'] * 4 + ['pepsi'] * 6, 1.0),
]

CLIMB_NLVR2 = [  # reference: "yes" for the label "True", "no" for "False"
    ("yes", "yes", 1.0), ("Yes.", "yes", 1.0), ("no", "yes", 0.0), ("No, it is not.", "no", 1.0), ("YES", "yes", 1.0),
    ("yes", "no", 0.0), ("", "yes", 0.0), ("maybe", "no", 0.0), ("no", "no", 1.0),
    ("Yes, the left image has two dogs.", "yes", 1.0),
]
CLIMB_SNLI_VE = [  # reference: the gold_label word
    ("entailment", "entailment", 1.0), ("Entailment.", "entailment", 1.0), ("neutral", "entailment", 0.0),
    ("contradiction", "contradiction", 1.0), ("CONTRADICTION", "contradiction", 1.0), ("neutral ", "neutral", 1.0),
    ("entails", "entailment", 0.0), ("", "neutral", 0.0), ("contradiction", "neutral", 0.0),
    ("entailment or neutral", "entailment", 0.0),
]
CLIMB_VCR = [  # reference: the letter of answer_label
    ("A", "A", 1.0), ("B", "A", 0.0), ("(C)", "C", 1.0), ("D.", "D", 1.0), ("The answer is B", "B", 1.0),
    ("b", "B", 1.0), ("", "A", 0.0), ("C) Casey is angry", "C", 1.0), ("A", "D", 0.0), ("Answer: D", "D", 1.0),
]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(published_scorers, "_WARNED", set())
    warnings.simplefilter("ignore", PublishedRuleWarning)


def _check(name: str, prediction: str, reference, expected: float) -> None:
    assert score_one(name, prediction, reference) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------- CoIN


@pytest.mark.parametrize(("prediction", "reference", "expected"), COIN_SCIENCEQA)
def test_coin_scienceqa(prediction: str, reference: str, expected: float) -> None:
    _check("coin_scienceqa", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), TEXTVQA)
def test_coin_textvqa(prediction: str, reference: list[str], expected: float) -> None:
    _check("textvqa_accuracy", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), COIN_IMAGENET)
def test_coin_imagenet(prediction: str, reference: str, expected: float) -> None:
    _check("coin_imagenet", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), COIN_GQA)
def test_coin_gqa(prediction: str, reference: str, expected: float) -> None:
    _check("coin_gqa", prediction, reference, expected)


@pytest.mark.parametrize("name", ["coin_vizwiz", "coin_vqav2"])
@pytest.mark.parametrize(("prediction", "reference", "expected"), COIN_UPPER_MATCH)
def test_coin_vizwiz_and_vqav2(name: str, prediction: str, reference: str, expected: float) -> None:
    _check(name, prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), COIN_GROUNDING)
def test_coin_grounding(prediction: str, reference: str, expected: float) -> None:
    _check("coin_grounding", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), COIN_OCRVQA)
def test_coin_ocrvqa(prediction: str, reference: str, expected: float) -> None:
    _check("coin_ocrvqa", prediction, reference, expected)


def test_coin_imagenet_warns_once_when_the_reply_is_only_inside_the_label() -> None:
    warnings.simplefilter("always", PublishedRuleWarning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert score_one("coin_imagenet", "a tabby cat", "tabby cat") == 1.0  # label in reply: no warning
        assert not caught
        assert score_one("coin_imagenet", "", "tabby cat") == 1.0
        assert score_one("coin_imagenet", "cat", "tabby cat") == 1.0
    assert [w.category for w in caught] == [PublishedRuleWarning]
    assert "'' scored 1 only because it occurs inside the label 'tabby cat'" in str(caught[0].message)
    assert score_one("contains", "", "tabby cat") == 0.0  # the stricter variant


def test_coin_grounding_warns_once_when_the_cut_changes_a_coordinate() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert score_one("coin_grounding", "[0.10, 0.20, 0.50, 0.60]", "[0.10, 0.20, 0.50, 0.60]") == 1.0
        assert not caught  # "0" cut from "0.10" and "0.60": same values
        assert score_one("coin_grounding", "[0.1, 0.2, 0.5, 0.6]", "[0.1, 0.2, 0.5, 0.6]") == 0.0
        assert score_one("coin_grounding", "[0.1, 0.2, 0.5, 0.6]", "[0.1, 0.2, 0.5, 0.6]") == 0.0
    assert len(caught) == 1 and "read as [0.1, 0.2, 0.5, 0.0]" in str(caught[0].message)
    assert score_one("box_iou", "[0.1, 0.2, 0.5, 0.6]", "[0.1, 0.2, 0.5, 0.6]") == 1.0  # the stricter variant


# ------------------------------------------------------------------------------------------- MLLM-CL


@pytest.mark.parametrize(("prediction", "reference", "expected"), MLLM_CL_AI2D)
def test_mllm_cl_ai2d(prediction: str, reference: str, expected: float) -> None:
    _check("mllm_cl_ai2d", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), MLLM_CL_PVQA)
def test_mllm_cl_pvqa(prediction: str, reference: str, expected: float) -> None:
    _check("mllm_cl_pvqa", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "answer", "image", "question", "expected"), MLLM_CL_SCI)
def test_mllm_cl_sci(prediction: str, answer: str, image: str, question: str, expected: float) -> None:
    _check("mllm_cl_sci", prediction, [sci_rule_tag(image, question), answer], expected)


def test_mllm_cl_sci_without_a_tag_uses_equality() -> None:
    assert score_one("mllm_cl_sci", "A", "a") == 1.0
    assert score_one("mllm_cl_sci", "Texas has the highest value", "texas") == 0.0


@pytest.mark.parametrize(("prediction", "reference", "expected"), MLLM_CL_FINVIS)
def test_mllm_cl_finvis(prediction: str, reference: str, expected: float) -> None:
    _check("mllm_cl_finvis", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "answers", "handwritten_math", "expected"), MLLM_CL_OCR)
def test_mllm_cl_ocr(prediction: str, answers: list[str], handwritten_math: bool, expected: float) -> None:
    _check("mllm_cl_ocr", prediction, [OCR_HME, *answers] if handwritten_math else answers, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), MLLM_CL_SAT)
def test_mllm_cl_sat(prediction: str, reference: str, expected: float) -> None:
    _check("mllm_cl_sat", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), MLLM_CL_MATH)
def test_mllm_cl_math_where_the_script_needs_no_judge(prediction: str, reference: str, expected: float) -> None:
    _check("mllm_cl_math", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), MLLM_CL_APP)
def test_mllm_cl_app(prediction: str, reference: str, expected: float) -> None:
    _check("mllm_cl_app", prediction, reference, expected)


# ------------------------------------------------------------------------------------------- CLiMB


@pytest.mark.parametrize(("prediction", "reference", "expected"), CLIMB_VQA)
def test_climb_vqa(prediction: str, reference: list[str], expected: float) -> None:
    _check("climb_vqa", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), CLIMB_NLVR2)
def test_climb_nlvr2(prediction: str, reference: str, expected: float) -> None:
    _check("yes_no", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), CLIMB_SNLI_VE)
def test_climb_snli_ve(prediction: str, reference: str, expected: float) -> None:
    _check("exact_match", prediction, reference, expected)


@pytest.mark.parametrize(("prediction", "reference", "expected"), CLIMB_VCR)
def test_climb_vcr(prediction: str, reference: str, expected: float) -> None:
    _check("option_letter", prediction, reference, expected)


# ------------------------------------------------------------------------------------------- mapping


def test_each_published_task_uses_the_scorer_of_its_script() -> None:
    assert {t.name: t.scorer for t in COIN_TASKS} == {
        "ScienceQA": "coin_scienceqa", "TextVQA": "textvqa_accuracy", "ImageNet": "coin_imagenet",
        "GQA": "coin_gqa", "VizWiz": "coin_vizwiz", "Grounding": "coin_grounding", "VQAv2": "coin_vqav2",
        "OCRVQA": "coin_ocrvqa",
    }  # fmt: skip
    assert {t.name: t.scorer for t in DOMAIN.tasks} == {
        "RS": "mllm_cl_ai2d", "Med": "mllm_cl_pvqa", "AD": "mllm_cl_ai2d", "Sci": "mllm_cl_sci",
        "Fin": "mllm_cl_finvis",
    }  # fmt: skip
    assert {t.name: t.scorer for t in ABILITY.tasks} == {
        "OCR": "mllm_cl_ocr", "Math": "mllm_cl_math", "VP": "mllm_cl_sat", "APP": "mllm_cl_app",
    }  # fmt: skip
    assert {t.name: t.scorer for t in CLIMB_TASKS} == {
        "vqa": "climb_vqa", "nlvr2": "yes_no", "snli-ve": "exact_match", "vcr": "option_letter",
    }  # fmt: skip
    every = [t.scorer for t in (*COIN_TASKS, *DOMAIN.tasks, *ABILITY.tasks, *CLIMB_TASKS)]
    assert set(every) <= set(SCORERS)
    assert {"textvqa_accuracy", "mllm_cl_sci", "mllm_cl_ocr", "climb_vqa"} <= MULTI_REFERENCE


def test_every_published_scorer_has_at_least_ten_golden_cases() -> None:
    tables = [COIN_SCIENCEQA, TEXTVQA, COIN_IMAGENET, COIN_GQA, COIN_UPPER_MATCH, COIN_GROUNDING, COIN_OCRVQA,
              MLLM_CL_AI2D, MLLM_CL_PVQA, MLLM_CL_SCI, MLLM_CL_FINVIS, MLLM_CL_OCR, MLLM_CL_SAT, MLLM_CL_MATH,
              MLLM_CL_APP, CLIMB_VQA, CLIMB_NLVR2, CLIMB_SNLI_VE, CLIMB_VCR]
    assert min(len(table) for table in tables) >= 10
