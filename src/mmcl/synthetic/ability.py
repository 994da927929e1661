"""The ``synth-ability`` stream: a synthetic twin of MLLM-CL's *ability* stream (Zhao et al. 2025,
arXiv:2506.05453), whose four tasks are trained on one source and tested on another public benchmark, so
train and test are deliberately NOT identically distributed. Each task here has such a shift, set by its
train and test :class:`AbilitySettings` profiles (defaults below; pixels are for a 96-pixel image):

- ``ocr``: read a rendered word, number or short line (Pillow's bundled font only). Test strings are
  longer (8-11 vs 3-7 characters; lines of three words vs two) from word lists disjoint from training's;
  test fonts are smaller or bigger (10, 16, 17 vs 12-14 px), bold on the big sizes (stroke 1 px vs
  never), slanted (shear 0.15-0.3 either way vs none), in other ink/paper colours, upper case as well as
  title case (vs lower and title), on speckled and scratched backgrounds (plain in training).
  Scorer ``mllm_cl_ocr`` (OCRBench: lower-cased reference contained in the lower-cased reply).
- ``math``: arithmetic, bar charts, pie charts, number sequences and tables read from the image; free-form
  (a number) or multiple choice (A-D; pie charts always). Test: bigger numbers (operands 21-99 vs 1-20,
  bar values 10-60 vs 1-9, table values 10-50 vs 1-9, sequence steps 6-15 vs 1-5), more bars (5-6 vs
  3-4) and slices (4-5 vs 3) with closer pie slices, descending sequences too, and other layouts
  (written column sums, horizontal bars, donuts, sequences in boxes, transposed tables).
  Scorer ``mllm_cl_math``.
- ``vp`` (CV-Bench style): counting (four numbers in shuffled order), relative position (the two options of
  the axis in a fixed order: left, right or above, below), relative size and depth order (occlusion, size
  and height cues) of two named objects (the options in the order the question names them), always
  multiple choice, as CV-Bench asks its count, relation and depth questions. Test: counts above training's
  range (6-9 vs 1-5), shape-colour pairs never seen in training (the 16 pairs are split in two halves by
  parity; every shape and colour occurs in both), four stacked objects instead of three, closer sizes
  (largest side 1.25x the next vs 1.5x). Scorer ``option_letter``.
- ``gui``: app screens with labelled buttons, fields, tabs and list rows plus an instruction; the
  answer is the letter of the right tap/type action among four (MMT-Bench GUI style; the options give
  element centres, so only the screen tells them apart) or the target element's box ``[x1,y1,x2,y2]``
  in pixels. Test: other screen layouts (tile grid, sidebar vs list, form), labels never seen in
  training, a dark theme too. Scorer ``synth_gui`` (letter rule, or box IoU >= 0.5).

Deterministic from the seed: one ``random.Random`` per (task, split) from :func:`rng_for`. Files are LLaVA
JSON + PNG written by :func:`write_split`, cached by :func:`write_cached`. Not calibrated against a model yet.
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from PIL import Image, ImageDraw

from mmcl.data.answer_styles import LETTERS
from mmcl.errors import ConfigError
from mmcl.synthetic import ability_draw as art
from mmcl.synthetic.draw import RGB, OptionArranger, SynthExample, TaskSpec, draw_shape, multiple_choice, rng_for
from mmcl.synthetic.files import check_sizes, write_cached, write_split
from mmcl.utils import ShuffledCycle

GENERATOR_VERSION = 2  # part of the cache key: bump it whenever the output changes

ABILITY_TASKS: list[TaskSpec] = [
    TaskSpec("ocr", "OCR: read the rendered word, number or line (test: unseen renderings and strings)",
             "mllm_cl_ocr", 16, ("word", "number", "line")),
    TaskSpec("math", "Math & logic: arithmetic, charts, sequences, tables (test: harder ranges, other layouts)",
             "mllm_cl_math", 8, ("arithmetic", "bar", "pie", "sequence", "table")),
    TaskSpec("vp", "Visual perception: count, position, size, depth (test: new counts and shape-colour pairs)",
             "option_letter", 4, ("count", "position", "size", "depth")),
    TaskSpec("gui", "GUI agent: action letter or target box on an app screen (test: unseen layouts and labels)",
             "synth_gui", 24, ("action", "box")),
]  # fmt: skip

NUMBER_INSTRUCTION = "Answer with a single number."
OCR_QUESTION = "What text is written in the image? Answer with the text only."

# -- vocabularies (train and test lists are disjoint) -------------------------------------------------
OCR_WORDS = {
    "train": """cat dog sun tree house river apple bread chair green water light stone cloud music paper table
        garden window market school silver orange rabbit pencil yellow summer winter bridge castle forest planet
        rocket ticket farmer kitten button candle basket doctor flower spoon mouse horse lemon tiger""".split(),
    "test": """elephant mountain treasure calendar umbrella chemistry dinosaur hospital keyboard lighthouse
        marathon notebook painting pineapple sandwich scissors squirrel telescope tomorrow triangle vacation
        waterfall yesterday adventure blueberry butterfly crocodile detective furniture invisible kangaroo
        landscape magnetic newspaper orchestra passenger question raincoat satellite strawberry""".split(),
}
OCR_LINE_WORDS = {
    "train": "red big hot box day run map car sea top cup pen bus old new hat bed egg ice".split(),
    "test": "fox ink jam owl zip yak elk gem hut kit mud nap oak pie rug web wax toy ivy fig".split(),
}
GUI_LABELS = {
    "train": """Home Search Settings Profile Save Cancel Mail Music Photos Camera Login Help Share Edit Delete
        Send Back Next Menu Cart News Maps Chat Files Games Videos Contacts Phone Clock Weather""".split(),
    "test": """Library Wallet Notes Alarm Upload Export Friends Events Rewards Podcast Travel Budget Recipes
        Fitness Tickets Orders Reviews Archive Drafts Invite Sync Print Scan Backup Filter Sort Lock Rename
        Copy Refresh""".split(),
}
OCR_COLORS: dict[str, tuple[RGB, RGB]] = {  # name -> (ink, paper)
    "black-white": ((15, 15, 15), (250, 250, 250)), "navy-cream": ((20, 30, 90), (248, 242, 225)),
    "gray-white": ((70, 70, 70), (245, 245, 245)), "red-white": ((200, 30, 30), (252, 252, 252)),
    "green-cream": ((20, 120, 40), (245, 240, 220)), "white-black": ((240, 240, 240), (20, 20, 20)),
    "yellow-navy": ((250, 220, 60), (25, 35, 90)),
}  # fmt: skip
CHART_COLORS: dict[str, RGB] = {
    "red": (220, 50, 50), "blue": (50, 90, 220), "green": (40, 160, 70), "orange": (245, 140, 30),
    "purple": (140, 70, 190), "gray": (130, 130, 130),
}  # fmt: skip
VP_SHAPES = ("circle", "square", "triangle", "cross")
VP_COLORS: dict[str, RGB] = {"red": (220, 40, 40), "blue": (40, 80, 225), "green": (30, 160, 60),
                             "yellow": (240, 200, 20)}  # fmt: skip
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}


def vp_pairs(split_pairs: str) -> list[tuple[str, str]]:
    """(shape, colour) pairs of one half: ``train`` when shape index + colour index is even, ``test`` odd;
    every shape and colour occurs in both halves, each combination in one only."""
    parity = {"train": 0, "test": 1}[split_pairs]
    return [(shape, color) for i, shape in enumerate(VP_SHAPES) for j, color in enumerate(VP_COLORS)
            if (i + j) % 2 == parity]  # fmt: skip


# -- settings ----------------------------------------------------------------------------------------
Range = tuple[int, int]  # inclusive


@dataclass(frozen=True)
class OcrProfile:
    """How one split renders OCR strings."""

    font_px: tuple[int, ...] = (12, 13, 14)
    length: Range = (3, 7)  # characters
    stroke_px: tuple[int, ...] = (0,)
    stroke_min_font_px: int = 14  # thinner fonts are never stroked (they would blot)
    shear: tuple[float, float] = (0.0, 0.0)  # |slant| range; the sign is random
    colors: tuple[str, ...] = ("black-white", "navy-cream", "gray-white")  # keys of OCR_COLORS
    casings: tuple[str, ...] = ("lower", "title")
    speckle: float = 0.0  # fraction of pixels turned into noise dots
    noise_lines: int = 0
    vocabulary: str = "train"  # which word lists
    line_words: int = 2


@dataclass(frozen=True)
class MathProfile:
    """Ranges and layouts of one split's math questions."""

    operands: Range = (1, 20)
    arithmetic_layouts: tuple[str, ...] = ("row",)  # row: "a + b = ?"; column: written sum
    bars: Range = (3, 4)
    bar_values: Range = (1, 9)
    bar_layouts: tuple[str, ...] = ("vertical",)
    slices: Range = (3, 3)
    pie_margin: float = 1.5  # the largest slice is at least this many times the second
    pie_layouts: tuple[str, ...] = ("pie",)
    sequence_terms: int = 4
    sequence_start: Range = (1, 10)
    sequence_step: Range = (1, 5)
    sequence_rules: tuple[str, ...] = ("add",)
    sequence_layouts: tuple[str, ...] = ("row",)  # row: "3, 6, 9, ?"; cells: a grid of boxes
    table_rows: Range = (2, 2)  # complete rows shown before the question row
    table_values: Range = (1, 9)
    table_layouts: tuple[str, ...] = ("rows",)  # rows or columns (transposed)
    mc_fraction: float = 0.5  # share of multiple-choice questions (pie charts are always multiple choice)


