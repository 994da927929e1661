"""Replay buffer selection on ids only (no model): the reservoir is uniform over every seen sample at
every stage, also while its capacity grows; ``random`` selection is the per-task draw it always was;
the state round trip and the refusal of old reservoir states."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from mmcl.errors import RunDirError
from mmcl.methods.replay import ExperienceReplay, ReplayConfig, reservoir_buffer, reservoir_key

SIZES = (50, 50, 50)
QUOTA = 10
SEEDS = 2000


def _tasks(sizes=SIZES):
    """Stand-ins with what the buffer reads: a name and training samples with ids, in file order."""
    return [
        SimpleNamespace(name=f"t{k}", train_samples=[SimpleNamespace(id=f"s{i:03d}") for i in range(size)])
        for k, size in enumerate(sizes)
    ]


def _method(seed: int, tasks, selection: str = "reservoir", per_task: int | None = QUOTA) -> ExperienceReplay:
    method = ExperienceReplay(ReplayConfig(per_task=per_task, selection=selection), lora=None, seed=seed)
    method.tasks = list(tasks)  # what setup() would store, without loading a backbone
    return method


def _buffers_now(seed: int, tasks) -> list[list[tuple[str, str]]]:
    method = _method(seed, tasks)
    stages = []
    for index, task in enumerate(tasks):
        method.after_task(index, task)
        stages.append(list(method.buffer))
    return stages


def _buffers_old(seed: int, tasks) -> list[list[tuple[str, str]]]:
    """The earlier rule, kept here to show that the test catches it: Algorithm R run over each task in
    file order while the capacity grows by the task's quota (new items fill the free slots first)."""
    buffer: list[tuple[str, str]] = []
    seen, stages = 0, []
    for index, task in enumerate(tasks):
        rng = random.Random(f"replay-{seed}-{index}")
        capacity = len(buffer) + min(QUOTA, len(task.train_samples))
        for sample in task.train_samples:
            seen += 1
            if len(buffer) < capacity:
                buffer.append((task.name, sample.id))
            else:
                slot = rng.randrange(seen)
                if slot < capacity:
                    buffer[slot] = (task.name, sample.id)
        stages.append(list(buffer))
    return stages


def _inclusion_counts(run) -> list[Counter]:
    tasks = _tasks()
    counts = [Counter() for _ in tasks]
    for seed in range(SEEDS):
        for stage, buffer in enumerate(run(seed, tasks)):
            assert len(buffer) == len(set(buffer)) == QUOTA * (stage + 1)
            counts[stage].update(buffer)
    return counts


def _deviations(counts: list[Counter]) -> list[tuple[int, tuple[str, str], float, float]]:
    """(stage, id, observed frequency, expected) for every seen id whose count is more than 4.5 binomial
    standard deviations from SEEDS * capacity / seen (about 450 checks: a false alarm has p ~ 3e-3)."""
    tasks, bad = _tasks(), []
    for stage, counter in enumerate(counts):
        seen = [(t.name, s.id) for t in tasks[: stage + 1] for s in t.train_samples]
        p = QUOTA * (stage + 1) / len(seen)
        tolerance = 4.5 * math.sqrt(SEEDS * p * (1 - p))
        bad += [(stage, i, counter[i] / SEEDS, p) for i in seen if abs(counter[i] - SEEDS * p) > tolerance]
        assert set(counter) <= set(seen)  # nothing unseen ever enters
    return bad


def _head_vs_rest(counts: list[Counter]) -> tuple[float, float]:
    """After task 2 (index 1): mean inclusion frequency of its first 10 items and of its other 40."""
    head = [counts[1][("t1", f"s{i:03d}")] / SEEDS for i in range(10)]
    rest = [counts[1][("t1", f"s{i:03d}")] / SEEDS for i in range(10, 50)]
    return sum(head) / len(head), sum(rest) / len(rest)


def test_reservoir_is_uniform_over_seen_samples_at_every_stage():
    counts = _inclusion_counts(_buffers_now)
    assert _deviations(counts) == []
    head, rest = _head_vs_rest(counts)
    assert head == pytest.approx(0.2, abs=0.02) and rest == pytest.approx(0.2, abs=0.02)
    # and per task, the share of the buffer each task holds matches its share of the seen samples
    last = counts[2]
    for task in _tasks():
        held = sum(n for (name, _), n in last.items() if name == task.name)
        assert held / (SEEDS * 3 * QUOTA) == pytest.approx(1 / 3, abs=0.02)


