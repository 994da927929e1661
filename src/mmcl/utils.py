"""Small file helpers: atomic writes and run metadata.

Every write of mmcl's outputs goes through these helpers, which turn the operating system's refusals
(read-only file system, full disk, no permission, a file where a folder should be) into one-line
:class:`~mmcl.errors.OutputError` naming the path."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from mmcl.errors import OutputError

# errno values that mean "this output cannot be written here", as opposed to a bug.
OUTPUT_ERRNOS = frozenset(
    code
    for code in (
        errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EACCES, errno.EPERM, errno.ENOTDIR,
        errno.EEXIST, errno.EISDIR, errno.EFBIG, errno.ENAMETOOLONG,
    )
    if code is not None
)  # fmt: skip


def _blocking_file(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists and is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def describe_output_error(exc: OSError, path: Path | str | None = None) -> str:
    """One line for an OSError met while writing ``path`` (default: the error's own file name)."""
    filename = exc.filename if isinstance(exc.filename, (str, os.PathLike)) else None
    target = Path(path if path is not None else filename) if (path is not None or filename) else "an output file"
    code = exc.errno
    if code == errno.ENOSPC:
        return f"disk full writing {target}"
    if code == getattr(errno, "EDQUOT", None):
        return f"disk quota exceeded writing {target}"
    if code == errno.EROFS:
        return f"read-only file system: cannot write {target}"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {target}"
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = _blocking_file(Path(filename)) if filename else None
        blocker = blocker or (_blocking_file(target) if isinstance(target, Path) else None)
        if blocker is not None:
            return f"cannot write {target}: {blocker} is a file, not a folder"
    if code == errno.EISDIR:
        return f"{target} is a folder, not a file"
    return f"{target}: {exc.strerror or exc}"


def as_output_error(exc: BaseException, path: Path | str | None = None) -> OutputError | None:
    """The :class:`OutputError` for an OSError of :data:`OUTPUT_ERRNOS` (None for any other exception)."""
    if isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS:
        return OutputError(describe_output_error(exc, path))
    return None


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn an output OSError raised inside the block into an :class:`OutputError` naming ``path``."""
    try:
        yield
    except OSError as exc:
        error = as_output_error(exc, path)
        if error is None:
            raise
        raise error from None


def make_dirs(path: Path | str) -> Path:
    """``mkdir -p path``; a file in the way, a read-only or full disk is an :class:`OutputError`."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def _write_text(path: Path, text: str) -> None:
    """The one low-level text write (tests inject disk faults here)."""
    path.write_text(text, encoding="utf-8")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temp file in ``path``'s folder, then rename it to ``path`` (a crash leaves no half file)."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(temporary)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    _atomic_write(Path(path), lambda temporary: _write_text(temporary, text))


def save_tensors(tensors: dict, path: Path | str) -> None:
    """``safetensors.torch.save_file`` (itself a temp file and a rename) with its I/O failures as
    :class:`OutputError` naming ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_file(tensors, str(path))
        except OSError:
            raise
        except Exception as exc:  # safetensors' SafetensorError carries the OS error in its text only
            found = re.search(r"os error (\d+)", str(exc))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from exc


# -- small shared helpers ----------------------------------------------------------------------------
class ShuffledCycle:
    """Values forever in shuffled passes drawn from ``rng`` (each value once per pass, popped from the end
    of the shuffled pass), so every value is (almost) equally frequent."""

    def __init__(self, rng: random.Random, values: Sequence[Any]) -> None:
        self._rng, self._values = rng, list(values)
        self._queue: list[Any] = []

    def next(self) -> Any:
        """The next value; a new pass is shuffled when the current one is used up."""
        if not self._queue:
            self._queue = list(self._values)
            self._rng.shuffle(self._queue)
        return self._queue.pop()


def mean_of_present(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _write_bytes(path: Path, data: bytes) -> None:
    """The one low-level bytes write (tests inject disk faults here)."""
    path.write_bytes(data)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    _atomic_write(Path(path), lambda temporary: _write_bytes(temporary, data))
