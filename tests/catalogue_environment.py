"""Bad-input catalogue: the environment. An unknown backbone name, an output folder under a file or on a
read-only disk, a disk that fills up in the middle of a run, an image over PIL's decompression-bomb limit
(in ``data check`` and in ``run``) and Ctrl-C while the program is still importing. Disk faults are raised
at mmcl's one low-level write (``mmcl.utils._write_text``): tests run as root, where permissions do not
stop a write."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Callable
from unittest import mock

from catalogue import Case, Fixtures, Invocation
from conftest import write_config

TASKS = ["rs", "med"]
SITECUSTOMIZE = '''\
import os, signal, sys

class _InterruptOnImport:
    """SIGINT to this process when the module named by MMCL_TEST_INTERRUPT_IMPORT starts importing."""

    def find_spec(self, name, path=None, target=None):
        if name == os.environ.get("MMCL_TEST_INTERRUPT_IMPORT"):
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, _InterruptOnImport())
'''


def experiment(fixtures: Fixtures, **extra: Any) -> Path:
    """A folder with ``config.yaml`` and a two-task stream of tiny synthetic files under ``data/``."""
    from mmcl.streams.synth import SYNTH_DOMAIN_TASKS, write_synth_domain

    folder = fixtures.tmp_path / "experiment"
    source = fixtures.stream_cache_dir / "environment-source"
    if not source.is_dir():
        write_synth_domain(source, seed=5, train_per_task=4, test_per_task=2)
    scorers = {spec.name: spec.scorer for spec in SYNTH_DOMAIN_TASKS}
    for task in TASKS:
        shutil.copytree(source / task, folder / "data" / task)
    config: dict[str, Any] = {
        "name": "environment",
        "seed": 0,
        "backbone": {"name": str(fixtures.tiny_model_dir)},
        "stream": {
            "tasks": [
                {"name": task, "train": f"data/{task}/train.json", "test": f"data/{task}/test.json", "scorer": scorers[task]}
                for task in TASKS
            ]
        },
        "training": {"max_steps": 1, "batch_size": 4, "progress_bar": False, "warmup_ratio": 0.0},
        "evaluation": {"batch_size": 8, "general": "none"},
    }
    config.update(extra)
    write_config(folder / "config.yaml", config)
    return folder


def run_argv(folder: Path, *more: str) -> list[str]:
    return ["run", str(folder / "config.yaml"), "--out", str(folder / "run"), *more]


def failing_writes(code: int, when: Callable[[Path], bool]) -> Callable[[], Any]:
    """A patch of mmcl's low-level write raising ``OSError(code)`` for the paths ``when`` selects."""
    from mmcl import utils

    original = utils._write_text

    def write(path: Path, text: str) -> None:
        if when(Path(path)):
            raise OSError(code, os.strerror(code), str(path))
        original(path, text)

    return lambda: mock.patch("mmcl.utils._write_text", write)


