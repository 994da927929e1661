"""Image loading and checking with errors that name the file and the record."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

from PIL import Image, UnidentifiedImageError

from mmcl.data.sample import Sample
from mmcl.errors import DataError


@contextlib.contextmanager
def _bombs_refused() -> Iterator[None]:
    """PIL's decompression-bomb warning (over ``Image.MAX_IMAGE_PIXELS``) raised as an error, like its
    :class:`PIL.Image.DecompressionBombError` (over twice the limit), so both name the image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _bomb_problem(path: Path, where: str) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    return f"{where}: image too large {path} (over PIL's decompression-bomb limit of {limit} pixels; shrink it)"


def load_image(path: Path, where: str) -> Image.Image:
    """Decode ``path`` fully as RGB; any failure becomes a one-line :class:`DataError`."""
    if not path.is_file():
        raise DataError(f"{where}: image not found: {path}")
    try:
        with _bombs_refused(), Image.open(path) as image:
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(_bomb_problem(path, where)) from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: unreadable image {path} ({exc})") from None


def check_image(path: Path, where: str) -> str | None:
    """Problem with the image at ``path`` (missing, unidentifiable, truncated), or None if it is sound."""
    if not path.is_file():
        return f"{where}: image not found: {path}"
    try:
        with _bombs_refused(), Image.open(path) as image:
            image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _bomb_problem(path, where)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        return f"{where}: unreadable image {path} ({exc})"
    return None


def sample_images(sample: Sample) -> list[Image.Image]:
    return [load_image(path, f"task {sample.task}: sample {sample.id}") for path in sample.images]
