"""The tiny-reader preset of ``mmcl pretrain-tiny``: tiny-llava's recipe is untouched, a very small
tiny-reader pretraining writes a model folder that loads and generates, and the CLI and the registry
know the preset."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from mmcl.backbones import pretrain
from mmcl.backbones.pretrain import PretrainConfig, pretrain_tiny, recipe_for
from mmcl.backbones.registry import (
    PRESETS,
    TINY_LLAVA_DIR,
    TINY_READER_DIR,
    load_backbone,
    resolve_backbone,
)
from mmcl.backbones.tiny import TinyLlavaSpec
from mmcl.data.readers import read_samples
from mmcl.errors import ConfigError, MmclError


def test_tiny_llava_recipe_is_unchanged() -> None:
    recorded = json.loads((TINY_LLAVA_DIR / "pretrain.json").read_text(encoding="utf-8"))
    config, spec = recipe_for("tiny-llava")
    assert config.preset == "tiny-llava"
    recipe = {key: value for key, value in asdict(config).items() if key not in pretrain.READER_ONLY_FIELDS}
    assert recipe == recorded["recipe"] and asdict(spec) == recorded["spec"]
    assert config == PretrainConfig() and spec == TinyLlavaSpec()
    assert recipe_for("tiny-llava", steps=7, seed=2)[0] == PretrainConfig(steps=7, seed=2)


def test_tiny_reader_recipe() -> None:
    config, spec = recipe_for("tiny-reader")
    base = recipe_for("tiny-llava")[1]
    assert (config.preset, config.image_size, config.n_train, config.n_test) == ("tiny-reader", 96, 24000, 600)
    assert (config.text_vision_epochs, config.vision_epochs, config.vision_batch_size, config.char_none_weight,
            config.mc_fraction, config.init_from) == (8.0, 2.0, 64, 0.05, 0.3, "tiny-llava")
    assert (config.choice_steps, config.choice_share, config.choice_match_steps, config.prompt_words) == (0, 0.6, 0, 0)  # stage 3 is off (see the recipe)
    assert asdict(spec) == {**asdict(base), "image_size": 96, "patch_size": 16}  # tiny-llava's widths and grid
    assert recipe_for("tiny-reader", image_size=32)[1].image_size == 32
    with pytest.raises(ConfigError, match="unknown preset"):
        recipe_for("tiny-writer")


def test_character_loss_weights_no_character_down() -> None:
    """The weighted loss is the class-weighted mean: sum(w_y * nll) / sum(w_y), ignored entries left out."""
    import math

    import torch

    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    labels = torch.tensor([[0, 1, -100]])
    weight = torch.tensor([0.05, 1.0, 1.0])
    nll_none = -math.log(math.exp(2) / (math.exp(2) + 2))
    nll_char = -math.log(math.e / (math.e + 2))
    expected = (0.05 * nll_none + 1.0 * nll_char) / 1.05
    assert float(pretrain._loss(logits, labels, weight)) == pytest.approx(expected, rel=1e-6)
    assert float(pretrain._loss(logits, labels)) == pytest.approx((nll_none + nll_char) / 2, rel=1e-6)


def test_small_tiny_reader_pretraining_loads_and_generates(tmp_path: Path) -> None:
    config, _ = recipe_for("tiny-reader", n_train=48, n_test=8, steps=2, batch_size=8, image_size=32,
                           vision_epochs=1.0, vision_batch_size=16, init_from="", choice_steps=2,
                           choice_match_steps=1, prompt_words=5)  # fmt: skip
    out = pretrain_tiny(config, tmp_path / "model", data_dir=tmp_path / "data")
    record = json.loads((out / "pretrain.json").read_text(encoding="utf-8"))
    assert record["recipe"]["preset"] == "tiny-reader" and record["recipe"]["init_from"] == ""
    # up to 5 prompt words that the tokenizer trained on the mix cuts up became tokens; the embedding grew with them
    backbone = load_backbone(str(out), device="cpu")
    mix = pretrain._read_mix([tmp_path / "data" / "shapes", tmp_path / "data" / "reading"], "train")
    scratch = pretrain.train_tokenizer([text for s in mix for turn in s.turns() for text in turn],
                                       recipe_for("tiny-reader")[1].vocab_size)
    assert len(scratch) < len(backbone.tokenizer) == backbone.model.get_input_embeddings().weight.shape[0]
    held_out = set(record["held_out_accuracy"])
    assert "overall" in held_out and {"read", "char", "length"} & held_out
    # stage 3: one step on "Which option is X?" alone, then two on every kind shuffled with the mix
    # (4 kinds x 1 step x 8 + 0.6 x 2 steps x 8 = 42 questions written), scored too
    assert record["choice_metrics"]["match_train_loss"] > 0 and record["choice_metrics"]["train_loss"] > 0
    choice = read_samples(tmp_path / "data" / "choice" / "text-choice" / "train.json", "text-choice")
    assert len(choice) == 42 and all(s.images == () for s in choice)
    assert {"text-match", "text-plus", "text-larger", "text-next"} <= held_out
    # half shapes, half reading; each kind of image carries only its own labels
    train = [s for task, root in (("pretrain", "shapes"), ("reading", "reading"))
             for s in read_samples(tmp_path / "data" / root / task / "train.json", task)]  # fmt: skip
    assert [s.task for s in train].count("reading") == 24 == [s.task for s in train].count("pretrain")
    spec = recipe_for("tiny-reader", image_size=32)[1]
    for sample in train[:30:5] + train[24::5]:
        colors, _, count, chars = pretrain._all_patch_labels(sample, spec)
        reading = sample.task == "reading"
        assert (count == -100) == reading and (set(colors) == {-100}) == reading
        assert (set(chars) == {-100}) != reading
    assert backbone.model.config.image_seq_length == 4  # 32 px in 16-pixel patches
    answers = backbone.generate(train[:1] + train[-1:], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)


def test_small_tiny_llava_record_keeps_its_keys(tmp_path: Path) -> None:
    """tiny-llava's pretrain.json has the keys of the shipped one (no preset, no character accuracy)."""
    recorded = json.loads((TINY_LLAVA_DIR / "pretrain.json").read_text(encoding="utf-8"))
    config = PretrainConfig(n_train=16, n_test=4, steps=1, batch_size=4, image_size=32, vision_batch_size=16,
                            vision_epochs=1.0)  # fmt: skip
    out = pretrain_tiny(config, tmp_path / "model", data_dir=tmp_path / "data")
    record = json.loads((out / "pretrain.json").read_text(encoding="utf-8"))
    assert list(record) == list(recorded) and list(record["recipe"]) == list(recorded["recipe"])
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["manifest.json", "pretrain"]


