"""``mmcl sweep``: sweep files expanded into runs with stable names, refused with one line naming the key or
the run, the dry run's states, a 2 methods x 2 seeds grid run by the local launcher (2 at once) ending in
one comparison page, a failing run that does not stop the others, resume, submitit's local executor, and
Ctrl-C. Runs are real ``mmcl run`` processes on a two-task stream of the tiny test model."""

from __future__ import annotations

import _thread
import csv
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from catalogue import Invocation, assert_contract, invoke
from conftest import write_config

from mmcl.cli import _set_assignments
from mmcl.config import load_config
from mmcl.errors import ConfigError, MmclError
from mmcl.layout import RunLayout
from mmcl.results import collect_results
from mmcl.sweep.launch import (
    INTERRUPTED,
    NOT_RUN,
    RunCommand,
    SweepInterrupted,
    last_error_line,
)
from mmcl.sweep.spec import MAX_NAME_CHARS, check_runs, load_sweep, run_name, yaml_value

FAILING_PLUGIN = '''"""A method that always fails at its first task (a run of the sweep that fails)."""
from mmcl.errors import DataError
from mmcl.methods.base import register_method
from mmcl.methods.seq_lora import SequentialLora


@register_method
class AlwaysFails(SequentialLora):
    name = "sweep-fails"
    description = "fails before its first task"

    def before_task(self, task_index, task):
        raise DataError("sweep-fails: this method always fails")
'''


