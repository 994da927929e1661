"""What a backbone does to a model must match what the run says: the vision encoder (one definition per
architecture) stays frozen under seq-full, a checkpoint's own generation config does not change greedy
evaluation, and ``<image>`` placeholders in later turns reach the processor with their images only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmcl.backbones.registry import load_backbone
from mmcl.backbones.tiny_archs import TINY_ARCHITECTURES, TinyArchSpec, build_tiny_arch, default_corpus

ALL_ARCHITECTURES = ("llava", *TINY_ARCHITECTURES)
# architecture -> (vision encoder prefix, prefixes inside it that are not the encoder, language model prefixes)
EXPECTED_PARTS = {
    "llava": ("model.vision_tower.", (), ("model.language_model.", "lm_head.")),
    "qwen2-vl": ("model.visual.", ("model.visual.merger.",), ("model.language_model.", "lm_head.")),
    "qwen2.5-vl": ("model.visual.", ("model.visual.merger.",), ("model.language_model.", "lm_head.")),
    "smolvlm": ("model.vision_model.", (), ("model.text_model.", "lm_head.")),
    "qwen3-vl": ("model.visual.", ("model.visual.merger.", "model.visual.deepstack_merger_list."),
                 ("model.language_model.", "lm_head.")),
    "internvl": ("model.vision_tower.", (), ("model.language_model.", "lm_head.")),
}


def build_tiny_llava(out_dir: Path) -> Path:
    """A random tiny LLaVA (CLIP tower + Llama) saved like a checkpoint; no warm-up, unlike conftest's."""
    from mmcl.backbones.tiny import TinyLlavaSpec, build_model, build_processor, train_tokenizer

    spec = TinyLlavaSpec(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                         text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64, vocab_size=512,
                         max_positions=512)  # fmt: skip
    tokenizer = train_tokenizer(default_corpus() + ["<|user|>\n", "<|assistant|>\n", "<|end|>\n"], spec.vocab_size)
    processor = build_processor(tokenizer, spec)
    model = build_model(tokenizer, spec, seed=0)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {"llava": build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))}
    for arch in TINY_ARCHITECTURES:
        dirs[arch] = build_tiny_arch(arch, tmp_path_factory.mktemp(f"tiny_{arch}"), spec=TinyArchSpec(text_layers=1))
    return dirs


# -- vision encoder ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_parts_follow_the_model_structure(arch: str, model_dirs: dict[str, Path]) -> None:
    from mmcl.backbones.parts import is_vision_encoder, part_parameter_names, vision_encoder_parameter_names

    model = load_backbone(str(model_dirs[arch]), device="cpu").model
    vision_prefix, not_vision, language_prefixes = EXPECTED_PARTS[arch]
    names = [name for name, _ in model.named_parameters()]
    expected_vision = [n for n in names if n.startswith(vision_prefix) and not n.startswith(not_vision or ("\0",))]
    parts = part_parameter_names(model)
    assert expected_vision and vision_encoder_parameter_names(model) == expected_vision
    assert parts["language_model"] == [n for n in names if n.startswith(language_prefixes)]
    assert parts["projector"] and parts["other"] == []
    assert sorted(sum(parts.values(), [])) == sorted(names)  # every parameter in exactly one part
    assert is_vision_encoder(expected_vision[0], model) and not is_vision_encoder(parts["projector"][0], model)
    if not_vision:  # a projector inside the vision encoder (Qwen-VL's mergers) is exactly those prefixes
        assert all(name.startswith(not_vision) for name in parts["projector"])
        assert all(any(name.startswith(prefix) for name in parts["projector"]) for prefix in not_vision)


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_seq_full_freezes_the_vision_encoder_only(arch: str, model_dirs: dict[str, Path]) -> None:
    from mmcl.backbones.parts import part_parameter_names
    from mmcl.config import LoraSettings
    from mmcl.methods.base import NoOptions
    from mmcl.methods.seq_full import SequentialFullFineTuning

    backbone = load_backbone(str(model_dirs[arch]), device="cpu")
    method = SequentialFullFineTuning(NoOptions(), LoraSettings(), seed=0)
    method.setup(backbone)
    parameters = dict(backbone.model.named_parameters())
    parts = part_parameter_names(backbone.model)
    assert parts["vision_encoder"] and not any(parameters[n].requires_grad for n in parts["vision_encoder"])
    assert parts["language_model"] and all(parameters[n].requires_grad for n in parts["language_model"])
    assert parts["projector"] and all(parameters[n].requires_grad for n in parts["projector"])
    vision_prefix, not_vision, _ = EXPECTED_PARTS[arch]
    assert not any(name.startswith(vision_prefix) and not name.startswith(not_vision or ("\0",))
                   for name in method.state_tensors())  # fmt: skip