@dataclass(frozen=True)
class VpProfile:
    """Counts, pairs and cue strengths of one split's visual-perception questions."""

    pairs: str = "train"  # which half of the shape-colour pairs (vp_pairs)
    counts: Range = (1, 5)
    count_distractors: Range = (0, 2)
    size_ratio: float = 1.5  # the largest object's side over the next one's, at least
    depth_objects: int = 3


@dataclass(frozen=True)
class GuiProfile:
    """Layouts, labels and question mix of one split's app screens."""

    layouts: tuple[str, ...] = ("list", "form")
    labels: str = "train"
    themes: tuple[str, ...] = ("light",)
    font_px: int = 9  # label size before shrinking to fit its element
    box_fraction: float = 0.5  # share of box questions (the rest: action letter)


@dataclass(frozen=True)
class AbilitySettings:
    """Every size and difficulty knob of ``synth-ability``, per task and split (defaults: the shifts
    described in the module doc). Part of the cache key."""

    ocr_train: OcrProfile = OcrProfile()
    ocr_test: OcrProfile = OcrProfile(
        font_px=(10, 16, 17), length=(8, 11), stroke_px=(1,), shear=(0.15, 0.3),
        colors=("red-white", "green-cream", "white-black", "yellow-navy"), casings=("upper", "title"),
        speckle=0.04, noise_lines=3, vocabulary="test", line_words=3,
    )  # fmt: skip
    math_train: MathProfile = MathProfile()
    math_test: MathProfile = MathProfile(
        operands=(21, 99), arithmetic_layouts=("column",), bars=(5, 6), bar_values=(10, 60),
        bar_layouts=("horizontal",), slices=(4, 5), pie_margin=1.15, pie_layouts=("donut",), sequence_terms=5,
        sequence_start=(20, 90), sequence_step=(6, 15), sequence_rules=("add", "subtract"),
        sequence_layouts=("cells",), table_rows=(2, 3), table_values=(10, 50), table_layouts=("columns",),
    )  # fmt: skip
    vp_train: VpProfile = VpProfile()
    vp_test: VpProfile = VpProfile(pairs="test", counts=(6, 9), size_ratio=1.25, depth_objects=4)
    gui_train: GuiProfile = GuiProfile()
    gui_test: GuiProfile = GuiProfile(layouts=("grid", "sidebar"), labels="test", themes=("light", "dark"))
    fixed_option_order: bool = False  # True: options in a canonical order instead of shuffled

    def profile(self, task: str, split: str) -> Any:
        return getattr(self, f"{task}_{'train' if split == 'train' else 'test'}")


