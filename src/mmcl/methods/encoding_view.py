"""The backbone as ``train_on_samples`` sees it when a method needs per-sample tensors in the training batch
(SMoLoRA's instruction feature, ProgLoRA's routing query, DER's buffer slot): every training encoding goes
through ``rewrite(sample, encoded)``, which may add keys; ``collate`` stacks a ``(1, d)`` tensor of each sample
into ``(batch, d)``. The method's forward pre-hook on the model must take its keys out of the batch again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmcl.data.sample import Sample

Rewrite = Callable[[Sample, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class EncodingView:
    """Everything of ``backbone`` unchanged except ``encode_for_training``, whose output ``rewrite`` extends."""

    def __init__(self, backbone: Any, rewrite: Rewrite):
        self._backbone = backbone
        self._rewrite = rewrite

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backbone, name)

    def encode_for_training(self, sample: Sample) -> dict[str, torch.Tensor]:
        return self._rewrite(sample, self._backbone.encode_for_training(sample))


def with_feature(key: str, backbone: Any, features: Callable[[Any, list[Sample]], torch.Tensor]) -> Rewrite:
    """A rewrite adding ``features(backbone, [sample])`` (a ``(1, d)`` tensor) under ``key``."""

    def rewrite(sample: Sample, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoded[key] = features(backbone, [sample])
        return encoded

    return rewrite
