"""What the launchers share: a run's command (its own process), its log file, how its end is read back
from the log, and the final table."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DONE, DONE_EARLIER, FAILED, INTERRUPTED, NOT_RUN = "done", "done earlier", "failed", "interrupted", "not run"
STOP_GRACE_SECONDS = 60.0  # after SIGINT, how long a run gets to stop (release its lock) before SIGKILL
LOG_TAIL_BYTES = 256 * 1024


@dataclass
class RunCommand:
    """One run's process: its command line, the variables added to its environment and its log file."""

    name: str
    argv: list[str]
    log_file: Path
    env: dict[str, str] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}

    def shown(self) -> str:
        """The run as a shell line (``mmcl run ...`` with its environment), for the log and the dry run."""
        args = self.argv[3:] if self.argv[1:3] == ["-m", CHILD_MODULE] else self.argv
        prefix = " ".join(f"{key}={shlex.quote(value)}" for key, value in self.env.items())
        return f"{prefix + ' ' if prefix else ''}mmcl {shlex.join(args)}"


CHILD_MODULE = "mmcl.sweep.child"


def child_argv(run_args: list[str]) -> list[str]:
    """``mmcl run`` with ``run_args`` as its own Python process (see :mod:`mmcl.sweep.child`)."""
    return [sys.executable, "-m", CHILD_MODULE, *run_args]


def thread_env(threads: int | None) -> dict[str, str]:
    """The variables that size a run's CPU thread pools (read when torch starts)."""
    if threads is None:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


@dataclass
class Outcome:
    """How one run of the sweep ended."""

    name: str
    result: str  # DONE, DONE_EARLIER, FAILED, INTERRUPTED, NOT_RUN
    code: int | None = None
    seconds: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.result in (DONE, DONE_EARLIER)


def open_log(command: RunCommand) -> tuple[object, int]:
    """The run's log, opened for appending with a header line for this session; (file, offset of the session)."""
    command.log_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(command.log_file, "ab")  # noqa: SIM115  (closed by the caller when the run ends)
    offset = log.tell()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    log.write(f"=== mmcl sweep {stamp}: {command.shown()}\n".encode())
    log.flush()
    return log, offset


def last_error_line(log_file: Path, offset: int = 0) -> str:
    """The last ``error: ...`` line the run wrote since ``offset`` (else its last line), cut to one short line."""
    try:
        with open(log_file, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(offset, size - LOG_TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("=== mmcl sweep ")]
    errors = [line for line in lines if line.startswith("error: ")]
    line = errors[-1] if errors else (lines[-1] if lines else "")
    return line if len(line) <= 200 else line[:197] + "..."


def ended(name: str, code: int, seconds: float, log_file: Path, offset: int) -> Outcome:
    """The outcome of a run whose process exited with ``code``."""
    if code == 0:
        return Outcome(name, DONE, code, seconds)
    if code < 0:
        try:
            note = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            note = f"killed by signal {-code}"
        return Outcome(name, FAILED, code, seconds, note)
    result = INTERRUPTED if code == 130 else FAILED
    return Outcome(name, result, code, seconds, last_error_line(log_file, offset))


def stop_process(process: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> int | None:
    """Stop a run as Ctrl-C does (SIGINT: it keeps its finished work and releases its lock), then SIGKILL
    after ``grace`` seconds. Returns its exit code."""
    if process.poll() is not None:
        return process.returncode
    try:
        process.send_signal(signal.SIGINT)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None:
        process.kill()
        process.wait()
    return process.returncode


def format_outcomes(outcomes: list[Outcome]) -> str:
    """The end-of-sweep table: run, result, exit code, seconds, and the last error line of a failed run."""
    header = ("run", "result", "exit", "seconds", "note")
    rows = [(o.name, o.result, "" if o.code is None else str(o.code),
             "" if o.seconds is None else f"{o.seconds:.0f}", o.note) for o in outcomes]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = []
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + ("  " + row[4] if row[4] else ""))
    return "\n".join(line.rstrip() for line in lines)


class SweepInterrupted(Exception):
    """Ctrl-C (or SIGTERM) while runs were going: they were stopped; ``outcomes`` says how each run ended."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        super().__init__("interrupted")
        self.outcomes = outcomes
