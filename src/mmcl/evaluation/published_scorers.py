"""Default scorers of the published streams, each the rule of the stream's own evaluation script.

Importing this module registers them in :data:`mmcl.evaluation.scorers.SCORERS` (``official`` imports it
at its end). The stricter mmcl rules (``exact_match``, ``contains``, ``box_iou``, ``vqa_accuracy``, ...)
stay registered under their own names. Every published script scores the reply its generation script
wrote, and those scripts strip surrounding whitespace off the decoded reply (``outputs.strip()`` in
``model_vqa.py`` / ``model_*.py``); the scorers here do the same first, so whitespace is the only thing
they forgive that the scoring code itself does not.

Golden cases, computed by running the published scoring code on them, pin every rule in
``tests/test_published_scorer_golden.py``.

CoIN (Chen et al. 2024, arXiv:2403.08350; github.com/zackschen/CoIN, ``ETrain/Eval/LLaVA/CoIN/``)
--------------------------------------------------------------------------------------------------

* ``coin_scienceqa`` -- ``eval_science_qa.py``: the reply itself if it is one of A-E, else its first
  character when followed by ". ", else the first one-character word (``\\b\\w\\b``) upper-cased; right
  when that letter is the gold one. Differences: none (the script also checks the letter against the
  number of choices, which cannot change the outcome since the gold letter is always a valid choice).
* ``textvqa_accuracy`` (in :mod:`~mmcl.evaluation.official`) -- ``eval_textvqa.py`` with
  ``m4c_evaluator.TextVQAAccuracyEvaluator``. Differences: the m4c evaluator requires exactly ten answers;
  other counts are accepted here (one answer counts as unanimous).
* ``coin_imagenet`` -- ``eval_ImagetNet.py``: ``(label in reply) or (reply in label)``, raw
  case-sensitive substrings. Known flaw, reproduced: the second direction gives full marks to an empty
  reply or to any fragment of the label ("cat" for "tabby cat"); a :class:`PublishedRuleWarning` is
  issued (``warnings.warn``, once per process) the first time a score comes from that direction alone.
  ``contains`` is the stricter variant (label as whole words in the reply).
* ``coin_gqa`` -- ``convert_gqa_for_eval.py`` (reply with trailing periods cut, lower-cased) then
  ``eval_gqa.py`` (``predicted == gold``, gold not lower-cased). Differences: none for the accuracy;
  the script's other GQA metrics (consistency, plausibility, distribution) are not computed.
* ``coin_vizwiz`` / ``coin_vqav2`` -- ``eval_vizwiz.py`` / ``eval_vqav2.py``: ``reply.upper() ==
  answer.upper()`` against the one answer of CoIN's test file (not the VQA soft score). Differences: none.
* ``coin_grounding`` -- ``eval_grounding.py``: brackets removed from the reply, then its first and last
  characters dropped (``[1:-1]``) before splitting on commas into four floats; the reference box is
  parsed without that cut; right when IoU > 0.5 (strict), IoU without any check of the corner order.
  Known flaw, reproduced: the cut removes the last digit of the last coordinate ("0.65" -> "0.6",
  "0.6" -> "0." = 0) and, when the reply does not start with "0", the first digit of the first one;
  a :class:`PublishedRuleWarning` is issued once per process when a cut digit changes a value.
  Differences: the script scales both boxes by the longer image side first, which cannot change the IoU
  except by floating-point rounding at exactly 0.5. ``box_iou`` is the stricter variant (first box in
  the reply, IoU >= 0.5, inverted boxes give 0).
* ``coin_ocrvqa`` -- ``eval_ocrvqa.py``: a reply containing "Unanswerable" (case-sensitive) is wrong,
  else ``reply.lower() == answer.lower()``. Differences: none.
* CoIN's general-knowledge score (``create_prompt.py`` + ``evaluate_generalknowledege.py``) is a GPT
  judge of the reply's reasoning; it has no rule-based counterpart here.

MLLM-CL (Zhao et al. 2025, arXiv:2506.05453; github.com/bjzhb666/MLLM-CL, ``ETrain/Eval/LLaVA/CoIN/``)
---------------------------------------------------------------------------------------------------

Every script except ``eval_ocr.py`` and ``eval_sat.py`` counts a reply containing "Unanswerable"
(case-sensitive) as wrong; the scorers below do the same where their script does.

* ``mllm_cl_ai2d`` (RS, AD) -- ``eval_ai2d.py``: both lower-cased; a gold answer with a space must be a
  substring of the reply; otherwise its periods are deleted and, when the reply has a space, one of
  " gold", "gold ", "gold." or "gold," must occur in it, else gold must be a substring. Quirks kept:
  "yes" is found in "eyes are open" and "yesterday"; gold "3.5" becomes "35" and misses "3.5".
* ``mllm_cl_pvqa`` (Med) -- ``eval_pvqa.py``: lower-cased gold is a substring of the lower-cased reply.
* ``mllm_cl_sci`` (Sci) -- ``eval_sci.py``: both lower-cased. AI2D, TQA, VQA and SciVerse items (told
  by the image file name's prefix before "_") need equality; MapQA items with "Which states" in the
  question get partial credit: the share of the gold's comma-separated items (not stripped, so " texas"
  keeps its space) that occur among the reply's comma-separated items; other MapQA items need the gold
  as a substring. The image name and question are not visible to a scorer, so the ``mllm-cl-domain``
  reader adds a rule tag to each Sci reference (``metadata["answers"] = [tag, answer]``, tags
  :data:`SCI_EXACT`, :data:`SCI_STATES`, :data:`SCI_CONTAINS`); an untagged reference is scored as
  the AI2D/TQA/VQA/SciVerse rule (equality).
* ``mllm_cl_finvis`` (Fin) -- ``eval_finvis.py``: spaces and periods deleted from the lower-cased
  reply, which must equal the lower-cased gold (whose spaces are kept: a gold with a space never matches).
* ``mllm_cl_ocr`` (OCR, multi-reference) -- ``eval_ocr.py`` (OCRBench): right when any accepted answer,
  lower-cased with newlines deleted, is a substring of the reply treated the same way; items of the
  category "Handwritten Mathematical Expression Recognition" instead delete spaces and newlines and keep
  case. The reader tags those items' references with :data:`OCR_HME`. The script reports OCRBench's
  summed score; its mean over items is the accuracy reported here.
* ``mllm_cl_sat`` (VP) -- ``eval_sat.py``: both lower-cased with spaces, newlines and periods deleted;
  gold must be a substring of the reply (so "13" counts for gold "3").
* ``mllm_cl_math`` (Math) -- rule-based stand-in for the GPT judge of ``eval_math.py`` (VLMEvalKit's
  MathVista evaluation, judge gpt-4o-mini). The script's deterministic part is reproduced: for a
  multiple-choice item whose reply names exactly one option letter as a separate token (after
  replacing ``.()[],:;!*#{}`` by spaces) that letter is the answer, right or wrong, and no judge is
  asked. Everything the judge would decide (free-form answers, replies naming no letter or several)
  goes to :func:`~mmcl.evaluation.official.math_answer`. Differences: the option letters considered are
  A..E (or up to the gold letter), since the choices are not part of the reference; the script's
  fallback of matching the choice texts in the reply is not available for the same reason.
* ``mllm_cl_app`` (APP) -- no local script: ``convert_result_to_submission.py`` submits
  ``reply.strip().upper()`` as the chosen option of MMT-Bench and the eval.ai server (closed 2026-02-01)
  scored it. Here that option must equal the gold letter, which comes from MMT-Bench's published answers
  (``stream.options.gui_answers``, :mod:`mmcl.streams.mmt_bench_answers`). Difference: how the server
  matched a submitted option that is not a bare letter is not public; here it scores 0.

CLiMB (Srinivasan et al. 2022, NeurIPS D&B; github.com/GLAMOR-USC/CLiMB)
-----------------------------------------------------------------------

CLiMB has no generative evaluation: it scores classification heads. The generative rules follow its
label definitions.

* ``climb_vqa`` (vqa, multi-reference) -- ``src/utils/vqa_utils.py`` and
  ``src/data/visionlanguage_datasets/vqa_dataset.py``: a label is ``normalize_word`` (``word_utils.py``)
  of an answer; the target score of a label is ``get_score`` of the number of the ten raw annotator
  answers equal to it (0, 0.3, 0.6, 0.9, then 1.0 from four on). Here the reply is normalized the same
  way and gets its label's score. Differences: CLiMB can only predict the 3129 labels of its answer
  vocabulary (majority answers seen at least nine times); a reply outside the vocabulary can score here
  when annotators gave it. Unlike the official VQA evaluation, the annotator answers are not normalized
  ("two" from an annotator does not count for "2"), as in CLiMB.
* nlvr2 -> ``yes_no``, snli-ve -> ``exact_match``, vcr -> ``option_letter`` (in
  :mod:`~mmcl.evaluation.scorers`): CLiMB's accuracy is argmax class == label. The reader turns each
  label into a text (NLVR2: "no" iff the label is the string "False", as ``nlvr2_dataset.py`` decides,
  else "yes"; SNLI-VE: the gold label word; VCR: the letter of ``answer_label``), and the scorer decides
  which class a reply names. How a free-text reply maps to a class is mmcl's rule, not CLiMB's.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from mmcl.evaluation.official import VQA_CONTRACTIONS, _references, math_answer
from mmcl.evaluation.scorers import register_scorer

RULE_TAG_PREFIX = "mmcl-rule:"
SCI_EXACT = RULE_TAG_PREFIX + "mllm-cl-sci-exact"
SCI_STATES = RULE_TAG_PREFIX + "mllm-cl-sci-which-states"
SCI_CONTAINS = RULE_TAG_PREFIX + "mllm-cl-sci-contains"
OCR_HME = RULE_TAG_PREFIX + "mllm-cl-ocr-hme"
SCI_EXACT_SUBSETS = frozenset({"AI2D", "TQA", "VQA", "SciVerse"})
OCR_HME_CATEGORY = "Handwritten Mathematical Expression Recognition"
UNANSWERABLE = "Unanswerable"


class PublishedRuleWarning(UserWarning):
    """A published scoring rule gave a score through one of its known flaws."""


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, PublishedRuleWarning, stacklevel=3)


def split_rule_tag(reference: str | Sequence[str]) -> tuple[str | None, list[str]]:
    """``(rule tag or None, the other references)`` of a reference (list) the readers may have tagged."""
    items = _references(reference)
    tags = [item for item in items if item.startswith(RULE_TAG_PREFIX)]
    return (tags[0] if tags else None), [item for item in items if not item.startswith(RULE_TAG_PREFIX)]


def sci_rule_tag(image: str, question: str) -> str:
    """The ``eval_sci.py`` rule of one MLLM-CL Sci item, from its image path and question text."""
    subset = image.replace("\\", "/").split("/")[-1].split("_")[0]
    if subset in SCI_EXACT_SUBSETS:
        return SCI_EXACT
    return SCI_STATES if "Which states" in question else SCI_CONTAINS


# --------------------------------------------------------------------------------------------------
# CoIN
# --------------------------------------------------------------------------------------------------

SQA_OPTIONS = "ABCDE"
_ONE_CHARACTER_WORD = re.compile(r"\b(\w)\b")


def coin_scienceqa_letter(reply: str) -> str | None:
    """The option letter ``eval_science_qa.py`` reads from a reply (``None`` for "FAILED")."""
    if reply in SQA_OPTIONS and len(reply) == 1:
        return reply
    if len(reply) >= 3 and reply[0] in SQA_OPTIONS and reply[1:3] == ". ":
        return reply[0]
    match = _ONE_CHARACTER_WORD.search(reply)
    return match.group(1).upper() if match else None


def coin_scienceqa(prediction: str, reference: str) -> float:
    """CoIN ``eval_science_qa.py``: the letter read from the reply equals the gold letter (A-E)."""
    letter = coin_scienceqa_letter(prediction.strip())
    return float(letter is not None and letter in SQA_OPTIONS and letter == reference.strip())


def coin_imagenet(prediction: str, reference: str) -> float:
    """CoIN ``eval_ImagetNet.py``: ``(label in reply) or (reply in label)``, case-sensitive; warns once
    when a score comes only from ``reply in label`` (an empty reply or a fragment of the label)."""
    reply = prediction.strip()
    if reference in reply:
        return 1.0
    if reply in reference:
        _warn_once(
            "coin_imagenet",
            f"coin_imagenet: reply {reply!r} scored 1 only because it occurs inside the label {reference!r} "
            "(CoIN's eval_ImagetNet.py rule; 'contains' is the stricter scorer)",
        )
        return 1.0
    return 0.0


def coin_gqa(prediction: str, reference: str) -> float:
    """CoIN ``convert_gqa_for_eval.py`` + ``eval_gqa.py``: reply without trailing periods, lower-cased, == gold."""
    return float(prediction.strip().rstrip(".").lower() == reference)


def coin_upper_match(prediction: str, reference: str) -> float:
    """CoIN ``eval_vizwiz.py`` / ``eval_vqav2.py``: ``reply.upper() == answer.upper()``."""
    return float(prediction.strip().upper() == reference.upper())


def coin_ocrvqa(prediction: str, reference: str) -> float:
    """CoIN ``eval_ocrvqa.py``: wrong if the reply contains "Unanswerable", else lower-cased equality."""
    reply = prediction.strip()
    return float(UNANSWERABLE not in reply and reply.lower() == reference.lower())


def _coin_floats(text: str) -> list[float] | None:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        return None


def coin_iou(first: Sequence[float], second: Sequence[float]) -> float:
    """``calculate_iou`` of ``eval_grounding.py``: no check of the corner order, 0 for a union <= 0."""
    x1, y1, x2, y2 = first
    u1, v1, u2, v2 = second
    intersection = max(0.0, min(x2, u2) - max(x1, u1)) * max(0.0, min(y2, v2) - max(y1, v1))
    union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - intersection
    return intersection / union if union > 0 else 0.0


def coin_grounding(prediction: str, reference: str) -> float:
    """CoIN ``eval_grounding.py``: the reply's box read after removing brackets and its first and last
    characters, IoU with the reference box > 0.5; warns once when that cut changes a coordinate."""
    unbracketed = prediction.strip().replace("[", "").replace("]", "")
    predicted = _coin_floats(unbracketed[1:-1])
    expected = _coin_floats(reference.replace("[", "").replace("]", ""))
    if predicted is None or expected is None or len(predicted) != 4 or len(expected) != 4:
        return 0.0
    uncut = _coin_floats(unbracketed)
    if uncut is not None and uncut != predicted:
        _warn_once(
            "coin_grounding",
            f"coin_grounding: reply {prediction.strip()!r} read as {predicted} (CoIN's eval_grounding.py drops "
            "the first and last characters; 'box_iou' is the stricter scorer)",
        )
    return float(coin_iou(predicted, expected) > 0.5)


# --------------------------------------------------------------------------------------------------
# MLLM-CL
# --------------------------------------------------------------------------------------------------


def mllm_cl_ai2d(prediction: str, reference: str) -> float:
    """MLLM-CL ``eval_ai2d.py`` (RS, AD): lower-cased containment with the script's word-edge variants."""
    reply = prediction.strip()
    if UNANSWERABLE in reply:
        return 0.0
    pred, gold = reply.lower(), reference.lower()
    if " " in gold:
        return float(gold in pred)
    gold = gold.replace(".", "")
    if " " in pred:
        return float(any(form in pred for form in (" " + gold, gold + " ", gold + ".", gold + ",")))
    return float(gold in pred)


