"""Fingerprints of a run's data, so that results computed from other data are never shown as current.

A run dir records, in ``data.json``, one entry per data file the run reads: the content hash (SHA-256)
of every task's train and test file (and of a published stream's side files), and for the images the
records of that file reference, one digest of their paths, sizes and modification times (a ``stat``
per image, no read: affordable for large image folders). On a re-run the runner compares the stored
entries with the current ones; :func:`changes` lists what differs, and the runner either refuses or
(``mmcl run --recompute-changed``) redoes exactly the stages and evaluations that depend on it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

FINGERPRINT_VERSION = 1
GENERAL_KEY = "general"  # the general-ability set's entry (kept apart from the stream's tasks)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def images_digest(images: Iterable[Path], base: Path) -> tuple[int, str]:
    """(number of distinct images, digest of their paths, sizes and modification times); a missing image
    counts with size and time -1. Paths under ``base`` (the data file's folder) are taken relative to it."""
    digest = hashlib.sha256()
    unique = sorted({str(image) for image in images})
    for name in unique:
        path = Path(name)
        try:
            stat = os.stat(path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        shown = path.relative_to(base).as_posix() if path.is_relative_to(base) else name
        digest.update(f"{shown}\0{size}\0{mtime}\n".encode())
    return len(unique), digest.hexdigest()


def file_entry(path: Path, samples: Iterable[Any] | None) -> dict[str, Any]:
    """The fingerprint of one data file and (for a file of samples) the images its records reference."""
    path = Path(path)
    entry: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path)}
    if samples is not None:
        count, digest = images_digest((image for sample in samples for image in sample.images), path.parent)
        entry["images"] = count
        entry["images_sha256"] = digest
    return entry


def data_fingerprints(tasks: list[Any], general: Any | None) -> dict[str, Any]:
    """``data.json``'s content for the stream's ``tasks`` and the general-ability set (``None`` = off)."""
    entries: dict[str, Any] = {}
    for task in tasks:
        entry = {
            "train": file_entry(task.train_file, task.train_samples),
            "test": file_entry(task.test_file, task.test_samples),
        }
        for name, path in getattr(task, "extra_files", ()):
            entry[f"extra:{name}"] = file_entry(Path(path), None) if Path(path).is_file() else {"path": str(path), "sha256": None}
        entries[task.name] = entry
    return {
        "version": FINGERPRINT_VERSION,
        "tasks": entries,
        GENERAL_KEY: file_entry(general.test_file, general.test_samples) if general is not None else None,
    }


@dataclass(frozen=True)
class Change:
    """One data file that differs from the run dir's record: ``task`` (``None`` for the general set),
    ``split`` (``train`` (side files count as training data), ``test`` or ``general``), ``path``, ``what``."""

    task: str | None
    split: str
    path: str
    what: str

    def describe(self) -> str:
        owner = f"task {self.task} {self.split} file" if self.task is not None else "general-ability set"
        return f"{self.path} ({owner}: {self.what})"


def _entry_change(task: str | None, split: str, old: Any, new: Any) -> Change | None:
    if old == new:
        return None
    path = (new or old or {}).get("path", "?")
    if not old:
        return Change(task, split, path, "not recorded before")
    if not new:
        return Change(task, split, path, "no longer used")
    if old.get("sha256") != new.get("sha256"):
        return Change(task, split, path, "content changed")
    if old.get("images") != new.get("images"):
        return Change(task, split, path, f"references {new.get('images')} images, {old.get('images')} before")
    if old.get("images_sha256") != new.get("images_sha256"):
        return Change(task, split, path, "an image it references changed (path, size or modification time)")
    return None  # only the file's location differs; same content and images


def changes(stored: dict[str, Any], current: dict[str, Any]) -> list[Change]:
    """Every file whose fingerprint differs between ``stored`` (the run dir's) and ``current``."""
    found: list[Change] = []
    old_tasks, new_tasks = stored.get("tasks") or {}, current.get("tasks") or {}
    for name in [*new_tasks, *(n for n in old_tasks if n not in new_tasks)]:
        old, new = old_tasks.get(name) or {}, new_tasks.get(name) or {}
        for key in [*new, *(k for k in old if k not in new)]:
            split = "test" if key == "test" else "train"
            change = _entry_change(name, split, old.get(key), new.get(key))
            if change is not None:
                found.append(change)
    change = _entry_change(None, GENERAL_KEY, stored.get(GENERAL_KEY), current.get(GENERAL_KEY))
    if change is not None:
        found.append(change)
    return found
