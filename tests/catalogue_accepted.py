"""Catalogue cases of inputs that must work (issue 12, items 5, 13, 14, 15, 16): numbers as people
write them, ``mmcl run FOLDER``, numeric answers in training turns, a file stream labelled as what
it is, and plain terminal output when stdout is not a terminal."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from catalogue import Case, Fixtures, Invocation, Outcome
from catalogue_config_data import conv, good_task, qa, write_json


def folder_stream(fx: Fixtures, numeric: bool = False) -> Path:
    root = fx.tmp_path / "mydata"
    good_task(root / "one")
    if numeric:  # JSON numbers as answers, in training turns and test records alike
        write_json(root / "one" / "train.json", [conv(0, question="<image>\nHow many?", answer=3), conv(1, answer="yes")])
        write_json(root / "one" / "test.json", [qa(0, text="<image>\nHow many?", answer=2), qa(1)])
    return root


def quick_settings(fx: Fixtures, *extra: str) -> list[str]:
    settings = [f"backbone.name={fx.tiny_model_dir}", "training.max_steps=1", "evaluation.general=none",
                "evaluation.forward_transfer=false", f"stream.cache_dir={fx.stream_cache_dir}", *extra]  # fmt: skip
    return [arg for setting in settings for arg in ("--set", setting)]


def float_as_written(fx: Fixtures) -> Invocation:
    """``1e-4`` (a string to YAML 1.1) in a config file and ``1E-4`` on the command line are floats."""
    config = {"name": "floats", "training": {"learning_rate": "1e-4"},
              "stream": {"tasks": [{"name": "one", "train": "mydata/one/train.json", "test": "mydata/one/test.json"}]}}  # fmt: skip
    folder_stream(fx)
    (fx.tmp_path / "exp.yaml").write_text(yaml.safe_dump(config).replace("'1e-4'", "1e-4"), encoding="utf-8")
    assert "learning_rate: 1e-4" in (fx.tmp_path / "exp.yaml").read_text(encoding="utf-8")
    return Invocation(["data", "check", str(fx.tmp_path / "exp.yaml")])


def run_folder(fx: Fixtures) -> Invocation:
    root = folder_stream(fx, numeric=True)
    out = fx.tmp_path / "run"
    return Invocation(["run", str(root), "--out", str(out), *quick_settings(fx, "training.learning_rate=1E-4")])


def folder_run_is_labelled_and_plain(fx: Fixtures) -> None:
    out = fx.tmp_path / "run"
    stored = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert stored["stream"]["name"] == "mydata" and stored["training"]["learning_rate"] == 1e-4
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["stream"] == "mydata" and results["complete"] is True and results["row_labels"] == ["base", "one"]


def plain_output(fx: Fixtures) -> Invocation:
    """Output to a pipe (a subprocess): no carriage-return progress frames, no raw metric dicts, no
    dependency warnings."""
    root = folder_stream(fx)
    out = fx.tmp_path / "run"
    return Invocation(["run", str(root), "--out", str(out), *quick_settings(fx, "training.logging_steps=1")],
                      subprocess=True)  # fmt: skip


def output_is_plain(outcome: Outcome) -> None:
    printed = outcome.out + outcome.err
    assert "\r" not in printed and "{'" not in printed and "Warning" not in printed, printed[-2000:]
    assert "step 1/1 loss" in outcome.out and "eval [1_one] one:" in outcome.out
    assert outcome.err.strip() == "", outcome.err[-2000:]


CASES = [
    Case("accepted-float-written-1e-4", float_as_written, 0, ""),
    Case("accepted-run-folder-numeric-answers", run_folder, 0, "", folder_run_is_labelled_and_plain),
    Case("accepted-plain-output-to-a-pipe", plain_output, 0, "", output_check=output_is_plain),
]