def mllm_cl_pvqa(prediction: str, reference: str) -> float:
    """MLLM-CL ``eval_pvqa.py`` (Med): the lower-cased gold is a substring of the lower-cased reply."""
    reply = prediction.strip()
    return float(UNANSWERABLE not in reply and reference.lower() in reply.lower())


def mllm_cl_sci(prediction: str, reference: str | Sequence[str]) -> float:
    """MLLM-CL ``eval_sci.py`` (Sci, multi-reference for the rule tag): equality, MapQA containment, or
    partial credit for "Which states" items (see the module doc)."""
    tag, answers = split_rule_tag(reference)
    reply = prediction.strip()
    if not answers or UNANSWERABLE in reply:
        return 0.0
    pred, gold = reply.lower(), answers[0].lower()
    if tag == SCI_STATES:
        wanted, given = gold.split(","), pred.split(",")
        return sum(item in given for item in wanted) / len(wanted)
    if tag == SCI_CONTAINS:
        return float(gold in pred)
    return float(gold == pred)


def mllm_cl_finvis(prediction: str, reference: str) -> float:
    """MLLM-CL ``eval_finvis.py`` (Fin): reply lower-cased without spaces and periods == lower-cased gold."""
    reply = prediction.strip()
    if UNANSWERABLE in reply:
        return 0.0
    return float(reply.lower().replace(" ", "").replace(".", "") == reference.lower())


