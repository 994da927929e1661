"""The synthetic pretraining mix ``synth-pretrain``: simple shapes on plain or noisy backgrounds, asked about
colours, shapes, counts, presence, side, captions and question proposals. It is the recipe's data behind
the shipped tiny-llava weights (:mod:`mmcl.backbones.pretrain`) and, held out, the tiny backbone's
general-ability set (:mod:`mmcl.evaluation.general`).

Generation is deterministic from a seed (one ``random.Random`` per (seed, split)); question types follow
fixed weights and answers are balanced. Files: ``<root>/pretrain/{train,test}.json`` + PNG images and
``<root>/manifest.json``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image, ImageDraw

from mmcl.synthetic.draw import (
    RGB, Box, SynthExample, TaskSpec, balanced_examples, draw_shape, rng_for, with_multiple_choice, yes_no,
)  # fmt: skip
from mmcl.synthetic.files import check_sizes, write_cached, write_split

PRETRAIN_VERSION = "synth-1"  # the pretraining mix behind the shipped tiny-llava weights
PRETRAIN_TASK = "pretrain"

COLORS: dict[str, RGB] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 80, 225), "yellow": (250, 220, 20),
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "orange": (255, 140, 0),
    "purple": (140, 50, 185), "brown": (130, 75, 30),
}  # fmt: skip

SYNTH_PRETRAIN_TASK = TaskSpec(
    PRETRAIN_TASK, "Pretraining mix: colours, shapes, counts, positions, captions and question proposals",
    "exact_match", 32, ("color", "shape", "count", "exists", "side", "caption", "propose"),
)  # fmt: skip


def _scaled(box: Box) -> list[int]:
    return [int(round(v)) for v in box]


PRETRAIN_SHAPES = ["circle", "square", "triangle", "cross", "bar"]
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "bar": "bars"}
_BACKGROUNDS = ["white", "black", "gray", "blue", "green", "yellow"]
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
_SIZE_RANGES = {1: (0.3, 0.6), 2: (0.25, 0.42), 3: (0.2, 0.32), 4: (0.2, 0.32)}
_PRETRAIN_WEIGHTS = {"color": 3, "shape": 2, "count": 3, "exists": 2, "side": 2, "caption": 2, "propose": 1}


def _place(rng: random.Random, size: int, shapes: list[str], side: str | None) -> list[Box]:
    """Non-overlapping boxes (2-pixel gap) for ``shapes``; ``side`` keeps a single shape's centre in one third."""
    low, high = _SIZE_RANGES[len(shapes)]
    if side is not None:
        high = min(high, 0.45)
    while True:
        boxes: list[Box] = []
        for shape in shapes:
            for _ in range(60):
                long = rng.uniform(low, high) * size
                w, h = (long, max(3.0, 0.3 * long)) if shape == "bar" else (long, long)
                if shape == "bar" and rng.random() < 0.5:
                    w, h = h, w
                x0, y0 = rng.uniform(1, size - 2 - w), rng.uniform(1, size - 2 - h)
                if side == "left":
                    x0 = rng.uniform(1, max(1.0, 0.38 * size - w / 2))
                elif side == "right":
                    x0 = rng.uniform(min(0.62 * size - w / 2, size - 2 - w), size - 2 - w)
                box = (x0, y0, x0 + w, y0 + h)
                if all(box[2] + 2 < b[0] or b[2] + 2 < box[0] or box[3] + 2 < b[1] or b[3] + 2 < box[1] for b in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(shapes):
            return boxes
        low, high = low * 0.9, high * 0.9


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(objects: list[dict[str, Any]], background: str, noisy: bool) -> str:
    """E.g. ``"two red circles and a blue bar on a noisy white background"`` (groups left to right)."""
    groups: dict[tuple[str, str], int] = {}
    for obj in sorted(objects, key=lambda o: (o["box"][0], o["box"][1])):
        key = (obj["color"], obj["shape"])
        groups[key] = groups.get(key, 0) + 1
    parts = [
        f"{_NUMBER_WORDS[n]} {color} {_PLURALS[shape]}" if n > 1 else f"{_article(color)} {color} {shape}"
        for (color, shape), n in groups.items()
    ]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on a {'noisy ' if noisy else ''}{background} background"


def _side_of(box: Sequence[float], size: int) -> str | None:
    centre = (box[0] + box[2]) / 2
    return "left" if centre <= 0.4 * size else "right" if centre >= 0.6 * size else None


def _draw_pretrain(
    rng: random.Random, size: int, background: str, noisy: bool, objects: list[dict[str, Any]]
) -> Image.Image:
    img = Image.new("RGB", (size, size), COLORS[background])
    if noisy:
        noise = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
        img = Image.blend(img, noise, 0.2)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        draw_shape(draw, obj["shape"], tuple(obj["box"]), COLORS[obj["color"]])  # type: ignore[arg-type]
    return img


def object_index_mask(facts: dict[str, Any], size: int) -> Image.Image:
    """A greyscale ("L") image of a pretraining scene: pixel value k > 0 where object k-1 of
    ``facts["objects"]`` is drawn (later objects on top), 0 on the background."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for index, obj in enumerate(facts["objects"], start=1):
        draw_shape(draw, obj["shape"], tuple(obj["box"]), index)  # type: ignore[arg-type]
    return mask


def _propose(rng: random.Random, objects: list[dict[str, Any]], background: str, size: int) -> tuple[str, str]:
    """A question about the scene (a template kind drawn uniformly, filled with a present object) and its answer."""
    kinds: dict[str, list[tuple[str, str]]] = {"count": [("How many shapes are there?", str(len(objects)))]}
    for shape in sorted({o["shape"] for o in objects}):
        colors = {o["color"] for o in objects if o["shape"] == shape}
        if len(colors) == 1:
            kinds.setdefault("color", []).append((f"What color is the {shape}?", colors.pop()))
    asked = rng.choice([o["color"] for o in objects] + [c for c in COLORS if c != background])
    kinds["exists"] = [(f"Is there a {asked} shape?", yes_no(any(o["color"] == asked for o in objects)))]
    if len(objects) == 1:
        kinds["shape"] = [("What shape is this?", objects[0]["shape"])]
        side = _side_of(objects[0]["box"], size)
        if side is not None:
            kinds["side"] = [("Is the shape on the left or the right?", side)]
    return rng.choice(kinds[rng.choice(sorted(kinds))])


def _make_pretrain(rng: random.Random, size: int, qtype: str, target: str) -> SynthExample:
    background = rng.choice([b for b in _BACKGROUNDS if b != target])
    palette = [c for c in COLORS if c != background]
    count = int(target) if qtype == "count" else 1 if qtype in ("shape", "side") else rng.randint(1, 4)
    specs = [(rng.choice(PRETRAIN_SHAPES), rng.choice(palette)) for _ in range(count)]
    facts: dict[str, Any] = {}
    if qtype == "color":  # the asked shape occurs once; the others are other shapes
        asked = rng.choice(PRETRAIN_SHAPES)
        specs = [(asked, target)] + [(rng.choice([s for s in PRETRAIN_SHAPES if s != asked]), c) for _, c in specs[1:]]
        facts["asked_shape"] = asked
    elif qtype == "shape":
        specs = [(target, specs[0][1])]
    elif qtype == "exists":
        asked = rng.choice(palette)
        others = [c for c in palette if c != asked]
        specs = [(s, rng.choice(others)) for s, _ in specs]
        if target == "yes":
            index = rng.randrange(count)
            specs[index] = (specs[index][0], asked)
        facts["asked_color"] = asked
    elif qtype == "caption" and rng.random() < 0.5:
        specs = [specs[0]] * count
    rng.shuffle(specs)
    boxes = _place(rng, size, [s for s, _ in specs], target if qtype == "side" else None)
    objects = [{"shape": s, "color": c, "box": _scaled(b)} for (s, c), b in zip(specs, boxes)]
    noisy = rng.random() < 0.4
    facts = {"background": background, "noisy": noisy, "objects": objects, **facts}
    img = _draw_pretrain(rng, size, background, noisy, objects)
    if qtype == "color":
        return SynthExample(img, f"What color is the {facts['asked_shape']}?", target, qtype, facts)
    if qtype == "shape":
        return SynthExample(img, "What shape is this?", objects[0]["shape"], qtype, facts)
    if qtype == "count":
        return SynthExample(img, "How many shapes are there?", str(len(objects)), qtype, facts)
    if qtype == "exists":
        present = any(o["color"] == facts["asked_color"] for o in objects)
        return SynthExample(img, f"Is there a {facts['asked_color']} shape?", yes_no(present), qtype, facts)
    if qtype == "side":
        side = str(_side_of(objects[0]["box"], size))
        return SynthExample(img, "Is the shape on the left or the right?", side, qtype, facts)
    if qtype == "caption":
        return SynthExample(img, "Describe the image.", _caption(objects, background, noisy), qtype, facts)
    question, answer = _propose(rng, objects, background, size)
    facts["proposal_answer"] = answer
    return SynthExample(img, "Ask a question about this image.", question, qtype, facts)


_PRETRAIN_TARGETS: dict[str, list[str]] = {
    "color": list(COLORS), "shape": PRETRAIN_SHAPES, "count": ["1", "2", "3", "4"], "exists": ["yes", "no"],
    "side": ["left", "right"], "caption": [""], "propose": [""],
}  # fmt: skip


# Answers a multiple-choice variant draws its options from (tiny-reader's mix: ``mc_fraction``).
_MC_POOLS: dict[str, list[str]] = {"color": list(COLORS), "shape": PRETRAIN_SHAPES, "count": ["1", "2", "3", "4", "5"],
                                   "side": ["left", "right"]}  # fmt: skip


def pretrain_examples(n: int, seed: int = 0, split: str = "train", image_size: int = 48,
                      mc_fraction: float = 0.0) -> Iterator[SynthExample]:
    """``n`` examples of the ``synth-pretrain`` mix; question types and answers are balanced. A fraction
    ``mc_fraction`` of the colour, shape, count and side questions are asked as multiple choice (letters)."""
    rng = rng_for("synth-pretrain", PRETRAIN_VERSION, seed, split)
    qtypes = [qtype for qtype, weight in _PRETRAIN_WEIGHTS.items() for _ in range(weight)]
    examples = balanced_examples(rng, _make_pretrain, qtypes, _PRETRAIN_TARGETS, n, image_size)
    yield from with_multiple_choice(examples, _MC_POOLS, mc_fraction, rng_for("synth-pretrain-mc", seed, split))


def write_synth_pretrain(
    root: Path, seed: int = 0, n_train: int = 20000, n_test: int = 500, image_size: int = 48, mc_fraction: float = 0.0
) -> Path:
    """Write the ``synth-pretrain`` mix as the single task ``pretrain`` under ``root`` and return ``root``
    (files: ``root/pretrain/train.json``, ``root/pretrain/test.json``, ``root/manifest.json``). Cached."""
    check_sizes(image_size, seed=seed, n_train=n_train, n_test=n_test)
    params = {
        "generator": "synth-pretrain", "version": PRETRAIN_VERSION, "seed": seed, "n_train": n_train,
        "n_test": n_test, "image_size": image_size, "tasks": [PRETRAIN_TASK],
    }  # fmt: skip
    if mc_fraction:  # tiny-llava's mix has none and keeps its cache key
        params["mc_fraction"] = mc_fraction

    def fill(folder: Path) -> None:
        for split, n in (("train", n_train), ("test", n_test)):
            write_split(folder / PRETRAIN_TASK, PRETRAIN_TASK, split,
                        pretrain_examples(n, seed, split, image_size, mc_fraction))

    return write_cached(Path(root), params, fill)


__all__ = [
    "COLORS", "PRETRAIN_SHAPES", "PRETRAIN_TASK", "PRETRAIN_VERSION", "SYNTH_PRETRAIN_TASK", "object_index_mask",
    "pretrain_examples", "write_synth_pretrain",
]  # fmt: skip
