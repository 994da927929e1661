"""``replay``: experience replay (rehearsal) with one LoRA adapter continued across tasks.

A buffer keeps a share of each finished task's training samples (their ids, not copies of the
images) and mixes them into every later task's training data. Two ways to fill it:

* ``random``: after task t, ``per_task`` (or ``ratio`` x its size) samples of task t drawn uniformly;
* ``reservoir`` (Vitter 1985, as used for replay by Chaudhry et al. 2019, "On Tiny Episodic
  Memories in Continual Learning"): one reservoir over all training samples seen so far, whose
  capacity grows by ``per_task`` (or ``ratio`` x task size) with every task, so each seen sample
  is kept with equal probability.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from mmcl.benchmarks.stream import Task
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError
from mmcl.methods.base import register_method
from mmcl.methods.seq_lora import SequentialLora


@dataclass
class ReplayConfig:
    """Buffer size and selection rule."""

    ratio: float = 0.1  # share of each task's training samples kept when per_task is not set
    per_task: int | None = None  # fixed number of samples kept per task (overrides ratio)
    selection: str = "random"  # random | reservoir

    def __post_init__(self) -> None:
        if self.selection not in ("random", "reservoir"):
            raise ConfigError(f"method.options.selection: expected 'random' or 'reservoir', got {self.selection!r}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"method.options.ratio: expected a share in [0, 1], got {self.ratio}")

    def quota(self, task_size: int) -> int:
        return min(task_size, self.per_task if self.per_task is not None else round(self.ratio * task_size))


@register_method
class ExperienceReplay(SequentialLora):
    name = "replay"
    description = "Sequential LoRA + a replay buffer of past tasks' samples (random or reservoir)"
    config_class = ReplayConfig

    def __init__(self, config: ReplayConfig, lora, seed: int):
        super().__init__(config, lora, seed)
        self.buffer: list[tuple[str, str]] = []  # (task name, sample id)
        self.seen = 0  # training samples offered to the reservoir so far

    def train_data(self, task_index: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
        by_task = {t.name: {s.id: s for s in t.train_samples} for t in self.tasks[:task_index]}
        replayed = [by_task[name][sample_id] for name, sample_id in self.buffer if name in by_task]
        return [*samples, *replayed]

    def after_task(self, task_index: int, task: Task) -> None:
        rng = random.Random(f"replay-{self.seed}-{task_index}")
        ids = [(task.name, sample.id) for sample in task.train_samples]
        quota = self.config.quota(len(ids))
        if self.config.selection == "random":
            self.buffer.extend(rng.sample(ids, quota))
            return
        capacity = len(self.buffer) + quota
        for item in ids:
            self.seen += 1
            if len(self.buffer) < capacity:
                self.buffer.append(item)
            else:
                slot = rng.randrange(self.seen)
                if slot < capacity:
                    self.buffer[slot] = item

    def state_json(self) -> dict[str, Any]:
        return {"buffer": [list(item) for item in self.buffer], "seen": self.seen}

    def load_state_json(self, state: dict[str, Any]) -> None:
        self.buffer = [tuple(item) for item in state.get("buffer", [])]
        self.seen = int(state.get("seen", 0))