def mllm_cl_ocr(prediction: str, reference: str | Sequence[str]) -> float:
    """MLLM-CL ``eval_ocr.py`` (OCR, multi-reference): any accepted answer is a substring of the reply
    (lower-cased, newlines deleted; handwritten math: spaces and newlines deleted, case kept)."""
    tag, answers = split_rule_tag(reference)
    reply = prediction.strip()
    if tag == OCR_HME:
        def clean(text: str) -> str:
            return text.strip().replace(" ", "").replace("\n", "")
    else:
        def clean(text: str) -> str:
            return text.lower().strip().replace("\n", "")
    return float(any(clean(answer) in clean(reply) for answer in answers))


def _sat_text(text: str) -> str:
    return text.lower().strip().replace(" ", "").replace("\n", "").replace(".", "")


def mllm_cl_sat(prediction: str, reference: str) -> float:
    """MLLM-CL ``eval_sat.py`` (VP): gold in reply, both lower-cased without spaces, newlines, periods."""
    return float(_sat_text(reference) in _sat_text(prediction))


_VLMEVAL_SEPARATORS = str.maketrans({char: " " for char in ".()[],:;!*#{}"})
_GOLD_LETTER = re.compile(r"^\(?([A-Z])\)?\.?$")


def mllm_cl_math(prediction: str, reference: str) -> float:
    """Rule-based stand-in for the GPT judge of MLLM-CL ``eval_math.py`` (VLMEvalKit MathVista): a
    multiple-choice reply naming exactly one option letter as a token is scored on that letter (the
    script's judge-free prefetch); everything else goes to :func:`~mmcl.evaluation.official.math_answer`."""
    reply = prediction.strip()
    gold = _GOLD_LETTER.match(reference.strip())
    if gold:
        last = max("E", gold.group(1))
        letters = [chr(code) for code in range(ord("A"), ord(last) + 1)]
        tokens = set(reply.translate(_VLMEVAL_SEPARATORS).split())
        named = [letter for letter in letters if letter in tokens]
        if len(named) == 1:
            return float(named[0] == gold.group(1))
    return math_answer(reply, reference)


