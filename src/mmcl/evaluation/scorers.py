"""Per-task answer scorers, looked up by name.

A scorer maps ``(prediction, reference)`` to a score in [0, 1]. Register more with
:func:`register_scorer` or by adding to :data:`SCORERS`. A sample may carry several references
(``Sample.reference`` is then a list, e.g. the ten human answers of VQA): scorers registered with
``multi_reference=True`` receive the whole list, the others are applied to each reference and the
best score counts (:func:`score_one`).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Sequence

from mmcl.registry import Registry

Scorer = Callable[[str, str], float]

_ARTICLE = re.compile(r"^(?:a|an|the)\s+")
_SURROUNDING = string.punctuation + string.whitespace


def normalize_answer(text: str) -> str:
    """Lowercase, strip surrounding punctuation/whitespace, collapse whitespace, drop one leading article."""
    text = " ".join(text.lower().strip(_SURROUNDING).split())
    return _ARTICLE.sub("", text).strip(_SURROUNDING)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalized prediction equals the normalized reference."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def _first_yes_no(text: str) -> str | None:
    match = _YES_NO.search(text)
    return match.group(1).lower() if match else None


def yes_no(prediction: str, reference: str) -> float:
    """1.0 if the first standalone yes/no word of the prediction matches the reference's."""
    predicted, expected = _first_yes_no(prediction), _first_yes_no(reference)
    return float(predicted is not None and predicted == expected)


# A letter that reads as an English word ("A circle", "I think", "I'm"), not an option.
_WORD_AFTER = re.compile(r"['\u2019]|\s+[a-z]")
_LEADING = re.compile(r"^\s*\(?([A-Za-z])(?:\)|[.:](?=\s|$)|(?=\s|$))")
_ANSWER_IS = re.compile(
    r"\banswer\b\s*(?:is\s*:?|:)?\s*(?:option\s+)?\(?([A-Za-z])(?![A-Za-z])", re.IGNORECASE
)
_CAPITAL = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def _reads_as_word(text: str, match: re.Match[str], letters: str) -> bool:
    return match.group(1) in letters and _WORD_AFTER.match(text, match.end(1)) is not None


def extract_option_letter(text: str) -> str | None:
    """Option letter (upper case) named by ``text``, or ``None``.

    Rules, first hit wins:
    1. the text starts with a letter, alone or followed by ``)``, ``.`` or ``:``
       ("B", "b.", "(B)", "B) circle"); a bare "A"/"I" followed by a lowercase word
       ("A circle") is an article/pronoun and skipped;
    2. "answer is X" / "answer: X" / "answer is option X" (any case; a lowercase
       "a"/"i" followed by a word, as in "the answer is a circle", is skipped);
    3. the first standalone capital letter, skipping "A"/"I" followed by a
       lowercase word or an apostrophe ("I think it's C" gives C).
    """
    match = _LEADING.match(text)
    if match and not _reads_as_word(text, match, "AaIi"):
        return match.group(1).upper()
    for match in _ANSWER_IS.finditer(text):
        if not _reads_as_word(text, match, "ai"):
            return match.group(1).upper()
    for match in _CAPITAL.finditer(text):
        if not _reads_as_word(text, match, "AI"):
            return match.group(1)
    return None


def option_letter(prediction: str, reference: str) -> float:
    """1.0 if the option letter extracted from the prediction equals the reference letter."""
    predicted = extract_option_letter(prediction)
    expected = extract_option_letter(reference) or reference.strip().upper()
    return float(predicted is not None and predicted == expected)


_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen twenty"
).split()
_NUMBER = re.compile(
    r"(?P<digits>(?:(?<!\w)-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<!\w)-)?\.\d+)"
    r"|\b(?P<word>" + "|".join(_NUMBER_WORDS) + r")\b",
    re.IGNORECASE,
)


def parse_first_number(text: str) -> float | None:
    """First number in ``text``: integers, decimals, negatives, "1,000", or a word zero..twenty."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    if match.group("word"):
        return float(_NUMBER_WORDS.index(match.group("word").lower()))
    return float(match.group("digits").replace(",", ""))


def numeric(prediction: str, reference: str) -> float:
    """1.0 if the first number in the prediction equals the reference number (rel. tol. 1e-6)."""
    predicted, expected = parse_first_number(prediction), parse_first_number(reference)
    if predicted is None or expected is None:
        return 0.0
    return float(math.isclose(predicted, expected, rel_tol=1e-6))


def contains(prediction: str, reference: str) -> float:
    """1.0 if the normalized reference occurs in the normalized prediction as whole words."""
    needle, haystack = normalize_answer(reference), normalize_answer(prediction)
    if not needle:
        return float(not haystack)
    return float(re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", haystack) is not None)


def synth_gui(prediction: str, reference: str) -> float:
    """The ``gui`` task of ``synth-ability`` (mmcl's own rule; no published script scores this data): a
    reference holding a box ``[x1,y1,x2,y2]`` is scored by :func:`~mmcl.evaluation.official.box_iou`
    (first box of the reply, 1.0 when IoU >= 0.5: Acc@0.5 of RefCOCO grounding, the stricter variant of
    CoIN Grounding's ``coin_grounding``, whose cut of the reply's first and last characters would misread
    a pixel box); any other reference, an option letter (MMT-Bench GUI style), by :func:`option_letter`."""
    from mmcl.evaluation.official import box_iou, parse_box  # official imports this module

    if parse_box(reference) is not None:
        return box_iou(prediction, reference)
    return option_letter(prediction, reference)


SCORERS: Registry[Scorer] = Registry("scorer")
for _scorer in (exact_match, yes_no, option_letter, numeric, contains, synth_gui):
    SCORERS.register(_scorer.__name__, _scorer)


MULTI_REFERENCE: set[str] = set()  # scorers that take the list of all references themselves


def register_scorer(name: str, scorer: Scorer, *, multi_reference: bool = False) -> None:
    """Add ``scorer`` to :data:`SCORERS` under ``name`` (a taken name is refused); ``multi_reference``: it
    receives a list of references."""
    SCORERS.register(name, scorer)
    MULTI_REFERENCE.discard(name)
    if multi_reference:
        MULTI_REFERENCE.add(name)


def score_one(scorer_name: str, prediction: str, reference: str | Sequence[str]) -> float:
    """Score of one prediction against one reference or a list of references (see the module doc)."""
    scorer = get_scorer(scorer_name)
    if isinstance(reference, str):
        return scorer(prediction, [reference] if scorer_name in MULTI_REFERENCE else reference)
    if scorer_name in MULTI_REFERENCE:
        return scorer(prediction, list(reference))
    return max((scorer(prediction, item) for item in reference), default=0.0)


def get_scorer(name: str) -> Scorer:
    """Scorer registered under ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return SCORERS[name]
    except KeyError:
        raise KeyError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}") from None


def score_predictions(scorer_name: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean score of the named scorer over the pairs, in percent (0.0 for no pairs)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    get_scorer(scorer_name)
    if not predictions:
        return 0.0
    return 100.0 * sum(score_one(scorer_name, p, r) for p, r in zip(predictions, references)) / len(predictions)


from mmcl.evaluation import official  # noqa: E402,F401  (registers the published benchmark scorers)
