"""CLiMB's frozen bottom-K: k from the share (9 of 12) or given, the decoder layers found generically, a stage that
leaves the vision encoder, projector, embeddings and bottom k layers bit-identical while every layer above k
changes, the LoRA variant with adapters above k only, the state round trip of both variants, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import eval_logits
import mmcl.methods.freeze  # noqa: F401  (registers "freeze")
from mmcl.backbones.parts import part_parameter_names
from mmcl.config import LoraSettings, TrainingConfig
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS
from mmcl.methods.freeze import (
    FreezeBottomLayers,
    FreezeConfig,
    decoder_layers,
    language_model_module,
    resolve_frozen_layers,
)

BACKBONE = "tiny-llava"  # the shipped tiny model: 4 decoder layers (Llama), CLIP tower, tied embeddings
TRAINING = TrainingConfig(max_steps=3, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, progress_bar=False)


# -- k and the layer list ----------------------------------------------------------------------------
@pytest.mark.parametrize("n, k", [(12, 9), (4, 3), (28, 21), (32, 24), (2, 1), (1, 0)])
def test_default_k_is_three_quarters_of_the_layers_and_leaves_one_to_train(n, k):
    assert resolve_frozen_layers(n, None, 0.75) == k


def test_explicit_k_must_leave_a_layer_to_train():
    assert resolve_frozen_layers(4, 0, 0.75) == 0 and resolve_frozen_layers(4, 3, 0.75) == 3
    with pytest.raises(ConfigError):
        resolve_frozen_layers(4, 4, 0.75)
    assert resolve_frozen_layers(4, None, 1.0) == 3  # share 1 is capped at N - 1


def test_decoder_layers_are_the_layers_attribute_or_the_first_module_list():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2)])

    class NoLayersAttribute(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 2)
            self.empty = nn.ModuleList()
            self.blocks = nn.ModuleList([Block(), Block(), Block()])

    model = NoLayersAttribute()
    assert decoder_layers(model) is model.blocks  # the empty list is skipped, the nested ones come later
    model.layers = nn.ModuleList([Block()])
    assert decoder_layers(model) is model.layers


# -- on the tiny model -------------------------------------------------------------------------------
def freeze_on_tiny(tasks, settings: LoraSettings | None = None, **options) -> FreezeBottomLayers:
    from mmcl.backbones.registry import load_backbone

    method = FreezeBottomLayers(FreezeConfig(**options), settings or LoraSettings(), seed=0)
    method.setup(load_backbone(BACKBONE, device="cpu"))
    method.see_tasks(tasks[:1], len(tasks))
    return method


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def layer_prefix(method: FreezeBottomLayers) -> str:
    model = method.backbone.model
    layers = decoder_layers(language_model_module(model))
    return next(name for name, module in model.named_modules() if module is layers) + "."


def test_a_stage_changes_the_layers_above_k_only(tasks, tmp_path: Path):
    method = freeze_on_tiny(tasks, frozen_layers=2)
    model = method.backbone.model
    assert (method.n_layers, method.k) == (4, 2)
    parts = part_parameter_names(model)
    prefix = layer_prefix(method)
    below = [n for n in parts["language_model"] if n.startswith((f"{prefix}0.", f"{prefix}1."))]
    above = [n for n in parts["language_model"] if n.startswith((f"{prefix}2.", f"{prefix}3."))]
    assert below and above and parts["vision_encoder"] and parts["projector"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(above) <= trainable
    assert not trainable & set(below + parts["vision_encoder"] + parts["projector"])
    assert not model.get_input_embeddings().weight.requires_grad  # tied: the head is frozen with it
    assert method.trainable_parameters() == sum(p.numel() for p in model.parameters() if p.requires_grad)

    before = snapshot(model)
    method.train(tasks[0].train_samples, TRAINING, tmp_path / "work", seed=0)
    after = snapshot(model)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    for name in below + parts["vision_encoder"] + parts["projector"]:
        assert name in unchanged, name
    assert torch.equal(before["model.language_model.embed_tokens.weight"], after["model.language_model.embed_tokens.weight"])
    for name in above:
        assert name in changed, name
    assert set(changed) <= trainable


def test_projector_and_embeddings_train_when_asked(tasks):
    method = freeze_on_tiny(tasks, freeze_embeddings=False, freeze_projector=False)
    model = method.backbone.model
    parts = part_parameter_names(model)
    assert method.k == 3
    assert all(p.requires_grad for n, p in model.named_parameters() if n in parts["projector"])
    assert model.get_input_embeddings().weight.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in parts["vision_encoder"])


def test_lora_variant_has_adapters_above_k_only_and_leaves_the_base_untouched(tasks, tmp_path: Path):
    method = freeze_on_tiny(tasks, frozen_layers=2, lora=True)
    model = method.backbone.model
    adapters = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    layer_of = {n: int(n.split(".layers.")[1].split(".")[0]) for n in adapters if ".layers." in n}
    assert set(layer_of) == set(adapters), "every adapter lies in a decoder layer"
    assert set(layer_of.values()) == {2, 3}
    assert not any("multi_modal_projector" in n or "vision_tower" in n for n in adapters)
    before = snapshot(model)
    method.train(tasks[0].train_samples, TRAINING, tmp_path / "work", seed=0)
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert any(not torch.equal(before[n], after[n]) for n in adapters if "lora_B" in n)
    assert method.trainable_parameters() == sum(after[n].numel() for n in adapters)


@pytest.mark.parametrize("lora", [False, True])
def test_state_round_trip(tasks, tmp_path: Path, lora: bool):
    method = freeze_on_tiny(tasks, frozen_layers=1, lora=lora)
    method.train(tasks[0].train_samples, TrainingConfig(max_steps=1, batch_size=4, learning_rate=1e-2,
                                                        warmup_ratio=0.0, progress_bar=False), tmp_path / "w", seed=0)
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    state = json.loads(json.dumps(method.state_json()))
    assert state == {"layers": 4, "frozen_layers": 1, "lora": lora, "freeze_embeddings": True, "freeze_projector": True}
    saved = load_file(str(tmp_path / "state.safetensors"))
    if not lora:
        prefix = layer_prefix(method)
        assert not any(key.startswith(f"{prefix}0.") or "vision_tower" in key for key in saved)

    restored = freeze_on_tiny(tasks, frozen_layers=1, lora=lora)
    restored.load_state_json(state)
    restored.restore_tensors(saved)
    samples = tasks[0].test_samples[:2]
    assert torch.equal(eval_logits(method.backbone, samples), eval_logits(restored.backbone, samples))
    assert all(torch.equal(a, b) for a, b in zip(method.backbone.model.parameters(), restored.backbone.model.parameters()))

    with pytest.raises(RunDirError):
        freeze_on_tiny(tasks, frozen_layers=2, lora=lora).load_state_json(state)
    other = freeze_on_tiny(tasks, frozen_layers=1, lora=lora)
    with pytest.raises(RunDirError):
        other.restore_tensors({key: value for key, value in list(saved.items())[1:]})


def test_bad_options_are_refused(tasks):
    with pytest.raises(ConfigError):
        freeze_on_tiny(tasks, frozen_layers=4)
    with pytest.raises(ConfigError):
        FreezeBottomLayers(FreezeConfig(), LoraSettings(use_dora=True), seed=0)
    FreezeBottomLayers(FreezeConfig(lora=True), LoraSettings(use_dora=True), seed=0)  # PEFT's DoRA above k: fine
    with pytest.raises(ConfigError):  # LoRA targets that reach no layer above k
        freeze_on_tiny(tasks, LoraSettings(targets=r".*vision_tower.*"), lora=True)
    assert METHODS["freeze"] is FreezeBottomLayers
