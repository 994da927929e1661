"""The local launcher: every run is its own process (``mmcl run``), at most ``jobs`` at once, each with
its share of CPU threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``) or its own GPUs
(``CUDA_VISIBLE_DEVICES``). A run that fails does not stop the others. Runs are started in their own
session, so a Ctrl-C reaches the launcher alone, which then stops the running ones as Ctrl-C would
(SIGINT: each keeps its finished stages and evaluations and releases its lock) and starts no more."""

from __future__ import annotations

import itertools
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

from mmcl.sweep.launch import (
    FAILED,
    NOT_RUN,
    STOP_GRACE_SECONDS,
    Outcome,
    RunCommand,
    SweepInterrupted,
    ended,
    open_log,
)

POLL_SECONDS = 0.2


def run_local(
    commands: Sequence[RunCommand], jobs: int, gpu_groups: Sequence[str] | None = None,
    echo: Callable[[str], None] = print, grace: float = STOP_GRACE_SECONDS,
) -> list[Outcome]:  # fmt: skip
    """Run ``commands``, ``jobs`` at once; with ``gpu_groups`` (``CUDA_VISIBLE_DEVICES`` values) each running
    run holds one group. Returns each run's :class:`Outcome` in the order given; on KeyboardInterrupt the
    running runs are stopped and :class:`SweepInterrupted` is raised with the outcomes so far."""
    stop = threading.Event()
    guard = threading.Lock()
    live: dict[str, subprocess.Popen] = {}
    free: queue.Queue[str] | None = None
    if gpu_groups:
        free = queue.Queue()
        for group in gpu_groups:
            free.put(group)
    started = itertools.count(1)
    total = len(commands)

    def say(line: str) -> None:
        with guard:
            echo(line)

    def take_gpus() -> str | None:
        while free is not None and not stop.is_set():
            try:
                return free.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
        return None

    def run_one(command: RunCommand) -> Outcome:
        if stop.is_set():
            return Outcome(command.name, NOT_RUN)
        devices = take_gpus()
        if free is not None and devices is None:  # stopped while waiting for a GPU
            return Outcome(command.name, NOT_RUN)
        log = None
        try:
            log, offset = open_log(command)
            env = command.environment()
            if devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = devices
            with guard:
                if stop.is_set():
                    return Outcome(command.name, NOT_RUN)
                begin = time.monotonic()
                process = subprocess.Popen(command.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env, start_new_session=True)  # fmt: skip
                live[command.name] = process
                echo(f"[{next(started)}/{total}] started {command.name}"
                     + (f" on GPU {devices}" if devices is not None else "") + f"  (log: {command.log_file})")
            while process.poll() is None:  # not wait(): the launcher must be able to poll it too
                time.sleep(POLL_SECONDS)
            with guard:
                live.pop(command.name, None)
            outcome = ended(command.name, process.returncode, time.monotonic() - begin, command.log_file, offset)
        except OSError as exc:  # the log or the process could not be made
            outcome = Outcome(command.name, FAILED, None, None, f"could not start: {exc}")
        finally:
            if log is not None:
                log.close()
            if devices is not None and free is not None:
                free.put(devices)
        detail = f" (exit {outcome.code}: {outcome.note})" if outcome.code not in (0, None) else ""
        say(f"{outcome.result} {command.name} after {outcome.seconds or 0:.0f} s{detail}")
        return outcome

    pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="mmcl-sweep")
    futures: list[Future] = [pool.submit(run_one, command) for command in commands]
    try:
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=1.0)
    except KeyboardInterrupt:
        stop.set()
        _stop_all(live, guard, grace, say)
        pool.shutdown(wait=True, cancel_futures=True)
        raise SweepInterrupted(_outcomes(commands, futures)) from None
    pool.shutdown(wait=True)
    return _outcomes(commands, futures)


def _outcomes(commands: Sequence[RunCommand], futures: list[Future]) -> list[Outcome]:
    out = []
    for command, future in zip(commands, futures):
        if future.done() and not future.cancelled() and future.exception() is None:
            out.append(future.result())
        elif future.done() and not future.cancelled():
            out.append(Outcome(command.name, FAILED, None, None, f"launcher error: {future.exception()}"))
        else:
            out.append(Outcome(command.name, NOT_RUN))
    return out


def _stop_all(live: dict[str, subprocess.Popen], guard: threading.Lock, grace: float, say: Callable[[str], None]) -> None:
    """SIGINT to every running run, then SIGKILL to those still there after ``grace`` seconds (at once on a
    second Ctrl-C)."""
    import signal

    with guard:
        running = dict(live)
    if running:
        say(f"interrupted: stopping {len(running)} running run(s) ({', '.join(running)})")
    for process in running.values():
        try:
            process.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    try:
        while any(process.poll() is None for process in running.values()) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        pass
    for process in running.values():
        if process.poll() is None:
            process.kill()