def mllm_cl_app(prediction: str, reference: str) -> float:
    """MLLM-CL's APP (MMT-Bench, once scored on the eval.ai server): the option submitted by
    ``convert_result_to_submission.py`` (``reply.strip().upper()``) equals the gold letter."""
    return float(prediction.strip().upper() == reference.strip().upper())


# --------------------------------------------------------------------------------------------------
# CLiMB
# --------------------------------------------------------------------------------------------------

_CLIMB_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_CLIMB_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
_CLIMB_PERIOD = re.compile(r"\.(?!\d)")
_CLIMB_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
# word_utils.py's table is the VQA one with one entry reversed: "somebody'd" -> "somebodyd".
_CLIMB_CONTRACTIONS = {**{k: v for k, v in VQA_CONTRACTIONS.items() if k != "somebodyd"}, "somebody'd": "somebodyd"}


def climb_normalize_word(text: str) -> str:
    """CLiMB's ``normalize_word`` (the VQA answer processing that names its answer labels): punctuation
    rule of ``vqaEval.py``, periods not before a digit deleted, lower-case, number words to digits,
    articles dropped, missing contraction apostrophes restored, remaining commas deleted."""
    drop_all = _CLIMB_COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _CLIMB_PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if drop_all or touches_space else " ")
    out = _CLIMB_PERIOD.sub("", out)
    words = [_CLIMB_NUMBERS.get(word, word) for word in out.lower().split()]
    words = [_CLIMB_CONTRACTIONS.get(word, word) for word in words if word not in ("a", "an", "the")]
    return " ".join(words).replace(",", "")


