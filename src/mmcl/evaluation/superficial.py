"""Superficial vs essential forgetting (SEFE, Chen et al., ICML 2025): does a model that fails an
old task still know the answer and only answer in the wrong format (superficial), or has it lost
the knowledge (essential)?

Every prediction is judged twice, for its **format** (does it have the form the question asks
for) and its **content** (is the intended answer right, whatever the form), on two question sets:

* the task's own test questions (the ordinary predictions of the accuracy matrix), and
* a *probe*: the same questions asked in another answer style (:mod:`mmcl.data.answer_styles`):
  an open question as 4-option multiple choice (yes/no when fewer than three distractors exist),
  a multiple-choice question as an open short-answer question, a yes/no question as an open
  question answered with a brief explanation. Distractors come from the task's own answers.

Format rules: ``mc`` an option letter first (``B``, ``(B)``, ``B. text``); ``short`` one to five
words, not a bare option letter, of the kind of the expected answer (a number for a number, a
word that is not yes/no for a word); ``yesno`` starts with yes or no; ``brief``/``detailed``
a sentence of at least six words. Content rules: ``mc`` the right letter, or the right option text
anywhere; yes/no questions the first yes/no word; numbers compared numerically; other answers the
content words anywhere in the prediction; a bare option letter answered to an open question counts
when it names the right option of the original question.

Summary (from the judged files alone). Both parts of the split are measured by the one lenient
judge above, on one scale: an answer is *right* when its format and its content are both ok, and
*knows* when its content is ok in any format. With the diagonal (right after learning a task) vs the
final stage, over the tasks before the last: total forgetting = mean(right_jj - right_Tj), essential
= mean(knows_jj - knows_Tj), superficial = total - essential (the growth of answers whose content
survived in the wrong format: an observed lower bound, since the content of an answer in the wrong
form often cannot be read). The task's own scorer is not used for the split: it cannot read the
content of an answer in another form (an option-letter scorer given a sentence) and soft scores
(VQA accuracy, ANLS) are on another scale than a yes/no content judgement; the matrix's accuracy on
the same tasks is reported beside the split. Also reported: the format drift (share of answers in
the asked form lost) and the share right among the answers in the asked form (right / format),
right after learning and at the end.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

from mmcl.data.answer_styles import LETTERS, Parsed, answer_vocabulary, parse, question_group, rewrite
from mmcl.data.sample import Sample
from mmcl.evaluation.scorers import contains, extract_option_letter, parse_first_number, yes_no
from mmcl.utils import atomic_write_text

PROBE_TOKENS = {"mc": 4, "yesno": 4, "short": 8, "brief": 48, "detailed": 96}
_BARE_LETTER = re.compile(r"^\(?([A-Z])\)?[.:)]?$")
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[.:)]|\s|$)")
_YES_NO_FIRST = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
MIN_SENTENCE_WORDS = 6
RATES = ("format", "content", "right", "probe_format", "probe_content")
MAX_SHORT_WORDS = 5


def probe_style(parsed: Parsed, distractors: Sequence[str]) -> str:
    """The style a question is re-asked in: open -> mc (or yesno), mc -> short, yes/no -> brief."""
    if parsed.style == "mc":
        return "short"
    if parsed.style == "yesno":
        return "brief"
    return "mc" if len(distractors) >= 3 else "yesno"


def make_probes(samples: Sequence[Sample], task_name: str) -> list[Sample]:
    """Each sample re-asked in its probe style (deterministic per task and sample id); metadata
    ``probe`` holds what judging needs: style, content, original style and original options."""
    vocabulary = answer_vocabulary(samples)
    probes = []
    for sample in samples:
        parsed = parse(sample)
        words = vocabulary.get(question_group(sample), [])
        distractors = sorted({w for w in [*words, *parsed.options] if w.strip().lower() != parsed.content.lower()})
        style = probe_style(parsed, distractors)
        rng = random.Random(f"probe/{task_name}/{sample.id}")
        probe = rewrite(sample, style, parsed, distractors, rng)
        options = dict(zip(LETTERS, parse(probe).options)) if style == "mc" else {}
        info = {"style": style, "content": parsed.content, "answer": probe.answer, "options": options,
                "original_style": parsed.style, "original_options": dict(zip(LETTERS, parsed.options))}  # fmt: skip
        probes.append(Sample(probe.id, probe.task, probe.images, probe.prompt, probe.answer, (), {"probe": info}))
    return probes


def answer_kind(text: str) -> str:
    """``number``, ``yesno`` or ``word``: the kind of a short answer."""
    text = text.strip().lower().rstrip(".")
    if text in ("yes", "no"):
        return "yesno"
    return "number" if re.fullmatch(r"-?[\d.,]+", text) and parse_first_number(text) is not None else "word"


def format_ok(prediction: str, style: str, letters: Sequence[str] = LETTERS, content: str = "") -> bool:
    """Whether ``prediction`` has the form ``style`` asks for (rules in the module docstring)."""
    text = prediction.strip()
    if style == "mc":
        match = _LEADING_LETTER.match(text)
        return match is not None and match.group(1) in letters
    if style == "yesno":
        return _YES_NO_FIRST.match(text) is not None
    if style == "short":
        short = 1 <= len(text.split()) <= MAX_SHORT_WORDS and _BARE_LETTER.match(text) is None
        return short and (not content or answer_kind(text) == answer_kind(content))
    return len(text.split()) >= MIN_SENTENCE_WORDS


def content_ok(prediction: str, style: str, content: str, answer: str, options: dict[str, str],
               original_options: dict[str, str]) -> bool:  # fmt: skip
    """Whether ``prediction`` carries the right content ``content`` (rules in the module docstring).
    ``answer`` is the expected answer in ``style`` (the letter for mc, yes/no for yes/no questions)."""
    text = prediction.strip()
    if style == "mc":
        letter = extract_option_letter(text) if _LEADING_LETTER.match(text) else None
        if letter is not None and letter in options:
            return letter == answer
        return _mentions(text, content)
    if style == "yesno" or content.lower() in ("yes", "no"):
        expected = answer if style == "yesno" else content
        return yes_no(text, expected) == 1.0
    bare = _BARE_LETTER.match(text)
    if bare and original_options:
        return original_options.get(bare.group(1), "").lower() == content.lower()
    return _mentions(text, content)


def _mentions(text: str, content: str) -> bool:
    if answer_kind(content) == "number":
        return parse_first_number(text) == parse_first_number(content)
    return contains(text, content) == 1.0


def judge(prediction: str, info: dict[str, Any]) -> tuple[bool, bool]:
    """(format ok, content ok) of ``prediction`` for a question described by ``info``."""
    style = info["style"]
    letters = list(info.get("options") or {}) or LETTERS
    fmt = format_ok(prediction, style, letters, info["content"])
    right = content_ok(prediction, style, info["content"], info["answer"], info.get("options") or {},
                       info.get("original_options") or {})  # fmt: skip
    return fmt, right


def original_info(sample: Sample) -> dict[str, Any]:
    """``info`` for judging a prediction to the sample's own question."""
    parsed = parse(sample)
    options = dict(zip(LETTERS, parsed.options))
    return {"style": parsed.style, "content": parsed.content, "answer": sample.answer.strip(), "options": options,
            "original_options": options}  # fmt: skip


