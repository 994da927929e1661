"""The reading part of the ``tiny-reader`` pretraining mix (:mod:`mmcl.backbones.pretrain`): one or two
short lines of random characters (digits, lower and upper case letters; 1-8 a line) drawn with Pillow's
bundled font in random, contrasting ink and paper colours at a random position, asked to be transcribed,
to name the character at a position, or to count the characters.

It teaches generic glyph reading, nothing of the ``synth-ability`` tasks: no words of that stream's lists
(a random string that happens to be one is redrawn), no arithmetic, charts or screens, and no shear or
noise, so that stream's train -> test shifts stay shifts. Each line is drawn character by character (x
advancing by ``font.getlength``), so every example's facts hold each character's cell box in pixels
(advance width x the line's ink height), from which :func:`char_patch_labels` gives per-patch character
labels for the vision tower. Positions and lengths count characters only, not the space that joins two
lines in a transcription.

Deterministic from a seed (one ``random.Random`` per (seed, split)). Files: ``<root>/reading/{train,test}.json``
+ PNG images and ``<root>/manifest.json``.
"""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image, ImageDraw

from mmcl.errors import ConfigError
from mmcl.synthetic import ability_draw as art
from mmcl.synthetic.ability import GUI_LABELS, OCR_LINE_WORDS, OCR_WORDS
from mmcl.synthetic.draw import RGB, SynthExample, TaskSpec, balanced_examples, rng_for, with_multiple_choice
from mmcl.synthetic.files import check_sizes, write_cached, write_split

READING_VERSION = "reading-1"  # part of the cache key: bump it whenever the output changes
READING_TASK = "reading"
READER_CHARSET = string.digits + string.ascii_letters  # per-patch label k > 0 is READER_CHARSET[k - 1]

READ_QUESTION = "Transcribe the text in the image."
CHAR_QUESTION = "Which character is at position {} of the text?"
LENGTH_QUESTION = "How many characters does the text have?"

SYNTH_READING_TASK = TaskSpec(
    READING_TASK, "Reading mix: transcribe random strings, name the character at a position, count characters",
    "exact_match", 24, ("read", "char", "length"),
)  # fmt: skip

LINE_LENGTH = (1, 8)  # characters a line
MAX_CHARS = 12  # characters in all (two lines when more than LINE_LENGTH[1])
FONT_PX = (11, 18)  # at 96 pixels, scaled with the image
TWO_LINES = 0.3  # chance of two lines when one would do
MIN_CONTRAST = 4.5  # WCAG contrast ratio of ink on paper
_WEIGHTS = {"read": 3, "char": 2, "length": 1}
_TARGETS: dict[str, list[int]] = {qtype: list(range(1, MAX_CHARS + 1)) for qtype in _WEIGHTS}
# Strings that are words of synth-ability's lists (any case) are never drawn.
_ABILITY_WORDS = frozenset(w.lower() for lists in (OCR_WORDS, OCR_LINE_WORDS, GUI_LABELS)
                           for words in lists.values() for w in words)  # fmt: skip


