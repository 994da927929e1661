"""Scorers of published benchmarks, computed locally (no evaluation server, no paid judge).

Importing this module registers them in :data:`mmcl.evaluation.scorers.SCORERS`
(``scorers`` imports it at its end, so any use of the registry sees them).

* ``vqa_accuracy`` (multi-reference: the ten human answers) -- VQAv2, VizWiz, TextVQA. VQA soft
  accuracy (Antol et al. 2015; Goyal et al. 2017): the answer processing of the official
  ``vqaEval.py`` and the mean over the ten leave-one-out subsets of min(1, #matching humans / 3).
* ``textvqa_accuracy`` (multi-reference) -- TextVQA as LLaVA and CoIN score it: the same accuracy
  with the answer processor of the m4c ``TextVQAAccuracyEvaluator`` (Singh et al. 2019), which
  first lowercases, deletes "," and "?" and splits off "'s".
* ``anls`` (multi-reference) -- ST-VQA, DocVQA, InfographicVQA, OCR answers. Average Normalized
  Levenshtein Similarity (Biten et al., ICCV 2019), threshold 0.5.
* ``box_iou`` -- RefCOCO/RefCOCO+/RefCOCOg grounding. Acc@0.5 of referring-expression grounding:
  1 if IoU(predicted box, reference box) >= 0.5; box convention in :func:`parse_box`. A stricter variant
  of CoIN's rule (CoIN Grounding itself uses ``coin_grounding``, see below).
* ``math_answer`` -- MathVista, MathVerse and other free-form / multiple-choice math answers.
  Rule-based stand-in for the GPT answer extractor of MathVista (Lu et al., ICLR 2024); rules in
  :func:`math_answer`. MLLM-CL Math uses ``mllm_cl_math``, which adds the judge-free part of its script.
* ``relaxed_accuracy`` -- ChartQA, PlotQA. Relaxed accuracy (Methani et al. 2020; Masry et al.
  2022) as pix2struct's ``relaxed_correctness``: numbers within 5 % relative error, exact match
  otherwise.

Exact match (GQA, OCR-VQA), option letter (ScienceQA, multiple choice), yes/no, numeric and
containment live in :mod:`mmcl.evaluation.scorers`.

Deliberate differences from the original scripts, each at the edge of the definition:

* VQA: the server script normalizes the human answers only when they disagree (and then only
  their punctuation); here the prediction and every human answer are always fully normalized, as
  the m4c evaluator does (LLaVA also normalizes its predictions before uploading them).
  The script's contraction table keys "Im", "Ive", "Id've" can never match its lowercased words;
  they are left out. With a single reference the leave-one-out average would always be 0, so a
  lone reference counts as all annotators agreeing (score 1 on a normalized match).
* ANLS: the paper's ``1 - NL if NL < 0.5 else 0`` is used; the RRC scripts keep 0.5 at exactly
  NL == 0.5.
* Grounding: CoIN's ``eval_grounding.py`` counts IoU > 0.5 strictly and cuts a character off each end
  of the reply before reading it; ``box_iou`` uses Acc@0.5 (>=) on the reply as written.

The default scorers of the published streams (CoIN, MLLM-CL, CLiMB), each reproducing the stream's own
script, are in :mod:`mmcl.evaluation.published_scorers`, imported (and registered) at the end of this
module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction

from mmcl.evaluation.scorers import extract_option_letter, register_scorer

# --------------------------------------------------------------------------------------------
# VQA soft accuracy (VQAv2 / VizWiz / TextVQA)
# --------------------------------------------------------------------------------------------

VQA_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')  # the 21 marks of vqaEval.py, in its order
VQA_ARTICLES = frozenset({"a", "an", "the"})
VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

# Contractions in their written form; each spelling with exactly one apostrophe left out is
# mapped back to it ("dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've"), which is
# the key set of the official table.
_CONTRACTED_FORMS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've
shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've
someone'll someone's something'd something'd've something'll that's there'd there'd've there're
there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll
why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've
""".split()


def _apostrophe_dropped_spellings(form: str) -> list[str]:
    return [form[:i] + form[i + 1 :] for i, char in enumerate(form) if char == "'"]


