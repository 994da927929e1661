"""What a stage was trained with: library versions, source commit, CPU kernels and threads.

Recorded in every ``stages/<k>_<task>/stage.json`` when the stage is trained (a resumed run may train its
stages on other machines or versions, so each stage says its own); ``mmcl report`` compares the record
with what is installed now (:func:`version_warnings`)."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable

from mmcl.determinism import KERNEL_VARIABLES

# The libraries whose version can change a number mmcl computes.
TRACKED_PACKAGES = ("mmcl", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy",
                    "pillow", "trl")  # fmt: skip


def installed_versions(packages: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    found = {}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


@lru_cache(maxsize=1)
def source_state() -> dict[str, Any]:
    """The git commit of the mmcl source tree and whether tracked files had uncommitted changes
    (both None when mmcl is not run from a git checkout)."""
    commit = _git("rev-parse", "HEAD") or None
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_record(deterministic: bool) -> dict[str, Any]:
    """This process's environment as a stage records it."""
    import torch

    record: dict[str, Any] = {
        "versions": installed_versions(),
        **source_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "kernel_variables": {key: os.environ[key] for key in KERNEL_VARIABLES if key in os.environ},
        "deterministic": deterministic,
    }
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name()
    return record


def version_warnings(stage_environments: dict[str, dict[str, Any] | None],
                     installed: dict[str, str] | None = None) -> list[str]:  # fmt: skip
    """One line per library whose installed version differs from the one a stage was trained with, and
    per pair of stages trained with different versions of it. ``stage_environments``: stage label ->
    its record (None for a stage of an older mmcl, which recorded none)."""
    installed = installed_versions() if installed is None else installed
    recorded = {label: env.get("versions", {}) for label, env in stage_environments.items() if env}
    warnings = []
    for package in sorted({name for versions in recorded.values() for name in versions}):
        used: dict[str, list[str]] = {}
        for label, versions in recorded.items():
            if package in versions:
                used.setdefault(versions[package], []).append(label)
        if len(used) > 1:
            shown = "; ".join(f"{found} for {', '.join(labels)}" for found, labels in used.items())
            warnings.append(f"{package}: the stages were trained with different versions ({shown})")
        now = installed.get(package)
        for found in used:
            if now != found:
                warnings.append(f"{package}: stages trained with {found}, installed now {now or 'none'}")
    return warnings
