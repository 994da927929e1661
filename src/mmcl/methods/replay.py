"""``replay``: experience replay (rehearsal) with one LoRA adapter continued across tasks.

A buffer keeps a share of each finished task's training samples (their ids, not copies of the
images) and mixes them into every later task's training data. Two ways to fill it:

* ``random``: after task t, ``per_task`` (or ``ratio`` x its size) samples of task t drawn uniformly;
* ``reservoir`` (reservoir sampling, Vitter 1985, "Random Sampling with a Reservoir"; used for
  replay by Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning"): one buffer
  over all training samples seen so far, whose capacity grows by ``per_task`` (or ``ratio`` x task
  size) with every task.

The reservoir is kept by *random keys* rather than by Vitter's Algorithm R: every seen sample gets a
key u ~ Uniform[0, 1), a hash of (run seed, task name, sample id), and the buffer is the ``capacity``
seen samples with the smallest keys. The keys are i.i.d. uniform, so their order is a uniformly random
permutation of the seen samples and its first ``capacity`` entries are a uniform sample without
replacement: at every point, each of the N seen samples is in the buffer with probability exactly
capacity / N, and every subset of that size is equally likely. This stays exact while the capacity
grows because no key is ever forgotten (a key is recomputed from the seen sample, so nothing has to
be stored): a sample evicted earlier comes back when a larger capacity reaches its key. Algorithm R
with a growing capacity is not exact: it would admit the next task's first items unconditionally
until the buffer is full, and evicted items could never come back. The keys depend on nothing but
the seed and the ids, so a resumed run rebuilds the same buffer.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Sequence

from mmcl.streams.stream import Task
from mmcl.data.sample import Sample
from mmcl.config import setting
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import register_method
from mmcl.methods.seq_lora import SequentialLora

RESERVOIR_SCHEME = "min-key"  # written to state.json; states without it come from the old Algorithm-R buffer


@dataclass
class ReplayConfig:
    """Buffer size and selection rule."""

    ratio: float = setting(0.1, help="share of each task's training samples kept when per_task is not set")
    per_task: int | None = setting(None, "[0, inf)", "fixed number of samples kept per task (overrides ratio)")
    selection: str = setting("random", help="random: a draw from each finished task; reservoir: one uniform buffer "
                             "over every sample seen")

    def __post_init__(self) -> None:
        if self.selection not in ("random", "reservoir"):
            raise ConfigError(f"method.options.selection: expected 'random' or 'reservoir', got {self.selection!r}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"method.options.ratio: expected a share in [0, 1], got {self.ratio}")

    def quota(self, task_size: int) -> int:
        return min(task_size, self.per_task if self.per_task is not None else round(self.ratio * task_size))


def reservoir_key(seed: int, task_name: str, sample_id: str) -> float:
    """The sample's uniform key in [0, 1): 53 bits of a BLAKE2b hash of (seed, task, id), the same in
    every process and on every machine (unlike Python's salted ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\x1f{task_name}\x1f{sample_id}".encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)


def reservoir_buffer(seed: int, seen: Sequence[tuple[str, str]], capacity: int) -> list[tuple[str, str]]:
    """The ``capacity`` items of ``seen`` ((task name, sample id) pairs, each counted once) with the
    smallest keys, in key order; ties (probability ~2^-53 per pair) are broken by (task, id)."""
    unique = dict.fromkeys(seen)
    ranked = sorted(unique, key=lambda item: (reservoir_key(seed, *item), item))
    return ranked[: max(0, capacity)]


@register_method
class ExperienceReplay(SequentialLora[ReplayConfig]):
    name = "replay"
    description = "Sequential LoRA + a replay buffer of past tasks' samples (random or reservoir)"

    def init_state(self) -> None:
        self.buffer: list[tuple[str, str]] = []  # (task name, sample id)
        self.seen = 0  # reservoir: distinct training samples seen so far
        self.capacity = 0  # reservoir: sum of the finished tasks' quotas

    def train_data(self, task_index: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
        by_task = {t.name: {s.id: s for s in t.train_samples} for t in self.tasks[:task_index]}
        replayed = [by_task[name][sample_id] for name, sample_id in self.buffer if name in by_task]
        return [*samples, *replayed]

    def after_task(self, task_index: int, task: Task) -> None:
        ids = [(task.name, sample.id) for sample in task.train_samples]
        quota = self.config.quota(len(ids))
        if self.config.selection == "random":
            rng = random.Random(f"replay-{self.seed}-{task_index}")
            self.buffer.extend(rng.sample(ids, quota))
            return
        # every sample seen so far, the earlier tasks' included: their keys decide again with the new capacity
        seen = [(t.name, s.id) for t in self.tasks[:task_index] for s in t.train_samples] + ids
        self.capacity = sum(self.config.quota(len(t.train_samples)) for t in self.tasks[:task_index]) + quota
        self.seen = len(dict.fromkeys(seen))
        self.buffer = reservoir_buffer(self.seed, seen, self.capacity)

    def state_json(self) -> dict[str, Any]:
        state: dict[str, Any] = {"selection": self.config.selection, "buffer": [list(item) for item in self.buffer]}
        if self.config.selection == "reservoir":
            state.update(scheme=RESERVOIR_SCHEME, seen=self.seen, capacity=self.capacity)
        return state

    def load_state_json(self, state: dict[str, Any]) -> None:
        selection = state.get("selection", self.config.selection)
        if selection != self.config.selection:
            raise RunDirError(f"replay state: saved with selection {selection!r}, config asks for {self.config.selection!r}")
        buffer = [tuple(item) for item in state.get("buffer", [])]
        if self.config.selection == "reservoir" and buffer and state.get("scheme") != RESERVOIR_SCHEME:
            raise RunDirError(
                "replay state: this reservoir buffer was saved by an older mmcl whose reservoir was not uniform "
                "(Algorithm R with a growing capacity); it cannot be continued exactly. Start the run again "
                "in a new output directory (or with --overwrite)."
            )
        self.buffer = buffer
        self.seen = int(state.get("seen", 0))
        self.capacity = int(state.get("capacity", len(buffer)))
