"""``mmcl sweep SWEEP.yaml``: expand the sweep, check every run's config, show what is done (``--dry-run``
stops there), run the rest with the local or the SLURM launcher, print how each run ended, and compare the
finished runs (one comparison per stream) in ``<output_dir>/compare/``."""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmcl.errors import ConfigError, MmclError, RunDirError
from mmcl.sweep.launch import (
    DONE_EARLIER,
    NOT_RUN,
    Outcome,
    RunCommand,
    SweepInterrupted,
    child_argv,
    format_outcomes,
    thread_env,
)
from mmcl.sweep.spec import (
    LAUNCHERS,
    SLURM_CLUSTERS,
    Sweep,
    load_sweep,
    value_part,
    yaml_value,
)
from mmcl.sweep.state import DONE, OTHER_CONFIG, RunState, run_state


def add_sweep_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``mmcl sweep`` on the CLI's subcommands."""
    sweep = commands.add_parser(
        "sweep", help="run a grid of experiments (a base config x axes), locally or on SLURM, then compare them",
        description="Expand SWEEP.yaml (base config, axes) into runs with stable names under its output_dir, "
                    "run them as separate `mmcl run` processes (re-running resumes; finished runs are skipped) "
                    "and compare the finished ones.",
    )  # fmt: skip
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml", help="the sweep file (see README, Sweeps)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs, their settings and what is done; launch nothing")
    sweep.add_argument("--launcher", choices=LAUNCHERS, help="override the sweep file's launcher")
    sweep.add_argument("--jobs", type=int, metavar="N", help="local launcher: runs at once (override jobs)")
    sweep.add_argument("--slurm-cluster", choices=SLURM_CLUSTERS,
                       help="slurm launcher: 'local' runs the jobs with submitit's local executor (override slurm.cluster)")
    sweep.set_defaults(handler=command_sweep)
    return sweep


def _echo(line: str) -> None:
    print(line, flush=True)


def _shown_path(path: Path) -> str:
    """``path`` relative to the current folder when it is inside it, else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _apply_cli(sweep: Sweep, args: argparse.Namespace) -> None:
    if args.launcher is not None:
        sweep.launcher = args.launcher
    if args.jobs is not None:
        if args.jobs < 1:
            raise ConfigError(f"--jobs: must be >= 1, got {args.jobs}")
        sweep.jobs = args.jobs
    if args.slurm_cluster is not None:
        sweep.slurm["cluster"] = args.slurm_cluster


def _gpu_groups(sweep: Sweep, echo: Callable[[str], None]) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` values of ``gpus_per_run`` GPUs each, from the GPUs this process sees."""
    if not sweep.gpus_per_run:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [item.strip() for item in visible.split(",") if item.strip()]
    else:
        import torch

        devices = [str(index) for index in range(torch.cuda.device_count())]
    groups = [",".join(devices[i:i + sweep.gpus_per_run]) for i in range(0, len(devices) - sweep.gpus_per_run + 1, sweep.gpus_per_run)]
    if not groups:
        echo(f"note: gpus_per_run is {sweep.gpus_per_run} but {len(devices)} GPU(s) are visible; the runs use the CPU")
        return None
    if len(groups) < sweep.jobs:
        echo(f"note: {len(groups)} group(s) of {sweep.gpus_per_run} GPU(s): at most {len(groups)} run(s) at once")
    return groups


def describe(sweep: Sweep) -> str:
    """The sweep's header: its runs, where they go, how they are launched, the settings all runs share."""
    if sweep.launcher == "local":
        how = f"local launcher, {sweep.jobs} at once, {sweep.default_threads()} thread(s) each"
        if sweep.gpus_per_run:
            how += f", {sweep.gpus_per_run} GPU(s) each"
    else:
        cluster = sweep.slurm.get("cluster", "slurm")
        how = "slurm launcher" + (" (submitit's local executor)" if cluster == "local" else "") + ", one job per run"
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} run(s) in {_shown_path(sweep.output_dir)} ({how})"]
    shared = [f"base {_shown_path(sweep.base)}"] if sweep.base else []
    shared += [f"{key}={yaml_value(value)}" for key, value in sweep.inline.items()]
    shared += [f"plugin {_shown_path(plugin)}" for plugin in sweep.plugins]
    if shared:
        lines.append("every run: " + ", ".join(shared))
    return "\n".join(lines)