def probe_tokens(probes: Sequence[Sample]) -> int:
    """Generation budget for a list of probes: enough for the longest style among them."""
    return max((PROBE_TOKENS[probe.metadata["probe"]["style"]] for probe in probes), default=1)


def write_judged(
    out_file: Path,
    samples: Sequence[Sample],
    probes: Sequence[Sample],
    original_predictions: dict[str, str],
    probe_predictions: Sequence[str],
) -> None:
    """One JSONL record per test sample: what judging needs about its own question and its probe, and
    both answers; the judgements are recomputed from this file alone (:func:`judged_rates`)."""
    lines = []
    for sample, probe, probe_answer in zip(samples, probes, probe_predictions):
        record = {
            "id": sample.id, "own": original_info(sample), "prediction": original_predictions.get(sample.id, ""),
            "probe": probe.metadata["probe"], "probe_prediction": probe_answer,
        }  # fmt: skip
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(out_file, "\n".join(lines) + ("\n" if lines else ""))


def judged_rates(path: Path) -> dict[str, float]:
    """Percentages of a judged file: format, content, right (format and content) of the answers to the
    own questions, and probe_format, probe_content of the probe answers."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    counts = dict.fromkeys(RATES, 0)
    for record in records:
        own_format, own_content = judge(record["prediction"], record["own"])
        probe_format, probe_content = judge(record["probe_prediction"], record["probe"])
        judged = (own_format, own_content, own_format and own_content, probe_format, probe_content)
        for key, value in zip(RATES, judged):
            counts[key] += value
    return {key: 100.0 * value / len(records) if records else 0.0 for key, value in counts.items()}


def summarize(matrix: list[list[float | None]], rates: list[list[dict[str, float] | None]]) -> dict[str, Any] | None:
    """Diagonal vs final-stage means over the tasks before the last (rows 1..T of ``matrix``/``rates``,
    row 0 the base model) and the split of forgetting into essential and superficial parts."""
    stages = len(matrix) - 1
    old = [j for j in range(stages - 1) if rates[j + 1][j] is not None and rates[stages][j] is not None]
    if stages < 2 or not old or any(matrix[j + 1][j] is None or matrix[stages][j] is None for j in old):
        return None

    def mean(values: list[float]) -> float:
        return round(sum(values) / len(values), 4)

    out: dict[str, Any] = {"tasks": old}
    for when, row_of in (("after_learning", lambda j: j + 1), ("final", lambda j: stages)):
        entry = {"accuracy": mean([matrix[row_of(j)][j] for j in old])}
        for key in RATES:
            entry[key] = mean([rates[row_of(j)][j][key] for j in old])
        out[when] = entry
    total = out["after_learning"]["right"] - out["final"]["right"]
    essential = out["after_learning"]["content"] - out["final"]["content"]
    out["forgetting"] = {"total": round(total, 4), "essential": round(essential, 4), "superficial": round(total - essential, 4)}
    for entry in (out["after_learning"], out["final"]):
        entry["right_given_format"] = round(100.0 * entry["right"] / entry["format"], 4) if entry["format"] else None
    out["format_drift"] = round(out["after_learning"]["format"] - out["final"]["format"], 4)
    return out
