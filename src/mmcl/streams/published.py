"""Shared pieces of the readers for published benchmark layouts (``coin``, ``mllm-cl-*``, ``climb``).

A published stream is given the folder a researcher downloaded (``stream.options.root``) and resolves
it to :class:`~mmcl.streams.stream.Task` objects. Files that our readers understand as they are
(LLaVA training JSON; test JSON with ``question_id, image, text, answer``) are read in place. Files
that need work (answers kept in a separate file, several accepted answers, raw annotation formats)
are converted once into LLaVA-format files under the stream cache, in a folder keyed by a hash of the
source paths, sizes and modification times, so an edited source is converted again.

Missing files are collected over all selected tasks first and reported in one line that names each
missing piece relative to the root, e.g. ``coin: root /data/CoIN: missing annotations/TextVQA/test.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from mmcl.errors import ConfigError, DataError

CONVERTER_VERSION = 2  # bump when a conversion changes its output, so caches are rebuilt
Record = dict[str, Any]


def parse_options(
    stream: str, options: dict[str, Any], task_names: Sequence[str], extra_defaults: dict[str, Any], layout: str
) -> tuple[Path, list[str], dict[str, Any]]:
    """``(root, selected task names in run order, extra options)`` from ``stream.options``.

    ``root`` is required; ``tasks`` (optional) is a subset of ``task_names`` in the order to run them;
    ``extra_defaults`` holds the stream's own keys and their defaults. ``layout`` describes the expected
    root in the error for a missing ``root``."""
    known = ["root", "tasks", *extra_defaults]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"stream.options: unknown key {unknown[0]!r} for {stream} (known: {', '.join(known)})")
    raw_root = options.get("root")
    if raw_root is None:
        raise ConfigError(f"stream.options.root: required for {stream} (the folder holding {layout})")
    if not isinstance(raw_root, str) or not raw_root:
        raise ConfigError(f"stream.options.root: expected a folder path, got {raw_root!r}")
    root = Path(raw_root).expanduser().absolute()
    selected = _selected_tasks(stream, options.get("tasks"), task_names)
    extras = {**extra_defaults, **{k: v for k, v in options.items() if k in extra_defaults}}
    if not root.is_dir():
        raise DataError(f"{stream}: root {root}: folder not found")
    return root, selected, extras


def _selected_tasks(stream: str, requested: Any, task_names: Sequence[str]) -> list[str]:
    if requested is None:
        return list(task_names)
    if isinstance(requested, str):
        requested = [part.strip() for part in requested.split(",") if part.strip()]
    if not isinstance(requested, list) or not requested or not all(isinstance(n, str) for n in requested):
        raise ConfigError(
            f"stream.options.tasks: expected a non-empty list of task names of {stream}, got {requested!r}"
        )
    by_lower = {name.lower(): name for name in task_names}
    chosen: list[str] = []
    for name in requested:
        if name.lower() not in by_lower:
            known = ", ".join(task_names)
            raise ConfigError(f"stream.options.tasks: unknown task {name!r} of {stream} (known: {known})")
        canonical = by_lower[name.lower()]
        if canonical in chosen:
            raise ConfigError(f"stream.options.tasks: task {canonical!r} listed twice")
        chosen.append(canonical)
    return chosen


def raise_if_missing(stream: str, root: Path, missing: Iterable[str]) -> None:
    """One :class:`DataError` naming every missing piece (paths relative to ``root``), if there are any."""
    unique = list(dict.fromkeys(missing))
    if unique:
        raise DataError(f"{stream}: root {root}: missing {', '.join(unique)}")


def missing_files(root: Path, relative_paths: Iterable[str]) -> list[str]:
    """The ones among ``relative_paths`` (files, or folders when they end with ``/``) that do not exist."""
    absent = []
    for relative in relative_paths:
        path = root / relative
        exists = path.is_dir() if relative.endswith("/") else path.is_file()
        if not exists:
            absent.append(relative)
    return absent


def image_folder_missing(records: Sequence[Record], image_root: Path, root: Path, source: str) -> list[str]:
    """The image folders the records point into that do not exist, e.g. ``COCO/train2014/ (images of
    annotations/VQAv2/test.json)``: for each top-level folder, the folder of the first image in it is
    looked at. A single missing image is left to the per-record check of ``mmcl data check``."""
    folders: dict[str, PurePosixPath] = {}
    for record in records:
        raw = record.get("image", record.get("images")) if isinstance(record, dict) else None
        names = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        for name in names:
            path = PurePosixPath(str(name))
            if len(path.parts) > 1 and not path.is_absolute():
                folders.setdefault(path.parts[0], path.parent)
        if len(folders) >= 4:
            break
    absent = []
    for folder in folders.values():
        full = image_root / folder
        if not full.is_dir():
            where = full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full)
            absent.append(f"{where}/ (images of {source})")
    return absent


def source_key(sources: Iterable[Path], *salt: str) -> str:
    """Hash of the sources' absolute paths, sizes and modification times (plus ``salt``)."""
    digest = hashlib.sha256(f"v{CONVERTER_VERSION}".encode())
    for part in salt:
        digest.update(b"\0" + part.encode())
    for path in sources:
        stat = path.stat()
        digest.update(f"\0{path.absolute()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_conversion(
    cache: Path,
    stream: str,
    name: str,
    sources: Sequence[Path],
    build: Callable[[], list[Record] | None],
    salt: str = "",
) -> Path | None:
    """The converted file ``<cache>/<stream>/<key>/<name>.json`` for ``sources``, built by ``build`` on a miss.

    ``build`` returns the records to write, or ``None`` when the first source can be read as it is; the
    answer is remembered (a ``.direct`` marker) so later builds of an unchanged source skip the work.
    Returns ``None`` for "read the source directly"."""
    folder = cache / stream / source_key(sources, name, salt)
    target, direct_marker = folder / f"{name}.json", folder / f"{name}.direct"
    if target.is_file():
        return target
    if direct_marker.is_file():
        return None
    records = build()
    folder.mkdir(parents=True, exist_ok=True)
    if records is None:
        direct_marker.write_text("the source file is read as it is\n", encoding="utf-8")
        return None
    temporary = folder / f".{name}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    temporary.replace(target)
    return target


def require_field(record: Any, key: str, where: str) -> Any:
    """``record[key]``, or a :class:`DataError` naming the record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, found {type(record).__name__}")
    if key not in record:
        raise DataError(f"{where}: missing field '{key}'")
    return record[key]
