"""The bad-input contract and its harness, shared by the catalogue test and the fuzz test.

Contract for every bad input: the command exits with the expected non-zero code, prints exactly one
line on stderr, ``error: ...``, naming the file, record or key at fault, prints no traceback, and
leaves everything already computed in place. Inputs that look odd but are fine (``1e-4`` for a
float, a numeric answer, a folder as the stream) are cases too, with ``exit_code`` 0: the command
succeeds, prints no traceback and no ``error:`` line, and ``check`` asserts what it produced. A case builds its inputs under ``tmp_path`` and says
what to run; ``run_case`` runs it in-process (or as a subprocess when a case needs a real process:
signals, imports) and checks the contract. Cases live in ``catalogue_*.py`` modules as ``CASES``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence


@dataclass
class Fixtures:
    """What cases may build on: the tiny test model, the shared stream cache, a fresh folder."""

    tiny_model_dir: Path
    stream_cache_dir: Path
    tmp_path: Path


@dataclass
class Invocation:
    """What a case runs: ``mmcl <argv>`` in ``cwd``; ``patches`` are entered around an in-process call
    (fault injection, e.g. raising EROFS at the write helpers); ``subprocess`` runs a real process."""

    argv: list[str]
    cwd: Path | None = None
    patches: Sequence[Callable[[], ContextManager]] = ()
    subprocess: bool = False
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    """One input: ``build`` prepares it; the run must exit ``exit_code`` with one stderr line that
    matches ``message`` (a regex, searched); ``check`` then asserts that nothing computed was lost.
    ``exit_code`` 0 marks an input that must work (``message`` unused)."""

    name: str
    build: Callable[[Fixtures], Invocation]
    exit_code: int
    message: str
    check: Callable[[Fixtures], None] | None = None
    output_check: Callable[["Outcome"], None] | None = None  # what the command printed


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def _default_sigint() -> None:
    """In the child before it runs: SIGINT back to its default, so Python installs its Ctrl-C handler even
    if this test process happens to ignore SIGINT at that moment (a child inherits an ignored signal)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def invoke(invocation: Invocation) -> Outcome:
    if invocation.subprocess:
        env = {**os.environ, **invocation.env}
        result = subprocess.run(
            [sys.executable, "-m", "mmcl.cli", *invocation.argv],
            cwd=invocation.cwd, env=env, capture_output=True, text=True, timeout=600,
            preexec_fn=_default_sigint,
        )  # fmt: skip
        return Outcome(result.returncode, result.stdout, result.stderr)
    from mmcl.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    try:
        if invocation.cwd is not None:
            os.chdir(invocation.cwd)
        with contextlib.ExitStack() as stack:
            for patch in invocation.patches:
                stack.enter_context(patch())
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(invocation.argv)
                except SystemExit as exc:  # argparse usage errors
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001  (a traceback is exactly what the contract forbids)
                    code = -1
                    err.write(traceback.format_exc())
    finally:
        os.chdir(previous)
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_contract(outcome: Outcome, exit_code: int | None, message: str | None) -> None:
    """Non-zero exit (``exit_code`` if given), one ``error:`` line on stderr matching ``message``, no traceback."""
    assert "Traceback" not in outcome.out + outcome.err, outcome.err[-3000:]
    assert outcome.code != 0, (outcome.out[-2000:], outcome.err)
    if exit_code is not None:
        assert outcome.code == exit_code, (outcome.code, outcome.err)
    lines = [line for line in outcome.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, outcome.err
    if message is not None:
        assert re.search(message, errors[0]), (message, errors[0])


def assert_success(outcome: Outcome) -> None:
    """Exit 0, no traceback, no ``error:`` line."""
    assert "Traceback" not in outcome.out + outcome.err, outcome.err[-3000:]
    assert outcome.code == 0, (outcome.code, outcome.err[-2000:])
    assert not any(line.startswith("error: ") for line in outcome.err.splitlines()), outcome.err


def run_case(case: Case, fixtures: Fixtures) -> Outcome:
    outcome = invoke(case.build(fixtures))
    if case.exit_code == 0:
        assert_success(outcome)
    else:
        assert_contract(outcome, case.exit_code, case.message)
    if case.check is not None:
        case.check(fixtures)
    if case.output_check is not None:
        case.output_check(outcome)
    return outcome