def png_bomb(path: Path, width: int = 20_000, height: int = 20_000) -> None:
    """A small PNG whose header claims ``width`` x ``height`` pixels (over PIL's decompression-bomb limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def first_image(folder: Path, task: str, split: str) -> Path:
    records = json.loads((folder / "data" / task / f"{split}.json").read_text(encoding="utf-8"))
    image = records[0]["image"]
    return folder / "data" / task / (image[0] if isinstance(image, list) else image)


def no_run_dir(fixtures: Fixtures) -> None:
    assert not (fixtures.tmp_path / "experiment" / "run").exists()


# -- cases ----------------------------------------------------------------------------------------


def _unknown_backbone(fixtures: Fixtures) -> Invocation:
    folder = experiment(fixtures)
    probe = lambda: mock.patch("mmcl.backbones.registry.probe_hub", return_value="no such model on the Hugging Face hub")  # noqa: E731
    return Invocation(run_argv(folder, "--backbone", "tiny-lava"), patches=[probe])


def _shipped_weights_missing(fixtures: Fixtures) -> Invocation:
    folder = experiment(fixtures)
    empty = fixtures.tmp_path / "tiny_reader"
    empty.mkdir()
    dirs = lambda: mock.patch.dict("mmcl.backbones.registry.SHIPPED_PRESET_DIRS", {"tiny-reader": empty})  # noqa: E731
    return Invocation(run_argv(folder, "--backbone", "tiny-reader"), patches=[dirs])


def _out_under_a_file(fixtures: Fixtures) -> Invocation:
    folder = experiment(fixtures)
    (folder / "results").write_text("not a folder\n", encoding="utf-8")
    return Invocation(["run", str(folder / "config.yaml"), "--out", str(folder / "results" / "run")])


def _out_under_a_file_kept(fixtures: Fixtures) -> None:
    blocker = fixtures.tmp_path / "experiment" / "results"
    assert blocker.read_text(encoding="utf-8") == "not a folder\n"


def _out_read_only(fixtures: Fixtures) -> Invocation:
    folder = experiment(fixtures)
    run_dir = folder / "run"
    return Invocation(run_argv(folder), patches=[failing_writes(errno.EROFS, lambda path: run_dir in path.parents)])


def _nothing_computed(fixtures: Fixtures) -> None:
    run_dir = fixtures.tmp_path / "experiment" / "run"
    assert not (run_dir / "stages").exists() and not (run_dir / "predictions").exists()


def _disk_full_mid_run(fixtures: Fixtures) -> Invocation:
    folder = experiment(fixtures)
    return Invocation(run_argv(folder), patches=[failing_writes(errno.ENOSPC, lambda path: path.parent.name == "2_med")])


def _finished_work_kept(fixtures: Fixtures) -> None:
    run_dir = fixtures.tmp_path / "experiment" / "run"
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["1_rs", "2_med"]
    for stage in ("1_rs", "2_med"):
        assert (run_dir / "stages" / stage / "state.safetensors").is_file()
    for row in ("0_base", "1_rs"):
        assert sorted(p.name for p in (run_dir / "predictions" / row).iterdir()) == ["med.jsonl", "rs.jsonl"]
    leftovers = [p for p in (run_dir / "predictions").rglob("*") if p.is_file() and ".tmp" in p.name]
    assert not leftovers and not list((run_dir / "predictions" / "2_med").glob("*.jsonl"))


def _bomb_in_data_check(fixtures: Fixtures) -> Invocation:
    folder = experiment(fixtures)
    png_bomb(first_image(folder, "med", "test"))  # data check of a folder goes through its tasks by name
    first_image(folder, "rs", "train").unlink()  # a problem in the next task: the check goes on past the bomb
    return Invocation(["data", "check", str(folder / "data")])


def _bomb_in_run(fixtures: Fixtures) -> Invocation:
    folder = experiment(fixtures)
    png_bomb(first_image(folder, "med", "train"))
    return Invocation(run_argv(folder))


def interrupt_during_import(module: str, argv: list[str]) -> Callable[[Fixtures], Invocation]:
    """``mmcl <argv>`` in a real process that gets SIGINT when ``module`` starts importing."""

    def build(fixtures: Fixtures) -> Invocation:
        hook = fixtures.tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
        path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
        return Invocation(argv, subprocess=True, env={"PYTHONPATH": path, "MMCL_TEST_INTERRUPT_IMPORT": module})

    return build


CASES = [
    Case("unknown-backbone", _unknown_backbone, 2,
         r"unknown backbone 'tiny-lava'.*did you mean tiny-llava\?.*presets: .*qwen2-vl-2b.*tiny-llava", no_run_dir),
    Case("shipped-weights-missing", _shipped_weights_missing, 1,
         r"backbone tiny-reader: weights missing in .*tiny_reader; build them with `mmcl pretrain-tiny --preset tiny-reader`"),
    Case("out-under-a-file", _out_under_a_file, 6, r"results/run.*: .*experiment/results is a file, not a folder",
         _out_under_a_file_kept),
    Case("out-read-only", _out_read_only, 6, r"read-only file system: cannot write .*experiment/run/", _nothing_computed),
    Case("disk-full-mid-run", _disk_full_mid_run, 6,
         r"disk full writing .*predictions/2_med/\w+\.jsonl; finished stages and evaluations are kept in .*experiment/run",
         _finished_work_kept),
    Case("decompression-bomb-data-check", _bomb_in_data_check, 3,
         r"data/med/test\.json: record 0: image too large .*\.png \(over PIL's decompression-bomb limit.*\(and 1 more"),
    Case("decompression-bomb-run", _bomb_in_run, 3, r"data/med/train\.json: record 0: image too large .*\.png", no_run_dir),
    # torch: imported by the command; argparse: by the command-line module itself, before main() runs
    Case("ctrl-c-during-import", interrupt_during_import("torch", ["list"]), 130, r"^error: interrupted$"),
    Case("ctrl-c-while-importing-the-cli", interrupt_during_import("argparse", ["list"]), 130, r"^error: interrupted$"),
]  # fmt: skip