def _number_distractors(rng: random.Random, answer: int, count: int = 3) -> list[str]:
    near = [answer + delta for delta in (-10, -3, -2, -1, 1, 2, 3, 10) if answer + delta >= 0]
    return [str(value) for value in rng.sample(near, count)]


def _between(rng: random.Random, bounds: Range) -> int:
    return rng.randint(bounds[0], bounds[1])


# -- OCR ---------------------------------------------------------------------------------------------


def _ocr_string(rng: random.Random, kind: str, p: OcrProfile) -> str:
    low, high = p.length
    if kind == "number":
        digits = _between(rng, p.length)
        return str(rng.randint(1, 9)) + "".join(rng.choice(string.digits) for _ in range(digits - 1))
    if kind == "word":
        words = [w for w in OCR_WORDS[p.vocabulary] if low <= len(w) <= high]
        if not words:
            raise ConfigError(f"synth-ability ocr: no {p.vocabulary} word has {low}-{high} letters")
        text = rng.choice(words)
    else:
        for _ in range(1000):
            text = " ".join(rng.sample(OCR_LINE_WORDS[p.vocabulary], p.line_words))
            if low <= len(text) <= high:
                break
        else:
            raise ConfigError(f"synth-ability ocr: no line of {p.line_words} words has {low}-{high} characters")
    casing = rng.choice(p.casings)
    return text.upper() if casing == "upper" else text.title() if casing == "title" else text