def test_parts_of_a_peft_wrapped_model(model_dirs: dict[str, Path]) -> None:
    """Under PEFT the names carry the wrapper's prefix; adapters count with the layer they wrap."""
    from mmcl.backbones.parts import part_parameter_names
    from mmcl.config import LoraSettings
    from mmcl.methods.lora_utils import add_lora

    backbone = load_backbone(str(model_dirs["qwen2.5-vl"]), device="cpu")
    add_lora(backbone, LoraSettings(), seed=0)
    parts = part_parameter_names(backbone.model)
    assert parts["vision_encoder"] and all(n.startswith("base_model.model.model.visual.") for n in parts["vision_encoder"])
    assert any("lora_" in name for name in parts["language_model"]) and parts["other"] == []


def test_unknown_architecture_is_a_clear_error() -> None:
    from mmcl.backbones.parts import vision_encoder_parameter_names
    from mmcl.errors import MmclError

    with pytest.raises(MmclError, match="Linear: cannot tell its vision encoder"):
        vision_encoder_parameter_names(torch.nn.Linear(2, 2))


# -- decoding ------------------------------------------------------------------------------------

# A hub-style generation_config.json that changes greedy decoding in every way transformers allows.
LEAKY_GENERATION = {
    "do_sample": True,
    "temperature": 0.3,
    "top_k": 3,
    "top_p": 0.5,
    "num_beams": 3,
    "length_penalty": -2.0,
    "repetition_penalty": 5.0,
    "no_repeat_ngram_size": 1,
    "min_new_tokens": 6,
    "suppress_tokens": [5, 6, 7],
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmcl.streams.synth import write_synth_domain

    return write_synth_domain(tmp_path_factory.mktemp("fidelity_data"), seed=0, train_per_task=4, test_per_task=2)


def samples_of(data_root: Path, task: str):
    from mmcl.data.readers import read_samples

    return read_samples(data_root / task / "train.json", task)


def with_leaky_generation_config(model_dir: Path, out_dir: Path) -> Path:
    import json
    import shutil

    shutil.copytree(model_dir, out_dir)
    path = out_dir / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **LEAKY_GENERATION}), encoding="utf-8")
    return out_dir


def test_decoding_settings_are_plain_and_greedy() -> None:
    import json

    from mmcl.backbones.backbone import Backbone, decoding_settings

    settings = Backbone.decoding_settings(7)
    assert settings == decoding_settings(7) and json.loads(json.dumps(settings)) == settings
    assert settings["max_new_tokens"] == 7 and settings["do_sample"] is False and settings["num_beams"] == 1
    assert settings["repetition_penalty"] == 1.0 and settings["no_repeat_ngram_size"] == 0


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl", "smolvlm"])
def test_checkpoint_generation_config_does_not_change_answers(
    arch: str, model_dirs: dict[str, Path], data_root: Path, tmp_path: Path
) -> None:
    from transformers import GenerationConfig

    samples = samples_of(data_root, "med")[:2] + samples_of(data_root, "sci")[:1]
    clean = load_backbone(str(model_dirs[arch]), device="cpu")
    leaky = load_backbone(str(with_leaky_generation_config(model_dirs[arch], tmp_path / "leaky")), device="cpu")
    assert leaky.model.generation_config.repetition_penalty == 5.0  # the checkpoint's config was loaded
    expected = clean.generate(samples, max_new_tokens=8)
    assert leaky.generate(samples, max_new_tokens=8) == expected
    assert leaky.model.generation_config.repetition_penalty == 5.0  # and is the model's again afterwards
    # the comparison means something: left to transformers, the checkpoint's settings change the output
    batch = leaky.prompt_batch(samples)
    with torch.no_grad():
        inherited = leaky.model.generate(**batch, generation_config=GenerationConfig(max_new_tokens=8, do_sample=False))
        plain = clean.model.generate(**clean.prompt_batch(samples), max_new_tokens=8, do_sample=False)
    assert inherited.shape != plain.shape or not torch.equal(inherited, plain)


