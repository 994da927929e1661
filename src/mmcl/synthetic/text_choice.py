"""Text-only multiple-choice questions for the ``tiny-reader`` pretraining recipe: they teach the language
model to answer with the letter of the option that holds its answer (multiple-choice symbol binding,
Robinson & Wingate, ICLR 2023), which a small model does not pick up from image questions alone.

Four kinds, every one in the shared prompt of :func:`~mmcl.synthetic.draw.multiple_choice` (four options,
the answer's letter balanced over A-D):

- ``text-match``: "Which option is cat?" (the answer is written in the question);
- ``text-plus``: "What is 3 plus 4?" over one-digit numbers;
- ``text-larger``: "Which is larger, 12 or 5?" over 0-19, both numbers among the options;
- ``text-next``: "Which letter comes after c?".

No image at all; deterministic from the seed."""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Iterator

from mmcl.synthetic.draw import OptionArranger, SynthExample, TaskSpec, multiple_choice, rng_for
from mmcl.synthetic.files import write_task_stream
from mmcl.utils import ShuffledCycle

GENERATOR_VERSION = 2  # 2: letters balanced by draw.OptionArranger
TEXT_CHOICE_TASK = TaskSpec("text-choice", "Text-only multiple choice: answer with the option's letter",
                            "exact_match", 4, ("text-match", "text-plus", "text-larger", "text-next"))
MATCH_WORDS = (
    "red blue green yellow orange purple black white circle square triangle cross left right top bottom cat dog "
    "sun tree house river apple bread chair water light stone cloud music paper table"
).split() + [str(number) for number in range(20)] + list(string.ascii_lowercase)


def _question(rng: random.Random, kind: str) -> tuple[str, str, list[str]]:
    """The question, its answer and three distractors."""
    if kind == "text-match":
        answer, *others = rng.sample(MATCH_WORDS, 4)
        return f"Which option is {answer}?", answer, others
    if kind == "text-plus":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        others = rng.sample([str(value) for value in range(19) if value != a + b], 3)
        return f"What is {a} plus {b}?", str(a + b), others
    if kind == "text-larger":
        a, b = rng.sample(range(20), 2)
        others = [str(min(a, b)), *rng.sample([str(value) for value in range(20) if value not in (a, b)], 2)]
        return f"Which is larger, {a} or {b}?", str(max(a, b)), others
    position = rng.randrange(25)
    answer = string.ascii_lowercase[position + 1]
    others = rng.sample([letter for letter in string.ascii_lowercase if letter != answer], 3)
    return f"Which letter comes after {string.ascii_lowercase[position]}?", answer, others


def text_choice_examples(task: str, n: int, seed: int, split: str, image_size: int = 0) -> Iterator[SynthExample]:
    """``n`` text-only multiple-choice examples; kinds and answer letters in shuffled passes."""
    rng = rng_for("text-choice", GENERATOR_VERSION, seed, split)
    kinds = ShuffledCycle(rng, TEXT_CHOICE_TASK.question_types)
    arrange = OptionArranger(rng, fixed=False)
    for _ in range(n):
        kind = kinds.next()
        question, answer, others = _question(rng, kind)
        options, letter = arrange(answer, others)
        facts = {"options": options, "target": answer}
        yield SynthExample(None, multiple_choice(question, options), letter, kind, facts)


def write_text_choice(root: Path, seed: int = 0, n_train: int = 20000, n_test: int = 400) -> Path:
    """Write the task under ``root`` (``text-choice/train.json``, ``test.json``, ``manifest.json``). Cached."""
    return write_task_stream(root, "text-choice", GENERATOR_VERSION, [TEXT_CHOICE_TASK], text_choice_examples,
                             seed, n_train, n_test, image_size=24)  # no images; 24 passes check_sizes


__all__ = ["TEXT_CHOICE_TASK", "text_choice_examples", "write_text_choice"]