def ocr_example(rng: random.Random, size: int, kind: str, p: OcrProfile) -> SynthExample:
    """One string rendered with the split's fonts, strokes, slant, colours and noise."""
    margin = art.scaled(3, size)
    for attempt in range(200):  # a rendering, then strings until one fits (font sizes stay evenly used)
        if attempt % 20 == 0:
            font_px = rng.choice(p.font_px)
            stroke = rng.choice(p.stroke_px) if font_px >= p.stroke_min_font_px else 0
            shear = rng.uniform(*p.shear) * rng.choice((-1, 1)) + 0.0  # + 0.0: no negative zero
        text = _ocr_string(rng, kind, p)
        mask = art.text_mask(text, art.scaled(font_px, size, art.MIN_FONT_PX), art.scaled(stroke, size, 0), shear)
        if mask.width <= size - 2 * margin and mask.height <= size - 2 * margin:
            break
    else:
        raise ConfigError(f"synth-ability ocr: no string of {p.length} characters fits a {size}-pixel image")
    color = rng.choice(p.colors)
    ink, paper = OCR_COLORS[color]
    image = Image.new("RGB", (size, size), paper)
    art.add_noise(image, rng, p.speckle, p.noise_lines, [ink, tuple(255 - v for v in paper)])  # type: ignore[list-item]
    xy = (rng.randint(margin, size - margin - mask.width), rng.randint(margin, size - margin - mask.height))
    art.paste_mask(image, mask, xy, ink)
    facts = {"text": text, "font_px": font_px, "stroke_px": stroke, "shear": round(shear, 3), "colors": color,
             "length": len(text)}  # fmt: skip
    return SynthExample(image, OCR_QUESTION, text, kind, facts)


# -- math --------------------------------------------------------------------------------------------


def _math_arithmetic(rng: random.Random, image: Image.Image, p: MathProfile) -> tuple[str, int, dict[str, Any]]:
    a, b = _between(rng, p.operands), _between(rng, p.operands)
    operator = rng.choice("+-")
    if operator == "-" and b > a:
        a, b = b, a
    answer = a + b if operator == "+" else a - b
    layout = rng.choice(p.arithmetic_layouts)
    art.draw_arithmetic(image, a, operator, b, layout)
    return "What number replaces the question mark in the image?", answer, {"a": a, "b": b, "operator": operator,
                                                                          "layout": layout}


def _math_bar(rng: random.Random, image: Image.Image, p: MathProfile) -> tuple[str, int, dict[str, Any]]:
    values = rng.sample(range(p.bar_values[0], p.bar_values[1] + 1), _between(rng, p.bars))
    layout, color = rng.choice(p.bar_layouts), rng.choice(list(CHART_COLORS))
    art.draw_bar_chart(image, values, layout, CHART_COLORS[color], art.scaled(9, image.width, art.MIN_FONT_PX))
    ranked = sorted(values, reverse=True)
    if rng.random() < 0.5:
        question, answer = "What is the sum of the two largest values in the bar chart?", ranked[0] + ranked[1]
    else:
        question = "What is the difference between the largest and the smallest value in the bar chart?"
        answer = ranked[0] - ranked[-1]
    return question, answer, {"values": values, "layout": layout}