def test_peft_wrapped_model_ignores_the_checkpoint_generation_config(
    model_dirs: dict[str, Path], data_root: Path, tmp_path: Path
) -> None:
    from mmcl.config import LoraSettings
    from mmcl.methods.lora_utils import add_lora

    samples = samples_of(data_root, "med")[:2]
    clean = load_backbone(str(model_dirs["qwen2.5-vl"]), device="cpu")
    leaky = load_backbone(str(with_leaky_generation_config(model_dirs["qwen2.5-vl"], tmp_path / "leaky")), device="cpu")
    for backbone in (clean, leaky):
        add_lora(backbone, LoraSettings(), seed=0)  # lora_B starts at zero: same function as the base model
    assert leaky.generate(samples, max_new_tokens=6) == clean.generate(samples, max_new_tokens=6)


def test_rollout_sampling_ignores_the_checkpoint_generation_config(
    model_dirs: dict[str, Path], data_root: Path, tmp_path: Path
) -> None:
    """GRPO/EvoLMM rollouts sample from the model's own distribution, not the checkpoint's penalties."""
    from mmcl.training.rollouts import sample_rollouts

    samples = samples_of(data_root, "med")[:2]
    clean = load_backbone(str(model_dirs["llava"]), device="cpu")
    leaky = load_backbone(str(with_leaky_generation_config(model_dirs["llava"], tmp_path / "leaky")), device="cpu")

    def texts(backbone) -> list[list[int]]:
        groups = sample_rollouts(backbone, samples, per_sample=3, max_new_tokens=6, temperature=1.0, seed=0)
        return [rollout.completion_ids.tolist() for group in groups for rollout in group]

    assert texts(leaky) == texts(clean)


# -- images in later turns -----------------------------------------------------------------------

END_OF_TURN = {"llava": "<|end|>", "qwen2-vl": "<|im_end|>", "qwen2.5-vl": "<|im_end|>", "qwen3-vl": "<|im_end|>",
               "smolvlm": "<end_of_utterance>", "internvl": "<|im_end|>"}


def labelled_spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of every run of labelled (not ignored) positions."""
    from mmcl.backbones.backbone import IGNORE_INDEX

    spans: list[tuple[int, int]] = []
    for position, label in enumerate(labels.tolist()):
        if label == IGNORE_INDEX:
            continue
        if spans and spans[-1][1] == position:
            spans[-1] = (spans[-1][0], position + 1)
        else:
            spans.append((position, position + 1))
    return spans


def later_turn_samples(data_root: Path):
    from mmcl.data.sample import Sample

    one, other = samples_of(data_root, "sci")[:2]
    later = Sample(id="later", task="sci", images=(one.images[0],), prompt="<image>\nWhich shape is it?",
                   answer=one.answer, history=(("Answer in one word.", "ok"),))  # fmt: skip
    both = Sample(id="both", task="sci", images=(one.images[0], other.images[0]),
                  prompt="And this one? <image>", answer=other.answer,
                  history=(("Hello", "hi"), ("<image>\nWhich shape?", one.answer)))  # fmt: skip
    return [later, both]


@pytest.mark.parametrize("arch", ["llava", "qwen2-vl", "smolvlm", "qwen3-vl", "internvl"])
def test_image_in_a_later_turn(arch: str, model_dirs: dict[str, Path], data_root: Path) -> None:
    """Each prompt prefix goes to the processor with the images it refers to: every assistant turn is
    labelled, the batch trains, and generation answers."""
    backbone = load_backbone(str(model_dirs[arch]), device="cpu")
    samples = later_turn_samples(data_root)
    features = [backbone.encode_for_training(sample) for sample in samples]
    for sample, encoded in zip(samples, features):
        spans = labelled_spans(encoded["labels"])
        answers = [answer for _, answer in sample.turns()]
        assert len(spans) == len(answers)
        for (start, end), answer in zip(spans, answers):
            assert backbone.tokenizer.decode(encoded["labels"][start:end]).strip() == f"{answer}{END_OF_TURN[arch]}"
    batch = backbone.collate(features + [backbone.encode_for_training(samples_of(data_root, "sci")[2])])
    loss = backbone.model(**batch).loss
    assert torch.isfinite(loss)
    answers = backbone.generate(samples + samples_of(data_root, "med")[:1], max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