def _luminance(color: RGB) -> float:
    def linear(v: int) -> float:
        c = v / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(v) for v in color)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(ink: RGB, paper: RGB) -> float:
    """WCAG contrast ratio of two colours (1 to 21)."""
    high, low = sorted((_luminance(ink), _luminance(paper)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def _colors(rng: random.Random) -> tuple[RGB, RGB]:
    """Random (ink, paper) with a contrast ratio of at least ``MIN_CONTRAST``."""
    while True:
        ink = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        paper = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if contrast(ink, paper) >= MIN_CONTRAST:
            return ink, paper


def _line_lengths(rng: random.Random, total: int) -> list[int]:
    """One or two line lengths (each 1-8) summing to ``total``."""
    low, high = LINE_LENGTH
    if total > high or (total >= 2 and rng.random() < TWO_LINES):
        first = rng.randint(max(low, total - high), min(high, total - low))
        return [first, total - first]
    return [total]


def _random_string(rng: random.Random, length: int) -> str:
    while True:
        text = "".join(rng.choice(READER_CHARSET) for _ in range(length))
        if text.lower() not in _ABILITY_WORDS:
            return text


def _fit(rng: random.Random, lengths: Sequence[int], font_px: int, size: int, room: int) -> tuple[list[str], int]:
    """Random lines of ``lengths`` and a font size that fits them in ``room`` pixels: the chosen size, shrunk
    down to the smallest of the range if a line is too wide, else other strings."""
    smallest = art.scaled(FONT_PX[0], size, art.MIN_FONT_PX)
    for _ in range(200):
        lines = [_random_string(rng, n) for n in lengths]
        for px in range(font_px, smallest - 1, -1):
            font = art.bundled_font(px)
            pitch = sum(font.getmetrics())
            widths = [sum(font.getlength(ch) for ch in line) for line in lines]
            if max(widths) + 1 <= room and pitch * len(lines) <= room:
                return lines, px
    raise ConfigError(f"reading mix: no string of {list(lengths)} characters fits a {size}-pixel image")


def draw_lines(rng: random.Random, size: int, lines: Sequence[str], font_px: int, ink: RGB, paper: RGB,
               margin: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Draw ``lines`` one below the other at a random place, each at its own random x, character by
    character; returns the image and per character ``{"char", "line", "box": [x0, y0, x1, y1]}`` (the cell:
    advance width x the line's ink height, pixels)."""
    font = art.bundled_font(font_px)
    pitch = sum(font.getmetrics())
    spans = []  # per line: ink top and bottom relative to the drawing origin (anchor "la")
    for line in lines:
        boxes = [font.getbbox(ch) for ch in line]
        spans.append((min(b[1] for b in boxes), max(b[3] for b in boxes)))
    top = margin - spans[0][0]
    bottom = size - margin - (len(lines) - 1) * pitch - spans[-1][1]
    y = rng.randint(top, max(top, bottom))
    image = Image.new("RGB", (size, size), paper)
    draw = ImageDraw.Draw(image)
    cells: list[dict[str, Any]] = []
    for index, (line, (ink_top, ink_bottom)) in enumerate(zip(lines, spans)):
        width = sum(font.getlength(ch) for ch in line)
        x = float(rng.randint(margin, max(margin, int(size - margin - width))))
        for ch in line:
            advance = font.getlength(ch)
            draw.text((x, y), ch, font=font, fill=ink)
            box = [round(x, 2), y + ink_top, round(x + advance, 2), y + ink_bottom]
            cells.append({"char": ch, "line": index, "box": box})
            x += advance
        y += pitch
    return image, cells


def _make_reading(rng: random.Random, size: int, qtype: str, target: int) -> SynthExample:
    """``target``: the number of characters (read, length) or the asked position (char)."""
    total = rng.randint(target, MAX_CHARS) if qtype == "char" else target
    font_px = art.scaled(rng.randint(*FONT_PX), size, art.MIN_FONT_PX)
    margin = art.scaled(3, size)
    lines, font_px = _fit(rng, _line_lengths(rng, total), font_px, size, size - 2 * margin)
    ink, paper = _colors(rng)
    image, cells = draw_lines(rng, size, lines, font_px, ink, paper, margin)
    facts: dict[str, Any] = {"lines": lines, "font_px": font_px, "ink": list(ink), "paper": list(paper),
                             "chars": cells}  # fmt: skip
    if qtype == "read":
        return SynthExample(image, READ_QUESTION, " ".join(lines), qtype, facts)
    if qtype == "char":
        facts["position"] = target
        return SynthExample(image, CHAR_QUESTION.format(target), cells[target - 1]["char"], qtype, facts)
    if qtype == "length":
        return SynthExample(image, LENGTH_QUESTION, str(len(cells)), qtype, facts)
    raise ValueError(f"unknown reading question type {qtype!r}")


def char_patch_labels(facts: dict[str, Any], image_size: int, patch_size: int) -> list[int]:
    """Per patch of the ``image_size // patch_size`` grid (row-major): 1 + the ``READER_CHARSET`` index of
    the character whose cell covers the patch centre (cells are half-open boxes), else 0."""
    grid = image_size // patch_size
    labels = [0] * (grid * grid)
    for cell in facts.get("chars", []):
        x0, y0, x1, y1 = cell["box"]
        label = 1 + READER_CHARSET.index(cell["char"])
        for row in range(grid):
            cy = (row + 0.5) * patch_size
            if not y0 <= cy < y1:
                continue
            for column in range(grid):
                if x0 <= (column + 0.5) * patch_size < x1:
                    labels[row * grid + column] = label
    return labels


_MC_POOLS = {"char": list(READER_CHARSET), "length": [str(n) for n in range(1, MAX_CHARS + 1)]}


def reading_examples(n: int, seed: int = 0, split: str = "train", image_size: int = 96,
                     mc_fraction: float = 0.0) -> Iterator[SynthExample]:
    """``n`` examples of the reading mix; question types (read 3 : char 2 : length 1) and their
    lengths or positions (1-12) are balanced; a fraction ``mc_fraction`` of the char and length questions
    are asked as multiple choice (letters)."""
    rng = rng_for("synth-reading", READING_VERSION, seed, split)
    qtypes = [qtype for qtype, weight in _WEIGHTS.items() for _ in range(weight)]
    examples = balanced_examples(rng, _make_reading, qtypes, _TARGETS, n, image_size)
    yield from with_multiple_choice(examples, _MC_POOLS, mc_fraction, rng_for("synth-reading-mc", seed, split))


def write_reading_mix(
    root: Path, seed: int = 0, n_train: int = 12000, n_test: int = 300, image_size: int = 96, mc_fraction: float = 0.0
) -> Path:
    """Write the reading mix as the single task ``reading`` under ``root`` and return ``root`` (files:
    ``root/reading/train.json``, ``root/reading/test.json``, ``root/manifest.json``). Cached."""
    check_sizes(image_size, seed=seed, n_train=n_train, n_test=n_test)
    params = {
        "generator": "synth-reading", "version": READING_VERSION, "seed": seed, "n_train": n_train,
        "n_test": n_test, "image_size": image_size, "tasks": [READING_TASK],
    }  # fmt: skip
    if mc_fraction:  # as in write_synth_pretrain: a mix without multiple choice keeps its cache key
        params["mc_fraction"] = mc_fraction

    def fill(folder: Path) -> None:
        for split, n in (("train", n_train), ("test", n_test)):
            write_split(folder / READING_TASK, READING_TASK, split,
                        reading_examples(n, seed, split, image_size, mc_fraction))

    return write_cached(Path(root), params, fill)


__all__ = [
    "CHAR_QUESTION", "LENGTH_QUESTION", "READER_CHARSET", "READING_TASK", "READING_VERSION", "READ_QUESTION",
    "SYNTH_READING_TASK", "char_patch_labels", "contrast", "draw_lines", "reading_examples", "write_reading_mix",
]  # fmt: skip
