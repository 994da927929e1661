"""The environment: output faults (read-only or full disk, a file in the way) as one-line OutputErrors
naming the path, decompression bombs as bad records, and the terminal output (the ``mmcl`` logger, one line
per training logging step, no Trainer dicts, dependencies' warnings filtered)."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from catalogue_environment import png_bomb
from mmcl import utils
from mmcl.errors import OutputError


def failing(code: int):
    def write(path: Path, text: str) -> None:
        raise OSError(code, os.strerror(code), str(path))

    return write


# -- output faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, message",
    [
        (errno.ENOSPC, "disk full writing {path}"),
        (errno.EROFS, "read-only file system: cannot write {path}"),
        (errno.EACCES, "permission denied: {path}"),
    ],
)
def test_atomic_write_faults_name_the_path_and_keep_the_old_file(
    code: int, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.json"
    path.write_text("old", encoding="utf-8")
    monkeypatch.setattr(utils, "_write_text", failing(code))
    with pytest.raises(OutputError) as caught:
        utils.atomic_write_text(path, "new")
    assert str(caught.value) == message.format(path=path)
    assert caught.value.exit_code == 6
    assert path.read_text(encoding="utf-8") == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_partial_temp_file_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(path: Path, text: str) -> None:
        path.write_text(text[:1], encoding="utf-8")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(utils, "_write_text", half_write)
    with pytest.raises(OutputError, match="disk full"):
        utils.atomic_write_text(tmp_path / "a" / "b.json", "content")
    assert list((tmp_path / "a").iterdir()) == []


def test_a_file_where_a_folder_should_be(tmp_path: Path) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(OutputError, match=f"cannot write {blocker}/run/config.yaml: {blocker} is a file, not a folder"):
        utils.atomic_write_text(blocker / "run" / "config.yaml", "x")
    with pytest.raises(OutputError, match=f"{blocker} is a file, not a folder"):
        utils.make_dirs(blocker)


def test_save_tensors_turns_safetensors_io_errors_into_output_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch
    import torch

    class SafetensorError(Exception):
        pass

    def full(tensors, filename, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"')

    tensors = {"w": torch.zeros(2)}
    utils.save_tensors(tensors, tmp_path / "ok" / "state.safetensors")
    assert (tmp_path / "ok" / "state.safetensors").is_file()
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OutputError, match=f"^disk full writing {tmp_path}/state.safetensors$"):
        utils.save_tensors(tensors, tmp_path / "state.safetensors")
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(SafetensorError("bad dtype")))
    with pytest.raises(SafetensorError):  # not an I/O failure: a bug, raised as it is
        utils.save_tensors(tensors, tmp_path / "state.safetensors")


def test_cli_turns_stray_output_oserrors_into_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Writes outside the helpers (the report's files, the Trainer's folders) still give one line and code 6."""
    from mmcl import cli

    def list_on_a_full_disk(args) -> int:
        raise OSError(errno.EROFS, "Read-only file system", "/data/runs/x/report.html")

    monkeypatch.setattr(cli, "command_list", list_on_a_full_disk)
    assert cli.main(["list"]) == 6
    captured = capsys.readouterr()
    assert captured.err == "error: read-only file system: cannot write /data/runs/x/report.html\n"

    def other_oserror(args) -> int:
        raise OSError(errno.EIO, "I/O error", "/x")

    monkeypatch.setattr(cli, "command_list", other_oserror)
    with pytest.raises(OSError):  # not an output fault: not disguised as one
        cli.main(["list"])


# -- decompression bombs ----------------------------------------------------------------------------


def test_bombs_are_bad_records(tmp_path: Path) -> None:
    from mmcl.data.images import check_image, load_image
    from mmcl.errors import DataError

    over_twice, over_once = tmp_path / "bomb.png", tmp_path / "large.png"
    png_bomb(over_twice, 20_000, 20_000)  # DecompressionBombError
    png_bomb(over_once, 10_000, 10_000)  # DecompressionBombWarning
    filters = list(warnings.filters)
    for path in (over_twice, over_once):
        problem = check_image(path, "test.json: record 4")
        assert problem is not None and problem.startswith(f"test.json: record 4: image too large {path} (over PIL's")
        with pytest.raises(DataError, match="record 4: image too large"):
            load_image(path, "test.json: record 4")
    assert warnings.filters == filters  # the warning-as-error filter is local to the image