VQA_CONTRACTIONS = {
    spelling: form for form in _CONTRACTED_FORMS for spelling in _apostrophe_dropped_spellings(form)
}

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text: str) -> str:
    """vqaEval ``processPunctuation``: a mark touching a space (or any mark when the answer has a
    comma between digits, "1,000") is deleted, any other mark becomes a space; then every period
    not followed by a digit is deleted (the script's look-behind for a preceding digit is
    malformed and never applies, so "3.5" keeps its period and "yes." loses it)."""
    drop_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if drop_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    """vqaEval ``processDigitArticle``: lowercase words, number words zero..ten (and "none") to
    digits, articles dropped, missing contraction apostrophes restored."""
    words = [VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words if word not in VQA_ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """Answer processing of the official VQA evaluation (``vqaEval.py``): newlines/tabs to
    spaces, strip, punctuation rules, then digits/articles/contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def normalize_textvqa_answer(text: str) -> str:
    """Answer processor of the m4c / EvalAI TextVQA evaluator: lowercase, delete "," and "?",
    split off "'s" (``"man's"`` -> ``"man 's"``), then :func:`normalize_vqa_answer`."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(text)


def _references(reference: str | Sequence[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else [str(item) for item in reference]


def vqa_soft_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of ``human_answers`` of min(1, #matches in the subset
    / 3), on already normalized strings. With ten answers of which k match: 0.3 for k=1, 0.6 for
    k=2, 0.9 for k=3, 1.0 for k>=4. A single answer counts as unanimous (1.0 on a match)."""
    if not human_answers:
        return 0.0
    if len(human_answers) == 1:
        return float(answer == human_answers[0])
    matches = sum(human == answer for human in human_answers)
    total = sum(min(Fraction(1), Fraction(matches - (human == answer), 3)) for human in human_answers)
    return float(total / len(human_answers))


def vqa_accuracy(prediction: str, reference: str | Sequence[str]) -> float:
    """VQA soft accuracy with the official ``vqaEval.py`` answer processing (multi-reference)."""
    human = [normalize_vqa_answer(item) for item in _references(reference)]
    return vqa_soft_accuracy(normalize_vqa_answer(prediction), human)


def textvqa_accuracy(prediction: str, reference: str | Sequence[str]) -> float:
    """VQA soft accuracy with the m4c TextVQA answer processor (multi-reference)."""
    human = [normalize_textvqa_answer(item) for item in _references(reference)]
    return vqa_soft_accuracy(normalize_textvqa_answer(prediction), human)


# --------------------------------------------------------------------------------------------
# ANLS (ST-VQA, DocVQA)
# --------------------------------------------------------------------------------------------

ANLS_THRESHOLD = 0.5


def levenshtein_distance(first: str, second: str) -> int:
    """Minimum number of single-character insertions, deletions and substitutions."""
    if len(first) < len(second):
        first, second = second, first
    previous = list(range(len(second) + 1))
    for i, char_a in enumerate(first, start=1):
        current = [i]
        for j, char_b in enumerate(second, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def normalized_levenshtein(first: str, second: str) -> float:
    """Levenshtein distance divided by the longer length (0.0 for two empty strings)."""
    longest = max(len(first), len(second))
    return levenshtein_distance(first, second) / longest if longest else 0.0


def anls(prediction: str, reference: str | Sequence[str]) -> float:
    """ANLS of one answer (Biten et al. 2019): max over references of ``1 - NL`` if ``NL < 0.5``
    else 0, with NL the normalized Levenshtein distance on lowercased, whitespace-collapsed text."""
    predicted = _anls_text(prediction)
    best = 0.0
    for item in _references(reference):
        distance = normalized_levenshtein(predicted, _anls_text(item))
        if distance < ANLS_THRESHOLD:
            best = max(best, 1.0 - distance)
    return best


# --------------------------------------------------------------------------------------------
# Grounding: IoU >= 0.5
# --------------------------------------------------------------------------------------------

IOU_THRESHOLD = 0.5
Box = tuple[float, float, float, float]

_BOX_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))"
_BRACKETED_BOX = re.compile(r"[\[(]\s*" + r"\s*,\s*".join([_BOX_NUMBER] * 4) + r"\s*[\])]")
_BOX_SEPARATOR = r"[\s,()\[\]]*[\s,][\s,()\[\]]*"
_NUMBER_RUN = re.compile(r"(?<![\w.])" + _BOX_NUMBER + r"(?:" + _BOX_SEPARATOR + _BOX_NUMBER + r")*")


def parse_box(text: str) -> Box | None:
    """The first ``[a, b, c, d]`` / ``(a, b, c, d)`` in ``text``, else the first run of exactly
    four numbers separated only by commas, spaces, brackets or parentheses ("(0.1,0.2),(0.5,0.9)",
    "box: 0.1 0.2 0.5 0.9."); ``None`` if there is neither. Default convention
    (CoIN Grounding, LLaVA-1.5 RefCOCO data): ``[x1, y1, x2, y2]`` = top-left and bottom-right
    corners, normalized to [0, 1] by the side of the image padded to a square, two decimals.
    IoU does not change under per-axis scaling and shifting, so any convention works as long as
    the prediction and the reference share it (pixels vs normalized do not mix)."""
    match = _BRACKETED_BOX.search(text)
    if match is not None:
        values = [float(value) for value in match.groups()]
    else:
        runs = (re.findall(_BOX_NUMBER, run.group(0)) for run in _NUMBER_RUN.finditer(text))
        values = next(([float(value) for value in run] for run in runs if len(run) == 4), [])
    if len(values) != 4:
        return None
    return (values[0], values[1], values[2], values[3])


def intersection_over_union(first: Box, second: Box) -> float:
    """IoU of two ``(x1, y1, x2, y2)`` boxes; 0.0 when either has x2 < x1 or y2 < y1 or the union is empty."""
    if any(box[2] < box[0] or box[3] < box[1] for box in (first, second)):
        return 0.0
    width = max(0.0, min(first[2], second[2]) - max(first[0], second[0]))
    height = max(0.0, min(first[3], second[3]) - max(first[1], second[1]))
    intersection = width * height
    area_first = (first[2] - first[0]) * (first[3] - first[1])
    area_second = (second[2] - second[0]) * (second[3] - second[1])
    union = area_first + area_second - intersection
    return intersection / union if union > 0 else 0.0


def box_iou(prediction: str, reference: str) -> float:
    """1.0 if the box parsed from the prediction overlaps the reference box with IoU >= 0.5;
    0.0 when either cannot be parsed."""
    predicted, expected = parse_box(prediction), parse_box(reference)
    if predicted is None or expected is None:
        return 0.0
    return float(intersection_over_union(predicted, expected) >= IOU_THRESHOLD)


# --------------------------------------------------------------------------------------------
# Math final answers (MathVista / MathVerse style), rule-based
# --------------------------------------------------------------------------------------------

_PLAIN = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_SIGN = r"(?:(?<![\w)}])-)?"
_MATH_NUMBER = re.compile(
    rf"(?P<lsign>{_SIGN})\\[dt]?frac\s*\{{\s*(?P<lnum>-?(?:{_PLAIN}))\s*\}}\s*\{{\s*(?P<lden>-?(?:{_PLAIN}))\s*\}}"
    rf"|(?P<ssign>{_SIGN})(?P<snum>{_PLAIN})\s*/\s*(?P<sden>{_PLAIN})(?![\d.])"
    rf"|(?P<psign>{_SIGN})(?P<plain>{_PLAIN})"
)
_ANSWER_PHRASE = re.compile(
    r"\b(?:final\s+answer|answer)\s*(?:is|:|=|should\s+be|would\s+be|will\s+be)\s*:?", re.IGNORECASE
)
_REFERENCE_LETTER = re.compile(r"^\(?([A-Z])\)?\.?$")
_LATEX_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
_TRAILING_UNIT = re.compile(r"(?<=[\d}])\s+[A-Za-z]+(?:\^?\d)?$")  # "12 cm", "4 m^2", "30 degrees"
_DECORATION = re.compile(r"\\left(?![a-z])|\\right(?![a-z])|\\!|\\,|\\;|\$|\*\*|\^\s*\{?\\circ\}?|°|\\%|%")


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (nested braces allowed), or ``None``."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 1, start + len("\\boxed{")
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index]
    return None


def final_answer_text(text: str) -> str | None:
    r"""The stated final answer: the last ``\boxed{}``, else what follows the last "answer is" /
    "answer:" / "final answer =" on its line; ``None`` when the text states neither."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = list(_ANSWER_PHRASE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].split("\n", 1)[0].strip()
    return re.sub(r"\.$", "", rest).strip()


def _number_value(match: re.Match[str]) -> float | None:
    def plain(text: str) -> Fraction:
        return Fraction(text.replace(",", ""))

    if match.group("lnum") is not None:
        numerator, denominator, sign = plain(match.group("lnum")), plain(match.group("lden")), match.group("lsign")
    elif match.group("snum") is not None:
        numerator, denominator, sign = plain(match.group("snum")), plain(match.group("sden")), match.group("ssign")
    else:
        numerator, denominator, sign = plain(match.group("plain")), Fraction(1), match.group("psign")
    if denominator == 0:
        return None
    value = float(numerator / denominator)
    return -value if sign else value


def _numbers(text: str) -> list[float]:
    values = (_number_value(match) for match in _MATH_NUMBER.finditer(_clean_math(text)))
    return [value for value in values if value is not None]


def _clean_math(text: str) -> str:
    return _DECORATION.sub("", _LATEX_TEXT.sub(r"\1", text))


def _whole_number(text: str) -> tuple[float, int] | None:
    """Value and decimal places when ``text`` is one number and nothing else (units, $, % allowed)."""
    cleaned = _TRAILING_UNIT.sub("", _clean_math(text).strip().rstrip(".")).strip()
    match = _MATH_NUMBER.fullmatch(cleaned)
    if match is None:
        return None
    value = _number_value(match)
    if value is None:
        return None
    plain = match.group("plain")
    places = len(plain.split(".", 1)[1]) if plain and "." in plain else 0
    return value, places


def _numbers_equal(predicted: float, expected: float, places: int) -> bool:
    """Equal within 1e-6 relative error, or equal once rounded to the reference's decimal places."""
    if math.isclose(predicted, expected, rel_tol=1e-6, abs_tol=1e-9):
        return True
    return places > 0 and round(predicted, places) == round(expected, places)


def _math_text(text: str) -> str:
    return re.sub(r"\s+", "", _clean_math(text)).lower().rstrip(".")


def math_answer(prediction: str, reference: str) -> float:
    r"""Rule-based math answer check (no GPT extractor). The prediction's final answer is the last
    ``\boxed{}``, else the text after the last "answer is"/"answer:"; then, by reference type:

    * option letter ("B", "(B)"): the letter of the final answer, else of the whole prediction
      (:func:`~mmcl.evaluation.scorers.extract_option_letter`) must equal it;
    * number (integer, decimal, "1,000", "3/4", ``\frac{3}{4}``, with $, %, degrees or a unit):
      the first number of the final answer, else the last number of the prediction, compared
      numerically (relative 1e-6, or equal when rounded to the reference's decimal places, so
      "1/3" matches "0.33");
    * anything else: the final answer (else the whole prediction) equals the reference once
      whitespace, $, ``\text{}``, ``\left``/``\right`` and case are removed.
    """
    stated = final_answer_text(prediction)
    letter = _REFERENCE_LETTER.match(reference.strip())
    if letter:
        predicted_letter = extract_option_letter(stated) if stated else None
        if predicted_letter is None:
            predicted_letter = extract_option_letter(prediction)
        return float(predicted_letter == letter.group(1))
    number = _whole_number(reference)
    if number is not None:
        stated_numbers = _numbers(stated) if stated else []
        candidates = stated_numbers[:1] or _numbers(prediction)[-1:]
        return float(bool(candidates) and _numbers_equal(candidates[0], *number))
    return float(_math_text(stated if stated is not None else prediction) == _math_text(reference))


# --------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)
# --------------------------------------------------------------------------------------------

RELAXED_TOLERANCE = 0.05


def _relaxed_float(text: str) -> float | None:
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, reference: str) -> float:
    """ChartQA relaxed accuracy (pix2struct ``relaxed_correctness``): when both parse as floats
    ("12.5", "40%" = 0.4) and the reference is non-zero, correct within 5 % relative error;
    otherwise case-insensitive exact match. Surrounding whitespace is ignored."""
    predicted_text, expected_text = prediction.strip(), reference.strip()
    predicted, expected = _relaxed_float(predicted_text), _relaxed_float(expected_text)
    if predicted is not None and expected:
        return float(abs(predicted - expected) / abs(expected) <= RELAXED_TOLERANCE)
    return float(predicted_text.lower() == expected_text.lower())


register_scorer("vqa_accuracy", vqa_accuracy, multi_reference=True)
register_scorer("textvqa_accuracy", textvqa_accuracy, multi_reference=True)
register_scorer("anls", anls, multi_reference=True)
register_scorer("box_iou", box_iou)
register_scorer("math_answer", math_answer)
register_scorer("relaxed_accuracy", relaxed_accuracy)

__all__ = [
    "ANLS_THRESHOLD",
    "IOU_THRESHOLD",
    "RELAXED_TOLERANCE",
    "anls",
    "box_iou",
    "final_answer_text",
    "intersection_over_union",
    "last_boxed",
    "levenshtein_distance",
    "math_answer",
    "normalize_textvqa_answer",
    "normalize_vqa_answer",
    "normalized_levenshtein",
    "parse_box",
    "relaxed_accuracy",
    "textvqa_accuracy",
    "vqa_accuracy",
    "vqa_soft_accuracy",
]

from mmcl.evaluation import published_scorers  # noqa: E402,F401  (registers the published streams' scorers)
