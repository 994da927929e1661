"""Procedurally drawn vision-language data: the continual stream ``synth-domain`` and the pretraining
mix ``synth-pretrain``.

Images are drawn with PIL directly at ``image_size`` pixels (default 48: a 6x6 grid of 8-pixel patches
for a tiny CLIP tower), so every visual is bold and simple and every coordinate scales with the size.
Each question's answer is computed from the scene that was drawn, and answer values are balanced
(values are drawn in shuffled passes). Generation is deterministic from a seed: one
``random.Random`` per (stream, task, split), never the global RNG. Files are LLaVA JSON + PNG:
``<root>/<task>/{train,test}.json`` and ``<root>/<task>/images/*.png``, with ``<root>/manifest.json``
written last (the whole folder is built aside and renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image, ImageDraw

from mmcl.data.sample import IMAGE_PLACEHOLDER
from mmcl.errors import ConfigError, DataError

GENERATOR_VERSION = "synth-2"  # the synth-domain stream; part of its cache key: bump it whenever the output changes (tests/test_integrity.py pins the output)
PRETRAIN_VERSION = "synth-1"  # the pretraining mix behind the shipped tiny-llava weights
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"
PRETRAIN_TASK = "pretrain"

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]

COLORS: dict[str, RGB] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 80, 225), "yellow": (250, 220, 20),
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "orange": (255, 140, 0),
    "purple": (140, 50, 185), "brown": (130, 75, 30),
}  # fmt: skip


@dataclass(frozen=True)
class TaskSpec:
    """A generated task: its name, a one-line description, its scorer and its generation budget."""

    name: str
    description: str
    scorer: str
    max_new_tokens: int = 4
    question_types: tuple[str, ...] = ()


SYNTH_DOMAIN_TASKS: list[TaskSpec] = [
    TaskSpec("rs", "Remote sensing: count buildings and spot rivers in aerial maps", "exact_match", 4,
             ("count", "river")),
    TaskSpec("med", "Medical scan: detect a bright lesion and tell its side", "exact_match", 4, ("lesion", "side")),
    TaskSpec("ad", "Driving: read the traffic light colour and count cars on the road", "exact_match", 4,
             ("light", "count")),
    TaskSpec("sci", "Science diagram: multiple-choice shape and fill colour", "option_letter", 4, ("shape", "fill")),
    TaskSpec("fin", "Finance chart: count bars and compare the first and last bar", "exact_match", 4,
             ("count", "compare")),
]  # fmt: skip
SYNTH_PRETRAIN_TASK = TaskSpec(
    PRETRAIN_TASK, "Pretraining mix: colours, shapes, counts, positions, captions and question proposals",
    "exact_match", 32, ("color", "shape", "count", "exists", "side", "caption", "propose"),
)  # fmt: skip


@dataclass
class SynthExample:
    """One drawn image with one question about it (``question`` has no ``<image>`` placeholder)."""

    image: Image.Image
    question: str
    answer: str
    qtype: str
    facts: dict[str, Any]


class _Cycle:
    """Yields values in shuffled passes, so every value is (almost) equally frequent."""

    def __init__(self, rng: random.Random, values: Sequence[Any]) -> None:
        self._rng, self._values = rng, list(values)
        self._queue: list[Any] = []

    def next(self) -> Any:
        if not self._queue:
            self._queue = list(self._values)
            self._rng.shuffle(self._queue)
        return self._queue.pop()


def _rng_for(*parts: object) -> random.Random:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _jitter(rng: random.Random, color: RGB, amount: int) -> RGB:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in color)  # type: ignore[return-value]


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _scaled(box: Box) -> list[int]:
    return [int(round(v)) for v in box]


def _draw_shape(
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


def _multiple_choice(question: str, options: Sequence[str]) -> str:
    lines = [question, *(f"{letter}. {option}" for letter, option in zip(LETTERS, options)), MC_INSTRUCTION]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# synth-domain renderers: each returns (image, facts); the answer is read from the facts.

_FIELD = [(74, 128, 52), (98, 150, 60), (120, 158, 70), (86, 112, 48), (139, 110, 66), (160, 132, 82)]


def _render_rs(rng: random.Random, size: int, buildings: int, river: bool) -> tuple[Image.Image, dict[str, Any]]:
    """Aerial map: green/brown field patches, gray buildings on a 3x3 grid, an optional river lane."""
    img = Image.new("RGB", (size, size), _jitter(rng, rng.choice(_FIELD[:3]), 8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(4, 7)):
        x0, y0 = rng.uniform(-0.1, 0.9) * size, rng.uniform(-0.1, 0.9) * size
        w, h = rng.uniform(0.2, 0.5) * size, rng.uniform(0.2, 0.5) * size
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=_jitter(rng, rng.choice(_FIELD), 8))
    cell = size / 3
    cells = [(row, col) for row in range(3) for col in range(3)]
    orientation = None
    if river:
        orientation = rng.choice(["horizontal", "vertical"])
        lane = rng.randrange(3)
        half = rng.uniform(0.07, 0.09) * size
        a, b = ((lane + 0.5 + rng.uniform(-0.1, 0.1)) * cell for _ in range(2))
        if orientation == "horizontal":
            poly = [(0, a - half), (size, b - half), (size, b + half), (0, a + half)]
        else:
            poly = [(a - half, 0), (a + half, 0), (b + half, size), (b - half, size)]
        draw.polygon(poly, fill=_jitter(rng, (40, 95, 210), 12))
        cells = [rc for rc in cells if rc[0 if orientation == "horizontal" else 1] != lane]
    for row, col in rng.sample(cells, buildings):
        side = rng.uniform(0.17, 0.22) * size
        margin = 0.08 * cell
        x0 = col * cell + rng.uniform(margin, cell - side - margin)
        y0 = row * cell + rng.uniform(margin, cell - side - margin)
        gray = rng.randint(165, 190)
        draw.rectangle((x0, y0, x0 + side, y0 + side), fill=(gray, gray, gray), outline=(55, 55, 55))
    return img, {"buildings": buildings, "river": river, "river_orientation": orientation}


def _make_rs(rng: random.Random, size: int, qtype: str, target: str) -> SynthExample:
    count = int(target) if qtype == "count" else rng.randint(1, 4)
    river = target == "yes" if qtype == "river" else rng.random() < 0.5
    img, facts = _render_rs(rng, size, count, river)
    if qtype == "count":
        return SynthExample(img, "How many buildings are in this aerial image?", str(facts["buildings"]), qtype, facts)
    return SynthExample(img, "Is there a river in this aerial image?", _yes_no(facts["river"]), qtype, facts)


def _render_med(rng: random.Random, size: int, side: str | None) -> tuple[Image.Image, dict[str, Any]]:
    """Scan: black field, dim body outline, large gray organ with darker structures, optional white lesion."""
    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    cx, cy = (0.5 + rng.uniform(-0.03, 0.03)) * size, (0.5 + rng.uniform(-0.03, 0.03)) * size
    draw.ellipse((0.03 * size, 0.06 * size, 0.97 * size, 0.94 * size), outline=(45, 45, 45), width=max(1, size // 24))
    rx, ry = rng.uniform(0.36, 0.41) * size, rng.uniform(0.30, 0.38) * size
    gray = rng.randint(95, 125)
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(gray, gray, gray))
    for _ in range(rng.randint(2, 4)):
        ex, ey = cx + rng.uniform(-0.5, 0.5) * rx, cy + rng.uniform(-0.5, 0.5) * ry
        er, dark = rng.uniform(0.04, 0.08) * size, gray - rng.randint(30, 50)
        draw.ellipse((ex - er, ey - er, ex + er, ey + er), fill=(dark, dark, dark))
    if side is not None:
        lx = rng.uniform(0.26, 0.36) if side == "left" else rng.uniform(0.64, 0.74)
        ly, lr = rng.uniform(0.38, 0.62) * size, rng.uniform(0.08, 0.11) * size
        draw.ellipse((lx * size - lr, ly - lr, lx * size + lr, ly + lr), fill=_jitter(rng, (245, 245, 245), 8))
    return img, {"lesion": side is not None, "side": side}


def _make_med(rng: random.Random, size: int, qtype: str, target: str) -> SynthExample:
    if qtype == "lesion":
        side = rng.choice(["left", "right"]) if target == "yes" else None
        img, facts = _render_med(rng, size, side)
        return SynthExample(img, "Is there a lesion in this scan?", _yes_no(facts["lesion"]), qtype, facts)
    img, facts = _render_med(rng, size, target)
    return SynthExample(img, "On which side of the scan is the lesion?", str(facts["side"]), qtype, facts)


_LIGHTS: dict[str, RGB] = {"red": (255, 35, 35), "yellow": (255, 215, 0), "green": (40, 230, 60)}
_CARS: dict[str, RGB] = {
    "blue": (40, 80, 230), "white": (240, 240, 240), "purple": (150, 60, 190), "orange": (255, 140, 20),
    "black": (20, 20, 20), "pink": (255, 120, 200), "cyan": (40, 200, 220),
}  # fmt: skip


def _render_ad(rng: random.Random, size: int, light: str, cars: int) -> tuple[Image.Image, dict[str, Any]]:
    """Road scene: sky, grass strip, gray road with lane dashes, a traffic light, 1-3 cars in two lanes."""
    s = float(size)
    img = Image.new("RGB", (size, size), _jitter(rng, (110, 170, 235), 12))
    draw = ImageDraw.Draw(img)
    road_top = 0.56 * s
    draw.rectangle((0, 0.46 * s, s, road_top), fill=_jitter(rng, (70, 150, 60), 10))
    draw.rectangle((0, road_top, s, s), fill=_jitter(rng, (95, 95, 95), 8))
    dash_y, offset = 0.78 * s, rng.uniform(0, 0.16) * s
    for k in range(-1, 7):
        x = offset + k * 0.16 * s
        draw.rectangle((x, dash_y, x + 0.08 * s, dash_y + max(1, size // 48) - 1), fill=(235, 235, 235))
    light_side = rng.choice(["left", "right"])
    bw, bh, top = 0.17 * s, 0.44 * s, 0.04 * s
    bx = 0.04 * s if light_side == "left" else s - 0.04 * s - bw
    pole = max(2.0, 0.05 * s)
    draw.rectangle((bx + bw / 2 - pole / 2, top + bh, bx + bw / 2 + pole / 2, road_top), fill=(50, 50, 50))
    draw.rectangle((bx, top, bx + bw, top + bh), fill=(20, 20, 20))
    radius = 0.06 * s
    for index, name in enumerate(_LIGHTS):
        lx, ly = bx + bw / 2, top + bh * (2 * index + 1) / 6
        lamp = _LIGHTS[name] if name == light else (70, 70, 70)
        draw.ellipse((lx - radius, ly - radius, lx + radius, ly + radius), fill=lamp)
    slots = rng.sample([(lane, col) for lane in range(2) for col in range(3)], cars)
    colors = [rng.choice(list(_CARS)) for _ in slots]
    for (lane, col), color in sorted(zip(slots, colors)):
        x0 = (0.04 + 0.33 * col + rng.uniform(-0.03, 0.03)) * s
        w, y0, h = 0.24 * s, (0.61 if lane == 0 else 0.84) * s, 0.11 * s
        body = _CARS[color]
        draw.rectangle((x0 + 0.2 * w, y0 - 0.06 * s, x0 + 0.8 * w, y0), fill=body)
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=body)
        wheel = 0.035 * s
        for wx in (x0 + 0.22 * w, x0 + 0.78 * w):
            draw.ellipse((wx - wheel, y0 + h - wheel, wx + wheel, y0 + h + wheel), fill=(10, 10, 10))
    return img, {"light": light, "light_side": light_side, "cars": cars, "car_colors": colors}


def _make_ad(rng: random.Random, size: int, qtype: str, target: str) -> SynthExample:
    light = target if qtype == "light" else rng.choice(list(_LIGHTS))
    cars = int(target) if qtype == "count" else rng.randint(1, 3)
    img, facts = _render_ad(rng, size, light, cars)
    if qtype == "light":
        return SynthExample(img, "What color is the traffic light?", facts["light"], qtype, facts)
    return SynthExample(img, "How many cars are on the road?", str(facts["cars"]), qtype, facts)


_SCI_SHAPES = ["circle", "triangle", "square", "cross"]
_SCI_FILLS: dict[str, RGB] = {
    "red": (230, 50, 50), "blue": (50, 90, 230), "green": (40, 170, 70), "yellow": (245, 215, 30),
}  # fmt: skip


def _render_sci(rng: random.Random, size: int, shape: str, fill: str) -> tuple[Image.Image, dict[str, Any]]:
    """Diagram: white page with a light grid or a black frame, one big black-outlined filled shape."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    style = rng.choice(["grid", "border"])
    if style == "grid":
        for k in range(1, 6):
            v = k * size / 6
            draw.line((v, 0, v, size), fill=(200, 215, 245))
            draw.line((0, v, size, v), fill=(200, 215, 245))
    else:
        inset = 0.04 * size
        draw.rectangle((inset, inset, size - inset, size - inset), outline=(0, 0, 0), width=max(1, size // 48))
    side = rng.uniform(0.52, 0.68) * size
    cx = size / 2 + rng.uniform(-0.06, 0.06) * size
    cy = size / 2 + rng.uniform(-0.06, 0.06) * size
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    _draw_shape(draw, shape, box, _SCI_FILLS[fill], outline=(0, 0, 0), width=max(2, round(size / 24)))
    return img, {"shape": shape, "fill": fill, "background": style}


def _make_sci(rng: random.Random, size: int, qtype: str, value: str) -> SynthExample:
    shape = value if qtype == "shape" else rng.choice(_SCI_SHAPES)
    fill = value if qtype == "fill" else rng.choice(list(_SCI_FILLS))
    img, facts = _render_sci(rng, size, shape, fill)
    correct = facts[qtype]
    # Options keep one fixed order per question type: the tiny model learns the letter answer style
    # within a stage; shuffled options (a pointer task) stay far below 70% for it (measured: 24%).
    options = list(_SCI_SHAPES if qtype == "shape" else _SCI_FILLS)
    facts = {**facts, "options": options, "target": correct}
    question = "Which shape is shown in the diagram?" if qtype == "shape" else "What color is the shape filled with?"
    return SynthExample(img, _multiple_choice(question, options), LETTERS[options.index(correct)], qtype, facts)


_BAR_COLORS: dict[str, RGB] = {
    "blue": (40, 90, 220), "green": (40, 160, 70), "orange": (245, 130, 20), "purple": (140, 60, 180),
    "red": (210, 40, 40), "teal": (20, 150, 150),
}  # fmt: skip
_BAR_LEVELS = [20, 32, 44, 56, 68, 80, 92]  # percent of the plot height


def _render_fin(rng: random.Random, size: int, bars: int, last_taller: bool) -> tuple[Image.Image, dict[str, Any]]:
    """Bar chart: light page, black axes, faint gridlines, 3-4 bars of distinct heights in one colour."""
    s = float(size)
    img = Image.new("RGB", (size, size), _jitter(rng, rng.choice([(248, 244, 232), (236, 242, 250)]), 4))
    draw = ImageDraw.Draw(img)
    left, right, bottom, top = 0.14 * s, 0.96 * s, 0.88 * s, 0.06 * s
    for k in (1, 2, 3):
        y = bottom - k * (bottom - top) / 3.3
        draw.line((left, y, right, y), fill=(210, 210, 210))
    while True:
        levels = rng.sample(_BAR_LEVELS, bars)
        if abs(_BAR_LEVELS.index(levels[-1]) - _BAR_LEVELS.index(levels[0])) >= 2:
            break
    if (levels[-1] > levels[0]) != last_taller:
        levels[0], levels[-1] = levels[-1], levels[0]
    color = rng.choice(list(_BAR_COLORS))
    slot = (right - left - 0.03 * s) / bars
    for index, level in enumerate(levels):
        x0 = left + 0.03 * s + index * slot + 0.19 * slot
        draw.rectangle((x0, bottom - level / 100 * (bottom - top), x0 + 0.62 * slot, bottom), fill=_BAR_COLORS[color])
    width = max(2, size // 24)
    draw.line((left, top, left, bottom), fill=(0, 0, 0), width=width)
    draw.line((left - width / 2, bottom, right, bottom), fill=(0, 0, 0), width=width)
    return img, {"bars": bars, "heights": levels, "bar_color": color, "last_taller": levels[-1] > levels[0]}


def _make_fin(rng: random.Random, size: int, qtype: str, target: str) -> SynthExample:
    bars = int(target) if qtype == "count" else rng.choice([3, 4])
    last_taller = target == "yes" if qtype == "compare" else rng.random() < 0.5
    img, facts = _render_fin(rng, size, bars, last_taller)
    if qtype == "count":
        return SynthExample(img, "How many bars are in the chart?", str(facts["bars"]), qtype, facts)
    return SynthExample(img, "Is the last bar taller than the first bar?", _yes_no(facts["last_taller"]), qtype, facts)


_DOMAIN_MAKERS: dict[str, tuple[Callable[[random.Random, int, str, Any], SynthExample], dict[str, list[Any]]]] = {
    "rs": (_make_rs, {"count": ["1", "2", "3", "4"], "river": ["yes", "no"]}),
    "med": (_make_med, {"lesion": ["yes", "no"], "side": ["left", "right"]}),
    "ad": (_make_ad, {"light": list(_LIGHTS), "count": ["1", "2", "3"]}),
    "sci": (_make_sci, {
        "shape": list(_SCI_SHAPES),
        "fill": list(_SCI_FILLS),
    }),
    "fin": (_make_fin, {"count": ["3", "4"], "compare": ["yes", "no"]}),
}  # fmt: skip


def domain_examples(
    task: str, n: int, seed: int = 0, split: str = "train", image_size: int = 48
) -> Iterator[SynthExample]:
    """``n`` examples of one ``synth-domain`` task; question types and answers are balanced."""
    if task not in _DOMAIN_MAKERS:
        raise ConfigError(f"synth-domain: unknown task {task!r} (known: {', '.join(_DOMAIN_MAKERS)})")
    make, answers = _DOMAIN_MAKERS[task]
    rng = _rng_for("synth-domain", GENERATOR_VERSION, seed, task, split)
    qtypes = _Cycle(rng, list(answers))
    targets = {qtype: _Cycle(rng, values) for qtype, values in answers.items()}
    for _ in range(n):
        qtype = qtypes.next()
        yield make(rng, image_size, qtype, targets[qtype].next())


# ---------------------------------------------------------------------------------------------
# synth-pretrain: simple shapes on plain or noisy backgrounds.

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
        _draw_shape(draw, obj["shape"], tuple(obj["box"]), COLORS[obj["color"]])  # type: ignore[arg-type]
    return img


def object_index_mask(facts: dict[str, Any], size: int) -> Image.Image:
    """A greyscale ("L") image of a pretraining scene: pixel value k > 0 where object k-1 of
    ``facts["objects"]`` is drawn (later objects on top), 0 on the background."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for index, obj in enumerate(facts["objects"], start=1):
        _draw_shape(draw, obj["shape"], tuple(obj["box"]), index)  # type: ignore[arg-type]
    return mask


def _propose(rng: random.Random, objects: list[dict[str, Any]], background: str, size: int) -> tuple[str, str]:
    """A question about the scene (a template kind drawn uniformly, filled with a present object) and its answer."""
    kinds: dict[str, list[tuple[str, str]]] = {"count": [("How many shapes are there?", str(len(objects)))]}
    for shape in sorted({o["shape"] for o in objects}):
        colors = {o["color"] for o in objects if o["shape"] == shape}
        if len(colors) == 1:
            kinds.setdefault("color", []).append((f"What color is the {shape}?", colors.pop()))
    asked = rng.choice([o["color"] for o in objects] + [c for c in COLORS if c != background])
    kinds["exists"] = [(f"Is there a {asked} shape?", _yes_no(any(o["color"] == asked for o in objects)))]
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
        return SynthExample(img, f"Is there a {facts['asked_color']} shape?", _yes_no(present), qtype, facts)
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


def pretrain_examples(n: int, seed: int = 0, split: str = "train", image_size: int = 48) -> Iterator[SynthExample]:
    """``n`` examples of the ``synth-pretrain`` mix; question types and answers are balanced."""
    rng = _rng_for("synth-pretrain", PRETRAIN_VERSION, seed, split)
    qtypes = _Cycle(rng, [qtype for qtype, weight in _PRETRAIN_WEIGHTS.items() for _ in range(weight)])
    targets = {qtype: _Cycle(rng, values) for qtype, values in _PRETRAIN_TARGETS.items()}
    for _ in range(n):
        qtype = qtypes.next()
        yield _make_pretrain(rng, image_size, qtype, targets[qtype].next())


# ---------------------------------------------------------------------------------------------
# Writing to disk.


def _write_split(folder: Path, task: str, split: str, examples: Iterable[SynthExample]) -> None:
    """``<folder>/<split>.json`` in LLaVA train or test format and one PNG per example under ``images/``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for index, example in enumerate(examples, start=1):
        sample_id = f"{task}-{split}-{index:05d}"
        image = f"images/{sample_id}.png"
        example.image.save(folder / image, format="PNG", compress_level=1)
        text = f"{IMAGE_PLACEHOLDER}\n{example.question}"
        if split == "train":
            conversation = [{"from": "human", "value": text}, {"from": "gpt", "value": example.answer}]
            record = {"id": sample_id, "image": image, "conversations": conversation}
        else:
            record = {"question_id": sample_id, "image": image, "text": text, "answer": example.answer}
        records.append({**record, "qtype": example.qtype, "facts": example.facts})
    lines = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)  # one record a line
    (folder / f"{split}.json").write_text(f"[\n{lines}\n]\n" if records else "[]\n", encoding="utf-8")


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _write_cached(root: Path, params: dict[str, Any], fill: Callable[[Path], None]) -> Path:
    """Generate into a temp folder beside ``root`` (manifest last) and rename it into place, unless
    ``root`` already holds a manifest with identical ``params``. A different synthetic folder is replaced;
    a non-empty folder that is not one is never touched."""
    root = Path(root).expanduser()
    existing = _read_manifest(root)
    if existing == params:
        return root
    ours = existing is not None and str(existing.get("generator", "")).startswith("synth-")
    if root.exists() and not ours and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root}: exists and holds no synthetic-data manifest.json; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        fill(tmp)
        (tmp / "manifest.json").write_text(json.dumps(params, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        old = None
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            os.replace(root, old / "data")
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished the same folder first
            if _read_manifest(root) != params:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _check_sizes(image_size: int, **counts: int) -> None:
    if not isinstance(image_size, int) or image_size < 24:
        raise ConfigError(f"synthetic data: image_size must be an integer >= 24, got {image_size!r}")
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"synthetic data: {name} must be a non-negative integer, got {value!r}")


def write_synth_domain(
    root: Path, seed: int = 0, train_per_task: int = 300, test_per_task: int = 100, image_size: int = 48
) -> Path:
    """Write the ``synth-domain`` stream (tasks rs, med, ad, sci, fin) under ``root`` and return ``root``,
    the folder holding ``<task>/train.json``, ``<task>/test.json`` and ``manifest.json``. Cached."""
    _check_sizes(image_size, seed=seed, train_per_task=train_per_task, test_per_task=test_per_task)
    params = {
        "generator": "synth-domain", "version": GENERATOR_VERSION, "seed": seed, "train_per_task": train_per_task,
        "test_per_task": test_per_task, "image_size": image_size, "tasks": [spec.name for spec in SYNTH_DOMAIN_TASKS],
    }  # fmt: skip

    def fill(folder: Path) -> None:
        for spec in SYNTH_DOMAIN_TASKS:
            for split, n in (("train", train_per_task), ("test", test_per_task)):
                examples = domain_examples(spec.name, n, seed, split, image_size)
                _write_split(folder / spec.name, spec.name, split, examples)

    return _write_cached(Path(root), params, fill)


def write_synth_pretrain(
    root: Path, seed: int = 0, n_train: int = 20000, n_test: int = 500, image_size: int = 48
) -> Path:
    """Write the ``synth-pretrain`` mix as the single task ``pretrain`` under ``root`` and return ``root``
    (files: ``root/pretrain/train.json``, ``root/pretrain/test.json``, ``root/manifest.json``). Cached."""
    _check_sizes(image_size, seed=seed, n_train=n_train, n_test=n_test)
    params = {
        "generator": "synth-pretrain", "version": PRETRAIN_VERSION, "seed": seed, "n_train": n_train,
        "n_test": n_test, "image_size": image_size, "tasks": [PRETRAIN_TASK],
    }  # fmt: skip

    def fill(folder: Path) -> None:
        for split, n in (("train", n_train), ("test", n_test)):
            _write_split(folder / PRETRAIN_TASK, PRETRAIN_TASK, split, pretrain_examples(n, seed, split, image_size))

    return _write_cached(Path(root), params, fill)


__all__ = [
    "COLORS", "GENERATOR_VERSION", "PRETRAIN_VERSION", "LETTERS", "MC_INSTRUCTION", "PRETRAIN_SHAPES", "PRETRAIN_TASK",
    "SYNTH_DOMAIN_TASKS", "SYNTH_PRETRAIN_TASK", "SynthExample", "TaskSpec", "domain_examples",
    "pretrain_examples", "write_synth_domain", "write_synth_pretrain",
]  # fmt: skip
