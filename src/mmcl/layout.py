"""Where everything of a run lives: the one place that knows the paths of a run directory.

::

    <run>/config.yaml             resolved config + fingerprint (+ plugins)
    <run>/run.json                the plan: tasks, stages, evaluation protocol
    <run>/data.json               fingerprints of the data files
    <run>/run.lock                held by a live ``mmcl run``
    <run>/sessions.json           wall-clock seconds of every ``mmcl run`` session on this dir
    <run>/stages/<k>_<label>/     state.safetensors, state.json, stage.json
    <run>/<protocol folder>/<k>_<label>/<task>.jsonl   per-task evaluation files of a protocol
    <run>/<protocol folder>/<k>_<label>.jsonl          per-row files (one set for the row, e.g. general)
    <run>/method_summary.json     the method's evaluation facts (e.g. MR-LoRA routing)
    <run>/results.json, report.html, matrix.csv, heatmap.png, accuracy_curves.png
    <run>/tensorboard/            training scalars

Row ``k`` is the model after stage ``k`` (row 0 = the backbone before training); its folder name is
``<k>_<label>`` (``0_base``, ``1_rs``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BASE_LABEL = "base"
LOCK_FILE = "run.lock"


def row_name(index: int, label: str) -> str:
    """Folder name of row/stage ``index`` labelled ``label`` (``0_base``, ``3_ad``)."""
    return f"{index}_{label}"


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- files of the run ---------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def plan_file(self) -> Path:
        return self.root / "run.json"

    @property
    def data_file(self) -> Path:
        return self.root / "data.json"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def sessions_file(self) -> Path:
        return self.root / "sessions.json"

    @property
    def results_file(self) -> Path:
        return self.root / "results.json"

    @property
    def method_summary_file(self) -> Path:
        return self.root / "method_summary.json"

    @property
    def report_file(self) -> Path:
        return self.root / "report.html"

    @property
    def matrix_csv(self) -> Path:
        return self.root / "matrix.csv"

    @property
    def heatmap_png(self) -> Path:
        return self.root / "heatmap.png"

    @property
    def curves_png(self) -> Path:
        return self.root / "accuracy_curves.png"

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "tensorboard"

    # -- stages ------------------------------------------------------------------------------
    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    def stage_dir(self, index: int, label: str) -> Path:
        return self.stages_dir / row_name(index, label)

    def stage_work_dir(self, index: int, label: str) -> Path:
        """Where a stage is written before it is renamed into place (a crash leaves no half stage)."""
        return self.stages_dir / f".tmp_{row_name(index, label)}"

    def stage_info_file(self, index: int, label: str, work: bool = False) -> Path:
        """``stage.json``: label, training samples, seconds, trainable parameters, training metrics."""
        return self._stage_folder(index, label, work) / "stage.json"

    def stage_state_files(self, index: int, label: str, work: bool = False) -> tuple[Path, Path]:
        """(tensors, JSON) of a stage's method state; ``work``: in the folder the stage is written in."""
        folder = self._stage_folder(index, label, work)
        return folder / "state.safetensors", folder / "state.json"

    def stage_scratch_dir(self, index: int, label: str) -> Path:
        """Scratch space of the training loop (the Trainer's output dir), removed before the stage is saved."""
        return self.stage_work_dir(index, label) / "trainer"

    def _stage_folder(self, index: int, label: str, work: bool) -> Path:
        return self.stage_work_dir(index, label) if work else self.stage_dir(index, label)

    # -- evaluation files ---------------------------------------------------------------------
    def protocol_dir(self, folder: str) -> Path:
        return self.root / folder

    def row_dir(self, folder: str, row: str) -> Path:
        """The folder of a protocol's per-task files after row ``row`` (``predictions/2_med``)."""
        return self.root / folder / row

    def task_file(self, folder: str, row: str, task: str) -> Path:
        """A protocol's file for one task after row ``row`` (``predictions/2_med/rs.jsonl``)."""
        return self.root / folder / row / f"{task}.jsonl"

    def row_file(self, folder: str, row: str) -> Path:
        """A protocol's one file for row ``row`` (``general/2_med.jsonl``)."""
        return self.root / folder / f"{row}.jsonl"

    def prediction_file(self, row: str, task: str) -> Path:
        """The accuracy matrix's cell: predictions on ``task`` after row ``row``."""
        return self.task_file("predictions", row, task)
