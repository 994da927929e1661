"""The procedurally drawn continual stream ``synth-domain``: five domains (remote sensing, medical scan,
driving, science diagram, finance chart), two question types each.

Images are drawn with PIL directly at ``image_size`` pixels (default 48: a 6x6 grid of 8-pixel patches
for a tiny CLIP tower), so every visual is bold and simple and every coordinate scales with the size.
Each question's answer is computed from the scene that was drawn, and answer values are balanced
(values are drawn in shuffled passes). Generation is deterministic from a seed: one
``random.Random`` per (stream, task, split), never the global RNG. Files are LLaVA JSON + PNG:
``<root>/<task>/{train,test}.json`` and ``<root>/<task>/images/*.png``, with ``<root>/manifest.json``
written last (the whole folder is built aside and renamed into place). The pretraining mix lives in
:mod:`mmcl.synthetic.pretrain_mix`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from PIL import Image, ImageDraw

from mmcl.data.answer_styles import LETTERS, MC_INSTRUCTION
from mmcl.errors import ConfigError
from mmcl.synthetic.draw import RGB, SynthExample, TaskSpec, balanced_examples, draw_shape, rng_for, yes_no
from mmcl.synthetic.files import write_task_stream

GENERATOR_VERSION = "synth-2"  # the synth-domain stream; part of its cache key: bump it whenever the output changes (tests/test_integrity.py pins the output)

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


def _jitter(rng: random.Random, color: RGB, amount: int) -> RGB:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in color)  # type: ignore[return-value]


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
    return SynthExample(img, "Is there a river in this aerial image?", yes_no(facts["river"]), qtype, facts)


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
        return SynthExample(img, "Is there a lesion in this scan?", yes_no(facts["lesion"]), qtype, facts)
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
    draw_shape(draw, shape, box, _SCI_FILLS[fill], outline=(0, 0, 0), width=max(2, round(size / 24)))
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
    return SynthExample(img, "Is the last bar taller than the first bar?", yes_no(facts["last_taller"]), qtype, facts)


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
    rng = rng_for("synth-domain", GENERATOR_VERSION, seed, task, split)
    yield from balanced_examples(rng, make, list(answers), answers, n, image_size)


def write_synth_domain(
    root: Path, seed: int = 0, train_per_task: int = 300, test_per_task: int = 200, image_size: int = 48
) -> Path:
    """Write the ``synth-domain`` stream (tasks rs, med, ad, sci, fin) under ``root`` and return ``root``,
    the folder holding ``<task>/train.json``, ``<task>/test.json`` and ``manifest.json``. Cached."""
    return write_task_stream(root, "synth-domain", GENERATOR_VERSION, SYNTH_DOMAIN_TASKS, domain_examples, seed,
                             train_per_task, test_per_task, image_size)


__all__ = [
    "GENERATOR_VERSION", "LETTERS", "MC_INSTRUCTION", "SYNTH_DOMAIN_TASKS", "SynthExample", "TaskSpec",
    "domain_examples", "write_synth_domain",
]  # fmt: skip
