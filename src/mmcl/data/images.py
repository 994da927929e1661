"""Image loading and checking with errors that name the file and the record."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmcl.data.sample import Sample
from mmcl.errors import DataError


def load_image(path: Path, where: str) -> Image.Image:
    """Decode ``path`` fully as RGB; any failure becomes a one-line :class:`DataError`."""
    if not path.is_file():
        raise DataError(f"{where}: image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: unreadable image {path} ({exc})") from None


def check_image(path: Path, where: str) -> str | None:
    """Problem with the image at ``path`` (missing, unidentifiable, truncated), or None if it is sound."""
    if not path.is_file():
        return f"{where}: image not found: {path}"
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        return f"{where}: unreadable image {path} ({exc})"
    return None


def sample_images(sample: Sample) -> list[Image.Image]:
    return [load_image(path, f"task {sample.task}: sample {sample.id}") for path in sample.images]
