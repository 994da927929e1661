"""The run-dir lock: one ``mmcl run`` owns a run directory at a time.

The owner (process 0 under ``torchrun``) creates ``<run_dir>/run.lock`` atomically, holding its host,
pid and start time, and touches it every minute from a daemon thread (the heartbeat). Another run on
the same directory is refused with the owner's host and pid. A lock is stale, and taken over, when its
process is dead (same host) or when it has not been touched for ``MMCL_LOCK_STALE_AFTER`` seconds
(environment variable, default 7200: covers a crashed run on another host, or a reused pid). The lock
is released when the run ends, also on errors and Ctrl-C (and at interpreter exit as a last resort).
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from mmcl.layout import LOCK_FILE, RunLayout
from mmcl.errors import RunDirError

STALE_AFTER_ENV = "MMCL_LOCK_STALE_AFTER"
DEFAULT_STALE_AFTER = 7200.0
HEARTBEAT_SECONDS = 60.0


def stale_after() -> float:
    raw = os.environ.get(STALE_AFTER_ENV, "")
    if not raw.strip():
        return DEFAULT_STALE_AFTER
    try:
        value = float(raw)
    except ValueError:
        raise RunDirError(f"{STALE_AFTER_ENV}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise RunDirError(f"{STALE_AFTER_ENV}={raw!r}: expected a positive number of seconds")
    return value


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _stale_reason(path: Path, holder: dict[str, Any] | None, max_age: float) -> str | None:
    """Why the lock at ``path`` may be taken over, or ``None`` while its owner is alive."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "gone"
    if age > max_age:
        return f"not refreshed for {age:.0f}s (> {STALE_AFTER_ENV}={max_age:g})"
    if holder is None:
        return None  # unreadable: being written right now, or damaged; it goes stale by age
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        return f"process {pid} is gone"
    return None


class RunLock:
    """The lock of one run directory, held by this process until :meth:`release`."""

    def __init__(self, run_dir: Path) -> None:
        self.path = RunLayout(Path(run_dir)).lock_file
        self.token = uuid.uuid4().hex
        self.held = False
        self.taken_over: str | None = None  # why a stale lock was replaced, for the log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> str:
        now = time.time()
        return json.dumps({
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
            "started_epoch": round(now, 3),
            "token": self.token,
        })  # fmt: skip

    def _create(self) -> bool:
        """Create the lock file with its content in one step; ``False`` if it exists."""
        temporary = self.path.with_name(f".{LOCK_FILE}.{self.token}")
        temporary.write_text(self._content(), encoding="utf-8")
        try:
            os.link(temporary, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create instead
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(temporary.read_text(encoding="utf-8"))
            return True
        finally:
            temporary.unlink(missing_ok=True)

    def acquire(self) -> "RunLock":
        max_age = stale_after()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self.held = True
                self._start_heartbeat()
                atexit.register(self.release)
                return self
            holder = read_lock(self.path)
            reason = _stale_reason(self.path, holder, max_age)
            if reason is None:
                who = f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started')}" if holder else "unreadable lock"
                raise RunDirError(
                    f"{self.path.parent}: in use by another mmcl run ({who}); wait for it to end, or delete "
                    f"{self.path} if that process is gone"
                )
            # Stale: move it aside under a unique name (only one contender wins the rename), then retry.
            aside = self.path.with_name(f".{LOCK_FILE}.stale.{self.token}")
            try:
                os.replace(self.path, aside)
                aside.unlink(missing_ok=True)
                self.taken_over = reason
            except FileNotFoundError:
                pass
        raise RunDirError(f"{self.path}: could not take the run-dir lock (other runs keep claiming it)")

    def _start_heartbeat(self) -> None:
        interval = min(HEARTBEAT_SECONDS, stale_after() / 4)

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    os.utime(self.path)
                except OSError:
                    return

        self._thread = threading.Thread(target=beat, name="mmcl-run-lock", daemon=True)
        self._thread.start()

    def owned(self) -> bool:
        holder = read_lock(self.path)
        return holder is not None and holder.get("token") == self.token

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.owned():
            self.path.unlink(missing_ok=True)
        atexit.unregister(self.release)
