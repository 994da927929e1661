"""The hub backbones' architectures (Qwen2-VL, Qwen2.5-VL, SmolVLM/Idefics3) as tiny local models: each
loads through the same path as a hub id, formats chats with its own template, masks labels to the answer,
and goes through a full `mmcl run` (train + evaluate); LoRA presets target the language model only."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_stream_config, write_config
from mmcl.backbones.backbone import IGNORE_INDEX
from mmcl.backbones.registry import PRESETS, load_backbone, resolve_dtype
from mmcl.backbones.tiny_archs import TINY_ARCHITECTURES, TinyArchSpec, build_tiny_arch
from mmcl.errors import ConfigError
from test_runner import invoke, prediction_records, read_json

SPEC = TinyArchSpec()
# architecture -> (hub preset, module prefix of its language model, end-of-turn token, generation prompt)
ARCHITECTURES = {
    "qwen2-vl": ("qwen2-vl-2b", "model.language_model.", "<|im_end|>", "<|im_start|>assistant\n"),
    "qwen2.5-vl": ("qwen2.5-vl-3b", "model.language_model.", "<|im_end|>", "<|im_start|>assistant\n"),
    "smolvlm": ("smolvlm-256m", "model.text_model.", "<end_of_utterance>", "<end_of_utterance>\nAssistant:"),
    "qwen3-vl": ("qwen3-vl-2b", "model.language_model.", "<|im_end|>", "<|im_start|>assistant\n"),
    "internvl": ("internvl3-1b", "model.language_model.", "<|im_end|>", "<|im_start|>assistant\n"),
}
TASKS = ["med", "sci"]
TRAINING = {"max_steps": 2, "batch_size": 2, "learning_rate": 0.01, "warmup_ratio": 0.0, "progress_bar": False}


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def arch_dir(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model of ``arch`` saved with ``save_pretrained`` (random weights)."""
    return build_tiny_arch(arch, tmp_path_factory.mktemp(f"tiny_{arch}"), spec=SPEC)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmcl.streams.synth import write_synth_domain

    return write_synth_domain(tmp_path_factory.mktemp("arch_data"), seed=0, train_per_task=4, test_per_task=2)


def samples_of(data_root: Path, task: str):
    from mmcl.data.readers import read_samples

    return read_samples(data_root / task / "train.json", task)