def write_sweep(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def two_task_base(folder: Path, model_dir: Path, tasks) -> Path:
    """An experiment on the first two synth-domain tasks of the tiny model: one step per stage, no general set."""
    entries = [{"name": task.name, "train": str(task.train_file), "test": str(task.test_file),
                "scorer": task.scorer, "max_new_tokens": task.max_new_tokens} for task in tasks[:2]]  # fmt: skip
    config = {
        "name": "tiny-sweep",
        "backbone": {"name": str(model_dir)},
        "stream": {"name": "two", "tasks": entries},
        "training": {"epochs": 1, "batch_size": 8, "progress_bar": False},
        "evaluation": {"batch_size": 8, "general": {"set": "none"}},
    }
    return write_config(folder / "base.yaml", config)


# -- the sweep file: expansion, names, errors (no process) ---------------------------------------------


def test_axes_expand_into_runs_with_stable_names(tmp_path: Path) -> None:
    data = {"name": "grid", "config": {"training": {"epochs": 2}},
            "axes": {"method": ["seq-lora", "replay"], "seed": [0, 1], "training.learning_rate": ["1e-3", 0.003]}}  # fmt: skip
    sweep = load_sweep(write_sweep(tmp_path / "grid.yaml", data))
    names = [run.name for run in sweep.runs]
    assert len(names) == 8 and len(set(names)) == 8
    assert names[:3] == ["method=seq-lora,seed=0,training.learning_rate=1e-3",
                         "method=seq-lora,seed=0,training.learning_rate=0.003",
                         "method=seq-lora,seed=1,training.learning_rate=1e-3"]  # fmt: skip
    assert sweep.output_dir == (Path.cwd() / "runs" / "grid").resolve()
    assert all(run.run_dir == sweep.output_dir / run.name for run in sweep.runs)
    assert all(run.log_file == sweep.output_dir / "logs" / f"{run.name}.log" for run in sweep.runs)
    # the same file gives the same names; one with more values keeps every name it had
    again = load_sweep(tmp_path / "grid.yaml")
    assert [run.name for run in again.runs] == names
    data["axes"]["seed"] = [0, 1, 2]
    grown = load_sweep(write_sweep(tmp_path / "grid.yaml", data))
    assert set(names) < {run.name for run in grown.runs}

    run = sweep.runs[-1]
    assert run.overrides == {"method.name": "replay", "seed": 1, "training.learning_rate": 0.003}
    config = load_config(None, sweep.settings(run))
    assert (config.method.name, config.seed, config.training.learning_rate, config.training.epochs) == ("replay", 1, 0.003, 2)
    assert config.run_dir == run.run_dir and config.name == "method-replay_seed-1_training.learning_rate-0.003"
    # the `mmcl run` arguments carry exactly these settings
    args = sweep.run_args(run)
    assert args[:3] == ["run", "--out", str(run.run_dir)]
    assignments = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    assert _set_assignments(assignments) == {key: value for key, value in sweep.settings(run).items() if key != "output_dir"}


def test_run_names_are_safe_and_short() -> None:
    assert run_name({}) == "base"
    assert run_name({"seed": 3, "evaluation.forward_transfer": False, "lora.dropout": None}) == \
        "seed=3,evaluation.forward_transfer=false,lora.dropout=null"
    hub = run_name({"backbone": "llava-hf/llava-1.5-7b-hf"})
    assert hub.startswith("backbone=llava-hf_llava-1.5-7b-hf-") and "/" not in hub
    assert hub != run_name({"backbone": "llava-hf_llava-1.5-7b-hf"})  # a safe spelling never collides
    assert run_name({"backbone": "llava-hf/llava-1.5-7b-hf"}) == hub  # stable
    listed = run_name({"method.options": {"buffer": 20, "strategy": "reservoir"}})
    assert listed.startswith("method.options=") and set(listed) <= set("abcdefghijklmnopqrstuvwxyz0123456789._-=_,")
    long = run_name({f"method.options.option_{i}": "x" * 30 for i in range(8)})
    assert len(long) <= MAX_NAME_CHARS
    for value in ["abc", "1e-3", 1e-5, True, None, "yes", [1, "a", {"b": 2}], "a: b", "", 3]:
        assert yaml.safe_load(yaml_value(value)) == value


@pytest.mark.parametrize(("data", "message"), [
    ({"axes": {"seed": [0]}, "jobz": 2}, r"unknown sweep key 'jobz' \(known: axes, base"),
    ({"axes": {"seed": 3}}, r"axes\.seed: expected a non-empty list of values, got int 3"),
    ({"axes": {"seed": []}}, r"axes\.seed: expected a non-empty list"),
    ({"axes": {"seed": [1, 1]}}, r"axes\.seed: the value 1 is listed twice"),
    ({"axes": {"method": ["a"], "method.name": ["b"]}}, r"axes\.method\.name: sets the same config key as axes\.method"),
    ({"axes": {"name": ["a"]}}, r"axes\.name: set by the sweep"),
    ({"axes": {"seed": [1, "1"]}}, r"give the same run name 'seed=1'"),
    ({"jobs": "2"}, r"jobs: expected an integer, got str '2'"),
    ({"jobs": 0}, r"jobs: must be >= 1, got 0"),
    ({"threads": 1.5}, r"threads: expected an integer"),
    ({"launcher": "pbs"}, r"launcher: expected one of local, slurm, got 'pbs'"),
    ({"slurm": {"partiton": "gpu"}}, r"unknown sweep key 'slurm\.partiton' \(known: .*partition"),
    ({"slurm": {"time_min": "1h"}}, r"slurm\.time_min: expected an integer"),
    ({"slurm": {"nodes": 2}}, r"slurm\.nodes: set by the sweep"),
    ({"slurm": {"cluster": "pbs"}}, r"slurm\.cluster: expected one of slurm, local"),
    ({"base": "missing.yaml"}, r"base: missing\.yaml not found"),
    ({"plugins": ["nope.py"]}, r"plugins\[0\]: nope\.py not found"),
    ({"config": {"output_dir": "x"}}, r"config\.output_dir: set by the sweep"),
    ({"config": [1]}, r"config: expected a mapping"),
    ({"name": "a b"}, r"name: 'a b' is not a safe name"),
])  # fmt: skip
def test_bad_sweep_files_are_refused_naming_the_key(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    path = write_sweep(tmp_path / "s.yaml", data)
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize(("axes", "message"), [
    ({"lora.rank": [4, "abc"]}, r"run lora\.rank=abc: lora\.rank: expected int, got str 'abc'"),
    ({"method": ["seq-lora", "nope"], "seed": [0]}, r"run method=nope,seed=0: method\.name: unknown method 'nope'"),
    ({"method": ["replay"], "method.options.selection": ["oldest"]},
     r"run method=replay,method\.options\.selection=oldest: method\.options\.selection: expected 'random'"),
    ({"training.lrr": [1]}, r"run training\.lrr=1: unknown config key 'training\.lrr'"),
    ({"seed": [-1]}, r"run seed=-1: seed: must be in"),
])  # fmt: skip
def test_a_bad_axis_value_fails_before_anything_starts(tmp_path: Path, axes: dict[str, list], message: str) -> None:
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", {"axes": axes, "output_dir": str(out)})
    with pytest.raises(ConfigError, match=message):
        check_runs(load_sweep(path))
    outcome = invoke(Invocation(["sweep", str(path)]))
    assert_contract(outcome, 2, message)
    assert not out.exists()  # nothing launched, no folder made


# -- real runs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tasks) -> dict[str, Any]:
    """2 methods x 2 seeds with the local launcher, 2 runs at once, 1 thread each (with a plugin that
    registers a failing method, used by a later sweep on the same runs)."""
    folder = tmp_path_factory.mktemp("sweep")
    base = two_task_base(folder, tiny_model_dir, tasks)
    (folder / "fails.py").write_text(FAILING_PLUGIN, encoding="utf-8")
    common = {"base": base.name, "plugins": ["fails.py"], "output_dir": str(folder / "runs"), "threads": 1}
    path = write_sweep(folder / "grid.yaml", {
        "name": "grid", **common, "axes": {"method": ["seq-lora", "replay"], "seed": [0, 1]}, "jobs": 2})
    begin = time.monotonic()
    outcome = invoke(Invocation(["sweep", str(path)]))
    return {"folder": folder, "path": path, "common": common, "outcome": outcome, "seconds": time.monotonic() - begin,
            "runs": folder / "runs"}  # fmt: skip


NAMES = ["method=seq-lora,seed=0", "method=seq-lora,seed=1", "method=replay,seed=0", "method=replay,seed=1"]


def _table_row(out: str, name: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.startswith(name + " "))


def _compared(runs: Path) -> list[dict[str, str]]:
    with open(runs / "compare" / "comparison.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_local_grid_runs_two_at_once_and_ends_in_one_comparison(grid: dict[str, Any]) -> None:
    outcome, runs = grid["outcome"], grid["runs"]
    assert outcome.code == 0, (outcome.out[-3000:], outcome.err[-3000:])
    assert "sweep grid: 4 run(s)" in outcome.out and "2 at once, 1 thread(s) each" in outcome.out
    for name in NAMES:
        assert collect_results(runs / name).complete, name
        assert _table_row(outcome.out, name)[1:3] == ["done", "0"]
        header = (runs / "logs" / f"{name}.log").read_text(encoding="utf-8").splitlines()[0]
        assert header.startswith("=== mmcl sweep ") and "OMP_NUM_THREADS=1" in header and "mmcl run " in header
    # two at once: the third run started only after one of the first two ended
    lines = outcome.out.splitlines()
    started = [i for i, line in enumerate(lines) if "] started " in line]
    ended = [i for i, line in enumerate(lines) if line.startswith("done method=")]
    assert len(started) == 4 and started[1] < ended[0] < started[2]
    page = runs / "compare" / "comparison.html"
    assert page.is_file() and "page: " in outcome.out
    rows = _compared(runs)
    assert sorted(row["run_dirs"] for row in rows if row["kind"] == "run") == sorted(str(runs / name) for name in NAMES)
    variants = [row for row in rows if row["kind"] != "run"]
    assert sorted(row["method"] for row in variants) == ["replay", "seq-lora"]
    assert all(row["n"] == "2" for row in variants), rows  # one variant per method, mean over its 2 seeds


def test_on_submitit_a_failing_run_does_not_stop_the_others_and_a_killed_run_resumes(grid: dict[str, Any]) -> None:
    """submitit's local executor (the SLURM launcher's path): one job per run, at once. One run's method
    fails; the other run had lost its last stage (killed, preempted) and finishes from where it was."""
    runs = grid["runs"]
    resumed = RunLayout(runs / "method=replay,seed=1")
    first_stage = next(path for path in resumed.stages_dir.iterdir() if path.name.startswith("1_"))
    kept = (first_stage / "state.safetensors").stat().st_mtime_ns
    last_stage = next(path for path in resumed.stages_dir.iterdir() if path.name.startswith("2_"))
    shutil.rmtree(last_stage)  # as if the run had been killed during its last stage
    assert not collect_results(resumed.root).complete
    dry = invoke(Invocation(["sweep", str(grid["path"]), "--dry-run"]))
    assert dry.code == 0 and "partial (1/2 stages" in " ".join(_table_row(dry.out, "method=replay,seed=1"))

    # the same runs (same names), plus one of a method that always fails
    path = write_sweep(grid["folder"] / "fails.yaml", {
        "name": "fails", **grid["common"], "axes": {"method": ["sweep-fails", "replay"], "seed": [1]},
        "slurm": {"time_min": 10, "partition": "ignored-by-the-local-executor"}})
    argv = ["sweep", str(path), "--launcher", "slurm", "--slurm-cluster", "local"]
    dry = invoke(Invocation([*argv, "--dry-run"]))
    assert "slurm launcher (submitit's local executor), one job per run" in dry.out and "would launch 2 run(s)" in dry.out
    outcome = invoke(Invocation(argv))
    assert_contract(outcome, 1, r"sweep fails: 1 of 2 run\(s\) did not finish \(method=sweep-fails,seed=1\)")
    assert "submitted 2 job(s) to submitit's local executor" in outcome.out
    failed = _table_row(outcome.out, "method=sweep-fails,seed=1")
    assert failed[1:3] == ["failed", "3"] and "sweep-fails: this method always fails" in " ".join(failed)
    assert _table_row(outcome.out, "method=replay,seed=1")[1:3] == ["done", "0"]
    assert collect_results(resumed.root).complete
    assert (first_stage / "state.safetensors").stat().st_mtime_ns == kept  # the finished stage was not redone
    assert len(collect_results(resumed.root).timing.sessions) == 2
    session = (runs / "logs" / "method=replay,seed=1.log").read_text(encoding="utf-8").split("=== mmcl sweep ")[-1]
    assert "OMP_NUM_THREADS=1" in session.splitlines()[0] and "over 2 sessions" in session
    assert any(path.name.endswith("_result.pkl") for path in (runs / "slurm").iterdir())  # submitit's own files
    assert [row["run_dirs"] for row in _compared(runs) if row["kind"] == "run"] == [str(resumed.root)]

    # the grid again, on either launcher: every run is done, nothing is launched, the comparison is rebuilt
    for extra in (["--launcher", "slurm", "--slurm-cluster", "local"], []):
        begin = time.monotonic()
        again = invoke(Invocation(["sweep", str(grid["path"]), *extra]))
        assert again.code == 0, again.err
        assert "4 run(s) already done, skipped" in again.out and "started" not in again.out and "submitted" not in again.out
        assert all(_table_row(again.out, name)[1:3] == ["done", "earlier"] for name in NAMES)
        assert {row["run_dirs"] for row in _compared(runs) if row["kind"] == "run"} == {str(runs / name) for name in NAMES}
        assert time.monotonic() - begin < 15


def test_dry_run_lists_runs_and_their_state(grid: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "runs"
    shutil.copytree(grid["runs"] / "method=seq-lora,seed=0", out / "method=seq-lora,seed=0")
    partial = out / "method=seq-lora,seed=1"
    shutil.copytree(grid["runs"] / "method=seq-lora,seed=1", partial)
    for folder in (partial / "predictions").iterdir():
        if folder.name.startswith("2_"):
            shutil.rmtree(folder)  # evaluations after the last stage lost
    other = out / "method=replay,seed=0"
    shutil.copytree(grid["runs"] / "method=replay,seed=1", other)  # seed 1's run where seed 0's belongs
    folder = grid["folder"]  # the same base and plugin files (a plugin's path is part of a run's config)
    path = write_sweep(tmp_path / "dry.yaml", {
        "base": str(folder / "base.yaml"), "plugins": [str(folder / "fails.py")], "output_dir": str(out),
        "axes": {"method": ["seq-lora", "replay"], "seed": [0, 1]}})
    outcome = invoke(Invocation(["sweep", str(path), "--dry-run"]))
    assert outcome.code == 0, outcome.err
    states = {name: " ".join(_table_row(outcome.out, name)[1:]) for name in NAMES}
    assert states["method=seq-lora,seed=0"].startswith("done ")
    assert states["method=seq-lora,seed=1"].startswith("partial (2/2 stages, ")
    assert states["method=replay,seed=0"].startswith("other config")
    assert states["method=replay,seed=1"].startswith("not started")
    assert "method.name=replay seed=1" in states["method=replay,seed=1"]  # the run's settings
    assert "would launch 3 run(s)" in outcome.out
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES[:3])  # nothing launched, no logs
    # launching refuses the run dir of another config before starting anything
    refused = invoke(Invocation(["sweep", str(path)]))
    assert_contract(refused, 4, r"method=replay,seed=0: holds a run of a different config than sweep run")
    assert not (out / "logs").exists()


# -- launchers without a model ---------------------------------------------------------------------------

SLEEPER = """import signal, sys, time
def stop(*_):
    print("stopping", flush=True)
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
print("started", flush=True)
time.sleep(60)
"""


def _sleeper(tmp_path: Path, name: str) -> RunCommand:
    return RunCommand(name, [sys.executable, "-c", SLEEPER], tmp_path / "logs" / f"{name}.log")


def _said(command: RunCommand, word: str) -> bool:
    """Whether the process wrote ``word`` as a line of its log (the log's header holds its source too)."""
    return command.log_file.is_file() and word in command.log_file.read_text().splitlines()


def _wait_for(predicate, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_slurm_section_becomes_submitit_parameters(tmp_path: Path) -> None:
    from mmcl.sweep.slurm import executor_parameters, make_executor

    slurm = {"partition": "gpu", "time_min": 90, "cpus_per_task": 4, "gpus_per_node": 1, "mem_gb": 16,
             "array_parallelism": 8, "account": "lab", "cluster": "local"}  # fmt: skip
    data = {"name": "lab", "axes": {"seed": [0]}, "slurm": slurm, "output_dir": str(tmp_path / "runs")}
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", data))
    assert executor_parameters(sweep) == {
        "name": "mmcl-lab", "timeout_min": 90, "nodes": 1, "tasks_per_node": 1, "slurm_partition": "gpu",
        "cpus_per_task": 4, "gpus_per_node": 1, "mem_gb": 16, "slurm_array_parallelism": 8, "slurm_account": "lab"}
    assert make_executor(sweep, "local").parameters["timeout_min"] == 90  # submitit takes them
    if shutil.which("srun") is None:  # no SLURM here: one line, nothing submitted
        with pytest.raises(MmclError, match=r"launcher slurm: .*--slurm-cluster local"):
            make_executor(sweep, "slurm")


def test_runs_on_several_streams_are_compared_per_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmcl.report.compare
    from mmcl.report.compare import Comparison
    from mmcl.sweep.command import compare_finished

    calls: dict[Path, list[Path]] = {}

    def compare_runs(run_dirs, out):
        calls[Path(out)] = list(run_dirs)
        return Comparison("table", out / "comparison.csv", out / "comparison.png", out / "comparison.html")

    monkeypatch.setattr(mmcl.report.compare, "compare_runs", compare_runs)
    data = {"axes": {"stream": ["synth-domain", "mllm-cl-domain"], "seed": [0, 1]}, "output_dir": str(tmp_path)}
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", data))
    configs = check_runs(sweep)
    pages = compare_finished(sweep, configs, [run.name for run in sweep.runs][:3])  # one run did not finish
    assert calls == {
        tmp_path / "compare" / "synth-domain": [tmp_path / "stream=synth-domain,seed=0", tmp_path / "stream=synth-domain,seed=1"],
        tmp_path / "compare" / "mllm-cl-domain": [tmp_path / "stream=mllm-cl-domain,seed=0"],
    }  # fmt: skip
    assert len(pages) == 2


def test_each_local_run_gets_its_own_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mmcl.sweep.command import _gpu_groups

    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", {"axes": {"seed": [0, 1]}, "gpus_per_run": 2, "jobs": 4}))
    notes: list[str] = []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4,5,6,7")
    assert _gpu_groups(sweep, notes.append) == ["3,4", "5,6"] and "at most 2 run(s) at once" in notes[-1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _gpu_groups(sweep, notes.append) is None and "the runs use the CPU" in notes[-1]
    sweep.gpus_per_run = 0
    assert _gpu_groups(sweep, notes.append) is None


def test_a_failing_run_does_not_stop_the_local_launcher(tmp_path: Path) -> None:
    from mmcl.sweep.launch import DONE, FAILED
    from mmcl.sweep.local import run_local

    fails = RunCommand("fails", [sys.executable, "-c", "import sys; print('error: bad record 3'); print('bye'); sys.exit(3)"],
                       tmp_path / "logs" / "fails.log")  # fmt: skip
    show = "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['CUDA_VISIBLE_DEVICES'])"
    works = RunCommand("works", [sys.executable, "-c", show], tmp_path / "logs" / "works.log", {"OMP_NUM_THREADS": "3"})
    again = RunCommand("again", works.argv, tmp_path / "logs" / "again.log", works.env)
    outcomes = run_local([fails, works, again], jobs=2, gpu_groups=["6,7"], echo=lambda line: None)
    assert [(o.result, o.code, o.note) for o in outcomes] == [(FAILED, 3, "error: bad record 3"), (DONE, 0, ""), (DONE, 0, "")]
    assert _said(works, "3 6,7") and _said(again, "3 6,7")  # its threads; the one GPU group, one run at a time


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler while the test runs: in the full suite something earlier may leave SIGINT
    ignored in this process, and ``_thread.interrupt_main`` then does nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_the_running_runs_and_starts_no_more(tmp_path: Path, python_ctrl_c: None) -> None:
    from mmcl.sweep.local import run_local

    commands = [_sleeper(tmp_path, f"run{i}") for i in range(3)]

    def interrupt_when_started() -> None:
        _wait_for(lambda: all(_said(command, "started") for command in commands[:2]))
        _thread.interrupt_main()  # Ctrl-C in the launcher

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    begin = time.monotonic()
    with pytest.raises(SweepInterrupted) as info:
        run_local(commands, jobs=2, echo=lambda line: None)
    assert time.monotonic() - begin < 20
    assert [outcome.result for outcome in info.value.outcomes] == [INTERRUPTED, INTERRUPTED, NOT_RUN]
    assert [outcome.code for outcome in info.value.outcomes[:2]] == [130, 130]
    assert all(_said(command, "stopping") for command in commands[:2]) and not commands[2].log_file.exists()
    assert last_error_line(commands[0].log_file) == "stopping"


def test_interrupted_sweep_says_that_running_it_again_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmcl.sweep.local
    from mmcl.sweep.launch import Outcome

    def interrupted(commands, *args, **kwargs):
        raise SweepInterrupted([Outcome(command.name, INTERRUPTED, 130, 1.0) for command in commands])

    monkeypatch.setattr(mmcl.sweep.local, "run_local", interrupted)
    path = write_sweep(tmp_path / "s.yaml", {"axes": {"seed": [0, 1]}, "output_dir": str(tmp_path / "out")})
    outcome = invoke(Invocation(["sweep", str(path)]))
    assert outcome.code == 130
    assert f"Run `mmcl sweep {path}` again to resume" in outcome.out
    assert _table_row(outcome.out, "seed=1")[1:3] == ["interrupted", "130"]


def test_a_preempted_job_stops_its_run_and_resubmits_itself(tmp_path: Path) -> None:
    import pickle

    from mmcl.sweep.slurm import SweepJob

    job = SweepJob(_sleeper(tmp_path, "job"), threads=1)
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(job()), daemon=True)
    worker.start()
    _wait_for(lambda: _said(job.command, "started"))
    delayed = job.checkpoint()  # what submitit calls on preemption or timeout
    worker.join(20)
    assert delayed.function is job and results and results[0]["code"] == 130
    assert _said(job.command, "stopping")
    copy = pickle.loads(pickle.dumps(job))  # how submitit stores the requeued job: without the process
    assert copy._process is None and copy.command == job.command and copy.threads == 1


@pytest.mark.parametrize("name", ["sweep.yaml", "all_methods.yaml"])
def test_shipped_sweep_files_expand_into_valid_runs(name: str) -> None:
    """The README's sweep files: every run's config loads and names a registered method."""
    from mmcl.sweep.spec import check_runs, expand, load_sweep

    sweep = load_sweep(Path(__file__).resolve().parent.parent / "examples" / name)
    runs = expand(sweep)
    check_runs(sweep)
    assert len(runs) == len(set(run.name for run in runs)) >= 4
    if name == "all_methods.yaml":  # every built-in method, so a new one is added to the file too
        from mmcl.methods import METHODS

        builtin = {name for name in METHODS if METHODS.origin(name).startswith("mmcl.methods.")}
        assert set(sweep.axes["method"]) == builtin
