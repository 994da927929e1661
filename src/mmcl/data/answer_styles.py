"""Answer styles of a visual question and the rule-based conversion between them (used by SEFE's
answer-style diversification, :mod:`mmcl.methods.asd`, and by the superficial-forgetting probes,
:mod:`mmcl.evaluation.superficial`).

A sample is parsed into its question stem, its content answer (the option text for multiple choice)
and its style; :func:`rewrite` asks the same question in another style with the same content:

* ``yesno``: "Is the answer X?" with X the true answer or a distractor (answer ``yes``/``no``);
* ``mc``: four options (the true answer and three distractors, shuffled); the answer is the letter;
* ``short``: the bare question with "Answer the question using a single word or phrase.";
* ``brief``: the answer in a sentence with a short explanation (about 20 words);
* ``detailed``: the answer with a longer explanation (about 50 words).

Explanations are templates filled with the sample's scene facts (``metadata["facts"]`` of the
synthetic generators), padded with generic sentences otherwise.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from mmcl.data.sample import Sample

STYLES = ("yesno", "mc", "short", "brief", "detailed")
LETTERS = "ABCD"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
YESNO_INSTRUCTION = "Please answer yes or no."
BRIEF_INSTRUCTION = "Answer the question and explain briefly in one sentence."
DETAILED_INSTRUCTION = "Answer the question and explain your reasoning in detail."
BRIEF_WORDS, DETAILED_WORDS = 20, 50

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$")
_GENERIC = [
    "I looked at the whole image and compared what it shows with the question.",
    "The relevant part of the picture is clear enough to decide.",
    "Other possible answers do not match what is visible.",
    "Every visual detail that matters for this question was checked before answering.",
    "Nothing else in the image changes this conclusion.",
    "This reading follows directly from the visual evidence in the picture.",
]


# -- parsing the original sample -------------------------------------------------------------
@dataclass(frozen=True)
class Parsed:
    """A sample reduced to its question stem, its content answer and its original style."""

    stem: str  # the prompt without options or answer-format instructions (keeps <image>)
    content: str  # the answer as words (the option text for multiple choice)
    style: str  # yesno | mc | short
    options: tuple[str, ...] = ()  # the original options (multiple choice only)


def parse(sample: Sample) -> Parsed:
    """Find the stem, the content answer and the style of ``sample`` (multiple choice parsed from the prompt)."""
    lines = sample.prompt.split("\n")
    options: list[tuple[str, str]] = []
    stem: list[str] = []
    for line in lines:
        match = _OPTION_LINE.match(line)
        if match and len(match.group(1)) == 1:
            options.append((match.group(1), match.group(2)))
        elif "option's letter" in line or line.strip().lower().startswith("answer with the option"):
            continue
        else:
            stem.append(line)
    answer = sample.answer.strip()
    letter = answer.rstrip(".").strip()
    by_letter = dict(options)
    if len(options) >= 2 and letter in by_letter:
        return Parsed("\n".join(stem).rstrip(), by_letter[letter], "mc", tuple(text for _, text in options))
    style = "yesno" if answer.lower() in ("yes", "no") else "short"
    return Parsed(sample.prompt.rstrip(), answer, style)


def question_group(sample: Sample) -> str:
    return str(sample.metadata.get("qtype", ""))


def answer_vocabulary(samples: Sequence[Sample]) -> dict[str, list[str]]:
    """Content answers of ``samples`` per question type (``""`` when the metadata has none), sorted."""
    vocabulary: dict[str, set[str]] = {}
    for sample in samples:
        parsed = parse(sample)
        words = vocabulary.setdefault(question_group(sample), set())
        words.add(parsed.content)
        words.update(parsed.options)
    return {group: sorted(words) for group, words in vocabulary.items()}


# -- explanations ------------------------------------------------------------------------------
def _plural(count: Any, word: str, plural: str | None = None) -> str:
    return f"{count} {word if str(count) == '1' else (plural or word + 's')}"


def fact_sentences(facts: Mapping[str, Any]) -> list[str]:
    """Sentences describing a synthetic scene from its recorded facts (unknown keys are skipped)."""
    out: list[str] = []
    if "buildings" in facts:
        out.append(f"The aerial image shows {_plural(facts['buildings'], 'building')} on the ground.")
    if "river" in facts:
        if facts["river"]:
            orientation = facts.get("river_orientation")
            out.append(f"A blue river runs {orientation + 'ly ' if orientation else ''}across the map.")
        else:
            out.append("No blue river crosses the map.")
    if "lesion" in facts:
        if facts["lesion"]:
            out.append(f"A bright white lesion appears on the {facts.get('side') or 'one'} side of the scan.")
        else:
            out.append("The scan shows no bright lesion, only gray tissue.")
    if "light" in facts:
        where = f" on the {facts['light_side']} side of the road" if facts.get("light_side") else ""
        out.append(f"The traffic light{where} shows its {facts['light']} lamp lit.")
    if "cars" in facts:
        colors = facts.get("car_colors") or []
        tail = f", colored {', '.join(map(str, colors))}" if colors else ""
        out.append(f"There {'is' if str(facts['cars']) == '1' else 'are'} {_plural(facts['cars'], 'car')} on the road{tail}.")
    if "shape" in facts and "fill" in facts:
        out.append(f"The diagram shows one {facts['fill']} {facts['shape']} with a black outline.")
    if "background" in facts:
        out.append(f"The page is drawn with a {facts['background']} style background.")
    if "bars" in facts:
        color = f" {facts['bar_color']}" if facts.get("bar_color") else ""
        out.append(f"The chart has {_plural(facts['bars'], color.strip() + ' bar' if color else 'bar')}.")
    if "last_taller" in facts:
        out.append(f"The last bar is {'taller' if facts['last_taller'] else 'shorter'} than the first bar.")
    return out


def _explanation(content: str, facts: Mapping[str, Any], words: int, detailed: bool) -> str:
    """``The answer is <content>.`` followed by scene facts and generic sentences up to about ``words`` words."""
    sentences = [f"The answer is {content}."]
    facts_first = sorted(fact_sentences(facts), key=lambda s: f" {content.lower()} " not in f" {s.lower()} ")
    pool = [*facts_first, *_GENERIC]
    count = len(sentences[0].split())
    for sentence in pool:
        if count >= words - 4:
            break
        sentences.append(sentence)
        count += len(sentence.split())
    if detailed:
        sentences.append(f"So the answer is {content}.")
    return " ".join(sentences)


# -- rewriting ---------------------------------------------------------------------------------
def fitting_styles(parsed: Parsed, distractors: Sequence[str]) -> list[str]:
    """Styles a sample can be rewritten into (never its own style)."""
    styles = []
    for style in STYLES:
        if style == parsed.style:
            continue
        if style == "yesno" and (not distractors or parsed.style == "yesno"):
            continue
        if style == "mc" and len(distractors) < 3:
            continue
        if style == "short" and parsed.style != "mc":
            continue
        styles.append(style)
    return styles


def rewrite(sample: Sample, style: str, parsed: Parsed, distractors: Sequence[str], rng: random.Random) -> Sample:
    """``sample`` asked and answered in ``style``; the content answer stays the true one."""
    stem, content = parsed.stem, parsed.content
    facts = sample.metadata.get("facts") or {}
    if style == "yesno":
        truth = not distractors or rng.random() < 0.5  # no other answer to ask about: ask about the true one
        asked = content if truth else rng.choice(list(distractors))
        prompt, answer = f"{stem}\nIs the answer {asked}? {YESNO_INSTRUCTION}", "yes" if truth else "no"
    elif style == "mc":
        options = [content, *rng.sample(list(distractors), 3)]
        rng.shuffle(options)
        lines = [f"{letter}. {option}" for letter, option in zip(LETTERS, options)]
        prompt, answer = "\n".join([stem, *lines, MC_INSTRUCTION]), LETTERS[options.index(content)]
    elif style == "short":
        prompt, answer = f"{stem}\n{SHORT_INSTRUCTION}", content
    elif style == "brief":
        prompt, answer = f"{stem}\n{BRIEF_INSTRUCTION}", _explanation(content, facts, BRIEF_WORDS, False)
    elif style == "detailed":
        prompt, answer = f"{stem}\n{DETAILED_INSTRUCTION}", _explanation(content, facts, DETAILED_WORDS, True)
    else:
        raise ValueError(f"unknown ASD style {style!r}")
    metadata = {**sample.metadata, "asd_style": style, "asd_content": content}
    return replace(sample, prompt=prompt, answer=answer, metadata=metadata)
