"""``asd``: Answer-Style Diversification, the data half of SEFE (Chen et al., ICML 2025, "SEFE:
Superficial and Essential Forgetting Eliminator for Multimodal Continual Instruction Tuning").

Superficial forgetting is the drift of a model's answers to the answer style of the latest task.
ASD counters it by rewriting a share X% (default 20) of every task's training samples into other
answer styles, so that no task teaches a single style:

* ``yesno``: "Is the answer X?" with X the true answer half of the time and one distractor otherwise
  (answer ``yes``/``no`` accordingly);
* ``mc``: four options (the true answer and three distractors, shuffled); the answer is the letter;
* ``short``: the bare question with "Answer the question using a single word or phrase.";
* ``brief``: the answer in a sentence with a short explanation (about 20 words);
* ``detailed``: the answer with a longer explanation (about 50 words).

The rewritten samples are split evenly over the styles that fit each sample: never the style the
sample already has, ``mc`` only when three distractors exist, ``short`` only for multiple-choice
originals (for other originals it would repeat the original). The SEFE authors rewrite with an LLM;
this converter is rule based and needs none: distractors come from the task's own answer
vocabulary (answers of samples of the same ``qtype`` when the metadata records one), explanations
from templates filled with the sample's scene facts (``metadata["facts"]`` of the synthetic
generators) or generic sentences otherwise. Pre-generated ASD files in LLaVA JSON format (as the
authors publish them for CoIN) replace the rewrite per task through ``asd_files``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from mmcl.benchmarks.stream import Task
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError
from mmcl.methods.base import register_method
from mmcl.methods.seq_lora import SequentialLora

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


def _group(sample: Sample) -> str:
    return str(sample.metadata.get("qtype", ""))


def answer_vocabulary(samples: Sequence[Sample]) -> dict[str, list[str]]:
    """Content answers of ``samples`` per question type (``""`` when the metadata has none), sorted."""
    vocabulary: dict[str, set[str]] = {}
    for sample in samples:
        parsed = parse(sample)
        words = vocabulary.setdefault(_group(sample), set())
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
        truth = rng.random() < 0.5
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


def diversify(
    samples: Sequence[Sample],
    share: float = 0.2,
    seed: int | str = 0,
    vocabulary: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
) -> list[Sample]:
    """Rewrite ``round(share * len(samples))`` samples (chosen deterministically from ``seed``) into
    other answer styles, evenly over the styles that fit; the others are returned unchanged, in order.

    ``vocabulary``: distractor candidates, either one list for all samples or a mapping from question
    type (``metadata["qtype"]``, ``""`` when absent) to a list; default: the content answers of
    ``samples`` per question type. A sample with no fitting style is left as it is."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"ASD share must be in [0, 1], got {share}")
    samples = list(samples)
    if vocabulary is None:
        vocabulary = answer_vocabulary(samples)
    rng = random.Random(f"asd/{seed}/{len(samples)}")
    chosen = sorted(rng.sample(range(len(samples)), round(share * len(samples))))
    counts = dict.fromkeys(STYLES, 0)
    out = list(samples)
    for index in chosen:
        sample = samples[index]
        parsed = parse(sample)
        words = vocabulary if not isinstance(vocabulary, Mapping) else vocabulary.get(_group(sample), [])
        distractors = sorted({w for w in [*words, *parsed.options] if w.strip().lower() != parsed.content.lower()})
        styles = fitting_styles(parsed, distractors)
        if not styles:
            continue
        style = min(styles, key=lambda s: (counts[s], rng.random()))
        counts[style] += 1
        out[index] = rewrite(sample, style, parsed, distractors, rng)
    return out


# -- the method ------------------------------------------------------------------------------------
@dataclass
class AsdConfig:
    """ASD options (default share from the paper: X = 20%)."""

    share: float = 0.2  # share of each task's training samples rewritten into other answer styles
    asd_files: dict[str, str] = field(default_factory=dict)  # task name -> pre-generated ASD LLaVA JSON

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ConfigError(f"method.options.share: expected a share in [0, 1], got {self.share}")
        for task, path in self.asd_files.items():
            if not isinstance(path, str) or not path:
                raise ConfigError(f"method.options.asd_files.{task}: expected a file path")


def asd_train_data(config: AsdConfig, seed: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
    """The training samples of ``task`` after ASD: the pre-generated file when configured, else ``diversify``."""
    path = config.asd_files.get(task.name)
    if path is not None:
        from mmcl.data.readers import read_samples

        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"method.options.asd_files.{task.name}: file not found: {file}")
        return read_samples(file, task.name)
    return diversify(samples, config.share, seed=f"{seed}/{task.name}")


@register_method
class AnswerStyleDiversification(SequentialLora):
    name = "asd"
    description = "Sequential LoRA on ASD data: a share of each task rewritten into other answer styles (SEFE)"
    config_class = AsdConfig

    def train_data(self, task_index: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
        return asd_train_data(self.config, self.seed, task, samples)