# -- terminal output --------------------------------------------------------------------------------


@pytest.fixture
def mmcl_logger():
    """Restore the ``mmcl`` logger and the warning filters after a test that configures them."""
    logger = logging.getLogger("mmcl")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    with warnings.catch_warnings():
        yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def test_logging_prints_plain_lines_on_the_current_stdout(mmcl_logger: logging.Logger) -> None:
    from mmcl.log import info, setup_logging

    setup_logging(verbose=False, is_main=True)
    setup_logging(verbose=False, is_main=True)  # idempotent: one handler
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        info("  eval [1_rs] med: 50.0")
        logging.getLogger("mmcl.training").debug("hidden")
    assert out.getvalue() == "  eval [1_rs] med: 50.0\n"
    setup_logging(verbose=False, is_main=False)  # other processes of a torchrun launch are silent
    with contextlib.redirect_stdout(out):
        info("from rank 1")
    assert "rank 1" not in out.getvalue()


def test_dependencies_warnings_are_filtered(mmcl_logger: logging.Logger) -> None:
    from mmcl.log import setup_logging

    setup_logging(verbose=False, is_main=True)
    with warnings.catch_warnings(record=True) as caught:
        for module in ("transformers.modeling_utils", "peft.tuners.lora", "torch.nn.modules"):
            warnings.warn_explicit("deprecated", FutureWarning, "x.py", 1, module=module)
            warnings.warn_explicit("deprecated", DeprecationWarning, "x.py", 1, module=module)
        warnings.warn_explicit("yours", FutureWarning, "x.py", 1, module="mmcl.runner")
    assert [str(w.message) for w in caught] == ["yours"]


def test_step_lines() -> None:
    from mmcl.training.sft import step_line

    state = SimpleNamespace(global_step=10, max_steps=40)
    assert step_line(state, {"loss": 1.23456, "learning_rate": 0.0002, "grad_norm": 0.81, "epoch": 0.5}) == (
        "  step 10/40 loss 1.235 lr 0.0002 grad norm 0.81"
    )
    assert step_line(state, {"train_runtime": 3.9, "train_loss": 1.2}) is None  # the runner reports the stage


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_training_prints_one_line_per_logging_step_and_no_dicts(
    terminal: bool, tiny_model_dir: Path, tmp_path: Path, mmcl_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output not on a terminal: no tqdm frames, no ``{'loss': ...}`` dicts, one ``step k/n`` line per log.
    On a terminal the bar stays (on stderr) and the same lines are written above it."""
    from mmcl.backbones.registry import load_backbone
    from mmcl.streams.synth import write_synth_domain
    from mmcl.config import TrainingConfig
    from mmcl.data.readers import read_samples
    from mmcl.log import setup_logging
    from mmcl.training import sft

    monkeypatch.setattr(sft, "_show_bar", lambda config: terminal)
    setup_logging(verbose=False, is_main=True)
    root = write_synth_domain(tmp_path / "data", seed=2, train_per_task=4, test_per_task=1)
    samples = read_samples(root / "med" / "train.json", "med")
    backbone = load_backbone(str(tiny_model_dir))
    config = TrainingConfig(max_steps=2, batch_size=2, logging_steps=1, progress_bar=True, warmup_ratio=0.0)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sft.train_on_samples(backbone, samples, config, tmp_path / "trainer", seed=0)
    lines = out.getvalue().splitlines()
    assert [line.split(" loss ")[0] for line in lines] == ["  step 1/2", "  step 2/2"], out.getvalue()
    assert "{" not in out.getvalue() + err.getvalue() and "\r" not in out.getvalue()
    assert ("it/s" in err.getvalue()) == terminal