def _math_pie(rng: random.Random, image: Image.Image, p: MathProfile) -> tuple[list[str], str, dict[str, Any]]:
    count = _between(rng, p.slices)
    for _ in range(1000):
        weights = [rng.randint(2, 20) for _ in range(count)]
        ranked = sorted(weights, reverse=True)
        if ranked[0] >= p.pie_margin * ranked[1]:
            break
    else:
        raise ConfigError(f"synth-ability math: pie_margin {p.pie_margin} is out of reach for {count} slices")
    colors = rng.sample(list(CHART_COLORS), count)
    layout = rng.choice(p.pie_layouts)
    art.draw_pie_chart(image, weights, [CHART_COLORS[c] for c in colors], layout, rng.uniform(0, 360))
    largest = colors[weights.index(ranked[0])]
    absent = [c for c in CHART_COLORS if c not in colors]
    others = [c for c in colors if c != largest] + rng.sample(absent, len(absent))
    return others[:3], largest, {"weights": weights, "colors": colors, "layout": layout}


def _math_sequence(rng: random.Random, image: Image.Image, p: MathProfile) -> tuple[str, int, dict[str, Any]]:
    rule, step, n = rng.choice(p.sequence_rules), _between(rng, p.sequence_step), p.sequence_terms
    start = _between(rng, p.sequence_start)
    if rule == "subtract":
        step, start = -step, start + step * n  # stays positive
    terms = [start + i * step for i in range(n + 1)]
    layout = rng.choice(p.sequence_layouts)
    art.draw_sequence(image, [str(t) for t in terms[:-1]] + ["?"], layout)
    return "What number comes next in the sequence shown in the image?", terms[-1], {"terms": terms, "layout": layout}


def _math_table(rng: random.Random, image: Image.Image, p: MathProfile) -> tuple[str, int, dict[str, Any]]:
    rows = [[_between(rng, p.table_values), _between(rng, p.table_values)] for _ in range(_between(rng, p.table_rows) + 1)]
    cells = [[str(a), str(b), str(a + b)] for a, b in rows]
    cells[-1][-1] = "?"
    layout, s = rng.choice(p.table_layouts), image.width
    if layout == "columns":
        cells = [list(column) for column in zip(*cells)]
    art.draw_table(image, cells, art.scaled(12, s), (0.06 * s, 0.12 * s, 0.94 * s, 0.88 * s))
    line = "row" if layout == "rows" else "column"
    question = f"Every {line} of the table follows the same rule. What number replaces the question mark?"
    return question, sum(rows[-1]), {"rows": rows, "layout": layout}


_MATH_KINDS = {"arithmetic": _math_arithmetic, "bar": _math_bar, "sequence": _math_sequence, "table": _math_table}


