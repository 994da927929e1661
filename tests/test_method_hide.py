"""HiDe-LLaVA (``hide``): the top-layer mixing weights and layer outputs on hand-made tensors, the lower-layer
fusion variants, training with the current expert only, anchors, the state round trip, per-sample routing
(batched == one by one, the task identity unused) and one CLI run."""

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
import mmcl.methods.hide  # noqa: F401  (registers "hide")
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS, LoraSettings
from mmcl.methods.hide import HiDe, HiDeConfig, HiDeLinear, hide_layers, mixing_weights
from mmcl.methods.sample_features import TextFeatures, image_features


# -- the mechanism on hand-made tensors -----------------------------------------------------------
def test_mixing_weights_are_softmax_of_mean_cosines_over_temperature():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    image_anchors = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    text_anchors = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    weights = mixing_weights(image, text, image_anchors, text_anchors, temperature=0.1)
    r = 1 / math.sqrt(2)
    # sample 0: image cos (1, r), text cos (1, 0) -> sim (1, r/2); sample 1: image (0, r), text (0, 1) -> (0, (r+1)/2)
    for row, sim in enumerate([(1.0, r / 2), (0.0, (r + 1) / 2)]):
        e0, e1 = math.exp(sim[0] / 0.1), math.exp(sim[1] / 0.1)
        expected = torch.tensor([e0 / (e0 + e1), e1 / (e0 + e1)])
        torch.testing.assert_close(weights[row], expected)
    assert weights[0, 0] > 0.99 and weights[1, 1] > 0.999
    # a sample without an image (zero feature) is decided by its text alone: cosine 0 for every image anchor
    alone = mixing_weights(torch.zeros(1, 2), text[:1], image_anchors, text_anchors, temperature=0.1)
    torch.testing.assert_close(alone[0], torch.softmax(torch.tensor([0.5, 0.0]) / 0.1, dim=0))


def hand_layer(fuse: str = "factors", coefficient: str = "one", top: bool = False) -> HiDeLinear:
    """in 2, out 2, rank 1, scaling 0.5, zero base; A_0 = [1, 0], A_1 = [0, 1], B_0 = [1, 0]^T, B_1 = [0, 2]^T."""
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.zero_()
        base.bias.copy_(torch.tensor([10.0, 20.0]))
    layer = HiDeLinear(base, rank=1, scaling=0.5, fuse=fuse, coefficient=coefficient, top=top)
    for _ in range(2):
        layer.add_expert(torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_A[0].copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_A[1].copy_(torch.tensor([[0.0, 1.0]]))
        layer.lora_B[0].copy_(torch.tensor([[1.0], [0.0]]))
        layer.lora_B[1].copy_(torch.tensor([[0.0], [2.0]]))
    return layer


X = torch.tensor([[3.0, 4.0]])


@pytest.mark.parametrize("fuse,coefficient,update", [
    ("updates", "one", [1.5, 4.0]),  # 0.5 (B_0 A_0 x + B_1 A_1 x) = 0.5 ([3, 0] + [0, 8])
    ("updates", "mean", [0.75, 2.0]),  # the same / 2
    ("factors", "one", [3.5, 7.0]),  # 0.5 (B_0 + B_1)(A_0 + A_1) x = 0.5 [1, 2] * 7
    ("factors", "mean", [0.875, 1.75]),  # 0.5 [0.5, 1] * 3.5
])
def test_lower_layer_fuses_the_experts(fuse: str, coefficient: str, update: list[float]):
    layer = hand_layer(fuse, coefficient)
    expected = torch.tensor([[10.0, 20.0]]) + torch.tensor([update])
    torch.testing.assert_close(layer(X), expected)
    if fuse == "updates" and coefficient == "one":  # = base + the sum of the experts' own LoRA outputs
        experts = sum(0.5 * X @ layer.lora_A[i].T @ layer.lora_B[i].T for i in range(2))
        torch.testing.assert_close(layer(X), layer.base(X) + experts)


def test_top_layer_mixes_expert_outputs_per_sample_over_tokens():
    layer = hand_layer(top=True)
    x = torch.tensor([[[3.0, 4.0], [1.0, 1.0]], [[3.0, 4.0], [0.0, 2.0]]])  # (batch 2, tokens 2, in 2)
    layer.mix = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    out = layer(x)
    # sample 0, token 0: 0.25 * 0.5 * [3, 0] + 0.75 * 0.5 * [0, 8] = [0.375, 3.0]
    torch.testing.assert_close(out[0, 0], torch.tensor([10.375, 23.0]))
    # sample 1 takes expert 0 alone: token 1 = 0.5 * [0, 0] -> bias only; token 0 = 0.5 * [3, 0]
    torch.testing.assert_close(out[1], torch.tensor([[11.5, 20.0], [10.0, 20.0]]))
    # each row of the batch equals that sample alone with its own weights
    for b in range(2):
        single = hand_layer(top=True)
        single.mix = layer.mix[b : b + 1]
        torch.testing.assert_close(single(x[b : b + 1]), out[b : b + 1])
    layer.mix = None
    with pytest.raises(RuntimeError, match="mixing weights are not set"):
        layer(x)
    layer.mix = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="batch of 2"):
        layer(x)


