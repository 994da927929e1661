"""What a sweep run's directory already holds, from its files alone: done, partial, not started, or a run of
another config (which ``mmcl run`` would refuse)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DONE, PARTIAL, NOT_STARTED, OTHER_CONFIG, UNREADABLE = "done", "partial", "not started", "other config", "unreadable"


@dataclass
class RunState:
    kind: str  # one of the constants above
    detail: str = ""  # e.g. "3/5 stages, 12/30 evaluations"

    @property
    def text(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


def run_state(run_dir: Path, config: Any | None = None) -> RunState:
    """The state of ``run_dir``. With ``config`` (the run's :class:`~mmcl.config.ExperimentConfig`), a dir
    made by a config of another fingerprint is ``other config``. Never raises on a damaged dir."""
    import yaml

    from mmcl.errors import MmclError
    from mmcl.layout import RunLayout
    from mmcl.results import collect_results

    layout = RunLayout(Path(run_dir))
    if not layout.config_file.is_file():
        return RunState(NOT_STARTED)
    try:
        if config is not None:
            from mmcl.run_dir import same_results_settings

            stored = yaml.safe_load(layout.config_file.read_text(encoding="utf-8"))
            if not same_results_settings(stored, config):
                return RunState(OTHER_CONFIG, "its config.yaml has another fingerprint; `mmcl run` would refuse it")
        if not layout.plan_file.is_file():
            return RunState(PARTIAL, "no stage yet")
        progress = collect_results(layout.root).progress
    except (MmclError, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return RunState(UNREADABLE, reason[:160])
    if progress.complete:
        return RunState(DONE)
    return RunState(PARTIAL, f"{progress.stages_done}/{progress.stages_planned} stages, "
                             f"{progress.evaluations_done}/{progress.evaluations_planned} evaluations")
