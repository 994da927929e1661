"""``mmcl reproduce RUN_DIR``: rerun a run from what it recorded, and say whether the numbers come out equal.

The rerun uses the run dir's ``config.yaml`` (the resolved config, with the folder its relative paths were
resolved against), the plugin files it recorded (refused when a file changed since: its sha256 differs)
and, with ``deterministic``, the same pinned kernels. It then compares, against the original, the accuracy
matrix and every predictions file of every protocol record by record (the header's generation time aside,
which differs between any two runs): "identical" means both are. The data is compared too and reported
beside: each data file's sha256 and image count (``data.json``); image files are fingerprinted by size and
modification time only, so copied images are reported as such, not as different content."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from mmcl.errors import ConfigError, RunDirError
from mmcl.layout import RunLayout
from mmcl.run_dir import BASE_DIR_KEY

UNTIMED_KEY = "seconds"  # the one header field that differs between two runs of the same thing


@dataclass
class Reproduction:
    """What :func:`compare_runs_exactly` found."""

    original: Path
    rerun: Path
    data_notes: list[str]  # how the data differs from the original's (empty: the same)
    matrix_cells: int
    differing_cells: list[str] = field(default_factory=list)  # "row/task: a -> b"
    prediction_files: int = 0
    differing_files: list[str] = field(default_factory=list)  # paths relative to the run dir
    missing_files: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not (self.differing_cells or self.differing_files or self.missing_files)

    def lines(self) -> list[str]:
        lines = [f"data: {'; '.join(self.data_notes)}" if self.data_notes else "data: the same files (sha256)"]
        if self.differing_cells:
            lines.append(f"matrix: {len(self.differing_cells)} of {self.matrix_cells} cells differ: "
                         + "; ".join(self.differing_cells[:5]))
        else:
            lines.append(f"matrix: all {self.matrix_cells} cells equal")
        if self.differing_files or self.missing_files:
            lines.append(f"predictions: {len(self.differing_files)} of {self.prediction_files} files differ"
                         + (f", {len(self.missing_files)} missing in the rerun" if self.missing_files else "")
                         + ": " + ", ".join((self.differing_files + self.missing_files)[:5]))
        else:
            lines.append(f"predictions: all {self.prediction_files} files identical, record by record")
        lines.append("identical" if self.identical else "differs")
        return lines


def read_stored_config(run_dir: Path) -> dict[str, Any]:
    path = RunLayout(run_dir).config_file
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{run_dir}: no config.yaml, not a run dir") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunDirError(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(stored, dict):
        raise RunDirError(f"{path}: not a mapping")
    return stored


def base_dir_of(stored: dict[str, Any], run_dir: Path, note: Callable[[str], None]) -> Path:
    """The folder the run's relative paths were resolved against (the current folder for a run dir of an
    older mmcl, which did not record it: said through ``note``)."""
    recorded = stored.get(BASE_DIR_KEY)
    if isinstance(recorded, str):
        return Path(recorded)
    note(f"{run_dir}: config.yaml does not record the folder its paths were resolved against; using {Path.cwd()}")
    return Path.cwd()


def load_recorded_plugins(stored: dict[str, Any], where: Path) -> None:
    """Load every plugin the run recorded; refuse a missing file or one whose content changed."""
    from mmcl.plugins import load_entry_points, load_plugin_file, loaded_plugins

    load_entry_points()
    for entry in stored.get("plugins") or []:
        path, digest = entry.get("path"), entry.get("sha256")
        loaded = {item["path"]: item["sha256"] for item in loaded_plugins()}
        if path not in loaded:
            if not Path(path).is_file():
                raise ConfigError(f"{where}: plugin {path} recorded by the run is missing")
            load_plugin_file(path)
            loaded = {item["path"]: item["sha256"] for item in loaded_plugins()}
        if loaded.get(path) != digest:
            raise ConfigError(f"{where}: plugin {path} changed since the run (sha256 {digest[:12]}... recorded)")


def prediction_records(path: Path) -> list[Any]:
    """A predictions file's records, the header's generation time left out."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if isinstance(record, dict) and isinstance(record.get("meta"), dict):
            record["meta"] = {key: value for key, value in record["meta"].items() if key != UNTIMED_KEY}
        records.append(record)
    return records


def prediction_files(run_dir: Path) -> list[Path]:
    """Every evaluation record file of a run dir (``*.jsonl`` of every protocol), relative to it."""
    return sorted(path.relative_to(run_dir) for path in run_dir.rglob("*.jsonl")
                  if RunLayout(run_dir).tensorboard_dir not in path.parents)  # fmt: skip


def compare_runs_exactly(original: Path, rerun: Path) -> Reproduction:
    from mmcl.results import load_results

    old_layout, new_layout = RunLayout(original), RunLayout(rerun)
    data_notes = data_differences(_json_or_none(old_layout.data_file), _json_or_none(new_layout.data_file))
    old, new = load_results(original), load_results(rerun)
    cells, differing = 0, []
    for label, old_row, new_row in zip(old.row_labels, old.matrix, new.matrix):
        for task, a, b in zip(old.task_names, old_row, new_row):
            if a is None and b is None:
                continue
            cells += 1
            if a != b:
                differing.append(f"{label}/{task}: {a} -> {b}")
    if len(old.matrix) != len(new.matrix) or old.task_names != new.task_names:
        differing.append("the matrices have different shapes")
    files = prediction_files(original)
    changed = [str(rel) for rel in files
               if (rerun / rel).is_file() and prediction_records(original / rel) != prediction_records(rerun / rel)]
    missing = [str(rel) for rel in files if not (rerun / rel).is_file()]
    return Reproduction(original, rerun, data_notes, cells, differing, len(files), changed, missing)


def data_differences(old: Any, new: Any) -> list[str]:
    """What differs between two ``data.json`` records: a data file's content (sha256) or image count, or
    (a weaker sign) its images' sizes or modification times. Paths are not compared: a rerun may resolve
    the same files under another folder."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ["no data fingerprints to compare (data.json missing or unreadable)"]

    def files(record: dict) -> dict[str, dict]:
        found = {f"{task}/{split}": entry for task, splits in (record.get("tasks") or {}).items()
                 for split, entry in splits.items() if isinstance(entry, dict)}  # fmt: skip
        if isinstance(record.get("general"), dict):
            found["general"] = record["general"]
        return found

    before, after = files(old), files(new)
    notes = [f"{name}: not in the rerun" for name in before if name not in after]
    notes += [f"{name}: only in the rerun" for name in after if name not in before]
    for name in before.keys() & after.keys():
        a, b = before[name], after[name]
        if a.get("sha256") != b.get("sha256"):
            notes.append(f"{name}: other content (sha256)")
        elif a.get("images") != b.get("images"):
            notes.append(f"{name}: {a.get('images')} images, {b.get('images')} in the rerun")
        elif a.get("images_sha256") != b.get("images_sha256"):
            notes.append(f"{name}: images of other sizes or modification times (copied? content not compared)")
    return sorted(notes)


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
