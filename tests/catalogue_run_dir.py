"""Bad-input catalogue: run directories whose results no longer match their data, a run dir owned by
another live run, and a report of an unfinished run. Every case starts from a copy of one finished run
of a tiny three-task stream declared by files (relative paths, so a copied experiment folder is the
same experiment), built once per session."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

from catalogue import Case, Fixtures, Invocation
from conftest import write_config

TASKS = ["rs", "med", "ad"]
STAGES = [f"{index}_{task}" for index, task in enumerate(TASKS, start=1)]
ROWS = ["0_base", *STAGES]
_FINISHED: dict[str, Path] = {}


def experiment_config(model_dir: Path, **extra: Any) -> dict[str, Any]:
    """A three-task stream of tiny synthetic files under ``data/`` (paths relative to the config)."""
    from mmcl.streams.synth import SYNTH_DOMAIN_TASKS

    scorers = {spec.name: spec.scorer for spec in SYNTH_DOMAIN_TASKS}
    config: dict[str, Any] = {
        "name": "integrity",
        "seed": 0,
        "backbone": {"name": str(model_dir)},
        "stream": {
            "tasks": [
                {"name": task, "train": f"data/{task}/train.json", "test": f"data/{task}/test.json", "scorer": scorers[task]}
                for task in TASKS
            ]
        },
        "training": {"max_steps": 1, "batch_size": 4, "progress_bar": False, "learning_rate": 0.02, "warmup_ratio": 0.0},
        "evaluation": {"batch_size": 8, "general": "none"},
    }
    config.update(extra)
    return config


def mmcl(argv: list[str], cwd: Path | None = None) -> tuple[int, str, str]:
    from mmcl.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(previous)
    return code, out.getvalue(), err.getvalue()


def finished_experiment(model_dir: Path, cache_dir: Path) -> Path:
    """A folder with ``config.yaml``, ``data/<task>/`` and a finished run in ``run/`` (built once)."""
    key = str(model_dir)
    if key in _FINISHED:
        return _FINISHED[key]
    from mmcl.streams.synth import write_synth_domain

    folder = Path(tempfile.mkdtemp(prefix="mmcl-integrity-"))
    source = write_synth_domain(cache_dir / "integrity-source", seed=3, train_per_task=4, test_per_task=3)
    for task in TASKS:
        shutil.copytree(source / task, folder / "data" / task)
    write_config(folder / "config.yaml", experiment_config(model_dir))
    code, out, err = mmcl(["run", str(folder / "config.yaml"), "--out", str(folder / "run")])
    assert code == 0, out[-2000:] + err
    _FINISHED[key] = folder
    return folder


def copy_experiment(fixtures: Fixtures) -> Path:
    """A fresh copy of the finished experiment in the case's folder."""
    target = fixtures.tmp_path / "experiment"
    shutil.copytree(finished_experiment(fixtures.tiny_model_dir, fixtures.stream_cache_dir), target)
    return target


def run_argv(folder: Path, *more: str) -> list[str]:
    return ["run", str(folder / "config.yaml"), "--out", str(folder / "run"), *more]


def edit_records(path: Path, edit: Callable[[list[dict]], None]) -> None:
    records = json.loads(path.read_text(encoding="utf-8"))
    edit(records)
    path.write_text(json.dumps(records), encoding="utf-8")


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every computed file of a run (stages and evaluations) with its content."""
    files = [p for folder in ("stages", "predictions") for p in (run_dir / folder).rglob("*") if p.is_file()]
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in files}


def reference_snapshot(fixtures: Fixtures) -> dict[str, bytes]:
    return snapshot(finished_experiment(fixtures.tiny_model_dir, fixtures.stream_cache_dir) / "run")


def nothing_lost(fixtures: Fixtures) -> None:
    """Every stage and prediction file of the finished run is still there, unchanged."""
    ours = snapshot(fixtures.tmp_path / "experiment" / "run")
    reference = reference_snapshot(fixtures)
    assert ours == reference, sorted(set(ours) ^ set(reference))
    assert sorted(p.name for p in (fixtures.tmp_path / "experiment" / "run" / "stages").iterdir()) == STAGES


# -- cases ----------------------------------------------------------------------------------------


def _stale_train(fixtures: Fixtures) -> Invocation:
    folder = copy_experiment(fixtures)

    def change_answer(records: list[dict]) -> None:
        records[0]["conversations"][1]["value"] = "something else entirely"

    edit_records(folder / "data" / "med" / "train.json", change_answer)
    return Invocation(run_argv(folder))


def _stale_test(fixtures: Fixtures) -> Invocation:
    folder = copy_experiment(fixtures)

    def change_answer(records: list[dict]) -> None:
        records[1]["answer"] = "a changed answer"

    edit_records(folder / "data" / "rs" / "test.json", change_answer)
    return Invocation(run_argv(folder))


def _deleted_records(fixtures: Fixtures) -> Invocation:
    folder = copy_experiment(fixtures)
    edit_records(folder / "data" / "ad" / "test.json", lambda records: records.pop())
    return Invocation(run_argv(folder))


def _touched_image(fixtures: Fixtures) -> Invocation:
    folder = copy_experiment(fixtures)
    image = sorted((folder / "data" / "rs" / "images").glob("rs-train-*.png"))[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    return Invocation(run_argv(folder))


def _damaged_fingerprints(fixtures: Fixtures) -> Invocation:
    folder = copy_experiment(fixtures)
    (folder / "run" / "data.json").write_text('{"version": 1, "tasks": {', encoding="utf-8")
    return Invocation(run_argv(folder))


def _locked_by_live_process(fixtures: Fixtures) -> Invocation:
    folder = copy_experiment(fixtures)
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "started": "2026-01-01T00:00:00+00:00"}
    (folder / "run" / "run.lock").write_text(json.dumps(holder), encoding="utf-8")
    return Invocation(run_argv(folder))


def _lock_untouched(fixtures: Fixtures) -> None:
    nothing_lost(fixtures)
    holder = json.loads((fixtures.tmp_path / "experiment" / "run" / "run.lock").read_text(encoding="utf-8"))
    assert holder["pid"] == os.getppid()  # the other run's lock is left alone


def _report_unfinished(fixtures: Fixtures) -> Invocation:
    folder = copy_experiment(fixtures)
    shutil.rmtree(folder / "run" / "stages" / "3_ad")
    shutil.rmtree(folder / "run" / "predictions" / "3_ad")
    (folder / "run" / "report.html").unlink()
    return Invocation(["report", str(folder / "run")])


def _report_written(fixtures: Fixtures) -> None:
    run_dir = fixtures.tmp_path / "experiment" / "run"
    reference = {k: v for k, v in reference_snapshot(fixtures).items() if "3_ad" not in k}
    assert snapshot(run_dir) == reference
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "UNFINISHED run: 2 of 3 stages" in html
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert results["complete"] is False and results["progress"]["stages_done"] == 2


def _damaged_run_json(fixtures: Fixtures) -> Invocation:
    folder = copy_experiment(fixtures)
    (folder / "run" / "run.json").write_text('{"name": "integrity", "tasks": [', encoding="utf-8")
    return Invocation(["report", str(folder / "run")])


CASES: list[Case] = [
    Case("run-dir-stale-train-data", _stale_train, 4, r"data changed.*med/train\.json \(task med train file: content changed\).*--recompute-changed", nothing_lost),
    Case("run-dir-stale-test-data", _stale_test, 4, r"data changed.*rs/test\.json \(task rs test file: content changed\)", nothing_lost),
    Case("run-dir-deleted-test-records", _deleted_records, 4, r"data changed.*ad/test\.json", nothing_lost),
    Case("run-dir-touched-image", _touched_image, 4, r"rs/train\.json \(task rs train file: an image it references changed", nothing_lost),
    Case("run-dir-damaged-data-fingerprints", _damaged_fingerprints, 4, r"data\.json: unreadable data fingerprints", nothing_lost),
    Case("run-dir-locked-by-live-run", _locked_by_live_process, 4, rf"in use by another mmcl run \(host {socket.gethostname()}, pid {os.getppid()}", _lock_untouched),
    Case("report-of-damaged-run-json", _damaged_run_json, 4, r"run: unreadable run\.json or config\.yaml", nothing_lost),
    Case("report-of-unfinished-run", _report_unfinished, 5, r"UNFINISHED run: 2 of 3 stages, \d+ of \d+ evaluations", _report_written),
]  # fmt: skip