def test_training_uses_the_current_expert_alone():
    for top in (False, True):
        layer = hand_layer(top=top)
        layer.train_expert = 1
        torch.testing.assert_close(layer(X), torch.tensor([[10.0, 24.0]]))  # + 0.5 B_1 A_1 x = [0, 4]
        layer.bypass = True
        torch.testing.assert_close(layer(X), torch.tensor([[10.0, 20.0]]))
    fresh = HiDeLinear(nn.Linear(4, 3), rank=2, scaling=1.0)
    assert fresh.add_expert() == 0 and torch.equal(fresh.lora_B[0], torch.zeros(3, 2))
    x = torch.randn(5, 4)
    torch.testing.assert_close(fresh(x), fresh.base(x), rtol=0, atol=0)  # B = 0: the base layer
    fresh.truncate(0)
    assert fresh.experts == 0 and not fresh.base.weight.requires_grad


def test_options_and_dora_are_checked():
    assert METHODS["hide"] is HiDe
    config = HiDeConfig()
    assert (config.top_layers, config.temperature, config.fuse, config.fusion_coefficient) == (1, 0.1, "factors", "one")
    for bad in ({"fuse": "mean"}, {"fusion_coefficient": "half"}, {"top_layers": -1}, {"temperature": 0.0},
                {"expert_rank": 0}):
        with pytest.raises(ConfigError, match="method.options"):
            HiDeConfig(**bad)
    dora = types.SimpleNamespace(rank=8, alpha=16.0, dropout=0.0, targets=None, use_dora=True)
    with pytest.raises(ConfigError, match="lora.use_dora: method hide"):
        HiDe(HiDeConfig(), dora, seed=0)


# -- on the tiny model ---------------------------------------------------------------------------
def new_method(model_dir: Path, tasks, **options) -> HiDe:
    return set_up_on_tiny(HiDe(HiDeConfig(**options), LoraSettings(rank=4, alpha=8.0), seed=0), model_dir, tasks)


def learn(method: HiDe, tasks, count: int, scale: float = 0.5) -> None:
    """The hooks of ``count`` tasks without the optimiser: each new expert's B is set at random instead."""
    generator = torch.Generator().manual_seed(5)
    for index, task in enumerate(tasks[:count]):
        method.before_task(index, task)
        method.train_data(index, task, task.train_samples)
        with torch.no_grad():
            for layer in hide_layers(method.backbone.model).values():
                layer.lora_B[index].copy_(torch.randn(layer.lora_B[index].shape, generator=generator) * scale)
        method.after_task(index, task)


