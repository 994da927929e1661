"""Chance scores: what a uniformly guessing model scores on a task, the floor of CLiMB's
normalised metrics (Srinivasan et al. 2022, "CLiMB", knowledge transfer T_K and forgetting T_F).

A sample's chance comes from its answer space: a multiple-choice question with k options (parsed
from the prompt by :func:`mmcl.data.answer_styles.parse`) has chance 100/k; a yes/no question (a
``yes_no`` scorer, or the reference answer "yes"/"no") has 50; any open answer has 0 (a guess
from an unbounded answer space is right with probability ~0). A task's chance is the mean over
the test samples it is evaluated on. CLiMB states its tasks' chance scores itself; a published
stream or a stream config can override the computed value per task (``Task.chance``).
"""

from __future__ import annotations

from typing import Sequence

from mmcl.data.answer_styles import parse
from mmcl.data.sample import Sample


def sample_chance(sample: Sample, scorer: str) -> float:
    """Chance score (percent) of one sample under ``scorer``: 100/k for k options, 50 for yes/no, else 0."""
    parsed = parse(sample)
    if parsed.style == "mc":
        return 100.0 / len(parsed.options)
    if scorer == "yes_no" or parsed.style == "yesno":
        return 50.0
    return 0.0


def task_chance(samples: Sequence[Sample], scorer: str, override: float | None = None) -> float | None:
    """Mean chance over ``samples`` (percent), ``override`` when it is set, ``None`` for no samples."""
    if override is not None:
        return float(override)
    if not samples:
        return None
    return sum(sample_chance(sample, scorer) for sample in samples) / len(samples)