def math_example(rng: random.Random, size: int, kind: str, p: MathProfile, arrange: OptionArranger) -> SynthExample:
    """One math question: a number (free-form) or a letter (multiple choice); pie charts are always letters."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    if kind == "pie":
        distractors, largest, facts = _math_pie(rng, image, p)
        options, letter = arrange(largest, distractors)
        question = multiple_choice("Which colour has the largest slice of the chart?", options)
        return SynthExample(image, question, letter, "pie-mc", {**facts, "options": options, "target": largest})
    text, answer, facts = _MATH_KINDS[kind](rng, image, p)
    if rng.random() < p.mc_fraction:
        options, letter = arrange(str(answer), _number_distractors(rng, answer), order=int)
        return SynthExample(image, multiple_choice(text, options), letter, f"{kind}-mc",
                            {**facts, "options": options, "target": answer})
    return SynthExample(image, f"{text}\n{NUMBER_INSTRUCTION}", str(answer), f"{kind}-free", {**facts, "target": answer})


# -- visual perception -------------------------------------------------------------------------------


def _name(pair: tuple[str, str]) -> str:
    return f"{pair[1]} {pair[0]}"


def _draw_objects(image: Image.Image, objects: Sequence[tuple[tuple[str, str], Sequence[float]]],
                  outline: RGB | None = None) -> list[dict[str, Any]]:
    draw = ImageDraw.Draw(image)
    width = max(1, image.width // 48) if outline else 0
    for (shape, color), box in objects:
        draw_shape(draw, shape, tuple(box), VP_COLORS[color], outline=outline, width=width)  # type: ignore[arg-type]
    return [{"shape": s, "color": c, "box": [round(v, 1) for v in box]} for (s, c), box in objects]


VpScene = tuple[str, list[str], str, Image.Image, list[dict[str, Any]]]  # question, options, letter, image, objects
BACKDROP: RGB = (245, 245, 240)


def _vp_count(rng: random.Random, size: int, p: VpProfile, arrange: OptionArranger) -> VpScene:
    """``count`` targets of one pair among a few objects of other pairs, one per grid cell; four numbers in
    shuffled order, as CV-Bench's count questions."""
    pairs = vp_pairs(p.pairs)
    target = rng.choice(pairs)
    count, extra = _between(rng, p.counts), _between(rng, p.count_distractors)
    placed = [target] * count + [rng.choice([q for q in pairs if q != target]) for _ in range(extra)]
    grid = 1
    while grid * grid < len(placed):
        grid += 1
    cell = size / grid
    spots = rng.sample([(r, c) for r in range(grid) for c in range(grid)], len(placed))
    objects = []
    for pair, (row, col) in zip(placed, spots):
        side, pad = rng.uniform(0.5, 0.7) * cell, 0.05 * cell  # neighbours stay 0.1 cell apart
        x0, y0 = col * cell + rng.uniform(pad, cell - side - pad), row * cell + rng.uniform(pad, cell - side - pad)
        objects.append((pair, (x0, y0, x0 + side, y0 + side)))
    image = Image.new("RGB", (size, size), BACKDROP)
    start = max(0, count - rng.randint(0, 3))
    options, letter = arrange(str(count), [str(v) for v in range(start, start + 4) if v != count], order=int)
    question = f"How many {target[1]} {PLURAL[target[0]]} are in the image?"
    return question, options, letter, image, _draw_objects(image, objects)


_AXES = (("left", "right"), ("above", "below"))  # each in CV-Bench's option order