def test_old_growing_algorithm_r_fails_the_same_check():
    counts = _inclusion_counts(_buffers_old)
    bad = _deviations(counts)
    assert {(stage, name) for stage, (name, _), _, _ in bad} >= {(1, "t1"), (2, "t2")}
    head, rest = _head_vs_rest(counts)
    # measured after task 2: its first 10 items held with p ~0.60, its other 40 ~0.20 and task 1's ~0.12
    # (all should be 0.2); after task 3: task 2's first 10 ~0.44, the rest ~0.15, task 3's first 10 ~0.74
    assert head > 0.5 and rest < head / 2


def test_evicted_samples_come_back_when_capacity_grows():
    """With keys kept, stage-2 buffer = the 20 smallest keys of all 100 seen: it contains every task-1
    sample of stage 1 whose key is among those 20, and the buffer is a pure function of the seed."""
    tasks = _tasks()
    for seed in range(50):
        stages = _buffers_now(seed, tasks)
        seen = [(t.name, s.id) for t in tasks for s in t.train_samples]
        for stage, buffer in enumerate(stages):
            pool = seen[: 50 * (stage + 1)]
            expected = sorted(pool, key=lambda item: reservoir_key(seed, *item))[: QUOTA * (stage + 1)]
            assert buffer == expected
        assert stages == _buffers_now(seed, tasks)  # deterministic from the seed
    assert _buffers_now(0, tasks) != _buffers_now(1, tasks)


def test_reservoir_key_is_uniform_and_stable():
    keys = [reservoir_key(3, "task", f"id{i}") for i in range(20000)]
    assert all(0.0 <= k < 1.0 for k in keys)
    assert sum(keys) / len(keys) == pytest.approx(0.5, abs=0.01)
    assert sum(k < 0.1 for k in keys) / len(keys) == pytest.approx(0.1, abs=0.01)
    assert reservoir_key(3, "task", "id0") == keys[0]  # a pure function: no process-dependent salt
    assert reservoir_buffer(0, [("a", "x"), ("a", "x"), ("a", "y")], 5) == reservoir_buffer(0, [("a", "y"), ("a", "x")], 5)


def test_random_selection_is_unchanged():
    """``random``: after task t, rng.sample(task t's ids, quota) with rng = Random(f"replay-{seed}-{t}")."""
    tasks = _tasks((30, 20, 40))
    for seed in (0, 1, 17):
        method = _method(seed, tasks, selection="random", per_task=None)  # ratio 0.1
        expected = []
        for index, task in enumerate(tasks):
            method.after_task(index, task)
            ids = [(task.name, s.id) for s in task.train_samples]
            expected += random.Random(f"replay-{seed}-{index}").sample(ids, round(0.1 * len(ids)))
        assert method.buffer == expected and len(expected) == 3 + 2 + 4


@pytest.mark.parametrize("selection", ["random", "reservoir"])
def test_state_round_trip(selection):
    tasks = _tasks((30, 20, 40))
    method = _method(5, tasks, selection=selection, per_task=4)
    method.after_task(0, tasks[0])
    method.after_task(1, tasks[1])
    state = json.loads(json.dumps(method.state_json()))
    fresh = _method(5, tasks, selection=selection, per_task=4)
    fresh.load_state_json(state)
    assert fresh.buffer == method.buffer and fresh.seen == method.seen
    method.after_task(2, tasks[2])
    fresh.after_task(2, tasks[2])
    assert fresh.buffer == method.buffer  # the resumed run continues with the same buffer
    with pytest.raises(RunDirError, match="selection"):
        _method(5, tasks, selection="random" if selection == "reservoir" else "reservoir").load_state_json(state)


def test_old_states():
    tasks = _tasks()
    old = {"buffer": [["t0", "s001"], ["t0", "s007"]], "seen": 50}  # what the previous version wrote
    with pytest.raises(RunDirError, match="not uniform"):
        _method(0, tasks).load_state_json(old)
    random_method = _method(0, tasks, selection="random")
    random_method.load_state_json(old)  # random buffers are drawn as before: still loadable
    assert random_method.buffer == [("t0", "s001"), ("t0", "s007")]
    _method(0, tasks).load_state_json({})  # nothing saved yet
