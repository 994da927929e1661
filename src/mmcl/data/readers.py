"""Readers for LLaVA-style training JSON, test JSON (``question_id, image, text, answer``) and JSONL.

Every problem is reported as a :class:`DataError` that names the file and the record index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from mmcl.data.sample import IMAGE_PLACEHOLDER, Sample
from mmcl.errors import DataError

_HUMAN_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant"}
_TRAIN_KEYS = {"id", "image", "images", "conversations"}
_TEST_KEYS = {"question_id", "id", "image", "images", "text", "answer"}


def _read_text(path: Path) -> str:
    """The file's text (UTF-8, a BOM allowed); an unreadable or undecodable file is a one-line DataError."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_json_lines(path: Path) -> list[Any]:
    """The values of a JSON-lines file (blank lines skipped); a malformed line names file and line."""
    values = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except RecursionError:
            raise DataError(f"{path}: line {line_number}: JSON nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {line_number}: malformed JSON ({exc.msg})") from None
    return values


def read_json_document(path: Path) -> Any:
    """One JSON document; malformed JSON names the file, line and column."""
    try:
        return json.loads(_read_text(path))
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None


def load_records(path: Path) -> list[dict[str, Any]]:
    """Records of a ``.json`` file (a list of objects) or a ``.jsonl`` file (one object a line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".jsonl":
        return read_json_lines(path)
    records = read_json_document(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    return records


def _image_paths(record: dict[str, Any], image_root: Path, where: str) -> tuple[Path, ...]:
    raw = record.get("images", record.get("image"))
    if raw is None:
        return ()
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{where}: 'image' must be a path or a list of paths")
    paths = tuple((image_root / name) for name in names)
    for name, path in zip(names, paths):
        if "\x00" in name or len(str(path).encode("utf-8", "surrogatepass")) > 4096 or any(
            len(part.encode("utf-8", "surrogatepass")) > 255 for part in path.parts
        ):
            shown = repr(name) if len(name) <= 40 else repr(name[:37]) + "..."
            raise DataError(f"{where}: unusable image path {shown} (a NUL byte, or a name longer than the file system allows)")
    return paths


def as_text(value: Any) -> str | None:
    """A text value of a record: a string, or a JSON number written as text (answers such as 7 or 2.5);
    None for anything else (booleans, null, lists, objects)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _string_field(record: dict[str, Any], key: str, where: str) -> str:
    value = as_text(record.get(key))
    if value is None:
        raise DataError(f"{where}: missing or non-string field '{key}'")
    return value


def _check_placeholders(sample: Sample, where: str) -> Sample:
    """The ``<image>`` placeholders of a sample's user turns must be absent (images go first) or match its
    images one to one; the backbone refuses anything else when it builds the chat messages."""
    placeholders = sum(user.count(IMAGE_PLACEHOLDER) for user, _ in sample.turns())
    if placeholders not in (0, len(sample.images)):
        raise DataError(f"{where}: {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) for {len(sample.images)} image(s)")
    return sample


def parse_train_record(record: Any, task: str, image_root: Path, where: str) -> Sample:
    """One LLaVA conversation record: alternating human/gpt turns, the last one from gpt."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, found {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: missing or empty 'conversations' list")
    turns: list[tuple[str, str]] = []
    pending_user: str | None = None
    for position, message in enumerate(conversations):
        value = as_text(message.get("value")) if isinstance(message, dict) else None
        if value is None:
            raise DataError(f"{where}: conversations[{position}] needs a string 'value'")
        role = message.get("from")
        if not isinstance(role, str) or role not in _HUMAN_ROLES | _ASSISTANT_ROLES:
            shown = repr(role) if len(repr(role)) <= 40 else repr(role)[:37] + "..."
            raise DataError(f"{where}: conversations[{position}] from {shown}: expected 'human' or 'gpt'")
        if role in _HUMAN_ROLES and pending_user is None:
            pending_user = value
        elif role in _ASSISTANT_ROLES and pending_user is not None:
            turns.append((pending_user, value))
            pending_user = None
        else:
            raise DataError(f"{where}: conversations[{position}] from {role!r} breaks the human/gpt alternation")
    if pending_user is not None:
        raise DataError(f"{where}: conversation ends with a human turn and has no answer")
    sample_id = where if record.get("id") is None else _sample_id(record["id"], where)
    metadata = {k: v for k, v in record.items() if k not in _TRAIN_KEYS}
    prompt, answer = turns[-1]
    return _check_placeholders(Sample(
        id=sample_id,
        task=task,
        images=_image_paths(record, image_root, where),
        prompt=prompt,
        answer=answer,
        history=tuple(turns[:-1]),
        metadata=metadata,
    ), where)


def parse_test_record(record: Any, task: str, image_root: Path, where: str) -> Sample:
    """One test record ``{question_id, image, text, answer}``; a conversation record also works."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, found {type(record).__name__}")
    if "conversations" in record:
        return parse_train_record(record, task, image_root, where)
    sample_id = record.get("question_id", record.get("id"))
    if sample_id is None:
        raise DataError(f"{where}: missing field 'question_id'")
    metadata = {k: v for k, v in record.items() if k not in _TEST_KEYS}
    return _check_placeholders(Sample(
        id=_sample_id(sample_id, where),
        task=task,
        images=_image_paths(record, image_root, where),
        prompt=_string_field(record, "text", where),
        answer=_string_field(record, "answer", where),
        metadata=metadata,
    ), where)


def _sample_id(value: Any, where: str) -> str:
    """A record's id as text: a string or a number (ids name predictions, so nothing else)."""
    text = as_text(value)
    if text is None or not text.strip():
        raise DataError(f"{where}: the id must be a non-empty string or a number")
    return text


def read_samples(path: Path, task: str, image_root: Path | None = None, split: str = "train") -> list[Sample]:
    """Read a training (``split="train"``) or test file into samples; images resolve against ``image_root``
    (default: the file's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    parse = parse_train_record if split == "train" else parse_test_record
    records = load_records(path)
    samples = [parse(record, task, root, f"{path}: record {index}") for index, record in enumerate(records)]
    if split != "train":  # predictions are keyed by test id
        _check_unique_ids(samples, path)
    return samples


def _check_unique_ids(samples: Iterable[Sample], path: Path) -> None:
    seen: dict[str, int] = {}
    for index, sample in enumerate(samples):
        if sample.id in seen:
            raise DataError(f"{path}: record {index}: duplicate id {sample.id!r} (first at record {seen[sample.id]})")
        seen[sample.id] = index
