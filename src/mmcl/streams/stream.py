"""Tasks and streams: an ordered list of tasks, each a training file, a test file, an image root and
a scorer. Registered streams (synthetic ones, published benchmarks) and streams declared in a
config resolve to the same :class:`Task` objects and are read by the same readers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from mmcl.data.images import check_image
from mmcl.data.readers import load_records, parse_test_record, parse_train_record, read_samples
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, DataError
from mmcl.registry import Registry, origin_of

_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_name(name: object, key: str) -> str:
    """``name`` if it is safe as one path component (letters, digits, '.', '_', '-'; not '.' or '..'):
    task names and the experiment name become folder and file names inside the run dir."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise ConfigError(
            f"{key}: {shown} is not a safe name (use letters, digits, '.', '_', '-'; not empty, '.' or '..')"
        )
    return name


def task_folders(root: Path) -> list[TaskFiles]:
    """A folder of ``<task>/{train,test}.json(l)``, one task per sub-folder in name order."""
    def data_file(folder: Path, split: str) -> Path:
        for suffix in (".json", ".jsonl"):
            if (folder / f"{split}{suffix}").exists():
                return folder / f"{split}{suffix}"
        return folder / f"{split}.json"

    entries = [
        TaskFiles(name=check_name(folder.name, f"{folder}: task folder name"), train=str(data_file(folder, "train")),
                  test=str(data_file(folder, "test")))
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    ]  # fmt: skip
    if not entries:
        raise ConfigError(f"{root}: no task folders (expected <task>/train.json and <task>/test.json)")
    return entries


@dataclass
class TaskFiles:
    """One task of a stream declared in a config (all paths relative to the config's folder or absolute)."""

    name: str = field(metadata={"safe_name": True, "help": "names the task's files in the run dir"})
    train: str = field(metadata={"help": "training file: LLaVA conversation JSON/JSONL"})
    test: str = field(metadata={"help": "test file JSON/JSONL: question_id, image, text, answer (or conversations)"})
    description: str = field(default="", metadata={"help": "one line shown in the report"})
    image_root: str | None = field(default=None, metadata={"help": "folder image paths are relative to (default: each file's folder)"})
    scorer: str = field(default="exact_match", metadata={"help": "registered scorer of the answers (`mmcl list`)"})
    max_new_tokens: int = field(default=16, metadata={"range": "[1, inf)", "help": "longest generated answer"})
    chance: float | None = field(default=None, metadata={
        "range": "[0, 100]", "help": "chance score in percent (CLiMB's S_rand); None = computed from the test answers"})

    def __post_init__(self) -> None:
        check_name(self.name, "stream task name")
        if self.chance is not None and not 0.0 <= self.chance <= 100.0:
            raise ConfigError(f"stream task {self.name}: chance must be a percentage in [0, 100], got {self.chance}")


@dataclass(frozen=True)
class Task:
    """A task ready to use: its files are resolved; samples are read on first access."""

    name: str
    description: str
    train_file: Path
    test_file: Path
    image_root: Path | None
    scorer: str
    max_new_tokens: int
    # Named side files a published stream ships for methods that want them (MLLM-CL's replay and router
    # samples), as (name, path) pairs; empty for most streams.
    extra_files: tuple[tuple[str, Path], ...] = ()
    # Chance score in percent when the benchmark states it (CLiMB) or the config sets it; otherwise it is
    # computed from the test samples' answer space (:mod:`mmcl.evaluation.chance`).
    chance: float | None = None

    @cached_property
    def train_samples(self) -> list[Sample]:
        return read_samples(self.train_file, self.name, self.image_root, split="train")

    @cached_property
    def test_samples(self) -> list[Sample]:
        return read_samples(self.test_file, self.name, self.image_root, split="test")

    def problems(self, max_problems: int | None = None, splits: tuple[str, ...] = ("train", "test")) -> list[str]:
        """Every bad record of the files of ``splits``: unreadable files, malformed records, missing or corrupt images."""
        found: list[str] = []
        for split, path in (("train", self.train_file), ("test", self.test_file)):
            if split not in splits:
                continue
            try:
                records = load_records(path)
            except DataError as exc:
                found.append(str(exc))
                continue
            parse = parse_train_record if split == "train" else parse_test_record
            root = self.image_root if self.image_root is not None else path.parent
            if not records:
                found.append(f"{path}: no records (the {split} set of task {self.name} is empty)")
            seen: dict[str, int] = {}  # test ids name predictions: duplicates are refused (as read_samples does)
            for index, record in enumerate(records):
                where = f"{path}: record {index}"
                try:
                    sample = parse(record, self.name, root, where)
                except DataError as exc:
                    found.append(str(exc))
                    continue
                if split == "test" and sample.id in seen:
                    found.append(f"{where}: duplicate id {sample.id!r} (first at record {seen[sample.id]})")
                seen.setdefault(sample.id, index)
                found.extend(p for p in (check_image(image, where) for image in sample.images) if p)
                if max_problems is not None and len(found) >= max_problems:
                    return found[:max_problems]
        return found


