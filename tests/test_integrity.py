"""Integrity of a run dir (issue 12): data fingerprints and ``--recompute-changed``, the run-dir lock,
"complete" meaning every stage and planned evaluation, no run dir left by a run that failed before its
first stage, and the synthetic stream's cache keyed by its generator's version."""

from __future__ import annotations

import hashlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from catalogue import Fixtures
from catalogue_run_dir import ROWS, TASKS, copy_experiment, edit_records, mmcl, run_argv
from mmcl.errors import RunDirError
from mmcl.lock import LOCK_FILE, RunLock


@pytest.fixture
def experiment(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path) -> Path:
    return copy_experiment(Fixtures(tiny_model_dir, stream_cache_dir, tmp_path))


def mtimes(run_dir: Path) -> dict[str, int]:
    files = [p for folder in ("stages", "predictions") for p in (run_dir / folder).rglob("*") if p.is_file()]
    return {p.relative_to(run_dir).as_posix(): p.stat().st_mtime_ns for p in files}


def redone(before: dict[str, int], after: dict[str, int]) -> set[str]:
    assert set(before) == set(after), set(before) ^ set(after)
    return {name for name in before if before[name] != after[name]}


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text(encoding="utf-8"))


# -- data fingerprints and --recompute-changed -----------------------------------------------------


def test_changed_train_file_redoes_its_stage_and_every_later_one(experiment: Path) -> None:
    run_dir = experiment / "run"
    before = mtimes(run_dir)

    def change(records: list[dict]) -> None:
        records[0]["conversations"][1]["value"] = "changed"

    edit_records(experiment / "data" / "med" / "train.json", change)
    code, out, err = mmcl(run_argv(experiment, "--recompute-changed"))
    assert code == 0, err
    assert "data changed:" in out and "med/train.json" in out
    changed = redone(before, mtimes(run_dir))
    later = {name for name in before if name.split("/")[1] in ("2_med", "3_ad")}
    assert changed == later  # stage 1, rows 0 and 1 untouched; stages 2, 3 and their rows redone
    assert results(run_dir)["complete"] is True
    # the new fingerprints are recorded: a plain re-run is accepted and does nothing
    code, out, err = mmcl(run_argv(experiment))
    assert code == 0, err
    assert "eval [" not in out
    assert redone(before, mtimes(run_dir)) == later


