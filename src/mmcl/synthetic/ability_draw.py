"""Drawing helpers of the ``synth-ability`` stream (:mod:`mmcl.synthetic.ability`): text with Pillow's
bundled font only (``ImageFont.load_default(size=...)``, never a system font), slanted and stroked text
masks, background noise, bar and pie charts, tables, object placement and synthetic app screens.

Pixel quantities are given for a 96-pixel image and scaled to the image size with :func:`scaled`. Nothing
here draws random numbers except through the ``random.Random`` it is handed.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from mmcl.synthetic.draw import RGB

REFERENCE_SIZE = 96
MIN_FONT_PX = 6
PixelBox = tuple[int, int, int, int]


def scaled(value: float, image_size: int, minimum: int = 1) -> int:
    """``value`` pixels of a 96-pixel image, scaled to ``image_size`` and rounded (at least ``minimum``)."""
    return max(minimum, round(value * image_size / REFERENCE_SIZE))


@functools.lru_cache(maxsize=128)
def bundled_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font (Aileron) at ``size`` pixels; needs Pillow built with FreeType."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("synth-ability needs Pillow with FreeType (ImageFont.load_default(size=...))")
    return font


def text_width(text: str, font: ImageFont.FreeTypeFont, stroke_px: int = 0) -> int:
    left, _, right, _ = font.getbbox(text, stroke_width=stroke_px)
    return int(right - left)


def fit_font(text: str, preferred_px: int, max_width: float) -> ImageFont.FreeTypeFont:
    """The bundled font at ``preferred_px``, shrunk one pixel at a time (down to 6) until ``text`` fits."""
    size = preferred_px
    while size > MIN_FONT_PX and text_width(text, bundled_font(size)) > max_width:
        size -= 1
    return bundled_font(size)


def text_mask(text: str, font_px: int, stroke_px: int = 0, shear: float = 0.0) -> Image.Image:
    """An ``L`` mask of ``text`` (255 = ink) in a tight box; ``shear`` slants it (positive: top to the right)."""
    font = bundled_font(font_px)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke_px)
    pad = stroke_px + 1
    width, height = int(right - left) + 2 * pad, int(bottom - top) + 2 * pad
    slant = math.ceil(abs(shear) * height)
    mask = Image.new("L", (width + slant, height), 0)
    origin = (pad - left + (0 if shear > 0 else slant), pad - top)
    ImageDraw.Draw(mask).text(origin, text, font=font, fill=255, stroke_width=stroke_px, stroke_fill=255)
    if shear:  # output (x, y) samples input (x + shear * y - max(shear, 0) * height, y)
        coefficients = (1.0, shear, -max(shear, 0.0) * height, 0.0, 1.0, 0.0)
        mask = mask.transform(mask.size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR)
    return mask


def paste_mask(image: Image.Image, mask: Image.Image, xy: tuple[int, int], color: RGB) -> None:
    """Paint ``color`` through ``mask`` with its top-left corner at ``xy``."""
    image.paste(Image.new("RGB", mask.size, color), xy, mask)


def add_noise(image: Image.Image, rng: random.Random, speckle: float, lines: int, colors: Sequence[RGB]) -> None:
    """Turn a ``speckle`` fraction of the pixels into dots of ``colors[0]`` and draw ``lines`` thin random
    strokes in the other colours (in place; nothing at 0)."""
    width, height = image.size
    if speckle > 0:
        threshold = round(255 * speckle)
        noise = Image.frombytes("L", image.size, rng.randbytes(width * height))
        paste_mask(image, noise.point(lambda value: 255 if value < threshold else 0), (0, 0), colors[0])
    draw = ImageDraw.Draw(image)
    for _ in range(lines):
        start = (rng.uniform(0, width), rng.uniform(0, height))
        end = (rng.uniform(0, width), rng.uniform(0, height))
        draw.line((start, end), fill=rng.choice(list(colors)), width=1)


def centered_text(draw: ImageDraw.ImageDraw, center: tuple[float, float], text: str,
                  font: ImageFont.FreeTypeFont, fill: RGB, anchor: str = "mm") -> None:
    draw.text(center, text, font=font, fill=fill, anchor=anchor)


# ---------------------------------------------------------------------------------------------
# Charts and tables (math)

INK: RGB = (20, 20, 20)


def draw_bar_chart(image: Image.Image, values: Sequence[int], layout: str, color: RGB, font_px: int) -> None:
    """Bars with their values written at their ends: ``vertical`` (values above) or ``horizontal`` (to the right)."""
    s = float(image.width)
    draw = ImageDraw.Draw(image)
    font = bundled_font(font_px)
    peak = max(values)
    if layout == "vertical":
        left, right, top, bottom = 0.06 * s, 0.96 * s, 0.16 * s, 0.92 * s
        slot = (right - left) / len(values)
        for index, value in enumerate(values):
            x0, x1 = left + (index + 0.15) * slot, left + (index + 0.85) * slot
            y0 = bottom - value / peak * (bottom - top)
            draw.rectangle((x0, y0, x1, bottom), fill=color)
            centered_text(draw, ((x0 + x1) / 2, y0 - 1), str(value), font, INK, anchor="md")
        draw.line((left, bottom, right, bottom), fill=INK, width=max(1, image.width // 48))
    elif layout == "horizontal":
        left, right, top, bottom = 0.06 * s, 0.78 * s, 0.05 * s, 0.95 * s
        slot = (bottom - top) / len(values)
        for index, value in enumerate(values):
            y0, y1 = top + (index + 0.15) * slot, top + (index + 0.85) * slot
            x1 = left + value / peak * (right - left)
            draw.rectangle((left, y0, x1, y1), fill=color)
            centered_text(draw, (x1 + 2, (y0 + y1) / 2), str(value), font, INK, anchor="lm")
        draw.line((left, top, left, bottom), fill=INK, width=max(1, image.width // 48))
    else:
        raise ValueError(f"unknown bar layout {layout!r}")


def draw_pie_chart(image: Image.Image, weights: Sequence[int], colors: Sequence[RGB], layout: str,
                   start_angle: float) -> None:
    """A pie (``pie``) or ring (``donut``) with one slice per weight, clockwise from ``start_angle``."""
    s = float(image.width)
    draw = ImageDraw.Draw(image)
    box = (0.1 * s, 0.1 * s, 0.9 * s, 0.9 * s)
    total, angle = sum(weights), start_angle
    for weight, color in zip(weights, colors):
        sweep = 360.0 * weight / total
        draw.pieslice(box, angle, angle + sweep, fill=color, outline=(255, 255, 255))
        angle += sweep
    if layout == "donut":
        draw.ellipse((0.32 * s, 0.32 * s, 0.68 * s, 0.68 * s), fill=image.getpixel((0, 0)))
    elif layout != "pie":
        raise ValueError(f"unknown pie layout {layout!r}")


def draw_table(image: Image.Image, cells: Sequence[Sequence[str]], font_px: int, box: Sequence[float]) -> None:
    """A ruled grid of ``cells`` (rows of strings) filling ``box``, each text centred in its cell."""
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    rows, columns = len(cells), max(len(row) for row in cells)
    width, height = (x1 - x0) / columns, (y1 - y0) / rows
    for r, row in enumerate(cells):
        for c, text in enumerate(row):
            cell = (x0 + c * width, y0 + r * height, x0 + (c + 1) * width, y0 + (r + 1) * height)
            draw.rectangle(cell, outline=INK, width=1)
            font = fit_font(text, font_px, width - 2)
            centered_text(draw, ((cell[0] + cell[2]) / 2, (cell[1] + cell[3]) / 2), text, font, INK)


def draw_arithmetic(image: Image.Image, a: int, operator: str, b: int, layout: str) -> None:
    """``a op b = ?`` on one line (``row``) or as a written column sum with a rule and ``?`` (``column``)."""
    s = image.width
    draw = ImageDraw.Draw(image)
    if layout == "row":
        text = f"{a} {operator} {b} = ?"
        centered_text(draw, (s / 2, s / 2), text, fit_font(text, scaled(14, s), 0.9 * s), INK)
    elif layout == "column":
        font, right = bundled_font(scaled(14, s)), 0.72 * s
        for y, text in ((0.25, str(a)), (0.45, str(b)), (0.72, "?")):
            centered_text(draw, (right, y * s), text, font, INK, anchor="rm")
        centered_text(draw, (0.28 * s, 0.45 * s), operator, font, INK)
        draw.line((0.22 * s, 0.58 * s, right, 0.58 * s), fill=INK, width=max(1, s // 48))
    else:
        raise ValueError(f"unknown arithmetic layout {layout!r}")


def draw_sequence(image: Image.Image, shown: Sequence[str], layout: str) -> None:
    """Terms separated by commas on one line (``row``) or in a grid of boxes, three a row (``cells``)."""
    s = image.width
    if layout == "row":
        text = ", ".join(shown)
        centered_text(ImageDraw.Draw(image), (s / 2, s / 2), text, fit_font(text, scaled(13, s), 0.92 * s), INK)
    elif layout == "cells":
        rows = [list(shown[i:i + 3]) for i in range(0, len(shown), 3)]
        rows[-1] += [""] * (3 - len(rows[-1]))
        draw_table(image, rows, scaled(12, s), (0.06 * s, 0.2 * s, 0.94 * s, 0.8 * s))
    else:
        raise ValueError(f"unknown sequence layout {layout!r}")


# ---------------------------------------------------------------------------------------------
# App screens (GUI)


@dataclass(frozen=True)
class Element:
    """One interactive element of a screen: ``button``, ``field`` (text box), ``tab`` or ``item`` (list row)."""

    kind: str
    label: str
    box: PixelBox

    @property
    def center(self) -> tuple[int, int]:
        return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2


@dataclass(frozen=True)
class Theme:
    background: RGB
    bar: RGB
    accent: RGB
    text: RGB
    field: RGB
    muted: RGB


THEMES: dict[str, Theme] = {
    "light": Theme((246, 246, 246), (225, 230, 240), (50, 110, 210), (25, 25, 25), (255, 255, 255), (120, 120, 120)),
    "dark": Theme((28, 30, 36), (50, 54, 64), (230, 140, 40), (235, 235, 235), (60, 64, 74), (170, 170, 170)),
}

Slot = tuple[str, tuple[float, float, float, float]]  # (kind, box in fractions of the side)


def _row(kind: str, count: int, y0: float, y1: float, x0: float = 0.0, x1: float = 1.0) -> list[Slot]:
    width = (x1 - x0) / count
    return [(kind, (x0 + i * width, y0, x0 + (i + 1) * width, y1)) for i in range(count)]


def _column(kind: str, count: int, x0: float, x1: float, y0: float, y1: float, fill: float = 1.0) -> list[Slot]:
    """``count`` boxes stacked from ``y0`` to ``y1``, each ``fill`` of its share of the height."""
    height = (y1 - y0) / count
    return [(kind, (x0, y0 + i * height, x1, y0 + (i + fill) * height)) for i in range(count)]


def _list_screen(rng: random.Random) -> list[Slot]:
    """Header bar, a search field, 2-4 list rows, a bottom tab bar of 2-4."""
    header = rng.uniform(0.08, 0.12)
    field_top = header + rng.uniform(0.02, 0.05)
    field_bottom = field_top + rng.uniform(0.10, 0.13)
    tab_top = 1.0 - rng.uniform(0.13, 0.17)
    rows = rng.randint(2, 4)
    row_height = min(rng.uniform(0.12, 0.16), (tab_top - field_bottom - 0.04) / rows)
    items = _column("item", rows, 0.0, 1.0, field_bottom + 0.03, field_bottom + 0.03 + rows * row_height)
    return [("header", (0.0, 0.0, 1.0, header)), ("field", (0.05, field_top, 0.95, field_bottom)), *items,
            *_row("tab", rng.randint(2, 4), tab_top, 1.0)]  # fmt: skip


def _form_screen(rng: random.Random) -> list[Slot]:
    """2-3 top tabs, 1-3 stacked fields, two side-by-side buttons and sometimes a wide one."""
    tab_bottom = rng.uniform(0.12, 0.15)
    fields = rng.randint(1, 3)
    field_height = rng.uniform(0.10, 0.13)
    top = tab_bottom + rng.uniform(0.05, 0.09)
    slots = [*_row("tab", rng.randint(2, 3), 0.0, tab_bottom)]
    slots += _column("field", fields, 0.08, 0.92, top, top + fields * (field_height + 0.05), fill=0.72)
    y = top + fields * (field_height + 0.05) + rng.uniform(0.02, 0.06)
    height = rng.uniform(0.11, 0.14)
    slots += [("button", (0.08, y, 0.46, y + height)), ("button", (0.54, y, 0.92, y + height))]
    if y + 2 * height + 0.06 <= 0.98:
        slots.append(("button", (0.08, y + height + 0.05, 0.92, y + 2 * height + 0.05)))
    return slots


def _grid_screen(rng: random.Random) -> list[Slot]:
    """2-3 top tabs, a grid of 2x2 or 3x2 tile buttons, a field at the bottom."""
    tab_bottom = rng.uniform(0.12, 0.15)
    columns, field_top = rng.choice((2, 3)), 1.0 - rng.uniform(0.12, 0.15)
    top, bottom = tab_bottom + 0.05, field_top - 0.05
    width, height = 0.88 / columns, (bottom - top) / 2
    tiles = [("button", (0.06 + c * width + 0.02, top + r * height + 0.02, 0.06 + (c + 1) * width - 0.02,
                         top + (r + 1) * height - 0.02)) for r in range(2) for c in range(columns)]  # fmt: skip
    return [*_row("tab", rng.randint(2, 3), 0.0, tab_bottom), *tiles, ("field", (0.06, field_top, 0.94, 0.97))]


def _sidebar_screen(rng: random.Random) -> list[Slot]:
    """A left column of 3-4 tabs; on the right a field, 1-3 list rows and a button."""
    split = rng.uniform(0.3, 0.36)
    rows = rng.randint(1, 3)
    field_bottom = rng.uniform(0.15, 0.19)
    items = _column("item", rows, split + 0.04, 1.0, field_bottom + 0.06, field_bottom + 0.06 + rows * 0.16)
    button_top = rng.uniform(max(0.6, field_bottom + 0.08 + rows * 0.16), 0.82)
    return [*_column("tab", rng.randint(3, 4), 0.0, split, 0.0, 1.0), ("field", (split + 0.06, 0.04, 0.96, field_bottom)),
            *items, ("button", (split + 0.1, button_top, 0.92, button_top + 0.14))]  # fmt: skip


SCREEN_LAYOUTS: dict[str, Callable[[random.Random], list[Slot]]] = {
    "list": _list_screen, "form": _form_screen, "grid": _grid_screen, "sidebar": _sidebar_screen,
}  # fmt: skip


def screen_slots(layout: str, rng: random.Random) -> list[Slot]:
    """The element kinds and fractional boxes of one screen of ``layout`` (counts and sizes vary)."""
    if layout not in SCREEN_LAYOUTS:
        raise ValueError(f"unknown screen layout {layout!r} (known: {', '.join(SCREEN_LAYOUTS)})")
    return SCREEN_LAYOUTS[layout](rng)


def draw_screen(image: Image.Image, slots: Sequence[Slot], labels: Sequence[str], theme: Theme,
                font_px: int) -> list[Element]:
    """Draw one app screen (the next label for each interactive slot, in order) and return its elements."""
    s = image.width
    draw = ImageDraw.Draw(image)
    edge = max(1, s // 96)
    elements: list[Element] = []
    names = iter(labels)
    for kind, fraction in slots:
        x0, y0, x1, y1 = box = tuple(min(s - 1, round(v * s)) for v in fraction)
        if kind == "header":
            draw.rectangle(box, fill=theme.accent)
            continue
        label = next(names)
        font = fit_font(label, font_px, max(4, x1 - x0 - 2 * scaled(4, s)))
        if kind == "button":
            draw.rounded_rectangle(box, radius=scaled(4, s), fill=theme.accent)
            centered_text(draw, ((x0 + x1) / 2, (y0 + y1) / 2), label, font, (255, 255, 255))
        elif kind == "field":
            draw.rectangle(box, fill=theme.field, outline=theme.muted, width=edge)
            centered_text(draw, (x0 + scaled(4, s), (y0 + y1) / 2), label, font, theme.muted, anchor="lm")
        elif kind == "tab":
            draw.rectangle(box, fill=theme.bar, outline=theme.background, width=edge)
            centered_text(draw, ((x0 + x1) / 2, (y0 + y1) / 2), label, font, theme.text)
        elif kind == "item":
            draw.line((x0, y1, x1, y1), fill=theme.muted, width=edge)
            centered_text(draw, (x0 + scaled(5, s), (y0 + y1) / 2), label, font, theme.text, anchor="lm")
            centered_text(draw, (x1 - scaled(5, s), (y0 + y1) / 2), ">", font, theme.muted, anchor="rm")
        else:
            raise ValueError(f"unknown element kind {kind!r}")
        elements.append(Element(kind, label, box))  # type: ignore[arg-type]
    return elements


def interactive_count(slots: Sequence[Slot]) -> int:
    """How many labelled elements ``slots`` holds (the header is not one)."""
    return sum(kind != "header" for kind, _ in slots)


__all__ = [
    "REFERENCE_SIZE", "SCREEN_LAYOUTS", "THEMES", "Element", "Theme", "add_noise", "bundled_font",
    "draw_arithmetic", "draw_bar_chart", "draw_pie_chart", "draw_screen", "draw_sequence", "draw_table", "fit_font",
    "interactive_count", "paste_mask", "scaled", "screen_slots", "text_mask", "text_width",
]  # fmt: skip
