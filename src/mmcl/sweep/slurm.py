"""The SLURM launcher, through submitit: one job per run, submitted together as a job array, resources
from the sweep file's ``slurm`` section. A job is a :class:`SweepJob`, which runs the run's ``mmcl run``
process; it is checkpointable: on preemption or timeout submitit calls :meth:`SweepJob.checkpoint`, which
stops the run as Ctrl-C does (its lock released, its finished stages kept) and resubmits the same job,
whose ``mmcl run`` resumes the run dir. ``slurm.cluster: local`` (``--slurm-cluster local``) uses
submitit's local executor instead: the same jobs as processes on this machine (what the tests use)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from mmcl.errors import ConfigError, MmclError
from mmcl.sweep.launch import (
    FAILED,
    INTERRUPTED,
    Outcome,
    RunCommand,
    SweepInterrupted,
    ended,
    open_log,
    stop_process,
    thread_env,
)
from mmcl.sweep.spec import DEFAULT_TIME_MIN, SLURM_SETTINGS, Sweep, available_cores

POLL_SECONDS = 1.0


class SweepJob(Checkpointable):
    """A SLURM job: one run's ``mmcl run`` process, with its output appended to the run's log. Returns
    ``{"code": exit code, "seconds": wall time, "offset": where this session starts in the log}``."""

    def __init__(self, command: RunCommand, threads: int | None) -> None:
        self.command = command
        self.threads = threads
        self._process: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:  # the process handle stays in the job that started it
        state = dict(self.__dict__)
        state["_process"] = None
        return state

    def __call__(self) -> dict[str, Any]:
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0) or available_cores()
        command = dataclasses.replace(self.command, env={**self.command.env, **thread_env(threads)})
        log, offset = open_log(command)
        begin = time.monotonic()
        try:
            self._process = subprocess.Popen(command.argv, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=command.environment())  # fmt: skip
            while self._process.poll() is None:  # not wait(): checkpoint() polls it from a signal handler
                time.sleep(0.5)
            return {"code": self._process.returncode, "seconds": time.monotonic() - begin, "offset": offset}
        finally:  # the job is being stopped (cancelled, requeued): stop the run cleanly first
            if self._process is not None and self._process.poll() is None:
                stop_process(self._process)
            log.close()

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Preempted or timed out: stop the run (SIGINT; it keeps what it finished and releases its lock),
        and resubmit this job, whose ``mmcl run`` on the same run dir resumes it."""
        if self._process is not None:
            stop_process(self._process)
        return DelayedSubmission(self)


def executor_parameters(sweep: Sweep) -> dict[str, Any]:
    """``update_parameters`` keywords from the sweep's ``slurm`` section (one task on one node per run)."""
    slurm = sweep.slurm
    params: dict[str, Any] = {"name": f"mmcl-{sweep.name}", "timeout_min": DEFAULT_TIME_MIN, "nodes": 1, "tasks_per_node": 1}
    for key, value in slurm.items():
        if key in SLURM_SETTINGS:
            params[SLURM_SETTINGS[key][0]] = value
        elif key != "cluster":
            params[f"slurm_{key}"] = value
    if "gpus_per_node" not in slurm and sweep.gpus_per_run:
        params["gpus_per_node"] = sweep.gpus_per_run
    return params


def make_executor(sweep: Sweep, cluster: str) -> submitit.AutoExecutor:
    try:
        executor = submitit.AutoExecutor(folder=str(sweep.submitit_dir), cluster=cluster)
    except RuntimeError as exc:  # no sbatch/srun on this machine
        reason = " ".join(str(exc).split())
        raise MmclError(f"launcher slurm: {reason[:160]} (run the sweep where SLURM is, or pass --slurm-cluster "
                        "local to run its jobs on this machine)") from None
    try:
        executor.update_parameters(**executor_parameters(sweep))
    except (NameError, ValueError, TypeError, AssertionError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{sweep.where or sweep.file}: slurm: submitit refused the parameters ({reason[:200]})") from None
    return executor


def _job_outcome(command: RunCommand, job: Any) -> Outcome:
    try:
        result = job.result()
    except Exception as exc:  # noqa: BLE001  (submitit's UncompletedJobError, FailedJobError: the job died)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        note = next((line for line in reversed(lines) if line.startswith("error: ")), lines[0] if lines else type(exc).__name__)
        return Outcome(command.name, FAILED, None, None, f"job {job.job_id}: {note[:180]}")
    return ended(command.name, int(result["code"]), float(result["seconds"]), command.log_file, int(result["offset"]))


def run_slurm(
    sweep: Sweep, commands: Sequence[RunCommand], cluster: str, echo: Callable[[str], None] = print,
) -> list[Outcome]:  # fmt: skip
    """Submit one :class:`SweepJob` per command as one job array, wait for all, and return their outcomes in
    order. On KeyboardInterrupt the unfinished jobs are cancelled and :class:`SweepInterrupted` raised."""
    threads = sweep.threads
    if threads is None and cluster == "local":  # every job runs at once on this machine
        threads = max(1, available_cores() // max(1, len(commands)))
    executor = make_executor(sweep, cluster)
    jobs: list[Any] = []
    with executor.batch():
        for command in commands:
            jobs.append(executor.submit(SweepJob(command, threads)))
    where = "submitit's local executor" if cluster == "local" else "SLURM"
    echo(f"submitted {len(jobs)} job(s) to {where}: {', '.join(str(job.job_id) for job in jobs)} "
         f"(submitit files in {sweep.submitit_dir})")
    outcomes: dict[str, Outcome] = {}
    pending = dict(zip((command.name for command in commands), zip(commands, jobs)))
    try:
        while pending:
            for name, (command, job) in list(pending.items()):
                if job.done():
                    outcome = outcomes[name] = _job_outcome(command, job)
                    detail = f" (exit {outcome.code}: {outcome.note})" if outcome.code not in (0, None) else \
                        (f" ({outcome.note})" if outcome.note else "")
                    echo(f"{outcome.result} {name} (job {job.job_id}){detail}")
                    del pending[name]
            if pending:
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        echo(f"interrupted: cancelling {len(pending)} unfinished job(s)")
        for name, (command, job) in pending.items():
            with contextlib.suppress(Exception):  # already gone
                job.cancel(check=False)
            outcomes[name] = Outcome(name, INTERRUPTED, None, None, f"job {job.job_id} cancelled")
        raise SweepInterrupted([outcomes[command.name] for command in commands]) from None
    return [outcomes[command.name] for command in commands]
