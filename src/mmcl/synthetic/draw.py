"""Drawing and sampling primitives shared by the synthetic generators (the ``synth-domain`` stream,
:mod:`mmcl.streams.synth`, ``synth-ability``, and the pretraining and reading mixes), including the one
multiple-choice prompt format they all use."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from PIL import Image, ImageDraw

from mmcl.data.answer_styles import LETTERS, MC_INSTRUCTION
from mmcl.utils import ShuffledCycle

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class TaskSpec:
    """A generated task: its name, a one-line description, its scorer and its generation budget."""

    name: str
    description: str
    scorer: str
    max_new_tokens: int = 4
    question_types: tuple[str, ...] = ()


@dataclass
class SynthExample:
    """One drawn image (``None`` for a text-only example) with one question about it (``question`` has no
    ``<image>`` placeholder)."""

    image: Image.Image | None
    question: str
    answer: str
    qtype: str
    facts: dict[str, Any]


def rng_for(*parts: object) -> random.Random:
    """A ``random.Random`` seeded from the SHA-256 of ``parts`` joined by ``/`` (never the global RNG)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def yes_no(flag: bool) -> str:
    """``"yes"`` or ``"no"``."""
    return "yes" if flag else "no"


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: Box, fill: RGB, outline: RGB | None = None, width: int = 0
) -> None:
    """Draw circle, square, bar (rectangle), triangle or cross (plus sign) inside ``box``."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape in ("square", "bar"):
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline, width=width)
    elif shape == "cross":
        a, b = x0 + (x1 - x0) / 3, x0 + 2 * (x1 - x0) / 3
        c, d = y0 + (y1 - y0) / 3, y0 + 2 * (y1 - y0) / 3
        points = [(a, y0), (b, y0), (b, c), (x1, c), (x1, d), (b, d), (b, y1), (a, y1), (a, d), (x0, d), (x0, c)]
        draw.polygon([*points, (a, c)], fill=fill, outline=outline, width=width)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def balanced_examples(
    rng: random.Random,
    make: Callable[[random.Random, int, str, Any], SynthExample],
    qtypes: Sequence[str],
    targets: Mapping[str, Sequence[Any]],
    n: int,
    image_size: int,
) -> Iterator[SynthExample]:
    """``n`` examples ``make(rng, image_size, qtype, target)``: question types in shuffled passes over
    ``qtypes`` (a type listed twice is drawn twice as often), each type's target in shuffled passes over
    ``targets[qtype]``, all from ``rng``."""
    qtype_cycle = ShuffledCycle(rng, qtypes)
    target_cycles = {qtype: ShuffledCycle(rng, values) for qtype, values in targets.items()}
    for _ in range(n):
        qtype = qtype_cycle.next()
        yield make(rng, image_size, qtype, target_cycles[qtype].next())


def multiple_choice(question: str, options: Sequence[str]) -> str:
    """The prompt of a multiple-choice question: the question, one ``A. option`` line each, the instruction."""
    return "\n".join([question, *(f"{letter}. {option}" for letter, option in zip(LETTERS, options)), MC_INSTRUCTION])


class OptionArranger:
    """Puts the correct option at the next position of a shuffled cycle per option count (so answer
    letters are balanced) among shuffled distractors, or every option in a canonical ``order`` (``fixed``)."""

    def __init__(self, rng: random.Random, fixed: bool) -> None:
        self._rng, self._fixed = rng, fixed
        self._positions: dict[int, ShuffledCycle] = {}

    def __call__(self, correct: str, distractors: Sequence[str],
                 order: Callable[[str], Any] = str) -> tuple[list[str], str]:
        """The options and the correct one's letter."""
        if self._fixed:
            options = sorted([correct, *distractors], key=order)
        else:
            count = len(distractors) + 1
            position = self._positions.setdefault(count, ShuffledCycle(self._rng, range(count))).next()
            options = self._rng.sample(list(distractors), len(distractors))
            options.insert(position, correct)
        return options, LETTERS[options.index(correct)]


def with_multiple_choice(
    examples: Iterable[SynthExample], pools: Mapping[str, Sequence[str]], fraction: float, rng: random.Random
) -> Iterator[SynthExample]:
    """``examples`` with a ``fraction`` of those whose question type has a pool of answers turned into multiple
    choice: the answer and up to three other answers of the pool in random order, the answer a letter, the
    question type suffixed ``-mc`` (the options are in the facts). ``rng`` draws nothing else, so the
    examples themselves stay those of the plain mix."""
    for example in examples:
        pool = pools.get(example.qtype)
        if pool is None or fraction <= 0 or rng.random() >= fraction:
            yield example
            continue
        others = [value for value in pool if value != example.answer]
        options = rng.sample(others, min(len(LETTERS) - 1, len(others)))
        options.insert(rng.randrange(len(options) + 1), example.answer)
        yield SynthExample(example.image, multiple_choice(example.question, options),
                           LETTERS[options.index(example.answer)], f"{example.qtype}-mc",
                           {**example.facts, "options": options})  # fmt: skip


__all__ = [
    "RGB", "Box", "OptionArranger", "SynthExample", "TaskSpec", "balanced_examples", "draw_shape", "multiple_choice",
    "rng_for", "with_multiple_choice", "yes_no",
]  # fmt: skip
