"""The per-sample features of ``mmcl.methods.sample_features`` (HiDe, DISCO, CL-MoE, SMoLoRA, ModalPrompt route
by them): each is a plain mean over the backbone's own tensors, independent of the batch around a sample."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mmcl.errors import ConfigError
from mmcl.methods.sample_features import TextFeatures, cosine_to, image_features, instruction_text


@pytest.fixture(scope="module")
def backbone(tiny_model_dir: Path, tasks):
    from mmcl.backbones.registry import load_backbone

    return load_backbone(str(tiny_model_dir), device="cpu")


def test_image_feature_is_the_mean_vision_hidden_state_of_each_sample_alone(backbone, tasks) -> None:
    samples = [tasks[0].test_samples[0], tasks[1].test_samples[0], tasks[2].test_samples[1]]
    together = image_features(backbone, samples)
    assert together.shape == (3, backbone.model.config.vision_config.hidden_size)
    for row, sample in enumerate(samples):
        assert torch.equal(image_features(backbone, [sample])[0], together[row])
    pixels = backbone.prompt_batch([samples[1]])["pixel_values"]
    hidden = backbone.model.model.vision_tower(pixels).last_hidden_state
    torch.testing.assert_close(together[1], hidden.reshape(-1, hidden.shape[-1]).mean(dim=0))
    without_image = dataclasses.replace(samples[0], images=(), prompt="Is there a river?")
    assert torch.equal(image_features(backbone, [without_image])[0], torch.zeros(together.shape[1]))


def test_text_feature_is_the_mean_input_embedding_of_the_instruction(backbone, tasks) -> None:
    sample = tasks[0].test_samples[0]
    assert "<image>" not in instruction_text(sample) and instruction_text(sample)
    ids = backbone.tokenizer(instruction_text(sample), add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = backbone.model.get_input_embeddings()(ids)[0].mean(dim=0)
    torch.testing.assert_close(TextFeatures()(backbone, [sample])[0], expected)


def test_a_local_text_encoder_gives_its_mean_last_hidden_state(backbone, tasks, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    encoder = LlamaModel(LlamaConfig(vocab_size=len(backbone.tokenizer), hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    encoder.save_pretrained(tmp_path / "encoder")
    backbone.tokenizer.save_pretrained(tmp_path / "encoder")
    sample = tasks[1].test_samples[0]
    ids = backbone.tokenizer(instruction_text(sample), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = encoder.eval()(input_ids=ids).last_hidden_state[0].mean(dim=0)
    torch.testing.assert_close(TextFeatures(str(tmp_path / "encoder"))(backbone, [sample])[0], expected)


def test_a_missing_encoder_folder_is_refused_when_the_method_is_built(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^method\.options\.text_encoder: .* is not a directory"):
        TextFeatures(str(tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"^method\.options\.text_encoder: cannot load"):
        TextFeatures(str(empty))._load_encoder(torch.device("cpu"))


def test_cosine_to_prototypes() -> None:
    features = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    prototypes = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    torch.testing.assert_close(cosine_to(features, prototypes), torch.tensor([[1.0, 0.0], [0.5**0.5, 0.5**0.5]]))