def dry_run_table(sweep: Sweep, states: dict[str, RunState]) -> str:
    header = ("run", "state", "run dir", "settings")
    rows = [(run.name, states[run.name].text, _shown_path(run.run_dir),
             " ".join(f"{key}={yaml_value(value)}" for key, value in run.overrides.items())) for run in sweep.runs]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    return "\n".join(("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]).rstrip()
                     for row in [header, *rows])  # fmt: skip


def _summary(states: dict[str, RunState]) -> str:
    counts: dict[str, int] = {}
    for state in states.values():
        counts[state.kind] = counts.get(state.kind, 0) + 1
    return ", ".join(f"{count} {kind}" for kind, count in counts.items())


def _commands(sweep: Sweep, runs: list[Any]) -> list[RunCommand]:
    env = thread_env(sweep.default_threads()) if sweep.launcher == "local" else {}
    return [RunCommand(run.name, child_argv(sweep.run_args(run)), run.log_file, dict(env)) for run in runs]


def _launch(sweep: Sweep, commands: list[RunCommand]) -> list[Outcome]:
    if not commands:
        return []
    if sweep.launcher == "slurm":
        try:
            from mmcl.sweep.slurm import run_slurm
        except ImportError as exc:
            raise ConfigError(f"launcher slurm needs submitit ({exc}); install it: pip install 'mmcl[slurm]'") from None
        return run_slurm(sweep, commands, sweep.slurm.get("cluster", "slurm"), echo=_echo)
    from mmcl.sweep.local import run_local

    return run_local(commands, sweep.jobs, _gpu_groups(sweep, _echo), echo=_echo)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def compare_finished(sweep: Sweep, configs: dict[str, Any], finished: list[str]) -> list[Path]:
    """``mmcl compare`` over the finished runs, one comparison per stream; prints each and returns the pages."""
    from mmcl.report.compare import compare_runs

    by_stream: dict[str, list[Path]] = {}
    for run in sweep.runs:
        if run.name in finished:
            by_stream.setdefault(configs[run.name].stream.name, []).append(run.run_dir)
    pages = []
    for stream, run_dirs in by_stream.items():
        out = sweep.compare_dir if len(by_stream) == 1 else sweep.compare_dir / value_part(stream)
        comparison = compare_runs(run_dirs, out)
        _echo(f"\n{len(run_dirs)} run(s) on {stream}:\n{comparison.text}")
        _echo(f"\ntable: {_shown_path(comparison.csv_path)}\nplot: {_shown_path(comparison.png_path)}\n"
              f"page: {_shown_path(comparison.html_path)}")
        pages.append(comparison.html_path)
    return pages


def command_sweep(args: argparse.Namespace) -> int:
    from mmcl.sweep.spec import check_runs

    sweep = load_sweep(args.sweep_file)
    _apply_cli(sweep, args)
    configs = check_runs(sweep)
    states = {run.name: run_state(run.run_dir, configs[run.name]) for run in sweep.runs}
    _echo(describe(sweep))
    if args.dry_run:
        _echo(dry_run_table(sweep, states))
        todo = sum(state.kind != DONE for state in states.values())
        _echo(f"{_summary(states)}; `mmcl sweep {args.sweep_file}` would launch {todo} run(s)")
        return 0
    for run in sweep.runs:
        if states[run.name].kind == OTHER_CONFIG:
            raise RunDirError(f"{run.run_dir}: holds a run of a different config than sweep run {run.name} (was the sweep "
                              "file or its base changed?); delete it or set another output_dir")  # fmt: skip
    done = [run for run in sweep.runs if states[run.name].kind == DONE]
    todo = [run for run in sweep.runs if states[run.name].kind != DONE]
    if done:
        _echo(f"{len(done)} run(s) already done, skipped: {', '.join(run.name for run in done)}")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the runs as Ctrl-C does
    except ValueError:  # not the main thread (mmcl called from a thread): Ctrl-C alone then
        previous = None
    try:
        launched = _launch(sweep, _commands(sweep, todo))
    except SweepInterrupted as interrupted:
        outcomes = _ordered(sweep, done, interrupted.outcomes)
        _echo("\n" + format_outcomes(outcomes))
        _echo(f"\ninterrupted: finished stages and evaluations are kept in each run dir. Run `mmcl sweep "
              f"{args.sweep_file}` again to resume (finished runs are skipped).")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    outcomes = _ordered(sweep, done, launched)
    _echo("\n" + format_outcomes(outcomes))
    finished = [outcome.name for outcome in outcomes if outcome.ok]
    if finished:
        compare_finished(sweep, configs, finished)
    failed = [outcome for outcome in outcomes if not outcome.ok]
    if failed:
        names = ", ".join(outcome.name for outcome in failed[:3]) + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
        logs = _shown_path(sweep.logs_dir)
        raise MmclError(f"sweep {sweep.name}: {len(failed)} of {len(outcomes)} run(s) did not finish ({names}); their "
                        f"logs are in {logs}; running the sweep again retries them and skips the finished ones")
    return 0


def _ordered(sweep: Sweep, done: list[Any], launched: list[Outcome]) -> list[Outcome]:
    by_name = {outcome.name: outcome for outcome in launched}
    for run in done:
        by_name[run.name] = Outcome(run.name, DONE_EARLIER)
    return [by_name.get(run.name, Outcome(run.name, NOT_RUN)) for run in sweep.runs]