def _vp_position(rng: random.Random, size: int, p: VpProfile, arrange: OptionArranger) -> VpScene:
    """Two objects clearly apart along one axis and nearly aligned along the other; as CV-Bench's relation
    questions, the two options of that axis in a fixed order (left, right or above, below)."""
    first, second = rng.sample(vp_pairs(p.pairs), 2)
    relation = rng.choice([relation for axis in _AXES for relation in axis])
    side = rng.uniform(0.18, 0.26) * size
    gap, offset = rng.uniform(0.3, 0.55) * size, rng.uniform(-0.08, 0.08) * size
    low, high = side / 2 + 2, size - side / 2 - 2
    along = rng.uniform(low, high - gap)
    across = rng.uniform(max(low, low - offset), min(high, high - offset))
    near, far = (along, along + gap) if relation in ("left", "above") else (along + gap, along)
    centers = [(near, across), (far, across + offset)]  # (x, y) of the first and second object
    if relation in ("above", "below"):
        centers = [(y, x) for x, y in centers]
    objects = [(pair, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
               for pair, (cx, cy) in zip((first, second), centers)]  # fmt: skip
    image = Image.new("RGB", (size, size), BACKDROP)
    options = list(next(axis for axis in _AXES if relation in axis))
    question = (f"Considering the relative positions of the {_name(first)} and the {_name(second)} in the image, "
                f"where is the {_name(first)} located with respect to the {_name(second)}?")
    return question, options, LETTERS[options.index(relation)], image, _draw_objects(image, objects)


def _two_named(arrange: OptionArranger, correct: tuple[str, str], other: tuple[str, str],
               question: str) -> tuple[str, list[str], str]:
    """CV-Bench's two-object form: the question names both objects in the order of the options."""
    options, letter = arrange(f"the {_name(correct)}", [f"the {_name(other)}"])
    return f"{question}, {options[0]} or {options[1]}?", options, letter


def _vp_size(rng: random.Random, size: int, p: VpProfile, arrange: OptionArranger) -> VpScene:
    """Four objects, one per quadrant; the largest side beats the others by ``size_ratio`` at least; the
    question names the largest and one other."""
    pairs = rng.sample(vp_pairs(p.pairs), 4)
    cell, largest = size / 2, rng.uniform(0.34, 0.44) * size
    sides = [largest] + [rng.uniform(0.12 * size, largest / p.size_ratio) for _ in range(3)]
    objects = []
    for pair, side, quadrant in zip(pairs, sides, rng.sample(range(4), 4)):
        row, col = divmod(quadrant, 2)
        x0, y0 = col * cell + rng.uniform(1, cell - side - 1), row * cell + rng.uniform(1, cell - side - 1)
        objects.append((pair, (x0, y0, x0 + side, y0 + side)))
    image = Image.new("RGB", (size, size), BACKDROP)
    question, options, letter = _two_named(arrange, pairs[0], rng.choice(pairs[1:]), "Which object is larger")
    return question, options, letter, image, _draw_objects(image, objects)


def _vp_depth(rng: random.Random, size: int, p: VpProfile, arrange: OptionArranger) -> VpScene:
    """Objects drawn back to front, each larger, lower and overlapping the one before (outlined); the question
    names two of them, as CV-Bench's depth questions."""
    pairs = rng.sample(vp_pairs(p.pairs), p.depth_objects)
    side, bottom, center = 0.2 * size, 0.42 * size, rng.uniform(0.3, 0.7) * size
    objects = []
    for pair in pairs:
        side = min(side, 0.45 * size)
        center = min(max(center, side / 2 + 1), size - side / 2 - 1)
        bottom = min(bottom, size - 1.0)
        objects.append((pair, (center - side / 2, bottom - side, center + side / 2, bottom)))
        center += rng.choice((-1, 1)) * rng.uniform(0.3, 0.55) * side
        side *= rng.uniform(1.15, 1.3)
        bottom += rng.uniform(0.12, 0.18) * size
    image = Image.new("RGB", (size, size), BACKDROP)
    farther, closer = sorted(rng.sample(range(len(pairs)), 2))  # drawn later = closer
    question, options, letter = _two_named(arrange, pairs[closer], pairs[farther],
                                           "Which object is closer to the camera")
    return question, options, letter, image, _draw_objects(image, objects, outline=(30, 30, 30))


_VP_KINDS: dict[str, Callable[[random.Random, int, VpProfile, OptionArranger], VpScene]] = {
    "count": _vp_count, "position": _vp_position, "size": _vp_size, "depth": _vp_depth,
}  # fmt: skip


def vp_example(rng: random.Random, size: int, kind: str, p: VpProfile, arrange: OptionArranger) -> SynthExample:
    """One CV-Bench-style multiple-choice question about drawn objects (count: four numbers; position, size,
    depth: two options)."""
    question, options, letter, image, objects = _VP_KINDS[kind](rng, size, p, arrange)
    facts = {"objects": objects, "options": options, "target": options[LETTERS.index(letter)]}
    return SynthExample(image, multiple_choice(question, options), letter, kind, facts)


# -- GUI ---------------------------------------------------------------------------------------------
_INSTRUCTIONS = {
    "button": ("Tap the {} button.", "Press {}."),
    "field": ("Type the name into the {} box.", "Enter a word in the {} field."),
    "tab": ("Open the {} tab.", "Go to {}."),
    "item": ("Select {} from the list.", "Open {} in the list."),
}
BOX_QUESTION = "Which element should be clicked? Answer with its bounding box [x1,y1,x2,y2] in pixels."


def gui_example(rng: random.Random, size: int, qtype: str, p: GuiProfile, arrange: OptionArranger) -> SynthExample:
    """One app screen and instruction; the answer is an action letter or the target's pixel box."""
    layout, theme = rng.choice(p.layouts), rng.choice(p.themes)
    slots = art.screen_slots(layout, rng)
    labels = rng.sample(GUI_LABELS[p.labels], art.interactive_count(slots))
    image = Image.new("RGB", (size, size), art.THEMES[theme].background)
    elements = art.draw_screen(image, slots, labels, art.THEMES[theme], art.scaled(p.font_px, size, art.MIN_FONT_PX))
    target = rng.choice(elements)
    instruction = rng.choice(_INSTRUCTIONS[target.kind]).format(target.label)
    facts: dict[str, Any] = {"layout": layout, "theme": theme, "target": target.label, "kind": target.kind,
                             "elements": [dataclasses.asdict(e) for e in elements]}  # fmt: skip
    if qtype == "box":
        answer = "[{},{},{},{}]".format(*target.box)
        return SynthExample(image, f"Instruction: {instruction}\n{BOX_QUESTION}", answer, qtype, facts)
    verb = "type at" if target.kind == "field" else "tap"
    actions = {e.label: f"{verb} ({e.center[0]}, {e.center[1]})" for e in elements}
    others = rng.sample([label for label in actions if label != target.label], 3)
    options, letter = arrange(actions[target.label], [actions[o] for o in others])
    question = multiple_choice(f"Instruction: {instruction}\nWhich action completes the instruction?", options)
    return SynthExample(image, question, letter, qtype, {**facts, "options": options})


# -- streams -----------------------------------------------------------------------------------------


def ability_examples(task: str, n: int, seed: int = 0, split: str = "train", image_size: int = 96,
                     settings: AbilitySettings | None = None, shifted_test: bool = True) -> Iterator[SynthExample]:
    """``n`` examples of one ``synth-ability`` task and split; question kinds in shuffled passes. With
    ``shifted_test`` False, the test split is drawn from the training profile (fresh samples of the training
    distribution, for the train-vs-test gap)."""
    specs = {spec.name: spec for spec in ABILITY_TASKS}
    if task not in specs:
        raise ConfigError(f"synth-ability: unknown task {task!r} (known: {', '.join(specs)})")
    settings = settings or AbilitySettings()
    profile = settings.profile(task, split if shifted_test else "train")
    rng = rng_for("synth-ability", GENERATOR_VERSION, seed, task, split)
    kinds = ShuffledCycle(rng, specs[task].question_types)
    arrange = OptionArranger(rng, settings.fixed_option_order)
    for _ in range(n):
        kind = kinds.next()
        if task == "ocr":
            yield ocr_example(rng, image_size, kind, profile)
        elif task == "math":
            yield math_example(rng, image_size, kind, profile, arrange)
        elif task == "vp":
            yield vp_example(rng, image_size, kind, profile, arrange)
        else:
            yield gui_example(rng, image_size, "box" if rng.random() < profile.box_fraction else "action",
                              profile, arrange)  # fmt: skip


def write_synth_ability(root: Path, seed: int = 0, train_per_task: int = 300, test_per_task: int = 200,
                        image_size: int = 96, settings: AbilitySettings | None = None, shifted_test: int = 1) -> Path:
    """Write the ``synth-ability`` stream (ocr, math, vp, gui) under ``root`` and return it
    (``<task>/train.json``, ``<task>/test.json``, ``<task>/images/``, ``manifest.json``). Cached.
    ``shifted_test`` 1: test sets from the shifted test profiles (MLLM-CL's non-IID setting); 0: from the
    training profiles."""
    check_sizes(image_size, seed=seed, train_per_task=train_per_task, test_per_task=test_per_task)
    settings = settings or AbilitySettings()
    params = {
        "generator": "synth-ability", "version": GENERATOR_VERSION, "seed": seed, "train_per_task": train_per_task,
        "test_per_task": test_per_task, "image_size": image_size, "tasks": [spec.name for spec in ABILITY_TASKS],
        "settings": json.loads(json.dumps(dataclasses.asdict(settings))),  # tuples as lists, as read back
        "shifted_test": shifted_test,
    }  # fmt: skip

    def fill(folder: Path) -> None:
        for spec in ABILITY_TASKS:
            for split, n in (("train", train_per_task), ("test", test_per_task)):
                examples = ability_examples(spec.name, n, seed, split, image_size, settings, bool(shifted_test))
                write_split(folder / spec.name, spec.name, split, examples)

    return write_cached(Path(root), params, fill)


__all__ = [
    "ABILITY_TASKS", "GENERATOR_VERSION", "AbilitySettings", "GuiProfile", "MathProfile", "OcrProfile", "VpProfile",
    "ability_examples", "vp_pairs", "write_synth_ability",
]  # fmt: skip