def test_registry_knows_the_shipped_reader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mmcl.backbones import registry

    assert PRESETS["tiny-reader"].lora_targets == PRESETS["tiny-llava"].lora_targets
    assert registry.SHIPPED_PRESET_DIRS["tiny-reader"] == TINY_READER_DIR
    built = tmp_path / "built"
    built.mkdir()
    (built / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(registry.SHIPPED_PRESET_DIRS, "tiny-reader", built)
    assert resolve_backbone("tiny-reader") == str(built)
    monkeypatch.setitem(registry.SHIPPED_PRESET_DIRS, "tiny-reader", tmp_path / "missing")
    expected = r"weights missing in .*; build them with `mmcl pretrain-tiny --preset tiny-reader`"
    with pytest.raises(MmclError, match=expected):
        load_backbone("tiny-reader", device="cpu")


def test_cli_passes_the_preset(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from mmcl import cli

    seen: list[PretrainConfig] = []
    monkeypatch.setattr(pretrain, "pretrain_tiny", lambda config, out=None: seen.append(config) or Path("/x"))
    assert cli.main(["pretrain-tiny", "--preset", "tiny-reader", "--steps", "3"]) == 0
    assert cli.main(["pretrain-tiny"]) == 0
    assert seen == [recipe_for("tiny-reader", steps=3)[0], PretrainConfig()]
    assert capsys.readouterr().out.splitlines() == ["tiny-reader written to /x", "tiny-llava written to /x"]


def test_warm_start_sees_a_96_pixel_image_as_tiny_llava_sees_its_pooled_48_pixel_copy() -> None:
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    spec = recipe_for("tiny-reader")[1]
    tokenizer, model = pretrain.warm_start("tiny-llava", spec)
    source = LlavaForConditionalGeneration.from_pretrained(TINY_LLAVA_DIR)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(TINY_LLAVA_DIR).get_vocab()
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        seen = model.model.vision_tower(pixel_values=pixels).last_hidden_state
        pooled = source.model.vision_tower(pixel_values=torch.nn.functional.avg_pool2d(pixels, 2)).last_hidden_state
        ids = torch.tensor([[1, 5, 6, 7, 40]])
        text = model.model.language_model(input_ids=ids).last_hidden_state
        source_text = source.model.language_model(input_ids=ids).last_hidden_state
    assert seen.shape == (2, 37, 96) and torch.allclose(seen, pooled, atol=1e-4)
    assert torch.equal(text, source_text)
    with pytest.raises(ConfigError, match="do not match tiny-llava's token grid"):
        pretrain.warm_start("tiny-llava", recipe_for("tiny-reader", image_size=64)[1])


def test_prompt_words_become_single_tokens_and_start_as_the_mean_of_their_pieces(tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from mmcl.backbones.tiny import build_processor
    from mmcl.data.sample import Sample
    from mmcl.synthetic.draw import multiple_choice

    spec = recipe_for("tiny-reader")[1]
    tokenizer, model = pretrain.warm_start("tiny-llava", spec)
    before = model.get_input_embeddings().weight.detach().clone()
    question = multiple_choice("Which option is larger?", ["12", "7", "letter", "9"])
    samples = [Sample(id=str(i), task="t", images=(), prompt=question, answer="letter") for i in range(3)]
    words = pretrain.frequent_prompt_words(tokenizer, samples, limit=100)
    assert "Ġletter" not in words and "letter" not in words  # an answer's word stays spelt as before
    assert not any(word.lstrip("Ġ").isdigit() for word in words) and {"Answer", "Ġoption", "Ġchoices"} <= set(words)
    old_pieces = {word: tokenizer.backend_tokenizer.model.tokenize(word) for word in words}
    extended = pretrain.add_prompt_words(tokenizer, model, samples, limit=100)
    line = "Answer with the option's letter from the given choices directly."
    assert len(tokenizer(line)["input_ids"]) == 48 and len(extended(line)["input_ids"]) == 16  # " letter": 5
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == len(extended) and model.get_output_embeddings().weight is rows  # still tied
    assert torch.equal(rows[: len(tokenizer)], before)
    for word, pieces in old_pieces.items():
        (token,) = extended(word.replace("Ġ", " "), add_special_tokens=False)["input_ids"]
        assert torch.allclose(rows[token], before[[piece.id for piece in pieces]].mean(0))
    build_processor(extended, spec).save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(question)["input_ids"] == extended(question)["input_ids"]
    assert tokenizer("The cat then sat.")["input_ids"] == extended("The cat then sat.")["input_ids"]