def climb_vqa_score(occurrences: int) -> float:
    """CLiMB ``get_score``: target score of a label given by ``occurrences`` of the ten annotators."""
    return (0.0, 0.3, 0.6, 0.9)[occurrences] if occurrences < 4 else 1.0


def climb_vqa(prediction: str, reference: str | Sequence[str]) -> float:
    """CLiMB VQAv2 score (multi-reference): ``get_score`` of the number of raw annotator answers equal
    to ``normalize_word(reply)``."""
    label = climb_normalize_word(prediction.strip())
    return climb_vqa_score(sum(answer == label for answer in _references(reference)))


register_scorer("coin_scienceqa", coin_scienceqa)
register_scorer("coin_imagenet", coin_imagenet)
register_scorer("coin_gqa", coin_gqa)
register_scorer("coin_vizwiz", coin_upper_match)
register_scorer("coin_vqav2", coin_upper_match)
register_scorer("coin_grounding", coin_grounding)
register_scorer("coin_ocrvqa", coin_ocrvqa)
register_scorer("mllm_cl_ai2d", mllm_cl_ai2d)
register_scorer("mllm_cl_pvqa", mllm_cl_pvqa)
register_scorer("mllm_cl_sci", mllm_cl_sci, multi_reference=True)
register_scorer("mllm_cl_finvis", mllm_cl_finvis)
register_scorer("mllm_cl_ocr", mllm_cl_ocr, multi_reference=True)
register_scorer("mllm_cl_sat", mllm_cl_sat)
register_scorer("mllm_cl_math", mllm_cl_math)
register_scorer("mllm_cl_app", mllm_cl_app)
register_scorer("climb_vqa", climb_vqa, multi_reference=True)
