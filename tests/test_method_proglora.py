"""ProgLoRA: the router weights by hand, the key-matching loss, two tasks on the tiny model (old block and key
frozen bit for bit, the new block mixed in training), per-sample generation that ignores the task, and the
state round trip (including stage 2 retrained from the saved stage-1 state)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import set_up_on_tiny
from safetensors.torch import load_file, save_file

import mmcl.methods.proglora  # noqa: F401  (registers "proglora")
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS, LoraSettings
from mmcl.methods.disco import task_layers
from mmcl.methods.proglora import (
    ProgLora,
    ProgLoraConfig,
    key_matching_loss,
    router_weights,
)
from mmcl.methods.sample_features import TextFeatures


# -- the router on hand-made tensors ------------------------------------------------------------------
def test_router_weights_by_hand():
    keys = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    queries = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    weights = router_weights(queries, keys, temperature=math.sqrt(2.0))
    # scores / sqrt(2): (2, 0, 1) -> softmax(sqrt2, 0, 1/sqrt2); (1, 1, 1) -> uniform; zeros -> uniform
    e = [math.exp(math.sqrt(2.0)), 1.0, math.exp(1 / math.sqrt(2.0))]
    expected = torch.tensor([[v / sum(e) for v in e], [1 / 3] * 3, [1 / 3] * 3])
    torch.testing.assert_close(weights, expected)
    # one row alone gets the same weights, to the bit
    assert torch.equal(router_weights(queries[:1], keys, math.sqrt(2.0)), weights[:1])
    assert router_weights(queries, keys[:0], 1.0).shape == (3, 0)


def test_key_matching_loss_by_hand():
    key = torch.tensor([1.0, 0.0], requires_grad=True)
    queries = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # cos 1 and 0 -> mean(0, 1) = 0.5
    loss = key_matching_loss(queries, key)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert key.grad is not None and key.grad[1] < 0  # pulled towards the second query


def test_config_checks():
    assert METHODS["proglora"] is ProgLora and ProgLora.supports_dora is False
    assert ProgLoraConfig().key_loss_weight == 0.0 and ProgLoraConfig().temperature is None
    with pytest.raises(ConfigError, match="temperature"):
        ProgLoraConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="a_init"):
        ProgLoraConfig(a_init="xavier")
    dora = SimpleNamespace(rank=8, alpha=16.0, dropout=0.0, targets=None, use_dora=True)
    with pytest.raises(ConfigError, match="use_dora"):
        ProgLora(ProgLoraConfig(), dora, seed=0)


# -- on the tiny model -------------------------------------------------------------------------------
def new_method(model_dir: Path, tasks, **options) -> ProgLora:
    return set_up_on_tiny(ProgLora(ProgLoraConfig(**options), LoraSettings(rank=4, alpha=8.0), seed=0), model_dir, tasks)


def fit(method: ProgLora, index: int, tasks, work: Path) -> list[str]:
    """Stage ``index`` as the runner runs it; returns the names of the parameters that trained."""
    from mmcl.training.sft import TrainingConfig

    settings = TrainingConfig(max_steps=2, batch_size=4, learning_rate=3e-2, warmup_ratio=0.0, progress_bar=False)
    method.before_task(index, tasks[index])
    samples = method.train_data(index, tasks[index], tasks[index].train_samples)
    trainable = [n for n, p in method.backbone.model.named_parameters() if p.requires_grad]
    method.train(samples, settings, work / f"stage{index}", seed=index)
    method.after_task(index, tasks[index])
    return trainable


def snapshot(method: ProgLora) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.saved_tensors().items()}


def logits(method: ProgLora, samples, weights: torch.Tensor) -> torch.Tensor:
    backbone = method.backbone
    batch = backbone.collate([backbone.encode_for_training(s) for s in samples])
    batch.pop("labels")
    backbone.model.eval()
    with torch.no_grad(), method.mixing(weights):
        return backbone.model(**batch).logits


@pytest.fixture(scope="module")
def two_tasks(tiny_model_dir: Path, tasks, tmp_path_factory):
    work = tmp_path_factory.mktemp("proglora")
    method = new_method(tiny_model_dir, tasks, key_loss_weight=0.5)
    fit(method, 0, tasks, work)
    record = {"stage0": snapshot(method), "json0": json.loads(json.dumps(method.state_json()))}
    resumed = new_method(tiny_model_dir, tasks, key_loss_weight=0.5)  # as the runner resumes stage 2
    resumed.load_state_json(record["json0"])
    resumed.restore_tensors(record["stage0"])
    fit(resumed, 1, tasks, work / "resumed")
    record["trainable_1"] = fit(method, 1, tasks, work)  # stage 2 in memory
    return method, resumed, record


def test_only_the_new_block_and_key_train(two_tasks):
    _, _, record = two_tasks
    trainable = record["trainable_1"]
    assert trainable and all(n.endswith(("lora_A.1", "lora_B.1", "proglora_router.keys.1")) for n in trainable)
    assert any(n.endswith("proglora_router.keys.1") for n in trainable)


def test_old_block_and_key_bit_identical_after_next_task(two_tasks):
    method, _, record = two_tasks
    after = method.saved_tensors()
    for key, value in record["stage0"].items():
        if key == "keys":
            assert torch.equal(after["keys"][0], value[0])
        else:
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["keys"][1], after["keys"][0])
    assert any(v.abs().sum() > 0 for k, v in after.items() if k.startswith("lora::1::") and k.endswith("lora_B"))
    layers = task_layers(method.backbone.model)
    assert layers and all(".language_model." in name and layer.tasks == 2 for name, layer in layers.items())
    assert not any(p.requires_grad for p in method.backbone.model.parameters())


def test_router_weights_on_the_model_by_formula(two_tasks, tasks):
    method, _, _ = two_tasks
    samples = tasks[0].test_samples[:2] + tasks[1].test_samples[:2]
    queries = TextFeatures()(method.backbone, samples)
    keys = method.router.stacked().detach()
    expected = torch.softmax(queries @ keys.T / math.sqrt(keys.shape[1]), dim=-1)
    torch.testing.assert_close(method.mixing_weights(samples), expected, rtol=1e-5, atol=1e-6)


def test_generate_is_per_sample_and_ignores_task(two_tasks, tasks):
    method, _, _ = two_tasks
    samples = tasks[0].test_samples[:3] + tasks[1].test_samples[:3]
    batched = method.generate(samples, tasks[0], 6)
    assert batched == [method.generate([s], tasks[0], 6)[0] for s in samples]
    assert method.generate(samples, tasks[2], 6) == batched
    weights = method.mixing_weights(samples)
    assert torch.equal(torch.cat([method.mixing_weights([s]) for s in samples]), weights)
    mixed = logits(method, samples, weights)
    assert not torch.allclose(mixed, logits(method, samples, torch.tensor([[1.0, 0.0]] * 6)), atol=1e-6)


def test_stage_two_from_saved_state_equals_in_memory(two_tasks, tasks):
    method, resumed, _ = two_tasks
    ours, theirs = method.saved_tensors(), resumed.saved_tensors()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    samples = tasks[1].test_samples[:3]
    assert method.generate(samples, tasks[1], 6) == resumed.generate(samples, tasks[1], 6)


def test_state_round_trip(two_tasks, tiny_model_dir: Path, tasks, tmp_path: Path):
    method, _, _ = two_tasks
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    saved = load_file(str(tmp_path / "state.safetensors"))
    fresh = new_method(tiny_model_dir, tasks)
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(saved)
    samples = tasks[0].test_samples[:2] + tasks[1].test_samples[:2]
    weights = method.mixing_weights(samples)
    assert torch.equal(fresh.mixing_weights(samples), weights)
    assert torch.equal(logits(fresh, samples, weights), logits(method, samples, weights))
    assert fresh.generate(samples, tasks[1], 6) == method.generate(samples, tasks[1], 6)

    other = new_method(tiny_model_dir, tasks)
    other.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    with pytest.raises(RunDirError, match="keys"):
        other.restore_tensors({**saved, "keys": saved["keys"][:1]})
    with pytest.raises(RunDirError, match="block 0"):
        other.restore_tensors({k: v for k, v in saved.items() if not k.endswith("q_proj.lora_B")})
    with pytest.raises(RunDirError, match="rank"):
        other.load_state_json({**method.state_json(), "rank": 16})