@dataclass
class StreamSpec:
    """A registered stream: a builder that prepares the files (generating them if synthetic)."""

    name: str
    description: str
    build: Callable[[dict[str, Any], Path], list[Task]]  # (options, cache dir) -> tasks
    # what ``mmcl list --stream`` shows as its options: a dataclass (fields with help and range metadata),
    # or else a mapping of option -> default; None: not declared
    options_class: type | None = None
    defaults: dict[str, Any] | None = None
    # the backbone preset a run of this stream uses when neither the config file nor --backbone names one
    backbone: str | None = None


STREAMS: Registry[StreamSpec] = Registry("stream")


def register_stream(spec: StreamSpec) -> StreamSpec:
    """Make ``spec`` selectable as ``stream.name`` (a taken name is refused)."""
    return STREAMS.register(spec.name, spec, origin=origin_of(spec.build))


def tasks_from_files(entries: list[TaskFiles], base_dir: Path) -> list[Task]:
    """Tasks of a stream declared as a list of files; relative paths resolve against ``base_dir``."""
    def resolve(path: str) -> Path:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() else base_dir / candidate

    names = [entry.name for entry in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"stream.tasks: duplicate task name(s) {duplicates}")
    return [
        Task(
            name=entry.name,
            description=entry.description or entry.name,
            train_file=resolve(entry.train),
            test_file=resolve(entry.test),
            image_root=resolve(entry.image_root) if entry.image_root else None,
            scorer=entry.scorer,
            max_new_tokens=entry.max_new_tokens,
            chance=entry.chance,
        )
        for entry in entries
    ]


@dataclass
class StreamConfig:
    """Which stream to run: a registered ``name`` (with its ``options``) or an explicit list of ``tasks``."""

    name: str | None = field(default=None, metadata={
        "help": "a registered stream; with `tasks`, a label of your own (default: files); none = synth-domain"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "the registered stream's options"})
    tasks: list[TaskFiles] = field(default_factory=list, metadata={"help": "your own tasks, in training order"})
    cache_dir: str = field(default="~/.cache/mmcl/streams", metadata={
        "help": "where generated streams are written (their content is fingerprinted apart)", "affects_results": False})

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = "files" if self.tasks else "synth-domain"


def build_stream(config: StreamConfig, base_dir: Path) -> list[Task]:
    from mmcl.streams import registry  # noqa: F401  (registers the built-in streams)
    from mmcl.evaluation.scorers import SCORERS

    if config.tasks and config.name in STREAMS:
        raise ConfigError(
            f"stream.name: {config.name!r} is a registered stream, but stream.tasks declares the tasks; "
            "drop the name (the stream is then labelled 'files') or give it a label of its own"
        )
    if config.tasks:
        tasks = tasks_from_files(config.tasks, base_dir)
    elif config.name in STREAMS:
        cache = Path(config.cache_dir).expanduser()
        tasks = STREAMS[config.name].build(dict(config.options), cache)
    else:
        STREAMS.lookup(config.name, "stream.name")
    if not tasks:
        raise ConfigError(f"stream {config.name}: no tasks")
    for task in tasks:
        check_name(task.name, f"stream {config.name}: task name")
        if task.scorer not in SCORERS:
            raise ConfigError(f"stream task {task.name}: unknown scorer {task.scorer!r} (known: {', '.join(sorted(SCORERS))})")
    return tasks
