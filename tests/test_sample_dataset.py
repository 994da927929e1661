"""Training samples are encoded once per training call when they are visited more than once, within a byte
budget (mmcl.training.sft.SampleDataset)."""

from __future__ import annotations

import torch

from mmcl.data.sample import Sample
from mmcl.training import sft


class CountingBackbone:
    def __init__(self) -> None:
        self.calls = 0

    def encode_for_training(self, sample: Sample) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"input_ids": torch.arange(4), "labels": torch.full((4,), int(sample.id))}


def _samples(n: int) -> list[Sample]:
    return [Sample(id=str(i), task="t", images=(), prompt="q", answer="a") for i in range(n)]


def test_kept_encodings_are_reused_and_equal_a_fresh_encoding() -> None:
    backbone = CountingBackbone()
    dataset = sft.SampleDataset(_samples(3), backbone, keep=True)
    first = [dataset[i] for i in range(3)]
    again = [dataset[i] for i in range(3)]
    assert backbone.calls == 3
    for one, two, fresh in zip(first, again, (CountingBackbone().encode_for_training(s) for s in _samples(3))):
        assert all(torch.equal(one[key], two[key]) and torch.equal(one[key], fresh[key]) for key in fresh)


def test_nothing_is_kept_beyond_the_budget_or_without_keep(monkeypatch) -> None:
    monkeypatch.setattr(sft, "ENCODED_CACHE_BYTES", 2 * 64)  # two samples of 2 x 4 int64 values
    backbone = CountingBackbone()
    dataset = sft.SampleDataset(_samples(3), backbone, keep=True)
    for _ in range(2):
        [dataset[i] for i in range(3)]
    assert backbone.calls == 4 and dataset.kept_bytes == 128  # the third sample is encoded twice
    plain_backbone = CountingBackbone()
    plain = sft.SampleDataset(_samples(3), plain_backbone)
    for _ in range(2):
        [plain[i] for i in range(3)]
    assert plain_backbone.calls == 6
