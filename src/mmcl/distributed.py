"""Multi-process runs under ``torchrun`` / ``accelerate launch`` (DDP: gloo on CPU, nccl on GPUs).

Every process runs the same continual loop on the same model. Training shards each stage's data
through the HF Trainer (DistributedSampler, gradients all-reduced, the configured batch size is the
global one); evaluation shards the test samples (``samples[rank::world]``) and gathers the answers
on process 0, which alone writes the run directory. Decisions that depend on files (is this stage or
evaluation done?) are taken by process 0 and broadcast, so all processes walk the same path.
Single-process runs never touch ``torch.distributed``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar

import torch

Item = TypeVar("Item")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world_size() > 1


def init_from_env() -> None:
    """Join the process group described by torchrun's environment (no-op for one process)."""
    if not active() or torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)


def shutdown(wait: bool = True) -> None:
    """Leave the process group before the interpreter exits (no-op when none was joined).

    A process that exits with the group still alive can abort in the C++ teardown
    ("terminate called without an active exception") while another process still talks to it;
    ``wait`` first lets every process reach this point (skip it on an error path, where a peer
    may never arrive).
    """
    if not torch.distributed.is_initialized():
        return
    if wait:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def agree(value: Any) -> Any:
    """Process 0's ``value`` on every process (JSON-like values)."""
    if not active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: Sequence[Item]) -> list[Item]:
    """This process's share: every ``world_size``-th item from position ``rank``."""
    return list(items[rank() :: world_size()]) if active() else list(items)


def gather_shards(part: list[Item], total: int) -> list[Item]:
    """The full list on every process, in the order :func:`shard` split it from (length ``total``)."""
    if not active():
        return part
    merged: list[Item] = [None] * total  # type: ignore[list-item]
    for index, chunk in enumerate(gather_objects(part)):
        merged[index::world_size()] = chunk  # type: ignore[index]
    return merged


def gather_objects(value: Item) -> list[Item]:
    """Every process's ``value``, in rank order, on every process (``[value]`` for one process)."""
    if not active():
        return [value]
    parts: list[Item | None] = [None] * world_size()
    torch.distributed.all_gather_object(parts, value)
    return parts  # type: ignore[return-value]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes, in place (unchanged for one process); returns it."""
    if active():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor
