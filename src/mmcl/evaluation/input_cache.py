"""Processed model inputs kept for the duration of a run.

Every row of the accuracy matrix evaluates the same test batches again (T times for T tasks), and each time
the processor decoded, resized and normalised the same images. :class:`InputCache` keeps the processor's
output of a batch, keyed by what it was made from (the rendered prompt texts and the image files), in a
least-recently-used store bounded in bytes. A hit returns copies of the stored tensors, so a caller that
changes its batch in place never changes the cache. Results cannot differ: the same texts and files give
the same tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

import torch


def tensor_bytes(batch: Mapping[str, Any]) -> int:
    return sum(value.numel() * value.element_size() for value in batch.values() if isinstance(value, torch.Tensor))


class InputCache:
    """At most ``max_bytes`` of processed batches (a batch larger than that is not kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, dict[str, Any]] = OrderedDict()
        self.used = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> dict[str, Any] | None:
        stored = self.entries.get(key)
        if stored is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in stored.items()}

    def put(self, key: Hashable, batch: Mapping[str, Any]) -> None:
        size = tensor_bytes(batch)
        if size > self.max_bytes or key in self.entries:
            return
        while self.entries and self.used + size > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.used -= tensor_bytes(evicted)
        self.entries[key] = {name: value.clone() if isinstance(value, torch.Tensor) else value
                             for name, value in batch.items()}
        self.used += size
