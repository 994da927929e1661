"""Reproducible by anyone: ``--deterministic`` pins the kernels before torch loads, every stage records
what it was trained with, ``mmcl report`` warns about other versions, and ``mmcl reproduce`` reruns a run
and says whether every number is identical."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_config
from mmcl.cli import main
from mmcl.config import load_config
from mmcl.determinism import LEVELS, check_pinned, requested_level
from mmcl.environment import version_warnings
from mmcl.errors import ConfigError
from mmcl.reproduce import compare_runs_exactly, data_differences

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "run_v1"


def test_requested_level_is_read_before_the_config_is_loaded() -> None:
    assert requested_level(None, {}) is None
    assert requested_level(None, {"deterministic": True}) == "avx2"
    assert requested_level({"deterministic": True, "deterministic_isa": "baseline"}, {}) == "baseline"
    assert requested_level({"deterministic": True}, {"deterministic": False}) is None  # --set wins
    assert requested_level({"deterministic": "yes"}, {}) is None  # a wrong type is refused by load_config


def test_unknown_kernel_level_is_refused() -> None:
    with pytest.raises(ConfigError, match="deterministic_isa: expected one of avx2, baseline, got 'avx512'"):
        load_config(None, {"deterministic_isa": "avx512"})


def test_kernels_pinned_after_torch_loaded_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in LEVELS["avx2"]:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="torch was imported before the kernels were pinned"):
        check_pinned("avx2")


def test_version_warnings() -> None:
    stages = {"rs": {"versions": {"torch": "2.13.0", "peft": "0.21"}}, "med": {"versions": {"torch": "2.14.0"}},
              "ad": None}  # fmt: skip
    warnings = version_warnings(stages, installed={"torch": "2.13.0", "peft": "0.21"})
    assert warnings == [
        "torch: the stages were trained with different versions (2.13.0 for rs; 2.14.0 for med)",
        "torch: stages trained with 2.14.0, installed now 2.13.0",
    ]
    assert version_warnings({"rs": {"versions": {"torch": "2.13.0"}}}, installed={"torch": "2.13.0"}) == []


def test_report_warns_when_installed_versions_differ(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = shutil.copytree(FIXTURE_RUN, tmp_path / "run")
    assert main(["report", str(run_dir)]) == 0
    assert "warning: the stages recorded no versions (trained by an older mmcl)" in capsys.readouterr().err
    info_file = next(run_dir.glob("stages/1_*/stage.json"))
    info = json.loads(info_file.read_text())
    info["environment"] = {"versions": {"torch": "1.0.0"}, "git_commit": "abc", "git_dirty": True}
    info_file.write_text(json.dumps(info))
    assert main(["report", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert "warning: torch: stages trained with 1.0.0, installed now" in err
    report = (run_dir / "report.html").read_text()
    assert "warning: torch: stages trained with 1.0.0" in report and "abc (with uncommitted changes)" in report


def _mmcl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``mmcl`` in a fresh process (torch must not be loaded before the kernels are pinned)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in LEVELS["avx2"]:
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "mmcl", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.mark.skipif(__import__("torch").backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the avx2 kernel level needs an x86-64 CPU with AVX2")
def test_deterministic_run_records_its_kernels_and_reproduces(tiny_model_dir: Path, tasks, tmp_path: Path) -> None:
    """A deterministic run pins the kernels in its own process and records them per stage; ``mmcl
    reproduce``, started in another folder, reruns it from config.yaml alone (its task files are relative
    to the recorded folder) and finds every number identical; a changed prediction is found."""
    project = tmp_path / "project"
    entries = []
    for task in tasks[:2]:
        shutil.copytree(task.train_file.parent, project / "data" / task.name)
        entries.append({"name": task.name, "train": f"data/{task.name}/{task.train_file.name}",
                        "test": f"data/{task.name}/{task.test_file.name}", "scorer": task.scorer,
                        "max_new_tokens": task.max_new_tokens})  # fmt: skip
    config = {
        "name": "det", "deterministic": True, "backbone": {"name": str(tiny_model_dir)},
        "stream": {"name": "two", "tasks": entries},
        "training": {"epochs": 1, "batch_size": 8, "progress_bar": False},
        "evaluation": {"batch_size": 8, "general": {"set": "none"}},
        "output_dir": "runs/det",
    }  # fmt: skip
    write_config(project / "experiment.yaml", config)
    done = _mmcl("run", "experiment.yaml", cwd=project)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = project / "runs" / "det"
    stage = json.loads(next(run_dir.glob("stages/1_*/stage.json")).read_text())["environment"]
    assert stage["deterministic"] is True and stage["cpu_capability"] == "AVX2"
    assert stage["kernel_variables"]["MKL_CBWR"] == "AVX2,STRICT" and stage["threads"] == 1
    assert stage["versions"]["torch"] and "git_dirty" in stage

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rerun = tmp_path / "rerun"
    done = _mmcl("reproduce", str(run_dir), "--out", str(rerun), cwd=elsewhere)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.rstrip().endswith("identical") and "data: the same files (sha256)" in done.stdout
    assert f"predictions: all {len(list(run_dir.rglob('*.jsonl')))} files identical, record by record" in done.stdout

    prediction = next(run_dir.glob(f"predictions/2_*/{tasks[0].name}.jsonl"))
    lines = prediction.read_text().splitlines()
    record = json.loads(lines[1])
    record["prediction"] += " (changed)"
    prediction.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    found = compare_runs_exactly(run_dir, rerun)
    assert not found.identical and found.differing_files == [str(prediction.relative_to(run_dir))]
    assert found.lines()[-1] == "differs"


def test_reproduce_refuses_what_is_not_a_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["reproduce", str(tmp_path)]) == 4
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: no config.yaml, not a run dir"


def test_data_differences_ignore_where_the_files_are() -> None:
    def record(path: str, sha: str, images: int, stat_digest: str) -> dict:
        entry = {"path": path, "sha256": sha, "images": images, "images_sha256": stat_digest}
        return {"version": 1, "tasks": {"rs": {"train": entry, "test": entry}}, "general": None}

    assert data_differences(record("data/rs.json", "a", 3, "x"), record("/elsewhere/rs.json", "a", 3, "x")) == []
    assert data_differences(record("rs.json", "a", 3, "x"), record("rs.json", "b", 3, "x")) == [
        "rs/test: other content (sha256)", "rs/train: other content (sha256)"]
    assert data_differences(record("rs.json", "a", 3, "x"), record("rs.json", "a", 3, "y"))[0].endswith(
        "images of other sizes or modification times (copied? content not compared)")
    assert data_differences(None, record("rs.json", "a", 3, "x")) == [
        "no data fingerprints to compare (data.json missing or unreadable)"]
