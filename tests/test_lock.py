"""requirements.lock (made by scripts/lock.sh, installed by scripts/setup.sh) pins every dependency of
pyproject.toml within its range, leaves torch and the GPU runtime to the machine, and is what this
environment has installed."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
LOCK_SCRIPT = ROOT / "scripts" / "lock.sh"
SETUP_SCRIPT = ROOT / "scripts" / "setup.sh"
LEFT_TO_THE_MACHINE = re.compile(r"^(torch|triton|pytorch-triton.*|nvidia-.*|cuda-.*)$")


def _lock_entries() -> list[Requirement]:
    entries = []
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(Requirement(line))
    return entries


def _locked_extras() -> list[str]:
    return re.findall(r"--extra\s+(\S+)", LOCK_SCRIPT.read_text())


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in _locked_extras():
        requirements += project["optional-dependencies"][extra]
    return [Requirement(text) for text in requirements]


def _pin(entry: Requirement) -> Version:
    (specifier,) = entry.specifier
    assert specifier.operator == "==", f"{entry}: not pinned with =="
    return Version(specifier.version)


def test_lock_script_locks_the_test_and_slurm_extras():
    assert set(_locked_extras()) == {"test", "slurm"}


def test_every_lock_line_is_one_exact_pin():
    entries = _lock_entries()
    assert len(entries) > 20
    for entry in entries:
        _pin(entry)


def test_every_project_dependency_is_pinned_within_its_range():
    by_name: dict[str, list[Requirement]] = {}
    for entry in _lock_entries():
        by_name.setdefault(canonicalize_name(entry.name), []).append(entry)
    checked = 0
    for requirement in _project_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in by_name, f"{requirement.name} (pyproject.toml) is not in {LOCK.name}: run scripts/lock.sh"
        for entry in by_name[name]:
            assert requirement.specifier.contains(_pin(entry), prereleases=True), (
                f"{LOCK.name} pins {entry}, outside pyproject's {requirement}: run scripts/lock.sh"
            )
        checked += 1
    assert checked >= 13


def test_torch_and_the_gpu_runtime_are_left_to_the_machine():
    named = [entry.name for entry in _lock_entries() if LEFT_TO_THE_MACHINE.match(canonicalize_name(entry.name))]
    assert named == []


def test_setup_and_lock_scripts_agree_on_torch():
    """The lock's torch dependencies are resolved against the torch that setup.sh installs."""
    pins = [re.search(r"^TORCH_VERSION=(\S+)", path.read_text(), re.M) for path in (LOCK_SCRIPT, SETUP_SCRIPT)]
    assert all(pins), "TORCH_VERSION=... missing in scripts/lock.sh or scripts/setup.sh"
    assert pins[0].group(1) == pins[1].group(1)


def test_installed_versions_equal_the_lock():
    """Fails when this environment was not installed from the lock (or the lock changed since):
    re-run scripts/setup.sh, or `.venv/bin/pip install -r requirements.lock`."""
    wrong = []
    applying = [entry for entry in _lock_entries() if entry.marker is None or entry.marker.evaluate()]
    if not applying:
        pytest.fail("no entry of the lock applies to this environment")
    for entry in applying:
        try:
            installed = metadata.version(entry.name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{entry.name}: not installed, locked {_pin(entry)}")
            continue
        if Version(installed) != _pin(entry):
            wrong.append(f"{entry.name}: installed {installed}, locked {_pin(entry)}")
    assert wrong == [], "the environment differs from requirements.lock:\n" + "\n".join(wrong)
