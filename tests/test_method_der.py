"""DER / DER++: the logit distance on hand-made tensors (full storage = mean squared error, top-k with the stored
minimum as a bound or ignored), top-k storage of the answer-position logits recorded after a task, the DER term
0 for the unchanged model and alpha * delta^2 for stored logits shifted by delta, DER++'s cross-entropy on the
buffered answers, the buffered rows kept out of the model's own loss (an all-buffered batch has loss 0, not NaN),
a short stage that trains with the term, and the state round trip with refusals of a bad state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import mmcl.methods.der  # noqa: F401  (registers "der")
from mmcl.backbones.backbone import IGNORE_INDEX
from mmcl.config import LoraSettings, TrainingConfig
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS
from mmcl.methods.der import (
    ANSWER_KEY,
    SLOT_KEY,
    DarkExperienceReplay,
    DerConfig,
    compress_logits,
    dark_distance,
)

BACKBONE = "tiny-llava"  # the shipped tiny model (4 decoder layers, vocabulary 421): nothing to build or download


# -- the distance on hand-made tensors ---------------------------------------------------------------
def test_full_storage_distance_is_the_mean_squared_error_per_position():
    h = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    z = torch.tensor([[1.0, 0.0, 5.0], [1.0, -1.0, 2.0]])
    # row 0: (0 + 4 + 4) / 3; row 1: (1 + 1 + 4) / 3
    torch.testing.assert_close(dark_distance(h, z, None), torch.tensor([8.0 / 3, 2.0]))
    assert float(dark_distance(h, z, None).mean()) == pytest.approx(float(F.mse_loss(h, z)))  # the released term


def test_top_k_distance_bounds_the_logits_not_stored_by_the_stored_minimum():
    h = torch.tensor([[3.0, 1.0, 4.0, 0.0, 2.5]])
    values = torch.tensor([[4.5, 2.0]])  # stored: id 2 -> 4.5, id 0 -> 2.0 (so every other logit was <= 2.0)
    ids = torch.tensor([[2, 0]], dtype=torch.int32)
    stored = (4.0 - 4.5) ** 2 + (3.0 - 2.0) ** 2  # 1.25
    above_floor = (2.5 - 2.0) ** 2  # id 4 rose above 2.0; ids 1 and 3 are below it
    torch.testing.assert_close(dark_distance(h, values, ids, "bound"), torch.tensor([(stored + above_floor) / 2]))
    torch.testing.assert_close(dark_distance(h, values, ids, "ignore"), torch.tensor([stored / 2]))
    # the stored entries themselves are never counted twice, even when above the floor (id 0: 3.0 > 2.0)
    assert float(dark_distance(torch.tensor([[2.0, 0.0, 4.5, 0.0, 2.0]]), values, ids)) == 0.0


def test_top_k_distance_is_zero_on_the_logits_it_was_stored_from_and_full_when_k_is_the_vocabulary():
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    values, ids = compress_logits(logits, 3)
    assert torch.equal(dark_distance(logits, values, ids), torch.zeros(4))
    full_values, full_ids = compress_logits(logits, 9)
    assert full_ids is None and torch.equal(full_values, logits)
    shifted = logits + 0.5
    torch.testing.assert_close(dark_distance(shifted, full_values, None), torch.full((4,), 0.25))


def test_compress_keeps_the_k_largest_sorted_with_int32_ids():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 4.0, 6.0, 0.0]])
    values, ids = compress_logits(logits, 2)
    assert torch.equal(values, torch.tensor([[3.0, 2.0], [6.0, 5.0]]))
    assert ids.dtype == torch.int32 and torch.equal(ids, torch.tensor([[1, 3], [2, 0]], dtype=torch.int32))


@pytest.mark.parametrize(
    "options",
    [{"variant": "der+"}, {"tail": "zero"}, {"alpha": -1.0}, {"logit_top_k": 0}, {"beta": 0.5},
     {"selection": "fifo"}],
)  # fmt: skip
def test_bad_options_are_refused(options):
    with pytest.raises(ConfigError):
        DerConfig(**options)


def test_defaults_are_the_released_seq_cifar10_settings():
    assert (DerConfig().alpha_value, DerConfig().beta_value) == (0.3, 0.0)
    assert (DerConfig(variant="der++").alpha_value, DerConfig(variant="der++").beta_value) == (0.2, 0.5)
    assert METHODS["der"] is DarkExperienceReplay and METHODS["der"].config_class is DerConfig


# -- on the tiny model -------------------------------------------------------------------------------
def der_on_tiny(tasks, seen: int = 1, **options) -> DarkExperienceReplay:
    from mmcl.backbones.registry import load_backbone

    config = DerConfig(**{"per_task": 3, "selection": "random", **options})
    method = DarkExperienceReplay(config, LoraSettings(), seed=0)
    method.setup(load_backbone(BACKBONE, device="cpu"))
    method.see_tasks(tasks[:seen], len(tasks))
    return method


def answer_logits_of(method: DarkExperienceReplay, sample) -> torch.Tensor:
    backbone = method.backbone
    batch = backbone.collate([backbone.encode_for_training(sample)])
    labels = batch.pop("labels")
    backbone.model.eval()
    with torch.no_grad():
        logits = backbone.model(**batch).logits
    return logits[0, :-1][labels[0, 1:] != IGNORE_INDEX]


def stage_two_batch(method: DarkExperienceReplay, tasks, current: int = 2):
    """After task 0: the training batch of stage 2 (``current`` of task 1's samples + the 3 buffered), run once
    through the model with the DER hooks; returns (batch, outputs)."""
    method.see_tasks(tasks[:2], len(tasks))
    samples = method.train_data(1, tasks[1], tasks[1].train_samples[:current])
    method.backbone.model.eval()
    with method.buffered_batches() as view:
        batch = view.collate([view.encode_for_training(s) for s in samples])
        with torch.no_grad():
            outputs = method.backbone.model(**batch)
    return batch, outputs


def test_logits_recorded_after_a_task_are_the_top_k_at_the_answer_positions(tasks):
    method = der_on_tiny(tasks, logit_top_k=5)
    method.after_task(0, tasks[0])
    assert len(method.buffer) == 3 and set(method.logits) == set(method.buffer)
    by_id = {s.id: s for s in tasks[0].train_samples}
    for (task_name, sample_id), (values, ids) in method.logits.items():
        expected = answer_logits_of(method, by_id[sample_id])
        top = expected.topk(5, dim=-1)
        assert values.shape == (expected.shape[0], 5) and ids.dtype == torch.int32
        assert torch.equal(values, top.values) and torch.equal(ids.long(), top.indices)
    full = der_on_tiny(tasks, logit_top_k=None)
    full.after_task(0, tasks[0])
    (_, sample_id), (values, ids) = next(iter(full.logits.items()))
    assert ids is None and torch.equal(values, answer_logits_of(full, by_id[sample_id]))


def test_der_term_is_zero_for_the_unchanged_model_and_alpha_delta_squared_for_shifted_logits(tasks):
    method = der_on_tiny(tasks, alpha=0.7)
    method.after_task(0, tasks[0])
    batch, outputs = stage_two_batch(method, tasks)
    slots = batch[SLOT_KEY].flatten().tolist()
    assert slots == [-1, -1, 0, 1, 2]  # the 2 current samples, then the buffered ones in buffer order
    assert bool((batch["labels"][2:] == IGNORE_INDEX).all()) and bool((batch["labels"][:2] != IGNORE_INDEX).any())
    assert torch.equal(batch[ANSWER_KEY][:2], (batch["labels"][:2] != IGNORE_INDEX).long())
    # the model's own loss is the CE of the current rows alone
    logits = outputs.logits
    current_ce = F.cross_entropy(logits[:2, :-1].flatten(0, 1), batch["labels"][:2, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(outputs.loss, current_ce)
    distance, _ = method.buffered_terms(batch, logits)
    assert float(distance) < 1e-10
    assert float(method.extra_loss(method.backbone.model, batch, outputs)) < 1e-10
    delta = 0.5
    method.logits = {key: (values + delta, ids) for key, (values, ids) in method.logits.items()}
    # every stored entry is off by delta and the floor moved up by delta too: D = delta^2 exactly
    extra = method.extra_loss(method.backbone.model, batch, outputs)
    assert float(extra) == pytest.approx(0.7 * delta**2, rel=1e-5)


def test_der_plus_plus_adds_beta_times_the_cross_entropy_of_the_buffered_answers(tasks):
    method = der_on_tiny(tasks, variant="der++", alpha=0.7, beta=0.4)
    method.after_task(0, tasks[0])
    batch, outputs = stage_two_batch(method, tasks)
    rows = []
    for row in (2, 3, 4):
        mask = batch[ANSWER_KEY][row, 1:].bool()
        rows.append((outputs.logits[row, :-1][mask], batch["input_ids"][row, 1:][mask]))
    by_hand = F.cross_entropy(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))
    distance, ce = method.buffered_terms(batch, outputs.logits)
    torch.testing.assert_close(ce, by_hand)
    extra = method.extra_loss(method.backbone.model, batch, outputs)
    torch.testing.assert_close(extra, 0.7 * distance + 0.4 * by_hand)


def test_a_batch_of_buffered_samples_only_has_model_loss_zero_not_nan(tasks):
    method = der_on_tiny(tasks, variant="der++")
    method.after_task(0, tasks[0])
    batch, outputs = stage_two_batch(method, tasks, current=0)
    assert batch[SLOT_KEY].flatten().tolist() == [0, 1, 2]
    assert float(outputs.loss) == 0.0
    assert torch.isfinite(method.extra_loss(method.backbone.model, batch, outputs))


def test_a_stage_trains_with_the_term_and_the_buffer_keeps_its_logits_only(tasks, tmp_path: Path):
    method = der_on_tiny(tasks, variant="der++", selection="reservoir")
    method.after_task(0, tasks[0])
    method.see_tasks(tasks[:2], len(tasks))
    samples = method.train_data(1, tasks[1], tasks[1].train_samples)
    config = TrainingConfig(max_steps=2, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, progress_bar=False)
    metrics = method.train(samples, config, tmp_path / "work", seed=0)
    assert metrics["der_distance_mean"] is not None and metrics["der_distance_mean"] >= 0.0
    assert len(method.der_log) == 1 and method.der_log[0]["calls"] >= 1
    assert not method.backbone.model._forward_pre_hooks and not method.backbone.model._forward_hooks
    before = dict(method.logits)
    method.after_task(1, tasks[1])
    assert set(method.logits) == set(method.buffer)
    assert all(torch.equal(method.logits[key][0], before[key][0]) for key in method.logits.keys() & before.keys())


def test_state_round_trip_restores_buffer_logits_and_adapter(tasks, tmp_path: Path):
    method = der_on_tiny(tasks, variant="der++")
    method.after_task(0, tasks[0])
    with torch.no_grad():  # a trained-looking adapter, so that the adapter part of the state matters
        for name, parameter in method.backbone.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.01)
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    state = json.loads(json.dumps(method.state_json()))
    assert state["der"]["recorded"] == "end_of_task" and len(state["der"]["index"]) == 3

    restored = der_on_tiny(tasks, variant="der++")
    restored.load_state_json(state)
    restored.restore_tensors(load_file(str(tmp_path / "state.safetensors")))
    assert restored.buffer == method.buffer and list(restored.logits) == list(method.logits)
    for key, (values, ids) in method.logits.items():
        assert torch.equal(restored.logits[key][0], values) and torch.equal(restored.logits[key][1], ids)
    batch, outputs = stage_two_batch(method, tasks)
    batch_r, outputs_r = stage_two_batch(restored, tasks)
    assert torch.equal(outputs.logits, outputs_r.logits)
    assert torch.equal(
        method.extra_loss(method.backbone.model, batch, outputs),
        restored.extra_loss(restored.backbone.model, batch_r, outputs_r),
    )

    # a state that does not fit is refused
    flat = load_file(str(tmp_path / "state.safetensors"))
    bad_index = json.loads(json.dumps(state))
    bad_index["der"]["index"][0][2] += 1
    other = der_on_tiny(tasks, variant="der++")
    other.load_state_json(bad_index)
    with pytest.raises(RunDirError):
        other.restore_tensors(flat)
    with pytest.raises(RunDirError):
        der_on_tiny(tasks, variant="der++", logit_top_k=8).load_state_json(state)
    no_logits = {key: value for key, value in flat.items() if not key.startswith("der_logits")}
    other = der_on_tiny(tasks, variant="der++")
    other.load_state_json(state)
    with pytest.raises(RunDirError):
        other.restore_tensors(no_logits)