def test_changed_test_file_redoes_that_task_in_every_row_only(experiment: Path) -> None:
    run_dir = experiment / "run"
    before = mtimes(run_dir)
    # a method's per-row, per-task evaluation facts (MR-LoRA's routing counts) lose the redone entries
    facts = {"stages": {row: {"tasks": {task: {"n": 3} for task in TASKS}} for row in ROWS[1:]}}
    (run_dir / "method_summary.json").write_text(json.dumps({"summary": facts, "sections": []}), encoding="utf-8")
    edit_records(experiment / "data" / "rs" / "test.json", lambda records: records.pop())
    code, out, err = mmcl(run_argv(experiment, "--recompute-changed"))
    assert code == 0, err
    changed = redone(before, mtimes(run_dir))
    assert changed == {f"predictions/{row}/rs.jsonl" for row in ROWS}
    kept = json.loads((run_dir / "method_summary.json").read_text(encoding="utf-8"))["summary"]["stages"]
    assert {row: sorted(entry["tasks"]) for row, entry in kept.items()} == {row: ["ad", "med"] for row in ROWS[1:]}
    header = json.loads((run_dir / "predictions" / "3_ad" / "rs.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert header["meta"]["n"] == 2  # scored on the edited file (3 records, one deleted)


def test_run_dir_without_fingerprints_is_fingerprinted_on_first_use(experiment: Path) -> None:
    run_dir = experiment / "run"
    (run_dir / "data.json").unlink()
    before = mtimes(run_dir)
    code, out, err = mmcl(run_argv(experiment))
    assert code == 0, err
    assert "made before data fingerprints were recorded" in out
    assert redone(before, mtimes(run_dir)) == set()
    stored = json.loads((run_dir / "data.json").read_text(encoding="utf-8"))
    assert set(stored["tasks"]) == set(TASKS) and stored["tasks"]["rs"]["train"]["images"] == 4
    edit_records(experiment / "data" / "rs" / "test.json", lambda records: records.pop())
    code, out, err = mmcl(run_argv(experiment))
    assert code == 4 and "rs/test.json" in err


def test_fingerprint_changes_name_the_file() -> None:
    from mmcl.fingerprint import changes

    entry = {"path": "/d/t.json", "sha256": "a", "images": 2, "images_sha256": "x"}
    stored = {"tasks": {"t": {"train": entry, "test": entry}}, "general": None}
    assert changes(stored, stored) == []
    moved = {"tasks": {"t": {"train": {**entry, "path": "/e/t.json"}, "test": entry}}, "general": None}
    assert changes(stored, moved) == []  # same content and images elsewhere
    more = {"tasks": {"t": {"train": entry, "test": {**entry, "images": 3, "images_sha256": "y"}}}, "general": None}
    (change,) = changes(stored, more)
    assert (change.task, change.split) == ("t", "test") and "3 images, 2 before" in change.describe()


# -- the run-dir lock -------------------------------------------------------------------------------


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_file = tmp_path / LOCK_FILE
        lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}), encoding="utf-8")
        with pytest.raises(RunDirError, match=rf"in use by another mmcl run \(host .*, pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path).acquire()  # the holder is dead now
    assert lock.taken_over and "is gone" in lock.taken_over
    assert json.loads(lock_file.read_text(encoding="utf-8"))["pid"] == os.getpid()
    with pytest.raises(RunDirError):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not lock_file.exists()


def test_lock_held_by_another_process_then_taken_over_when_it_dies(tmp_path: Path) -> None:
    script = (
        "import sys, time; from mmcl.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        stored = json.loads((tmp_path / LOCK_FILE).read_text(encoding="utf-8"))
        assert stored["pid"] == holder.pid and stored["host"] == socket.gethostname() and stored["started"]
        with pytest.raises(RunDirError, match=rf"pid {holder.pid}, since "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # no chance to release: the lock stays behind with a dead pid
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()
    lock = RunLock(tmp_path).acquire()
    assert f"process {holder.pid} is gone" in (lock.taken_over or "")
    lock.release()


def test_lock_heartbeat_keeps_it_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("MMCL_LOCK_STALE_AFTER", "0.4")  # heartbeat every 0.1 s
    lock = RunLock(tmp_path).acquire()
    try:
        os.utime(tmp_path / LOCK_FILE, (0, 0))
        time.sleep(0.35)
        assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 1
    finally:
        lock.release()


def test_lock_goes_stale_by_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps({"host": "another-host", "pid": 1}), encoding="utf-8")
    with pytest.raises(RunDirError, match="host another-host, pid 1"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("MMCL_LOCK_STALE_AFTER", "60")
    os.utime(lock_file, (0, os.stat(lock_file).st_mtime - 120))
    lock = RunLock(tmp_path).acquire()
    assert "not refreshed" in (lock.taken_over or "")
    lock.release()


def test_run_releases_its_lock_also_on_failure(experiment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = experiment / "run"
    shutil.rmtree(run_dir / "predictions" / "3_ad")
    from mmcl.runner import ContinualRun

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ContinualRun, "evaluate_file", broken)
    code, out, err = mmcl(run_argv(experiment))
    assert code == 130 and not (run_dir / LOCK_FILE).exists()
    assert (run_dir / "stages" / "3_ad").is_dir()  # nothing computed was removed


# -- "complete" and the unfinished notice ---------------------------------------------------------


def test_complete_needs_every_planned_evaluation(experiment: Path) -> None:
    from mmcl.report.render import format_table
    from mmcl.results import collect_results

    run_dir = experiment / "run"
    finished = collect_results(run_dir)
    n = len(TASKS)
    assert finished.complete is True
    assert dataclasses.asdict(finished.progress) == {
        "stages_done": n, "stages_planned": n, "evaluations_done": (n + 1) * n, "evaluations_planned": (n + 1) * n
    }  # fmt: skip
    (run_dir / "predictions" / "1_rs" / "ad.jsonl").unlink()  # above the diagonal: planned with forward transfer
    partial = collect_results(run_dir)
    assert partial.complete is False and partial.progress.evaluations_done == (n + 1) * n - 1
    assert format_table(partial).splitlines()[0].startswith(f"UNFINISHED run: {n} of {n} stages, 11 of 12 evaluations")
    assert "UNFINISHED" not in format_table(finished)
    code, out, err = mmcl(["report", str(run_dir)])
    assert code == 5 and err.startswith("error: ") and "UNFINISHED run" in err
    assert (run_dir / "report.html").is_file()
    # a run.json from before the plan was recorded: the plan is derived from config.yaml
    plan = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    del plan["evaluation"]["planned"]
    (run_dir / "run.json").write_text(json.dumps(plan), encoding="utf-8")
    assert collect_results(run_dir).progress == partial.progress


def test_complete_counts_probes_and_low_shot_files(experiment: Path, tmp_path: Path) -> None:
    out = tmp_path / "probed"
    more = ["--set", "evaluation.superficial=true", "--set", "evaluation.low_shot=2", "--set", "evaluation.forward_transfer=false"]
    code, _, err = mmcl(["run", str(experiment / "config.yaml"), "--out", str(out), *more])
    assert code == 0, err
    progress = results(out)["progress"]
    # predictions: base row 3 + lower triangle 1+2+3; probes 1+2+3; low-shot (unseen tasks) 3+2+1+0
    assert progress["evaluations_planned"] == progress["evaluations_done"] == 9 + 6 + 6
    assert results(out)["complete"] is True
    (out / "low_shot" / "1_rs" / "ad.jsonl").unlink()
    code, _, err = mmcl(["report", str(out)])
    assert code == 5 and "20 of 21 evaluations" in err


def test_general_drop_only_from_the_final_stage(tmp_path: Path) -> None:
    from mmcl.evaluation.protocols import RunView
    from mmcl.evaluation.protocols.general import GeneralAbility
    from mmcl.layout import RunLayout
    from mmcl.results import run_rows

    layout = RunLayout(tmp_path)

    def general_results(labels: list[str]):
        return GeneralAbility().collect(RunView(layout, ["a", "b"], run_rows(["a", "b"], labels[1:], joint=False)))

    for row, score in (("0_base", 1.0), ("1_a", 0.0)):
        path = layout.row_file("general", row)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"meta": {"scorer": "exact_match", "n": 1}}
        record = {"id": "x", "prediction": "a" if score else "b", "answer": "a", "score": score}
        path.write_text(json.dumps(meta) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    unfinished = general_results(["base", "a", "b"])
    assert unfinished.scores[2] is None and unfinished.drop is None
    assert GeneralAbility().collect(RunView(layout, ["a"], run_rows(["a"], ["a"], joint=False))).drop == pytest.approx(100.0)


# -- nothing left behind by a run that fails before its first stage --------------------------------


def test_failure_before_the_first_stage_leaves_no_run_dir(
    experiment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mmcl.backbones.registry as registry
    from mmcl.errors import DataError

    def unloadable(*args, **kwargs):
        raise DataError("backbone: cannot load (injected)")

    monkeypatch.setattr(registry, "load_backbone", unloadable)
    fresh = tmp_path / "fresh"
    code, out, err = mmcl(["run", str(experiment / "config.yaml"), "--out", str(fresh)])
    assert code == 3 and "injected" in err
    assert not fresh.exists()
    # a run dir that holds results is never removed, and its lock is released
    shutil.rmtree(experiment / "run" / "predictions" / "0_base")
    code, out, err = mmcl(run_argv(experiment))
    assert code == 3 and (experiment / "run" / "stages" / "1_rs").is_dir()
    assert not (experiment / "run" / LOCK_FILE).exists()


# -- the synthetic stream's cache -----------------------------------------------------------------

# The output of the synth-domain generator at one small size. When this test fails, the generator's
# output changed: bump GENERATOR_VERSION in mmcl/streams/synth.py (it keys the stream cache, so old
# cached files are not reused) and update the digest here.
PINNED = {"synth-2": "c574db3a6875c5b0"}


def test_synth_cache_is_keyed_by_generator_version(tmp_path: Path) -> None:
    from PIL import Image

    from mmcl.streams.stream import StreamConfig, build_stream
    from mmcl.streams.synth import GENERATOR_VERSION

    tasks = build_stream(StreamConfig(options={"train_per_task": 2, "test_per_task": 1}, cache_dir=str(tmp_path)), tmp_path)
    root = tasks[0].train_file.parent.parent
    assert root.name.startswith(f"{GENERATOR_VERSION}-")
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix == ".json" and path.name != "manifest.json":
            digest.update(path.read_bytes())
        elif path.suffix == ".png":
            digest.update(Image.open(path).convert("RGB").tobytes())
    assert GENERATOR_VERSION in PINNED, f"new generator version {GENERATOR_VERSION}: pin its output digest here"
    if PINNED[GENERATOR_VERSION] is not None:
        assert digest.hexdigest()[:16] == PINNED[GENERATOR_VERSION], "synth output changed: bump GENERATOR_VERSION"
    else:
        pytest.fail(f"pin {digest.hexdigest()[:16]}")
