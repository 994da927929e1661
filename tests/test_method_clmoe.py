"""CL-MoE: the task-level gate, the dual-router mix and the momentum merge on hand-made tensors; on the tiny
model the merge after task 2, per-sample routing (batched = one by one, the task argument unused) and the
state round trip."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import eval_logits, set_up_on_tiny
import mmcl.methods.clmoe  # noqa: F401  (registers "clmoe")
from mmcl.errors import ConfigError, DataError, RunDirError
from mmcl.methods.base import METHODS, LoraSettings
from mmcl.methods.clmoe import (
    ClMoe,
    ClMoeConfig,
    DualRouterLinear,
    dual_router_layers,
    merge_coefficients,
    momentum_merge,
    nearest_task,
    prototype,
    selected_experts,
    task_gate,
)
from mmcl.methods.moelora import MoeLoraLinear


# -- the mechanism on hand-made tensors -------------------------------------------------------------
def test_task_gate_keeps_the_top_k_usage_renormalised():
    usage = torch.tensor([0.1, 0.4, 0.2, 0.3])
    assert selected_experts(usage, 2) == [1, 3]
    torch.testing.assert_close(task_gate(usage, 2), torch.tensor([0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7]))
    torch.testing.assert_close(task_gate(usage, 1), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(task_gate(usage, 4), usage / usage.sum())
    assert selected_experts(torch.tensor([0.25, 0.25, 0.25, 0.25]), 2) == [0, 1]  # ties: lower index


def test_dual_router_layer_mixes_instance_and_task_gates_by_hand():
    torch.manual_seed(0)
    layer = MoeLoraLinear(nn.Linear(3, 2, bias=False), rank=2, alpha=2.0, experts=2)  # scaling 1, rank 1 each
    layer.__class__ = DualRouterLinear
    with torch.no_grad():
        layer.base.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))  # expert 0 reads x0, expert 1 reads x2
        layer.lora_B.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # expert 0 writes y0, expert 1 writes 2 * y1
        layer.gate.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))  # G^I = (1/2, 1/2)
    x = torch.tensor([[[2.0, 3.0, 5.0]]])
    # instance router alone: y = W x + 1/2 * (2, 0) + 1/2 * (0, 2 * 5) = (2 + 1, 3 + 5)
    torch.testing.assert_close(layer(x), torch.tensor([[[3.0, 8.0]]]))
    # beta = 0.25, G^T = (1, 0): weights 0.25 * 0.5 + 0.75 * 1 = 0.875 and 0.25 * 0.5 = 0.125
    layer.task, layer.beta = torch.tensor([1.0, 0.0]), 0.25
    torch.testing.assert_close(layer(x), torch.tensor([[[2.0 + 0.875 * 2.0, 3.0 + 0.125 * 10.0]]]))
    # the usage recorder sees the instance gate only (not the mix)
    layer.usage_sum, layer.usage_tokens = torch.zeros(2, dtype=torch.float64), 0
    layer(torch.zeros(1, 3, 3))
    assert layer.usage_tokens == 3
    torch.testing.assert_close(layer.usage_sum, torch.tensor([1.5, 1.5], dtype=torch.float64))


def test_merge_coefficients_follow_the_old_and_new_sets():
    # S_old = {0, 1}, S_new = {1, 2}: only expert 0 is the old task's own expert
    coefficients = merge_coefficients(4, [0, 1], [1, 2], 0.7)
    torch.testing.assert_close(coefficients, torch.tensor([0.7, 0.3, 0.3, 0.3], dtype=torch.float64))
    coefficients = merge_coefficients(4, [0, 1], [1, 2], 0.7, sets="old")
    torch.testing.assert_close(coefficients, torch.tensor([0.7, 0.7, 0.3, 0.3], dtype=torch.float64))
    # params.py's released configuration: 4 experts, every one in both sets -> 0.3 on the new weights everywhere
    torch.testing.assert_close(merge_coefficients(4, range(4), range(4), 0.7), torch.full((4,), 0.3, dtype=torch.float64))


def test_momentum_merge_by_hand():
    # 4 experts of rank 2 (r = 8): A is (8, 3), B is (5, 8); previous A = 10, current A = 20, previous B = 1, current B = 3
    previous_A, current_A = torch.full((8, 3), 10.0), torch.full((8, 3), 20.0)
    previous_B, current_B = torch.full((5, 8), 1.0), torch.full((5, 8), 3.0)
    coefficients = torch.tensor([0.7, 0.3, 0.3, 0.3], dtype=torch.float64)
    merged_A, merged_B = momentum_merge(previous_A, current_A, previous_B, current_B, coefficients)
    expected_A = torch.tensor([17.0] * 2 + [13.0] * 6)[:, None].expand(8, 3)  # 0.7*20+0.3*10, 0.3*20+0.7*10
    expected_B = torch.tensor([2.4] * 2 + [1.6] * 6)[None, :].expand(5, 8)  # 0.7*3+0.3*1, 0.3*3+0.7*1
    torch.testing.assert_close(merged_A, expected_A)
    torch.testing.assert_close(merged_B, expected_B)
    assert merged_A.dtype == torch.float32
    # a_i = 1 keeps the current weights, a_i = 0 the previous ones, expert by expert
    keep = momentum_merge(previous_A, current_A, previous_B, current_B, torch.tensor([1.0, 0.0, 1.0, 0.0]))[0]
    assert keep[:, 0].tolist() == [20.0, 20.0, 10.0, 10.0, 20.0, 20.0, 10.0, 10.0]


def test_nearest_task_sums_image_and_text_cosines():
    image_prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_prototypes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    image = torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # second sample: no image (zero feature)
    text = torch.tensor([[0.0, 0.0, 2.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    # sample 0: task 0 scores 1 + 0, task 1 scores 0 + 1 -> tie -> task 0; sample 1: text only -> task 1;
    # sample 2: images tie (0.707 each), text picks task 1
    assert nearest_task(image, text, image_prototypes, text_prototypes).tolist() == [0, 1, 1]
    torch.testing.assert_close(prototype(torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 4.0]])), torch.tensor([1 / 3, 1 / 3]))


def test_config_checks_and_dora_refusal():
    assert METHODS["clmoe"] is ClMoe
    config = ClMoeConfig()
    assert (config.experts, config.task_experts, config.beta, config.merge_alpha) == (4, 2, 0.5, 0.7)
    with pytest.raises(ConfigError, match="task_experts"):
        ClMoeConfig(task_experts=5)
    with pytest.raises(ConfigError, match="merge_sets"):
        ClMoeConfig(merge_sets="new")
    with pytest.raises(ConfigError, match="beta"):
        ClMoeConfig(beta=1.5)
    with pytest.raises(ConfigError, match="not divisible"):
        ClMoe(ClMoeConfig(), LoraSettings(rank=6), seed=0)
    dora = SimpleNamespace(rank=8, alpha=16.0, dropout=0.0, targets=None, use_dora=True)
    with pytest.raises(ConfigError, match=r"^lora.use_dora: method clmoe"):
        ClMoe(ClMoeConfig(), dora, seed=0)


# -- on the tiny model --------------------------------------------------------------------------
def new_method(model_dir: Path, tasks, **options) -> ClMoe:
    config = ClMoeConfig(experts=2, task_experts=1, statistics_samples=4, **options)
    return set_up_on_tiny(ClMoe(config, LoraSettings(rank=4, alpha=8.0), seed=0), model_dir, tasks)


def fit(method: ClMoe, index: int, tasks, work: Path) -> None:
    from mmcl.training.sft import TrainingConfig, train_on_samples

    settings = TrainingConfig(max_steps=3, batch_size=4, learning_rate=3e-2, warmup_ratio=0.0, progress_bar=False)
    train_on_samples(method.backbone, tasks[index].train_samples, settings, work / f"trainer{index}", seed=index)


def expert_weights(method: ClMoe) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for name, l in method.layers().items()}


@pytest.fixture(scope="module")
def two_tasks(tiny_model_dir: Path, tasks, tmp_path_factory):
    """A method trained on tasks 0 and 1, with the weights around the merge of task 1 recorded."""
    work = tmp_path_factory.mktemp("clmoe")
    method = new_method(tiny_model_dir, tasks)
    method.before_task(0, tasks[0])
    fit(method, 0, tasks, work)
    before_stats = expert_weights(method)
    method.after_task(0, tasks[0])
    record = {"no_merge_after_first": expert_weights(method), "trained_0": before_stats}
    method.before_task(1, tasks[1])
    record["previous"] = expert_weights(method)
    fit(method, 1, tasks, work)
    record["current"] = expert_weights(method)
    method.after_task(1, tasks[1])
    record["merged"] = expert_weights(method)
    return method, record


def test_setup_trains_only_moe_parameters(tiny_model_dir: Path, tasks):
    method = new_method(tiny_model_dir, tasks)
    model = method.backbone.model
    layers = dual_router_layers(model)
    assert layers and any(name.endswith("self_attn.q_proj") for name in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.{p}" for layer in layers for p in ("lora_A", "lora_B", "gate.weight")}
    assert method.trainable_parameters() == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    # no task learned: the instance router alone, and B = 0 -> the base model's answers
    from mmcl.backbones.registry import load_backbone

    plain = load_backbone(str(tiny_model_dir), device="cpu")
    samples = tasks[0].test_samples[:3]
    assert method.generate(samples, tasks[0], 4) == plain.generate(samples, 4)


def test_statistics_and_the_merge_after_task_two(two_tasks, tasks):
    method, record = two_tasks
    assert method.learned == [tasks[0].name, tasks[1].name]
    n_layers = len(method.layers())
    for usage in method.usage:
        assert usage.shape == (n_layers, 2)
        torch.testing.assert_close(usage.sum(dim=1), torch.ones(n_layers))  # mean softmax weights sum to 1
    # no merge after the first task
    for name, (a, b) in record["no_merge_after_first"].items():
        assert torch.equal(a, record["trained_0"][name][0]) and torch.equal(b, record["trained_0"][name][1])
    # after task 2: every layer's experts follow a_i * current + (1 - a_i) * previous with params.py's sets
    assert set(method.last_merge) == set(method.layers())
    for position, name in enumerate(method.layers()):
        old = selected_experts(method.usage[0][position], 1)
        new = selected_experts(method.usage[1][position], 1)
        expected = [0.7 if (i in old and i not in new) else 0.3 for i in range(2)]
        assert method.last_merge[name] == pytest.approx(expected)
        coefficients = torch.tensor(expected, dtype=torch.float64)
        previous, current, merged = record["previous"][name], record["current"][name], record["merged"][name]
        want_A, want_B = momentum_merge(previous[0], current[0], previous[1], current[1], coefficients)
        torch.testing.assert_close(merged[0], want_A)
        torch.testing.assert_close(merged[1], want_B)
    assert any(not torch.equal(record["merged"][n][0], record["current"][n][0]) for n in method.layers())


def test_generate_routes_per_sample_and_ignores_the_task(two_tasks, tasks):
    method, _ = two_tasks
    mixed = [tasks[0].test_samples[0], tasks[1].test_samples[0], tasks[0].test_samples[1], tasks[1].test_samples[1]]
    choices = method.route(mixed).tolist()
    assert choices == [method.route([s]).item() for s in mixed]  # decided per sample
    answers = method.generate(mixed, tasks[0], 6)
    routes = list(method.last_routes)
    assert routes == [method.learned[c] for c in choices]
    assert method.generate(mixed, tasks[4], 6) == answers and method.last_routes == routes  # task unused
    assert [method.generate([s], tasks[2], 6)[0] for s in mixed] == answers  # batched = one by one
    # each answer is the model's with the chosen task's G^T in every layer, and no gate is left set
    for sample, choice, answer in zip(mixed, choices, answers):
        method.set_task_gates(choice)
        assert method.backbone.generate([sample], 6) == [answer]
    method.set_task_gates(None)
    assert all(layer.task is None for layer in method.layers().values())
    # the task-level router changes the computation
    batch = mixed[:2]
    plain = eval_logits(method.backbone, batch)
    method.set_task_gates(0)
    mixed_logits = eval_logits(method.backbone, batch)
    method.set_task_gates(None)
    assert not torch.allclose(plain, mixed_logits, atol=1e-6)


def test_state_round_trip(two_tasks, tiny_model_dir: Path, tasks, tmp_path: Path):
    method, _ = two_tasks
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    saved = load_file(str(tmp_path / "state.safetensors"))
    assert {k.split("::")[0] for k in saved} == {"moe", "usage", "image_prototype", "text_prototype"}

    fresh = new_method(tiny_model_dir, tasks)  # as on resume: fresh setup, see_tasks, then the state
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(saved)
    assert fresh.learned == method.learned
    for a, b in zip(fresh.usage, method.usage):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    samples = tasks[0].test_samples[:2]
    torch.testing.assert_close(eval_logits(fresh.backbone, samples), eval_logits(method.backbone, samples), rtol=0, atol=0)
    mixed = tasks[0].test_samples[:2] + tasks[1].test_samples[:2]
    assert fresh.generate(mixed, tasks[3], 6) == method.generate(mixed, tasks[3], 6)
    assert fresh.last_routes == method.last_routes

    # a third task after the resume: the previous weights are taken at before_task, so the merge works
    fresh.before_task(2, tasks[2])
    assert fresh.previous is not None and all(layer.task is None for layer in fresh.layers().values())
    with pytest.raises(DataError, match="learned already"):
        fresh.before_task(0, tasks[0])

    state = json.loads((tmp_path / "state.json").read_text())
    with pytest.raises(RunDirError, match="missing keys"):
        fresh.restore_tensors({k: v for k, v in saved.items() if not k.endswith("gate.weight")})
    with pytest.raises(RunDirError, match="usage"):
        fresh.restore_tensors({k: v for k, v in saved.items() if k != "usage::1"})
    with pytest.raises(RunDirError, match="experts=2"):
        fresh.load_state_json({**state, "experts": 4})
