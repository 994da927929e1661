"""Fuzzing the input side (issue 12): mutated configs, ``--set`` values, training and test records and raw
file bytes must each either load or be refused by an :class:`MmclError` whose message is one line; a
whole ``mmcl data check`` on a mutated folder must honour the bad-input contract (:mod:`catalogue`).
In-process only (config loading, readers, ``Task.problems``, the length check, ``data check``); seeded
and without an example database, so every run tries the same examples."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalogue import Invocation, assert_contract, invoke
from catalogue_config_data import conv, good_task, qa
from mmcl.streams.stream import Task
from mmcl.cli import _set_assignments
from mmcl.config import ExperimentConfig, load_config
from mmcl.data.readers import read_samples
from mmcl.errors import MmclError

# 150 + 80 + 150 + 150 + 80 + 40 = 650 examples
FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))

# -- value strategies -----------------------------------------------------------------------------

SPECIAL_TEXT = ["", " ", "1e-4", "1E-4", ".5", "5.", "+1e3", "-0", "inf", "-inf", "nan", ".inf", "abc", "null",
                "true", "../../x", "a/b", "\x00", "é🙂", "<image>", "<image><image>", "\n", "x" * 500, "0x10", "1_000"]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(SPECIAL_TEXT),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _is_one_line_refusal(exc: BaseException) -> None:
    assert isinstance(exc, MmclError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message.strip() and "\n" not in message and "Traceback" not in message, repr(message)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and list indices) inside a JSON-like value, the root included."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


@st.composite
def mutated(draw, base: Any) -> Any:
    """``base`` (a JSON-like value) with one to three mutations: a value replaced, a key deleted or added,
    a value wrapped in a list or an object, a text emptied or made huge."""
    value = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(value)
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["replace", "delete", "add", "wrap", "wrap-dict", "empty", "huge"]))
        if not path:
            value = draw(VALUES) if kind == "replace" else [value] if kind == "wrap" else value
            continue
        *parents, leaf = path
        node = value
        for part in parents:
            node = node[part]
        if kind == "delete":
            del node[leaf]
        elif kind == "add" and isinstance(node, dict):
            node[draw(st.sampled_from(["extra", "id", "image", "images", "answer", "text", "from", "value", ""]))] = draw(VALUES)
        elif kind == "wrap":
            node[leaf] = [node[leaf]]
        elif kind == "wrap-dict":
            node[leaf] = {"value": node[leaf]}
        elif kind == "empty":
            node[leaf] = type(node[leaf])() if isinstance(node[leaf], (str, list, dict)) else ""
        elif kind == "huge":
            node[leaf] = "9" * 400 if isinstance(node[leaf], str) else 10**30
        else:
            node[leaf] = draw(VALUES)
    return value


# -- configs --------------------------------------------------------------------------------------

BASE_CONFIG = {
    "name": "fuzz",
    "seed": 0,
    "stream": {"tasks": [{"name": "a", "train": "a/train.json", "test": "a/test.json", "scorer": "yes_no",
                          "max_new_tokens": 3, "chance": 50.0}]},
    "backbone": {"name": "tiny-llava", "max_length": 512, "processor_options": {}},
    "method": {"name": "seq-lora", "options": {}},
    "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0},
    "training": {"epochs": 1, "max_steps": -1, "batch_size": 8, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                 "progress_bar": False},
    "evaluation": {"batch_size": 8, "limit": 4, "max_new_tokens": None, "general": "none"},
}  # fmt: skip


def _loaded_config_is_sane(config: ExperimentConfig) -> None:
    config.fingerprint()
    yaml.safe_dump(config.to_dict())
    for value in (config.seed, config.training.learning_rate, config.training.batch_size, config.lora.rank,
                  config.evaluation.batch_size, config.backbone.max_length):  # fmt: skip
        assert math.isfinite(value) and value >= 0, value
    assert config.training.epochs > 0 or config.training.max_steps > 0


@settings(FUZZ, max_examples=150)
@given(mutated(BASE_CONFIG))
def test_fuzzed_config_files_load_or_are_refused_in_one_line(tmp_path_factory, data: Any) -> None:
    folder = tmp_path_factory.mktemp("cfg")
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    try:
        config = load_config(path)
    except Exception as exc:  # noqa: BLE001
        _is_one_line_refusal(exc)
        return
    _loaded_config_is_sane(config)


YAML_PIECES = ["training:", "  epochs: ", "  learning_rate: ", "lora: {rank: ", "}", "name: ", "- ", "!!python/object:os.system",
               "&a [*a]", "2020-01-01", "1e-4", "? [a, b]\n: 1", "\t", "'", '"', "{", "[", ":", "\n", "~", "<<: *x", "é🙂",
               "stream: {tasks: [{name: ", "!!binary aGk=", "0o17", "0x1F", ".inf", "-.nan", "yes", "null"]


@settings(FUZZ, max_examples=80)
@given(st.lists(st.one_of(st.sampled_from(YAML_PIECES), st.text(max_size=8)), max_size=12).map("".join))
def test_fuzzed_yaml_text_loads_or_is_refused_in_one_line(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("yaml") / "exp.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        config = load_config(path)
    except Exception as exc:  # noqa: BLE001
        _is_one_line_refusal(exc)
        return
    _loaded_config_is_sane(config)


KEYS = ["name", "seed", "output_dir", "training.epochs", "training.learning_rate", "training.batch_size",
        "training.max_steps", "training.warmup_ratio", "lora.rank", "lora.alpha", "lora.dropout", "lora.targets",
        "evaluation.batch_size", "evaluation.limit", "evaluation.max_new_tokens", "evaluation.limit_selection",
        "backbone.max_length", "backbone.processor_options", "stream", "stream.tasks", "stream.name", "training",
        "method.options", "nokey", "training.nokey", "training.batch_size.deeper", ""]  # fmt: skip


@settings(FUZZ, max_examples=150)
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(st.text(max_size=20), st.sampled_from(SPECIAL_TEXT))),
                min_size=1, max_size=3))
def test_fuzzed_set_assignments_load_or_are_refused_in_one_line(assignments: list[tuple[str, str]]) -> None:
    try:
        config = load_config(None, _set_assignments([f"{key}={text}" for key, text in assignments]))
    except Exception as exc:  # noqa: BLE001
        _is_one_line_refusal(exc)
        return
    _loaded_config_is_sane(config)


# -- records --------------------------------------------------------------------------------------

TRAIN_RECORD = conv(0)
MULTI_TURN = {"id": "m", "image": ["images/ok.png"], "conversations": [
    {"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"},
    {"from": "human", "value": "q2"}, {"from": "gpt", "value": 3}]}  # fmt: skip
TEST_RECORD = qa(0)


@pytest.fixture(scope="module")
def task_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="mmcl-fuzz-"))
    good_task(folder / "t")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def lengths():
    from mmcl.data.lengths import LengthChecker

    return LengthChecker("tiny-llava", 512)


def _check_task_files(folder: Path, lengths) -> None:
    task = Task(name="t", description="t", train_file=folder / "train.json", test_file=folder / "test.json",
                image_root=None, scorer="exact_match", max_new_tokens=4)  # fmt: skip
    problems = task.problems() + lengths.problems(task)
    assert all(p.strip() and "\n" not in p for p in problems), problems
    for split, path in (("train", task.train_file), ("test", task.test_file)):
        try:
            samples = read_samples(path, "t", split=split)
        except Exception as exc:  # noqa: BLE001
            _is_one_line_refusal(exc)
            assert problems, f"read_samples refused {path} but Task.problems found nothing: {exc}"
            continue
        for sample in samples:
            assert isinstance(sample.answer, str) and isinstance(sample.prompt, str) and isinstance(sample.id, str)


@settings(FUZZ, max_examples=150)
@given(train=st.lists(st.one_of(mutated(TRAIN_RECORD), mutated(MULTI_TURN), st.just(TRAIN_RECORD)), min_size=0, max_size=3),
       test=st.lists(st.one_of(mutated(TEST_RECORD), st.just(TEST_RECORD)), min_size=0, max_size=3))
def test_fuzzed_records_are_read_or_refused_in_one_line(task_dir: Path, lengths, train: list, test: list) -> None:
    folder = task_dir / "t"
    (folder / "train.json").write_text(json.dumps(train), encoding="utf-8")
    (folder / "test.json").write_text(json.dumps(test), encoding="utf-8")
    _check_task_files(folder, lengths)


@settings(FUZZ, max_examples=80)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode),
                 st.sampled_from([b"", b"[", b"{}", b"null", b"[[[[", b"[" * 5000 + b"]" * 5000, b"\xef\xbb\xbf[]",
                                  b'[{"conversations": NaN}]', b"\xff\xfe[\x00]\x00"])),
       st.sampled_from(["train.json", "train.jsonl", "test.json"]))  # fmt: skip
def test_fuzzed_file_bytes_are_refused_in_one_line(task_dir: Path, lengths, content: bytes, name: str) -> None:
    folder = task_dir / "raw"
    if folder.exists():
        shutil.rmtree(folder)
    good_task(folder)
    if name == "train.jsonl":
        (folder / "train.json").unlink()
    (folder / name).write_bytes(content)
    task = Task(name="raw", description="raw", train_file=folder / ("train.jsonl" if name == "train.jsonl" else "train.json"),
                test_file=folder / "test.json", image_root=None, scorer="exact_match", max_new_tokens=4)  # fmt: skip
    problems = task.problems() + lengths.problems(task)
    assert all(p.strip() and "\n" not in p for p in problems), problems


# -- the whole command ----------------------------------------------------------------------------


@settings(FUZZ, max_examples=40)
@given(train=st.lists(mutated(TRAIN_RECORD), min_size=1, max_size=2), test=st.lists(mutated(TEST_RECORD), min_size=1, max_size=2))
def test_fuzzed_data_check_keeps_the_contract(task_dir: Path, lengths, train: list, test: list) -> None:
    root = task_dir / "cli"
    if root.exists():
        shutil.rmtree(root)
    folder = good_task(root / "t")
    (folder / "train.json").write_text(json.dumps(train), encoding="utf-8")
    (folder / "test.json").write_text(json.dumps(test), encoding="utf-8")
    outcome = invoke(Invocation(["data", "check", str(root)]))
    if outcome.code == 0:
        assert "Traceback" not in outcome.out + outcome.err and not outcome.err.strip(), outcome.err
        return
    assert_contract(outcome, 3, r"(train|test)\.json")