def test_presets_name_the_hub_checkpoints() -> None:
    sources = {name: preset.source for name, preset in PRESETS.items()}
    assert sources["qwen2-vl-2b"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert sources["qwen2.5-vl-3b"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert sources["smolvlm-256m"] == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert sources["llava-1.5-7b"] == "llava-hf/llava-1.5-7b-hf"
    assert all(PRESETS[name].dtype == "bfloat16" for name in ("qwen2-vl-2b", "qwen2.5-vl-3b", "smolvlm-256m"))
    # dtype "auto": the preset's dtype on a GPU, float32 on the CPU and for directories
    assert resolve_dtype("qwen2-vl-2b", "auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("qwen2-vl-2b", "auto", "cpu") == torch.float32
    assert resolve_dtype("/some/dir", "auto", "cuda") == torch.float32
    with pytest.raises(ConfigError, match="backbone.dtype"):
        resolve_dtype("qwen2-vl-2b", "int8", "cpu")


def test_lora_regex_matches_the_language_model_only(arch: str, arch_dir: Path) -> None:
    preset, lm_prefix, _, _ = ARCHITECTURES[arch]
    backbone = load_backbone(str(arch_dir), device="cpu")
    linears = [name for name, module in backbone.model.named_modules() if isinstance(module, torch.nn.Linear)]
    vision = [name for name in linears if not name.startswith(lm_prefix) and name != "lm_head"]
    assert vision, "the tiny model has a vision tower and projector"
    expected = [name for name in linears if name.startswith(lm_prefix)]
    assert len(expected) == 7 * SPEC.text_layers  # q k v o gate up down per decoder layer
    for regex in (PRESETS[preset].lora_targets, backbone.lora_targets):  # the preset's, and a local dir's default
        matched = [name for name, _ in backbone.model.named_modules() if re.fullmatch(regex, name)]
        assert matched == expected


def test_labels_cover_only_the_answer(arch: str, arch_dir: Path, data_root: Path) -> None:
    _, _, end_of_turn, generation_prompt = ARCHITECTURES[arch]
    backbone = load_backbone(str(arch_dir), device="cpu")
    for sample in samples_of(data_root, "sci")[:2] + samples_of(data_root, "med")[:1]:
        features = backbone.encode_for_training(sample)
        labels = features["labels"]
        labelled = (labels != IGNORE_INDEX).nonzero().flatten()
        start = int(labelled[0])
        assert labelled.tolist() == list(range(start, labels.shape[0]))  # one span, to the end
        assert torch.equal(labels[start:], features["input_ids"][start:])
        text = backbone.tokenizer.decode(labels[start:])
        assert text.strip() == f"{sample.answer}{end_of_turn}"
        prompt = backbone.tokenizer.decode(features["input_ids"][:start])
        assert prompt.endswith(generation_prompt)  # everything up to the assistant's first token is masked


def test_batches_mix_samples_with_different_image_counts(arch: str, arch_dir: Path, data_root: Path) -> None:
    """A two-image sample batched with one-image samples: image tensors are padded or concatenated, and each
    sample's logits equal those it gets alone."""
    from mmcl.data.sample import Sample

    backbone = load_backbone(str(arch_dir), device="cpu")
    one, other = samples_of(data_root, "sci")[:2]
    two = Sample(id="pair", task="sci", images=(one.images[0], other.images[0]),
                 prompt="<image> and <image>\nSame shape?", answer="no")  # fmt: skip
    features = [backbone.encode_for_training(sample) for sample in (two, one, other)]
    batch = backbone.collate(features)
    backbone.model.eval()
    with torch.no_grad():
        logits = backbone.model(**batch).logits
        for row, single in enumerate(features):
            alone = backbone.model(**backbone.collate([single])).logits[0]
            assert torch.allclose(logits[row, : alone.shape[0]], alone, atol=1e-4)


def test_a_text_only_sample_first_in_the_batch_keeps_the_others_images(arch: str, arch_dir: Path,
                                                                      data_root: Path) -> None:
    """A batch whose first sample has no image: the image tensors of the later samples are kept (the keys are
    every sample's, not the first's), and each row's logits equal those it gets alone, in either order."""
    from mmcl.data.sample import Sample

    backbone = load_backbone(str(arch_dir), device="cpu")
    text_only = Sample(id="words", task="sci", images=(), prompt="Is a square round?", answer="no")
    features = [backbone.encode_for_training(sample) for sample in (text_only, *samples_of(data_root, "sci")[:2])]
    assert not any(key.startswith("pixel") for key in features[0])
    backbone.model.eval()
    with torch.no_grad():
        for order in (features, features[::-1]):
            batch = backbone.collate(order)
            with_images = backbone.collate([f for f in order if f is not features[0]])
            assert torch.equal(batch["pixel_values"], with_images["pixel_values"])
            logits = backbone.model(**batch).logits
            for row, single in enumerate(order):
                alone = backbone.model(**backbone.collate([single])).logits[0]
                assert torch.allclose(logits[row, : alone.shape[0]], alone, atol=1e-4)


@pytest.fixture(scope="module")
def arch_run(arch: str, arch_dir: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mmcl run` on a two-task stream declared as files, with the preset's LoRA targets (one stage per task)."""
    preset, _, _, _ = ARCHITECTURES[arch]
    folder = tmp_path_factory.mktemp(f"run_{arch}")
    tasks = [
        {"name": task, "train": str(data_root / task / "train.json"), "test": str(data_root / task / "test.json"),
         "scorer": "exact_match", "max_new_tokens": 3}
        for task in TASKS
    ]  # fmt: skip
    config = make_stream_config(
        arch_dir,
        folder / "cache",
        folder / "run",
        stream={"tasks": tasks},
        lora={"targets": PRESETS[preset].lora_targets},
        training=dict(TRAINING),
        evaluation={"batch_size": 2, "limit": 2},
    )
    result = invoke(["run", str(write_config(folder / "config.yaml", config))])
    assert result.code == 0, result.err
    return folder / "run"


def test_one_run_trains_and_evaluates(arch_run: Path) -> None:
    for index, task in enumerate(TASKS, start=1):
        stage = arch_run / "stages" / f"{index}_{task}"
        info = read_json(stage / "stage.json")
        assert math.isfinite(info["train_metrics"]["train_loss"]) and info["train_metrics"]["train_loss"] > 0
        tensors = load_file(str(stage / "state.safetensors"))
        assert tensors and all("lora_" in key for key in tensors)
        assert all("visual" not in key and "vision" not in key and "connector" not in key for key in tensors)
    for row in ["0_base", "1_med", "2_sci"]:
        for task in TASKS:
            meta, records = prediction_records(arch_run / "predictions" / row / f"{task}.jsonl")
            assert meta["n"] == 2 and len(records) == 2
            assert all(isinstance(record["prediction"], str) for record in records)
    results = read_json(arch_run / "results.json")
    assert [task["name"] for task in results["tasks"]] == TASKS and len(results["matrix"]) == 3 and results["complete"] is True


def test_bfloat16_with_activation_checkpointing_trains(
    arch: str, arch_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    """One LoRA step on a bfloat16 model with activation checkpointing moves the adapter; generation works."""
    from mmcl.config import LoraSettings, TrainingConfig
    from mmcl.methods.lora_utils import adapter_tensors, add_lora
    from mmcl.training.sft import train_on_samples

    preset, _, _, _ = ARCHITECTURES[arch]
    backbone = load_backbone(str(arch_dir), dtype="bfloat16", device="cpu")
    assert backbone.model.dtype == torch.bfloat16
    add_lora(backbone, LoraSettings(targets=PRESETS[preset].lora_targets), seed=0)
    before = adapter_tensors(backbone)
    samples = samples_of(data_root, "med")[:2]
    config = TrainingConfig(max_steps=1, batch_size=2, learning_rate=0.05, warmup_ratio=0.0, progress_bar=False,
                            activation_checkpointing=True)  # fmt: skip
    metrics = train_on_samples(backbone, samples, config, tmp_path / "trainer", seed=0)
    assert math.isfinite(metrics["train_loss"])
    assert backbone.model.get_base_model().is_activation_checkpointing
    after = adapter_tensors(backbone)
    moved = [key for key in before if "lora_B" in key and not torch.equal(before[key], after[key])]
    assert len(moved) == 7 * SPEC.text_layers  # every targeted layer got a gradient through the checkpoints
    answers = backbone.generate(samples, max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)


def test_processor_options_reach_the_processor(data_root: Path, tmp_path: Path) -> None:
    """Qwen-VL ``size`` (pixels) caps the image grid: 56x56 px = 4x4 patches; 28x28 px = 2x2 patches."""
    model_dir = build_tiny_arch("qwen2-vl", tmp_path / "qwen", spec=SPEC)
    sample = samples_of(data_root, "med")[0]
    default = load_backbone(str(model_dir), device="cpu").encode_for_training(sample)
    capped = load_backbone(
        str(model_dir), device="cpu", processor_options={"size": {"shortest_edge": 28 * 28, "longest_edge": 28 * 28}}
    )
    small = capped.encode_for_training(sample)
    assert default["image_grid_thw"].tolist() == [[1, 4, 4]] and small["image_grid_thw"].tolist() == [[1, 2, 2]]
    assert small["input_ids"].shape[0] == default["input_ids"].shape[0] - 3  # 4 merged image tokens -> 1


def test_load_in_4bit_needs_cuda_and_bitsandbytes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model_dir = tmp_path / "never_loaded"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^backbone\.load_in_4bit: .*CUDA") as error:
            load_backbone(str(model_dir), load_in_4bit=True)
        assert "\n" not in str(error.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None if name == "bitsandbytes" else object())
    with pytest.raises(ConfigError, match=r"^backbone\.load_in_4bit: .*bitsandbytes"):
        load_backbone(str(model_dir), load_in_4bit=True)


def test_load_in_4bit_error_from_the_command_line(arch_run: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may load in 4 bits")
    config = read_json_yaml(arch_run.parent / "config.yaml")
    config["output_dir"] = str(tmp_path / "run")
    config["backbone"]["load_in_4bit"] = True
    result = invoke(["run", str(write_config(tmp_path / "config.yaml", config))])
    assert result.code == 2
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "load_in_4bit" in lines[0] and "Traceback" not in result.err


def read_json_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


# -- resolving a backbone name before any work (no network: the hub probe is mocked) ----------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hub probe replaced: ids in ``known`` exist; every probe is recorded. Nothing is cached locally."""
    from mmcl.backbones import registry

    probed: list[str] = []
    known = {"someone/real-vlm"}

    def probe(repo_id: str) -> str | None:
        probed.append(repo_id)
        return None if repo_id in known else "no such model on the Hugging Face hub"

    monkeypatch.setattr(registry, "probe_hub", probe)
    monkeypatch.setattr(registry, "in_hub_cache", lambda repo_id: repo_id == "someone/cached-vlm")
    monkeypatch.setattr(registry, "_RESOLVED", {})
    return probed


def test_resolve_backbone_accepts_presets_dirs_cached_and_known_ids(hub: list[str], tiny_model_dir: Path) -> None:
    from mmcl.backbones.registry import TINY_LLAVA_DIR, resolve_backbone

    assert resolve_backbone("tiny-llava") == str(TINY_LLAVA_DIR)
    assert resolve_backbone(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_backbone("someone/cached-vlm") == "someone/cached-vlm"
    assert hub == []  # presets shipped, local dirs and cached ids never touch the network
    assert resolve_backbone("someone/real-vlm") == "someone/real-vlm"
    assert resolve_backbone("someone/real-vlm") == "someone/real-vlm"
    assert hub == ["someone/real-vlm"]  # one probe, then remembered


def test_unknown_backbone_lists_presets_and_the_closest_name(hub: list[str]) -> None:
    from mmcl.backbones.registry import resolve_backbone

    with pytest.raises(ConfigError) as caught:
        resolve_backbone("tiny-lava")
    message = str(caught.value)
    assert "\n" not in message and "unknown backbone 'tiny-lava'" in message and "did you mean tiny-llava?" in message
    assert all(name in message for name in PRESETS)
    assert hub == ["tiny-lava"]
    with pytest.raises(ConfigError, match="presets: ") as caught:
        resolve_backbone("nothing/like-it")
    assert "did you mean" not in str(caught.value)


def test_backbone_paths_are_checked_without_the_hub(hub: list[str], tmp_path: Path) -> None:
    from mmcl.backbones.registry import resolve_backbone

    with pytest.raises(ConfigError, match="no such directory"):
        resolve_backbone(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"not a model directory \(no config.json\)"):
        resolve_backbone(str(tmp_path))
    assert hub == []


def test_hub_preset_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from mmcl.backbones import registry

    monkeypatch.setattr(registry, "_RESOLVED", {})
    monkeypatch.setattr(registry, "in_hub_cache", lambda repo_id: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"backbone qwen2-vl-2b: cannot use Qwen/Qwen2-VL-2B-Instruct: .*HF_HUB_OFFLINE"):
        registry.resolve_backbone("qwen2-vl-2b")


def test_probe_hub_asks_once_with_a_short_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """One request, a timeout of a few seconds, no retry; gated models exist; network errors are one line."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from mmcl.backbones.registry import probe_hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls: list[tuple[str, float]] = []
    outcomes: dict[str, BaseException | None] = {
        "org/exists": None,
        "org/gated": GatedRepoError.__new__(GatedRepoError),
        "org/missing": RepositoryNotFoundError.__new__(RepositoryNotFoundError),
        "org/offline": ConnectionError("[Errno -2] Name or service not known\nmore"),
    }

    def model_info(repo_id: str, timeout: float | None = None, **_):
        calls.append((repo_id, timeout))
        if outcomes[repo_id] is not None:
            raise outcomes[repo_id]
        return object()

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    assert probe_hub("org/exists") is None and probe_hub("org/gated") is None
    assert probe_hub("org/missing").startswith("no such model on the Hugging Face hub")
    assert probe_hub("org/offline") == (
        "not in the local Hugging Face cache and the hub cannot be reached ([Errno -2] Name or service not known)"
    )
    assert [name for name, _ in calls] == list(outcomes)
    assert all(timeout is not None and timeout <= 10 for _, timeout in calls)


def test_data_check_does_not_need_the_backbone(hub: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An unknown backbone in the experiment is a note in ``data check`` (lengths unchecked), not an error."""
    from mmcl.streams.synth import write_synth_domain
    from mmcl.cli import main

    root = write_synth_domain(tmp_path / "data", seed=1, train_per_task=2, test_per_task=1)
    config = {"backbone": {"name": "tiny-lava"}, "stream": {"tasks": [
        {"name": "med", "train": str(root / "med" / "train.json"), "test": str(root / "med" / "test.json")}]}}
    code = main(["data", "check", str(write_config(tmp_path / "config.yaml", config))])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "lengths not checked: backbone.name: unknown backbone 'tiny-lava'" in out and "med: ok" in out


# -- Qwen3-VL and InternVL: presets, chat templates and processors of the hub checkpoints ----------------


def test_qwen3_vl_and_internvl_presets() -> None:
    from mmcl.backbones.registry import LANGUAGE_MODEL_LORA_TARGETS

    qwen3, internvl = PRESETS["qwen3-vl-2b"], PRESETS["internvl3-1b"]
    assert qwen3.source == "Qwen/Qwen3-VL-2B-Instruct" and internvl.source == "OpenGVLab/InternVL3-1B-hf"
    assert qwen3.dtype == internvl.dtype == "bfloat16"
    assert qwen3.lora_targets == internvl.lora_targets == LANGUAGE_MODEL_LORA_TARGETS
    # 16 to 512 visual tokens of 32x32 px (16-px patches merged 2x2); at most 2 InternVL tiles + thumbnail
    assert qwen3.processor_options == {"size": {"shortest_edge": 16 * 32 * 32, "longest_edge": 512 * 32 * 32}}
    assert internvl.processor_options == {"max_patches": 2}


# the prompt of one image and a question, as the hub checkpoints' chat templates render it
HUB_PROMPTS = {
    "qwen3-vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which shape?<|im_end|>\n"
                "<|im_start|>assistant\n",
    "internvl": "<|im_start|>user\n<IMG_CONTEXT>\nWhich shape?<|im_end|>\n<|im_start|>assistant\n",
}  # fmt: skip


@pytest.mark.parametrize("arch", ["qwen3-vl", "internvl"])
def test_chat_template_and_processor_class_of_the_hub_checkpoint(arch: str, data_root: Path, tmp_path: Path) -> None:
    """No default system turn in either template; a system turn is rendered when given. The saved checkpoint
    records the hub's processor class and loads as that class (its image-only stand-in without torchvision)."""
    import json

    from transformers import InternVLProcessor, Qwen3VLProcessor

    model_dir = build_tiny_arch(arch, tmp_path / arch, spec=SPEC)
    backbone = load_backbone(str(model_dir), device="cpu")
    expected_class = Qwen3VLProcessor if arch == "qwen3-vl" else InternVLProcessor
    assert isinstance(backbone.processor, expected_class)
    recorded = json.loads((model_dir / "processor_config.json").read_text(encoding="utf-8"))["processor_class"]
    assert recorded == expected_class.__name__
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape?"}]}]
    assert backbone._render(messages, generation_prompt=True) == HUB_PROMPTS[arch]
    system = [{"role": "system", "content": "Be brief."}, *messages]
    with_system = "<|im_start|>system\nBe brief.<|im_end|>\n" + HUB_PROMPTS[arch]
    assert backbone._render(system, generation_prompt=True) == with_system
    features = backbone.encode_for_training(samples_of(data_root, "sci")[0])
    tokens = backbone.tokenizer.convert_ids_to_tokens(features["input_ids"].tolist())
    if arch == "internvl":
        # each <IMG_CONTEXT> of the template becomes <img>, 4 context tokens per tile, </img>: a 48x48 image is a
        # 2x2 grid of 32-px tiles plus the thumbnail
        assert features["pixel_values"].shape[0] == 5
        start = tokens.index("<img>")
        assert tokens[start + 1 : start + 22] == ["<IMG_CONTEXT>"] * 20 + ["</img>"]
    else:
        # one 64x64 image = 4x4 patches of 16 px = 4 tokens after the 2x2 merge, marked as image tokens (1) in
        # mm_token_type_ids, from which the model builds its M-RoPE positions
        assert features["image_grid_thw"].tolist() == [[1, 4, 4]]
        image = [token == "<|image_pad|>" for token in tokens]
        assert sum(image) == 4 and features["mm_token_type_ids"].tolist() == [int(flag) for flag in image]


def test_internvl_tiles_follow_the_processor_options(data_root: Path, tmp_path: Path) -> None:
    """InternVL's ``max_patches`` (a preset's processor option) bounds the tiles: one tile, no thumbnail."""
    model_dir = build_tiny_arch("internvl", tmp_path / "internvl", spec=SPEC)
    sample = samples_of(data_root, "med")[0]
    default = load_backbone(str(model_dir), device="cpu").encode_for_training(sample)
    capped = load_backbone(str(model_dir), device="cpu", processor_options={"max_patches": 1})
    single = capped.encode_for_training(sample)
    assert default["pixel_values"].shape[0] == 5 and single["pixel_values"].shape[0] == 1
    assert single["input_ids"].shape[0] == default["input_ids"].shape[0] - 16  # 4 tokens per tile
