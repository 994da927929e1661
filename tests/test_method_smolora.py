"""SMoLoRA: the two gates and the fused output on hand-made tensors (padding left out of the visual
gate's mean, sum and adaptive fusion, gradients to the gates), the module swap on the tiny model,
per-sample instruction features during training, gates frozen after the first task, the state round
trip, and batched generation equal to one-by-one generation whatever task is named."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import eval_logits, set_up_on_tiny
import mmcl.methods.smolora  # noqa: F401  (registers "smolora")
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS, LoraSettings
from mmcl.methods.smolora import (
    INSTRUCTION_KEY,
    RoutingContext,
    SMoLora,
    SMoLoraConfig,
    SMoLoraLinear,
    hard_top1,
    smolora_layers,
)
from mmcl.training.sft import TrainingConfig


# -- the layer on hand-made tensors ----------------------------------------------------------------
def hand_layer(fusion: str = "sum", gate_gradient: str = "none") -> tuple[SMoLoraLinear, RoutingContext]:
    """in 4, out 3; rank 4 over 2 + 2 experts (rank 1 each); alpha 8 -> s = 2; instruction width 2."""
    base = nn.Linear(4, 3)
    context = RoutingContext()
    layer = SMoLoraLinear(base, context, rank=4, alpha=8.0, visual_experts=2, instruction_experts=2,
                          instruction_width=2, fusion=fusion, gate_gradient=gate_gradient)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]))
        base.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
        layer.visual_A.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]))  # A_v0 reads x0, A_v1 reads x1
        layer.visual_B.copy_(torch.tensor([[1.0, 0], [0, 1], [0, 0]]))  # B_v0 = e0, B_v1 = e1
        layer.instruction_A.copy_(torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 1]]))  # A_i0 reads x2, A_i1 reads x3
        layer.instruction_B.copy_(torch.tensor([[0.0, 1], [0, 1], [1, 1]]))  # B_i0 = e2, B_i1 = (1, 1, 1)
        layer.visual_gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]))  # mean x0 vs mean x1
        layer.instruction_gate.weight.copy_(torch.eye(2))  # e0 vs e1
        if fusion == "adaptive":
            layer.visual_score.weight.copy_(torch.tensor([[1.0, 0, 0]]))
            layer.instruction_score.weight.copy_(torch.tensor([[0.0, 0, 1]]))
    return layer, context


# sample 0: token mean (2, 1, 1, 2) -> visual expert 0; instruction (0, 5) -> instruction expert 1
# sample 1: token mean (0, 3, .5, .5) -> visual expert 1; instruction (1, -1) -> instruction expert 0
X = torch.tensor([[[3.0, 1, 2, 0], [1, 1, 0, 4]], [[0.0, 2, 1, 1], [0, 4, 0, 0]]])
INSTRUCTIONS = torch.tensor([[0.0, 5.0], [1.0, -1.0]])
BASE = torch.tensor([[[3.5, 0, -1], [1.5, 0, 3]], [[0.5, 0, 0], [0.5, 0, -1]]])  # W x + b
# s B_v A_v x and s B_i A_i x of the chosen experts, token by token (s = 2)
V = torch.tensor([[[6.0, 0, 0], [2, 0, 0]], [[0.0, 4, 0], [0, 8, 0]]])
U = torch.tensor([[[0.0, 0, 0], [8, 8, 8]], [[0.0, 0, 2], [0, 0, 0]]])


def test_each_gate_picks_the_expected_expert_per_sample():
    layer, context = hand_layer()
    context.instruction = INSTRUCTIONS
    visual, instruction = layer.routes(X)
    assert torch.equal(visual, torch.tensor([[1.0, 0], [0, 1]]))
    assert torch.equal(instruction, torch.tensor([[0.0, 1], [1, 0]]))
    visual_logits, instruction_logits = layer.gate_logits(X)
    torch.testing.assert_close(visual_logits, torch.tensor([[2.0, 1.0], [0.0, 3.0]]))  # gate of the token mean
    torch.testing.assert_close(instruction_logits, INSTRUCTIONS)


def test_output_is_base_plus_chosen_visual_plus_chosen_instruction_expert():
    layer, context = hand_layer(fusion="sum")
    context.instruction = INSTRUCTIONS
    v, u = layer.branches(X)
    torch.testing.assert_close(v, V)
    torch.testing.assert_close(u, U)
    expected = torch.tensor([[[9.5, 0, -1], [11.5, 8, 11]], [[0.5, 4, 2], [0.5, 8, -1]]])
    torch.testing.assert_close(expected, BASE + V + U)
    torch.testing.assert_close(layer(X), expected)
    # one sample at a time gives the same rows: the routes are per sample
    for b in range(2):
        context.instruction = INSTRUCTIONS[b : b + 1]
        torch.testing.assert_close(layer(X[b : b + 1]), expected[b : b + 1])


def test_adaptive_fusion_is_a_per_token_softmax_over_two_scores():
    layer, context = hand_layer(fusion="adaptive")
    context.instruction = INSTRUCTIONS
    expected = torch.empty(2, 2, 3)
    for b in range(2):
        for t in range(2):
            score_v, score_u = V[b, t, 0].item(), U[b, t, 2].item()  # w_v = e0, w_u = e2
            a_v = math.exp(score_v) / (math.exp(score_v) + math.exp(score_u))
            expected[b, t] = BASE[b, t] + a_v * V[b, t] + (1 - a_v) * U[b, t]
    torch.testing.assert_close(layer(X), expected)


def test_padding_is_left_out_of_the_visual_gate_mean():
    layer, context = hand_layer()
    # left padding: a pad token that would flip each sample's visual route if it were averaged in
    pads = torch.tensor([[[0.0, 100, 0, 0]], [[100.0, 0, 0, 0]]])
    padded = torch.cat([pads, X], dim=1)
    context.instruction = INSTRUCTIONS
    context.token_mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    visual, _ = layer.routes(padded)
    assert torch.equal(visual, torch.tensor([[1.0, 0], [0, 1]]))
    torch.testing.assert_close(layer(padded)[:, 1:], BASE + V + U)
    # a decoding step: the mask covers the whole sequence so far, the input is its last positions
    context.token_mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(layer(X), BASE + V + U)
    context.token_mask = None  # without a mask every token counts: the pads now decide
    visual, _ = layer.routes(padded)
    assert torch.equal(visual, torch.tensor([[0.0, 1], [1, 0]]))


def test_gate_gradient_none_as_released_or_straight_through():
    logits = torch.tensor([[0.3, 2.0, -1.0]], requires_grad=True)
    one_hot = torch.tensor([[0.0, 1.0, 0.0]])
    assert torch.equal(hard_top1(logits, False), one_hot) and not hard_top1(logits, False).requires_grad
    straight = hard_top1(logits, True)
    assert torch.equal(straight, one_hot)  # the value is exactly the one-hot
    (straight * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    p = torch.softmax(logits.detach(), -1)
    g = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(logits.grad[0], p[0] * (g - (p[0] * g).sum()))  # softmax's Jacobian

    outputs = {}
    for mode in ("none", "straight-through"):
        layer, context = hand_layer(fusion="adaptive", gate_gradient=mode)
        context.instruction = INSTRUCTIONS
        outputs[mode] = layer(X)
        outputs[mode].square().sum().backward()
        gates = [layer.visual_gate.weight.grad, layer.instruction_gate.weight.grad]
        if mode == "none":  # released code: the one-hot is built from constants, no gradient reaches the gates
            assert all(g is None for g in gates)
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in gates)
        assert layer.visual_B.grad.abs().sum() > 0 and layer.visual_score.weight.grad.abs().sum() > 0
        assert layer.base.weight.grad is None
    assert torch.equal(outputs["none"], outputs["straight-through"])


def test_layer_equals_base_at_init_and_refuses_a_forward_without_instructions():
    torch.manual_seed(0)
    context = RoutingContext()
    layer = SMoLoraLinear(nn.Linear(6, 5), context, rank=4, alpha=8.0, visual_experts=2, instruction_experts=2,
                          instruction_width=3)
    x = torch.randn(2, 4, 6)
    with pytest.raises(ConfigError, match="without per-sample instruction features"):
        layer(x)
    context.instruction = torch.randn(2, 3)
    assert torch.equal(layer(x), layer.base(x))  # B = 0
    assert 0 < layer.visual_A.std().item() < 0.05  # released init: N(0, 0.01)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert names == ["visual_A", "visual_B", "instruction_A", "instruction_B", "visual_gate.weight",
                     "instruction_gate.weight", "visual_score.weight", "instruction_score.weight"]
    context.instruction = torch.randn(3, 3)
    with pytest.raises(RuntimeError, match="batch of 2 rows"):
        layer(x)


def test_options_are_checked():
    assert METHODS["smolora"] is SMoLora
    default = SMoLoraConfig()
    assert (default.visual_experts, default.instruction_experts, default.fusion, default.gate_gradient) == (
        4, 4, "adaptive", "none")
    with pytest.raises(ConfigError, match="lora.rank: 12 is not divisible by the 8 experts"):
        SMoLora(SMoLoraConfig(), LoraSettings(rank=12), seed=0)
    with pytest.raises(ConfigError, match="method.options.fusion"):
        SMoLoraConfig(fusion="concat")
    with pytest.raises(ConfigError, match="method.options.gate_gradient"):
        SMoLoraConfig(gate_gradient="gumbel")
    with pytest.raises(ConfigError, match="visual_experts"):
        SMoLoraConfig(visual_experts=0)
    dora = types.SimpleNamespace(rank=8, alpha=16.0, dropout=0.0, targets=None, use_dora=True)
    with pytest.raises(ConfigError, match="lora.use_dora: method smolora"):
        SMoLora(SMoLoraConfig(), dora, seed=0)


# -- on the tiny model -----------------------------------------------------------------------------
def new_method(model_dir: Path, tasks, **options) -> SMoLora:
    config = SMoLoraConfig(visual_experts=2, instruction_experts=2, **options)
    return set_up_on_tiny(SMoLora(config, LoraSettings(rank=4, alpha=8.0), seed=0), model_dir, tasks)


def logits(method: SMoLora, tasks) -> torch.Tensor:
    samples = tasks[0].test_samples[:2]
    with method.instructions(samples):
        return eval_logits(method.backbone, samples)


def randomize(method: SMoLora, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in method._parameters().items():
            scale = 0.3 if name.endswith("_B") else 3.0 if name.endswith("_gate.weight") else 1.0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def test_wraps_the_language_model_after_the_first_task_is_known(tiny_model_dir: Path, tasks):
    from mmcl.backbones.registry import load_backbone

    method = SMoLora(SMoLoraConfig(visual_experts=2, instruction_experts=2), LoraSettings(rank=4, alpha=8.0), 0)
    method.setup(load_backbone(str(tiny_model_dir), device="cpu"))
    method.see_tasks([], len(tasks))
    assert not smolora_layers(method.backbone.model)  # the base-model row is the plain backbone
    plain = eval_logits(method.backbone, tasks[0].test_samples[:2])
    method.see_tasks(tasks[:1], len(tasks))
    model = method.backbone.model
    layers = smolora_layers(model)
    assert any(name.endswith("self_attn.q_proj") for name in layers)
    assert not any("multi_modal_projector" in name or "vision_tower" in name for name in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(method._parameters()) and method.trainable_parameters() > 0
    first = next(iter(layers.values()))
    assert first.visual_A.shape == (2, first.in_features) and first.instruction_B.shape == (first.out_features, 2)
    assert first.instruction_gate.weight.shape == (2, method.instruction_width)
    torch.testing.assert_close(logits(method, tasks), plain, rtol=0, atol=0)  # B = 0: the base model


def test_training_feeds_per_sample_instructions_and_freezes_the_gates_after_task_one(
    tiny_model_dir: Path, tasks, tmp_path: Path
):
    method = new_method(tiny_model_dir, tasks[:1], gate_gradient="straight-through")
    model = method.backbone.model
    samples = tasks[0].train_samples[:4]
    features = method.text_features(method.backbone, samples)
    seen = []
    spy = model.register_forward_hook(lambda module, args, output: seen.append(method.context.instruction.clone()))
    config = TrainingConfig(max_steps=2, batch_size=2, learning_rate=5e-2, warmup_ratio=0.0, progress_bar=False,
                            logging_steps=1000)

    def snapshot(gate: bool) -> dict[str, torch.Tensor]:
        # the SMoLoRA gates end in "_gate.weight" (the model's own mlp.gate_proj layers are not gates)
        return {n: p.detach().clone() for n, p in method._parameters().items() if n.endswith("_gate.weight") == gate}

    def gates() -> dict[str, torch.Tensor]:
        return snapshot(True)

    def others() -> dict[str, torch.Tensor]:
        return snapshot(False)

    initial_gates = gates()
    method.before_task(0, tasks[0])
    method.train(samples, config, tmp_path / "t0", seed=0)
    spy.remove()
    # every training forward saw one instruction row per sample of its batch, each the feature of a training sample
    # (2 steps of 2 = one epoch over the 4 samples: each sample's own feature exactly once)
    assert len(seen) == 2 and all(rows.shape == (2, features.shape[1]) for rows in seen)
    assert sorted(map(tuple, torch.cat(seen).tolist())) == sorted(map(tuple, features.tolist()))
    assert method.context.instruction is None  # cleared after training
    after_one = gates()
    assert any(not torch.equal(initial_gates[n], after_one[n]) for n in after_one)  # straight-through: trained
    count_with_gates = method.trainable_parameters()

    method.see_tasks(tasks[:2], len(tasks))
    before_two = others()
    method.before_task(1, tasks[1])
    method.train(tasks[1].train_samples[:4], config, tmp_path / "t1", seed=1)
    after_two = gates()
    assert all(torch.equal(after_one[n], after_two[n]) for n in after_two)  # frozen: bit-identical
    assert any(not torch.equal(before_two[n], p) for n, p in others().items())  # the experts still learn
    gate_count = sum(t.numel() for t in after_two.values())
    assert method.trainable_parameters() == count_with_gates - gate_count


def test_training_batch_carries_the_instruction_key(tiny_model_dir: Path, tasks):
    from mmcl.methods.encoding_view import EncodingView, with_feature

    method = new_method(tiny_model_dir, tasks[:1])
    view = EncodingView(method.backbone, with_feature(INSTRUCTION_KEY, method.backbone, method.text_features))
    samples = tasks[0].train_samples[:3]
    batch = view.collate([view.encode_for_training(s) for s in samples])
    torch.testing.assert_close(batch[INSTRUCTION_KEY], method.text_features(method.backbone, samples))
    randomize(method)
    out = method.backbone.model(**batch)  # the pre-hook takes the key out of the batch
    assert torch.isfinite(out.loss) and torch.equal(method.context.instruction, batch[INSTRUCTION_KEY])
    method.context.clear()
    batch.pop(INSTRUCTION_KEY)
    with method.instructions(samples):
        torch.testing.assert_close(method.backbone.model(**batch).loss, out.loss, rtol=0, atol=0)


def test_state_round_trip_and_per_sample_generation(tiny_model_dir: Path, tasks, tmp_path: Path):
    method = new_method(tiny_model_dir, tasks[:1])
    randomize(method)
    save_file(method.state_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    saved = load_file(str(tmp_path / "state.safetensors"))
    assert saved.keys() == set(method._parameters())

    fresh = new_method(tiny_model_dir, tasks[:1])  # as on resume: fresh setup and see_tasks, then the state
    before = logits(fresh, tasks)
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.load_state_tensors(saved)
    after = logits(fresh, tasks)
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, logits(method, tasks), rtol=0, atol=0)

    # the samples do not all take the same instruction expert, so the routing is exercised per sample
    # prompts of very different lengths (sci is long): the short ones are left-padded in the batch
    samples = [*tasks[0].test_samples[:2], *tasks[1].test_samples[:2], *tasks[3].test_samples[:2]]
    first = next(iter(smolora_layers(fresh.backbone.model).values()))
    choices = (fresh.text_features(fresh.backbone, samples) @ first.instruction_gate.weight.T).argmax(-1)
    assert len(set(choices.tolist())) > 1
    batched = fresh.generate(samples, tasks[0], 4)
    one_by_one = [fresh.generate([s], tasks[2], 4)[0] for s in samples]
    assert batched == one_by_one
    assert fresh.generate(samples, tasks[1], 4) == batched  # the task named does not matter
    assert batched == method.generate(samples, tasks[0], 4)
    assert fresh.context.instruction is None

    with pytest.raises(RunDirError, match="missing keys"):
        fresh.load_state_tensors({k: v for k, v in list(saved.items())[1:]})
    with pytest.raises(RunDirError, match="saved with"):
        fresh.load_state_json({**method.state_json(), "visual_experts": 3})
