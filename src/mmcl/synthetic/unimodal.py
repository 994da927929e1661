"""The ``synth-unimodal`` tasks: one language-only and one vision-only task, for CLiMB's unimodal low-shot
transfer (Srinivasan et al., NeurIPS 2022 D&B: after upstream vision-language continual learning, how well
does the model still learn language-only and vision-only tasks from a few examples).

CLiMB uses real benchmarks (IMDb, SST-2, HellaSwag, CommonsenseQA, PIQA; ImageNet, iNaturalist, Places365)
with classification heads. These two stand-ins run on the default CPU machine and are answered
generatively:

- ``text-arith`` (no image at all): small-number arithmetic and comparison written in words and digits,
  "What is 3 plus 4?" -> "7", "Which is larger, 6 or 2?" -> "6", "Is 9 even or odd?" -> "odd".
- ``image-shapes`` (image classification): one shape of a random colour, size and place on a plain
  background, always asked "What shape is this?"; the answer (circle, square, triangle, cross) depends on
  the image alone.

Train and test draw from the same distribution with their own seeds.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

from mmcl.synthetic.draw import SynthExample, TaskSpec, draw_shape, rng_for
from mmcl.synthetic.files import write_task_stream

GENERATOR_VERSION = 1
SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_QUESTION = "What shape is this?"
UNIMODAL_TASKS = (
    TaskSpec("text-arith", "Language only: small arithmetic and comparisons, no image", "exact_match", 4),
    TaskSpec("image-shapes", "Vision only: name the one shape drawn", "exact_match", 4),
)


def arithmetic_example(rng: random.Random) -> SynthExample:
    """One language-only question with a one-word answer."""
    kind = rng.choice(("plus", "larger", "parity"))
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if kind == "plus":
        question, answer = f"What is {a} plus {b}?", str(a + b)
    elif kind == "larger":
        while b == a:
            b = rng.randint(0, 9)
        question, answer = f"Which is larger, {a} or {b}?", str(max(a, b))
    else:
        question, answer = f"Is {a} even or odd?", "even" if a % 2 == 0 else "odd"
    return SynthExample(image=None, question=question, answer=answer, qtype=kind, facts={"a": a, "b": b})


def shape_example(rng: random.Random, image_size: int, shape: str) -> SynthExample:
    """One shape on a plain background; the question is the same for every image."""
    background = tuple(rng.randint(200, 255) for _ in range(3))
    fill = tuple(rng.randint(0, 150) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    side = rng.uniform(0.35, 0.7) * image_size
    x0, y0 = rng.uniform(0, image_size - side), rng.uniform(0, image_size - side)
    draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + side, y0 + side), fill)
    return SynthExample(image=image, question=SHAPE_QUESTION, answer=shape, qtype="shape", facts={"shape": shape})


def unimodal_examples(task: str, n: int, seed: int, split: str, image_size: int) -> Iterator[SynthExample]:
    rng = rng_for("synth-unimodal", GENERATOR_VERSION, seed, task, split)
    for index in range(n):
        if task == "text-arith":
            yield arithmetic_example(rng)
        else:
            yield shape_example(rng, image_size, SHAPES[index % len(SHAPES)])


def write_synth_unimodal(root: Path, seed: int = 0, train_per_task: int = 64, test_per_task: int = 100,
                         image_size: int = 48) -> Path:
    """Write both tasks under ``root`` (``<task>/train.json``, ``<task>/test.json``, ``manifest.json``). Cached."""
    return write_task_stream(root, "synth-unimodal", GENERATOR_VERSION, UNIMODAL_TASKS, unimodal_examples, seed,
                             train_per_task, test_per_task, image_size)
