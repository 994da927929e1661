"""DISCO: the per-sample LoRA mixing layer and the activation weights by hand, training task after task on
the tiny model (one LoRA active and trainable per task, prototypes), per-sample generation, the state round
trip, and the federated averaging with a stand-in for local training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import set_up_on_tiny
from safetensors.torch import load_file, save_file
from torch import nn

import mmcl.methods.disco  # noqa: F401  (registers "disco")
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS, LoraSettings
from mmcl.methods.disco import (
    Activation,
    Disco,
    DiscoConfig,
    TaskLoraLinear,
    activation_weights,
    client_shards,
    task_layers,
)
from mmcl.methods.sample_features import TextFeatures


# -- the layer on hand-made tensors ----------------------------------------------------------------
def hand_layer() -> tuple[TaskLoraLinear, Activation]:
    """W = [1 1], b = 0; LoRA 0: A = [1 0], B = [2]; LoRA 1: A = [0 1], B = [3]; alpha 2, rank 1 (s = 2)."""
    activation = Activation()
    base = nn.Linear(2, 1)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 1.0]]))
        base.bias.zero_()
    layer = TaskLoraLinear(base, rank=1, alpha=2.0, activation=activation)
    layer.add_task()
    layer.add_task()
    with torch.no_grad():
        layer.lora_A[0].copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B[0].copy_(torch.tensor([[2.0]]))
        layer.lora_A[1].copy_(torch.tensor([[0.0, 1.0]]))
        layer.lora_B[1].copy_(torch.tensor([[3.0]]))
    return layer, activation


def test_layer_by_hand():
    layer, activation = hand_layer()
    x = torch.tensor([[1.0, 2.0]])  # W x = 3, LoRA 0: 2 * 2 * 1 = 4, LoRA 1: 2 * 3 * 2 = 12
    activation.task = 0
    assert layer(x).item() == 7.0
    activation.task = 1
    assert layer(x).item() == 15.0
    activation.task = None
    activation.weights = torch.tensor([[1.0, 0.0]])
    assert layer(x).item() == 7.0
    activation.weights = torch.tensor([[0.25, 0.75]])  # 3 + 0.25 * 4 + 0.75 * 12
    assert layer(x).item() == 13.0
    # per sample: each row of the batch takes its own weights
    activation.weights = torch.tensor([[0.25, 0.75], [0.0, 1.0], [1.0, 0.0]])
    out = layer(torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]))
    assert out.flatten().tolist() == [13.0, 15.0, 7.0]


def random_layer(tasks: int = 3, seed: int = 0) -> tuple[TaskLoraLinear, Activation]:
    torch.manual_seed(seed)
    activation = Activation()
    layer = TaskLoraLinear(nn.Linear(6, 5).double(), rank=2, alpha=3.0, activation=activation)
    for _ in range(tasks):
        layer.add_task()
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    return layer, activation


def lora_output(layer: TaskLoraLinear, k: int, x: torch.Tensor) -> torch.Tensor:
    return (layer.lora_A[k].detach() @ x.unsqueeze(-1)).squeeze(-1) @ layer.lora_B[k].detach().T * layer.scaling


def test_one_hot_activation_is_exactly_one_lora():
    """Weights one-hot on task k: the layer output is base + LoRA_k, for each sample its own k."""
    layer, activation = random_layer()
    x = torch.randn(3, 4, 6, dtype=torch.float64)  # 3 samples, 4 tokens
    choice = [1, 0, 2]
    activation.weights = nn.functional.one_hot(torch.tensor(choice), 3).double()
    mixed = layer(x)
    for b, k in enumerate(choice):
        expected = layer.base(x[b]) + lora_output(layer, k, x[b])
        torch.testing.assert_close(mixed[b], expected, rtol=0, atol=1e-12)
        activation.weights, activation.task = None, k  # the training path: LoRA k alone
        torch.testing.assert_close(layer(x[b : b + 1])[0], expected, rtol=0, atol=1e-12)
        activation.task, activation.weights = None, nn.functional.one_hot(torch.tensor(choice), 3).double()
    assert not torch.allclose(mixed[0], layer.base(x[0]))


def test_mixture_is_weighted_sum_of_lora_outputs():
    layer, activation = random_layer(tasks=4, seed=1)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    weights = torch.softmax(torch.randn(2, 4, dtype=torch.float64), dim=-1)
    activation.weights = weights
    for b in range(2):
        expected = layer.base(x[b]) + sum(weights[b, k] * lora_output(layer, k, x[b]) for k in range(4))
        torch.testing.assert_close(layer(x)[b], expected, rtol=0, atol=1e-12)


def test_layer_without_activation_is_base_and_refuses_misshaped_weights():
    layer, activation = random_layer()
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)  # nothing activated: the base layer
    activation.weights = torch.ones(3, 3, dtype=torch.float64) / 3
    with pytest.raises(RuntimeError, match="mixing weights of shape"):
        layer(x)
    activation.weights = torch.zeros(2, 0)
    empty, empty_activation = random_layer(tasks=0)
    empty_activation.weights = torch.zeros(2, 0)
    torch.testing.assert_close(empty(x), empty.base(x))  # no LoRA learned: the base layer


def test_new_lora_starts_at_zero_and_frozen():
    layer, _ = random_layer(tasks=0)
    layer.add_task("kaiming", torch.Generator().manual_seed(0))
    layer.add_task("normal", torch.Generator().manual_seed(0))
    assert torch.equal(layer.lora_B[0], torch.zeros(5, 2)) and layer.lora_A[0].abs().sum() > 0
    assert layer.lora_A[1].std().item() < 0.05  # N(0, 0.01^2), MCITlib's init
    assert not any(p.requires_grad for p in layer.parameters())
    layer.keep_tasks(1)
    assert layer.tasks == 1


# -- activation weights -----------------------------------------------------------------------------
def test_activation_weights_by_hand():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    features = torch.tensor([[3.0, 4.0], [1.0, 1.0], [5.0, 0.0], [0.0, 0.0]])
    weights = activation_weights(features, prototypes, temperature=0.05)
    # cos = (0.6, 0.8) -> softmax(12, 16); (1/sqrt2, 1/sqrt2) -> uniform; (1, 0) -> softmax(20, 0); zero -> uniform
    e4, e20 = math.exp(4.0), math.exp(20.0)
    expected = torch.tensor([[1 / (1 + e4), e4 / (1 + e4)], [0.5, 0.5], [e20 / (1 + e20), 1 / (1 + e20)], [0.5, 0.5]])
    torch.testing.assert_close(weights, expected)
    softer = activation_weights(features[:1], prototypes, temperature=1.0)  # softmax(0.6, 0.8)
    torch.testing.assert_close(softer, torch.softmax(torch.tensor([[0.6, 0.8]]), dim=-1))
    assert activation_weights(features, prototypes[:0], 0.05).shape == (4, 0)


def test_config_checks():
    assert DiscoConfig().temperature == 0.05 and METHODS["disco"] is Disco
    with pytest.raises(ConfigError, match="temperature"):
        DiscoConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="a_init"):
        DiscoConfig(a_init="xavier")
    with pytest.raises(ConfigError, match="client_fraction"):
        DiscoConfig(client_fraction=0.0)
    dora = SimpleNamespace(rank=8, alpha=16.0, dropout=0.0, targets=None, use_dora=True)
    with pytest.raises(ConfigError, match="use_dora"):
        Disco(DiscoConfig(), dora, seed=0)
    assert Disco.supports_dora is False


# -- on the tiny model ---------------------------------------------------------------------------
def new_method(model_dir: Path, tasks, **options) -> Disco:
    return set_up_on_tiny(Disco(DiscoConfig(**options), LoraSettings(rank=4, alpha=8.0), seed=0), model_dir, tasks)


def fit(method: Disco, index: int, tasks, work: Path) -> None:
    """Stage ``index`` as the runner runs it."""
    from mmcl.training.sft import TrainingConfig

    settings = TrainingConfig(max_steps=3, batch_size=4, learning_rate=3e-2, warmup_ratio=0.0, progress_bar=False)
    method.before_task(index, tasks[index])
    samples = method.train_data(index, tasks[index], tasks[index].train_samples)
    method.train(samples, settings, work / f"stage{index}", seed=index)
    method.after_task(index, tasks[index])


def logits(method: Disco, samples, weights: torch.Tensor) -> torch.Tensor:
    backbone = method.backbone
    batch = backbone.collate([backbone.encode_for_training(s) for s in samples])
    batch.pop("labels")
    backbone.model.eval()
    with torch.no_grad(), method.mixing(weights):
        return backbone.model(**batch).logits


def lora_weights(method: Disco, slot: int) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in method._slot_tensors(slot).items()}


@pytest.fixture(scope="module")
def two_tasks(tiny_model_dir: Path, tasks, tmp_path_factory):
    work = tmp_path_factory.mktemp("disco")
    method = new_method(tiny_model_dir, tasks)
    record = {}
    fit(method, 0, tasks, work)
    record["lora0"] = lora_weights(method, 0)
    method.before_task(1, tasks[1])
    record["trainable_1"] = [n for n, p in method.backbone.model.named_parameters() if p.requires_grad]
    samples = method.train_data(1, tasks[1], tasks[1].train_samples)
    from mmcl.training.sft import TrainingConfig

    settings = TrainingConfig(max_steps=3, batch_size=4, learning_rate=3e-2, warmup_ratio=0.0, progress_bar=False)
    method.train(samples, settings, work / "stage1", seed=1)
    # the model as task 1's training sees it (activation.task = 1), on two test prompts
    batch = method.backbone.collate([method.backbone.encode_for_training(s) for s in tasks[1].test_samples[:2]])
    batch.pop("labels")
    method.backbone.model.eval()
    with torch.no_grad():
        record["training_logits"] = method.backbone.model(**batch).logits
    method.after_task(1, tasks[1])
    return method, record


def test_layers_sit_in_the_language_model_only(two_tasks):
    method, _ = two_tasks
    layers = task_layers(method.backbone.model)
    assert layers and all(".language_model." in name for name in layers)
    assert not any("projector" in name or "vision" in name for name in layers)
    assert {name.rsplit(".", 1)[-1] for name in layers} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert all(layer.tasks == 2 for layer in layers.values())
    assert not any(p.requires_grad for p in method.backbone.model.parameters())  # all frozen between tasks
    one = sum(p.numel() for layer in layers.values() for p in (layer.lora_A[0], layer.lora_B[0]))
    assert method.trainable_parameters() == one


def test_training_task_t_uses_and_trains_lora_t_only(two_tasks, tasks):
    method, record = two_tasks
    assert record["trainable_1"] and all(n.endswith(("lora_A.1", "lora_B.1")) for n in record["trainable_1"])
    after = lora_weights(method, 0)
    assert all(torch.equal(after[k], v) for k, v in record["lora0"].items())  # task 1 left LoRA 0 alone
    assert any(v.abs().sum() > 0 for k, v in after.items() if k.endswith("lora_B"))  # LoRA 0 did train
    # while task 1 trains the model is base + LoRA 1: weights one-hot on LoRA 1, not anything with LoRA 0
    samples = tasks[1].test_samples[:2]
    on_one = logits(method, samples, torch.tensor([[0.0, 1.0]] * 2))
    torch.testing.assert_close(record["training_logits"], on_one, rtol=1e-5, atol=1e-5)
    for weights in ([1.0, 0.0], [0.5, 0.5]):
        other = logits(method, samples, torch.tensor([weights] * 2))
        assert not torch.allclose(record["training_logits"], other, atol=1e-4)


def test_prototypes_are_mean_training_features(two_tasks, tasks):
    method, _ = two_tasks
    assert method.trained == [tasks[0].name, tasks[1].name]
    features = TextFeatures()
    expected = torch.stack([features(method.backbone, tasks[i].train_samples).mean(0) for i in range(2)])
    torch.testing.assert_close(method.prototypes, expected)
    samples = tasks[0].test_samples[:3] + tasks[1].test_samples[:3]
    expected_weights = activation_weights(features(method.backbone, samples), expected, 0.05)
    torch.testing.assert_close(method.mixing_weights(samples), expected_weights)
    torch.testing.assert_close(method.mixing_weights(samples).sum(1), torch.ones(6))


def test_generate_is_per_sample_and_ignores_task(two_tasks, tasks):
    method, _ = two_tasks
    samples = tasks[0].test_samples[:3] + tasks[1].test_samples[:3]
    batched = method.generate(samples, tasks[0], 6)
    assert batched == [method.generate([s], tasks[0], 6)[0] for s in samples]
    assert method.generate(samples, tasks[2], 6) == batched
    weights = method.mixing_weights(samples)
    assert torch.equal(torch.cat([method.mixing_weights([s]) for s in samples]), weights)
    # the mixture changes the answers' logits: not the base model, not one fixed LoRA for everyone
    mixed = logits(method, samples, weights)
    assert not torch.allclose(mixed, logits(method, samples, torch.tensor([[1.0, 0.0]] * 6)), atol=1e-5)
    assert method.evaluation_summary()["routing"]  # routing statistics were counted
    assert method.report_sections()[0]["kind"] == "table"


def test_state_round_trip(two_tasks, tiny_model_dir: Path, tasks, tmp_path: Path):
    method, _ = two_tasks
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    saved = load_file(str(tmp_path / "state.safetensors"))
    assert saved["prototypes"].shape[0] == 2
    assert {k.split("::")[1] for k in saved if k.startswith("lora::")} == {"0", "1"}

    fresh = new_method(tiny_model_dir, tasks)  # as on resume: setup, see_tasks, then the state
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(saved)
    samples = tasks[0].test_samples[:2] + tasks[1].test_samples[:2]
    weights = method.mixing_weights(samples)
    torch.testing.assert_close(fresh.mixing_weights(samples), weights, rtol=0, atol=0)
    torch.testing.assert_close(logits(fresh, samples, weights), logits(method, samples, weights), rtol=0, atol=0)
    assert fresh.generate(samples, tasks[1], 6) == method.generate(samples, tasks[1], 6)

    # the next stage adds LoRA 2, the only trainable one
    fresh.before_task(2, tasks[2])
    trainable = [n for n, p in fresh.backbone.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A.2", "lora_B.2")) for n in trainable)

    broken = {k: v for k, v in saved.items() if not k.endswith("q_proj.lora_B")}
    other = new_method(tiny_model_dir, tasks)
    other.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    with pytest.raises(RunDirError, match="missing keys"):
        other.restore_tensors(broken)
    with pytest.raises(RunDirError, match="prototypes"):
        other.restore_tensors({**saved, "prototypes": saved["prototypes"][:1]})
    with pytest.raises(RunDirError, match="rank"):
        other.load_state_json({**method.state_json(), "rank": 16})


# -- federated form ----------------------------------------------------------------------------------
def test_client_shards_cover_the_data_once():
    shards = client_shards(10, 3, seed=0)
    assert sorted(len(s) for s in shards) == [3, 3, 4]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert shards == client_shards(10, 3, seed=0) and shards != client_shards(10, 3, seed=1)


def test_federated_rounds_average_client_loras_by_shard_size(monkeypatch, tmp_path: Path):
    """Local training replaced by "add the shard size to every LoRA weight": 5 samples on 2 clients
    (shards of 3 and 2), both clients every round. Round 1 from 0: clients hold 3 and 2, the server
    (3*3 + 2*2)/5 = 2.6; round 2 from 2.6: 5.6 and 4.6, server (3*5.6 + 2*4.6)/5 = 5.2."""
    from mmcl.training import sft

    method = Disco(DiscoConfig(clients=2, rounds=2, client_fraction=1.0), LoraSettings(rank=2, alpha=2.0), seed=0)
    model = nn.Sequential(TaskLoraLinear(nn.Linear(3, 3), 2, 2.0, method.activation))
    method.backbone = SimpleNamespace(model=model)
    layer = model[0]
    layer.add_task()
    with torch.no_grad():
        layer.lora_A[0].zero_()
    method.activation.task = 0
    starts = []

    def local_training(backbone, shard, config, work_dir, seed, extra_loss=None, log_dir=None):
        starts.append(float(layer.lora_B[0][0, 0]))
        with torch.no_grad():
            for p in (layer.lora_A[0], layer.lora_B[0]):
                p.add_(len(shard))
        return {"train_loss": float(len(shard))}

    monkeypatch.setattr(sft, "train_on_samples", local_training)
    metrics = method.train(list(range(5)), None, tmp_path, seed=0)
    assert starts == [0.0, 0.0, pytest.approx(2.6), pytest.approx(2.6)]  # every client starts from the server's
    torch.testing.assert_close(layer.lora_B[0], torch.full((3, 2), 5.2))
    torch.testing.assert_close(layer.lora_A[0], torch.full((2, 3), 5.2))
    assert metrics["local_trainings"] == 4 and metrics["train_loss"] == 2.5