def test_setup_marks_the_top_decoder_layer(tiny_model_dir: Path, tasks):
    method = new_method(tiny_model_dir, tasks)
    layers = hide_layers(method.backbone.model)
    top = {name for name, layer in layers.items() if layer.top}
    last = max(int(name.split(".layers.")[1].split(".")[0]) for name in layers if ".layers." in name)
    assert top and top == {name for name in layers if f".layers.{last}." in name}
    assert any("multi_modal_projector" in name and not layers[name].top for name in layers)
    assert not any(p.requires_grad for p in method.backbone.model.parameters())
    method.before_task(0, tasks[0])
    trainable = {n for n, p in method.backbone.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{k}.0" for name in layers for k in "AB"}
    assert method.trainable_parameters() == sum(p.numel() for n, p in method.backbone.model.named_parameters()
                                                if n in trainable)
    with pytest.raises(ConfigError, match="top_layers: 99 exceeds"):
        new_method(tiny_model_dir, tasks, top_layers=99)


def test_second_task_trains_a_new_expert_with_the_old_one_out_of_the_path(tiny_model_dir: Path, tasks):
    method = new_method(tiny_model_dir, tasks)
    plain = new_method(tiny_model_dir, tasks)
    learn(method, tasks, 1)
    method.before_task(1, tasks[1])  # B_1 = 0 and expert 0 is not used: the model is the base model
    samples = tasks[0].test_samples[:2]
    torch.testing.assert_close(eval_logits(method.backbone, samples), eval_logits(plain.backbone, samples))
    trainable = {n for n, p in method.backbone.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A.1", ".lora_B.1")) for n in trainable)


def test_anchors_are_the_mean_features_of_each_task(tiny_model_dir: Path, tasks):
    method = new_method(tiny_model_dir, tasks)
    learn(method, tasks, 2)
    assert method.trained == [tasks[0].name, tasks[1].name]
    backbone = method.backbone
    with method._bypassed():
        for index in range(2):
            samples = tasks[index].train_samples
            assert all(s.images for s in samples)
            torch.testing.assert_close(method.image_anchors[index], image_features(backbone, samples).mean(0))
            torch.testing.assert_close(method.text_anchors[index], TextFeatures()(backbone, samples).mean(0))
    # the weights of a sample come from its own features against these anchors
    samples = tasks[1].test_samples[:3]
    image, text = method.features(samples)
    expected = mixing_weights(image, text, method.image_anchors, method.text_anchors, 0.1)
    torch.testing.assert_close(method.weights_for(samples), expected)
    torch.testing.assert_close(expected.sum(-1), torch.ones(3))


def test_state_round_trip_and_per_sample_generate(tiny_model_dir: Path, tasks, tmp_path: Path):
    method = new_method(tiny_model_dir, tasks)
    learn(method, tasks, 3)
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    saved = load_file(str(tmp_path / "state.safetensors"))
    assert any(k.startswith("experts::2::") and k.endswith("::B") for k in saved)
    assert saved["anchors::image"].shape[0] == 3 and saved["anchors::text"].shape[0] == 3

    fresh = new_method(tiny_model_dir, tasks)  # as on resume: fresh setup, see_tasks, then the state
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(saved)
    samples = [tasks[t].test_samples[i] for t in range(4) for i in range(2)]
    with method.mixing(samples) as weights, fresh.mixing(samples) as fresh_weights:
        torch.testing.assert_close(fresh_weights, weights, rtol=0, atol=0)
        reference = eval_logits(method.backbone, samples)
        torch.testing.assert_close(eval_logits(fresh.backbone, samples), reference, rtol=0, atol=0)
    batched = fresh.generate(samples, tasks[0], 4)
    assert batched == method.generate(samples, tasks[0], 4)
    # per sample: one by one gives the same answers, and the task passed in changes nothing
    assert [fresh.generate([s], tasks[0], 4)[0] for s in samples] == batched
    assert fresh.generate(samples, tasks[3], 4) == batched
    for index, sample in enumerate(samples):
        torch.testing.assert_close(fresh.weights_for([sample])[0], weights[index], rtol=0, atol=1e-6)
    # the mixing matters: the top layer with uniform weights gives other logits
    with fresh.mixing(samples):
        for layer in hide_layers(fresh.backbone.model).values():
            if layer.top:
                layer.mix = torch.full((len(samples), 3), 1 / 3)
        assert not torch.allclose(eval_logits(fresh.backbone, samples), reference, atol=1e-4)

    with pytest.raises(RunDirError, match="expected experts 0..2"):
        fresh.restore_tensors({k: v for k, v in saved.items() if not k.startswith("experts::2::")})
    with pytest.raises(RunDirError, match="anchors must be"):
        fresh.restore_tensors({**saved, "anchors::text": saved["anchors::text"][:2]})
    with pytest.raises(RunDirError, match="no trained task"):
        new_method(tiny_model_dir, tasks).restore_tensors(saved)
    with pytest.raises(RunDirError, match="saved with"):
        new_method(tiny_model_dir, tasks, expert_rank=2).load_state_json(method.state_json())


def test_cli_run(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path):
    from conftest import make_stream_config, write_config
    from mmcl.cli import main

    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "run", method={"name": "hide"})
    config["stream"]["options"] = {"train_per_task": 4, "test_per_task": 2}
    config["lora"] = {"rank": 4, "alpha": 8.0}
    config["training"] = {
        "max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "progress_bar": False
    }
    config["evaluation"] = {"batch_size": 8, "forward_transfer": False, "evaluate_base": False, "max_new_tokens": 4}
    path = write_config(tmp_path / "hide.yaml", config)
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "hide" and results["complete"]
    stages = sorted((run / "stages").iterdir())
    last = load_file(str(stages[-1] / "state.safetensors"))
    assert last["anchors::image"].shape[0] == len(stages)
    assert json.loads((stages[-1] / "state.json").read_text())["tasks"] == [t["name"] for t in results["tasks"]]
    first = load_file(str(stages[0] / "state.safetensors"))
    # expert 0 is frozen after its task
    assert all(torch.equal(first[k], last[k]) for k in first if k.startswith("experts::"))
    assert any(v.abs().sum() > 0 for k, v in last.items() if k.startswith(f"experts::{len(stages) - 1}::")
               and k.endswith("::B"))
