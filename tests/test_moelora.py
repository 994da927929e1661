"""MoE-LoRA: the layer (identity at init, fused forward = naive sum over experts, softmax gate), the
module swap on the tiny model, the state round trip and one end-to-end run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import eval_logits, set_up_on_tiny
import mmcl.methods.moelora  # noqa: F401  (registers "moelora")
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS, LoraSettings
from mmcl.methods.moelora import MoeLora, MoeLoraConfig, MoeLoraLinear, moe_layers, wrap_moe_layers


def make_layer(rank: int = 8, experts: int = 4, alpha: float = 16.0, seed: int = 0) -> MoeLoraLinear:
    torch.manual_seed(seed)
    return MoeLoraLinear(nn.Linear(12, 10), rank=rank, alpha=alpha, experts=experts)


def naive_forward(layer: MoeLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """W x + b + sum_i g_i(x) (alpha/r) B_i A_i x, one expert at a time."""
    gate = torch.softmax(x @ layer.gate.weight.T, dim=-1)
    out = x @ layer.base.weight.T + layer.base.bias
    k = layer.rank // layer.experts
    for i in range(layer.experts):
        a_i = layer.lora_A[i * k : (i + 1) * k]  # (r/E, in)
        b_i = layer.lora_B[:, i * k : (i + 1) * k]  # (out, r/E)
        out = out + gate[..., i : i + 1] * (layer.alpha / layer.rank) * (x @ a_i.T @ b_i.T)
    return out


# -- the layer -----------------------------------------------------------------------------------
def test_layer_equals_base_at_init():
    layer = make_layer()
    x = torch.randn(3, 5, 12)
    assert torch.equal(layer.lora_B, torch.zeros(10, 8))
    assert layer.lora_A.abs().sum() > 0
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B", "gate.weight"]


@pytest.mark.parametrize("rank,experts", [(8, 4), (8, 1), (6, 3), (8, 8)])
def test_fused_forward_equals_naive_sum(rank: int, experts: int):
    layer = make_layer(rank=rank, experts=experts, alpha=12.0, seed=rank + experts)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate.weight.normal_()
    x = torch.randn(2, 7, 12)
    expected = naive_forward(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, layer.base(x), atol=1e-3)  # the experts do contribute
    # gradients flow to every MoE parameter, not to the base
    layer(x).sum().backward()
    for name, parameter in layer.adapter_parameters():
        assert parameter.grad is not None
        # with one expert the softmax gate is constant 1: no gradient reaches it
        assert (parameter.grad.abs().sum() > 0) == (name != "gate.weight" or experts > 1)
    assert layer.base.weight.grad is None


def test_gate_is_a_softmax_over_experts_per_token():
    layer = make_layer(experts=4)
    x = torch.randn(2, 5, 12)
    weights = layer.gate_weights(x)
    assert weights.shape == (2, 5, 4)
    assert (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    torch.testing.assert_close(weights, torch.softmax(x @ layer.gate.weight.T, dim=-1))
    assert layer.gate.bias is None
    assert not torch.allclose(weights[0, 0], weights[0, 1])  # token-level: tokens get their own mixture


def test_layer_follows_base_dtype():
    base = nn.Linear(12, 10).to(torch.bfloat16)
    layer = MoeLoraLinear(base, rank=4, alpha=8.0, experts=2)
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    assert layer(torch.randn(3, 12, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_rank_not_divisible_by_experts_is_a_config_error():
    with pytest.raises(ConfigError, match="lora.rank: 6 is not divisible by method.options.experts 4"):
        MoeLora(MoeLoraConfig(experts=4), LoraSettings(rank=6), seed=0)
    with pytest.raises(ConfigError, match="not divisible"):
        MoeLoraLinear(nn.Linear(4, 4), rank=6, alpha=1.0, experts=4)
    with pytest.raises(ConfigError, match="experts"):
        MoeLoraConfig(experts=0)
    assert MoeLoraConfig().experts == 4 and METHODS["moelora"] is MoeLora


def test_wrap_uses_fullmatch_on_linear_layers_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert wrap_moe_layers(model, r"2\.[01]", rank=2, alpha=2.0, experts=2) == ["2.0", "2.1"]
    assert isinstance(model[0], nn.Linear) and list(moe_layers(model)) == ["2.0", "2.1"]
    with pytest.raises(ConfigError, match="matches no linear layer"):
        wrap_moe_layers(nn.Sequential(nn.Linear(4, 4)), r"0\.", rank=2, alpha=2.0, experts=2)


# -- on the tiny model ---------------------------------------------------------------------------
def new_method(model_dir: Path, tasks, experts: int = 2) -> MoeLora:
    return set_up_on_tiny(MoeLora(MoeLoraConfig(experts=experts), LoraSettings(rank=4, alpha=8.0), seed=0), model_dir, tasks)


def logits(method: MoeLora, tasks) -> torch.Tensor:
    return eval_logits(method.backbone, tasks[0].test_samples[:2])


def test_setup_on_tiny_model_trains_only_moe_parameters(tiny_model_dir: Path, tasks):
    from mmcl.backbones.registry import load_backbone

    plain = load_backbone(str(tiny_model_dir), device="cpu")
    method = new_method(tiny_model_dir, tasks)
    model = method.backbone.model
    layers = moe_layers(model)
    assert layers and all(isinstance(layer.base, nn.Linear) for layer in layers.values())
    assert any(name.endswith("self_attn.q_proj") for name in layers)
    assert any("multi_modal_projector" in name for name in layers)
    assert not any("vision_tower" in name or name.endswith("lm_head") for name in layers)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{layer}.{p}" for layer in layers for p in ("lora_A", "lora_B", "gate.weight")}
    assert trainable == expected
    assert method.trainable_parameters() == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    first = next(iter(layers.values()))
    assert first.lora_A.shape == (4, first.in_features) and first.gate.weight.shape == (2, first.in_features)

    # B = 0: the wrapped model equals the base model
    reference = MoeLora(MoeLoraConfig(experts=2), LoraSettings(rank=4, alpha=8.0), seed=0)
    reference.backbone = plain
    torch.testing.assert_close(logits(method, tasks), logits(reference, tasks))


def test_state_round_trip_and_generate(tiny_model_dir: Path, tasks, tmp_path: Path):
    method = new_method(tiny_model_dir, tasks)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in moe_layers(method.backbone.model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.2)
            layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=generator))
    save_file(method.state_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    saved = load_file(str(tmp_path / "state.safetensors"))
    assert saved.keys() == {n for n, p in method.backbone.model.named_parameters() if p.requires_grad}
    assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "weight") and ".base." not in n for n in saved)

    fresh = new_method(tiny_model_dir, tasks)  # as on resume: fresh setup, then the state
    before = logits(fresh, tasks)
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.load_state_tensors(saved)
    after = logits(fresh, tasks)
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, logits(method, tasks), rtol=0, atol=0)

    samples = tasks[1].test_samples[:3]
    answers = fresh.generate(samples, tasks[1], 4)
    assert len(answers) == 3 and answers == method.generate(samples, tasks[1], 4)

    with pytest.raises(RunDirError, match="missing keys"):
        fresh.load_state_tensors({k: v for k, v in list(saved.items())[1:]})


def test_cli_run_moelora(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path):
    from conftest import make_stream_config, write_config
    from mmcl.cli import main

    method = {"name": "moelora", "options": {"experts": 2}}
    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "run", method=method)
    config["stream"]["options"] = {"train_per_task": 4, "test_per_task": 2}
    config["lora"] = {"rank": 4, "alpha": 8.0}
    config["training"] = {
        "max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "progress_bar": False
    }
    config["evaluation"] = {"batch_size": 8, "forward_transfer": False, "evaluate_base": False, "max_new_tokens": 4}
    path = write_config(tmp_path / "moelora.yaml", config)
    assert main(["run", str(path), "--method", "moelora"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "moelora" and results["complete"]
    stages = sorted((tmp_path / "run" / "stages").iterdir())
    assert len(stages) == 5
    first, last = (load_file(str(stage / "state.safetensors")) for stage in (stages[0], stages[-1]))
    assert first.keys() == last.keys() and any("lora_B" in k for k in first)
    assert any(v.abs().sum() > 0 for k, v in last.items() if k.endswith("lora_B"))  # B left zero: it trained
    assert not all(torch.equal(first[k], last[k]) for k in first)  # one module set, trained on every task
    counts = {json.loads((stage / "stage.json").read_text())["trainable_parameters"] for stage in stages}
    assert len(counts) == 1 and counts.pop() == sum(v.numel() for v in last.values())


def test_bad_rank_through_cli_is_one_line_config_error(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path):
    from conftest import make_stream_config, write_config
    from mmcl.cli import main

    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "run", method={"name": "moelora"})
    config["lora"] = {"rank": 6}
    path = write_config(tmp_path / "bad.yaml", config)
    assert main(["run", str(path)]) == ConfigError.exit_code
    assert not (tmp_path / "run").exists()
