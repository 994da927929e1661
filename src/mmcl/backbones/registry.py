"""Backbone presets and the one loading path for every image-text-to-text model (hub id or local dir)."""

from __future__ import annotations

import difflib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmcl.backbones.backbone import Backbone
from mmcl.backbones.parts import top_level_vision_modules
from mmcl.errors import ConfigError, MmclError
from mmcl.registry import Registry

TINY_LLAVA_DIR = Path(__file__).parent / "tiny_llava"
TINY_READER_DIR = Path(__file__).parent / "tiny_reader"
# Presets whose weights ship inside the package, built by `mmcl pretrain-tiny --preset <name>`.
SHIPPED_PRESET_DIRS: dict[str, Path] = {"tiny-llava": TINY_LLAVA_DIR, "tiny-reader": TINY_READER_DIR}

# Regexes over transformers 5 module paths (PEFT full-matches them against ``named_modules()`` names).
_DECODER_LINEARS = r"\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
# Language model of LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and InternVL: ``model.language_model.layers.N.
# {self_attn,mlp}.*``. (Qwen2.5-VL's vision blocks also have ``mlp.gate_proj`` and InternVL's vision tower
# ``attention.{q,k,v}_proj``: the ``language_model`` anchor keeps them out.)
LANGUAGE_MODEL_LORA_TARGETS = r".*\.language_model" + _DECODER_LINEARS
# Language model of Idefics3 / SmolVLM: ``model.text_model.layers.N.*`` (the SigLIP tower is ``vision_model``).
TEXT_MODEL_LORA_TARGETS = r".*\.text_model" + _DECODER_LINEARS
# Language-model linear layers of Llama-style decoders plus the LLaVA projector (tiny-llava's default).
LLAMA_STYLE_LORA_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"|.*multi_modal_projector\.linear_[12]"
)
# Hub ids and directories that are not presets: the LLaVA default, or the language model of an Idefics3.
DEFAULT_LORA_TARGETS = f"{LLAMA_STYLE_LORA_TARGETS}|{TEXT_MODEL_LORA_TARGETS}"
# ... except for these model types (``config.model_type``), which get their preset's targets instead: InternVL
# names its projector as LLaVA does (``multi_modal_projector.linear_{1,2}``), which the LLaVA default adapts,
# while the internvl3-1b preset adapts the language model only.
MODEL_TYPE_LORA_TARGETS = {"internvl": LANGUAGE_MODEL_LORA_TARGETS}

# 4-bit loading quantises the language model only; vision encoders, projectors (every family of
# mmcl.backbones.parts) and the output head stay as loaded.
NOT_QUANTIZED_MODULES = ["lm_head", *top_level_vision_modules()]


@dataclass(frozen=True)
class BackbonePreset:
    name: str
    description: str
    source: str  # hub id or local directory
    lora_targets: str
    dtype: str = "float32"  # used when backbone.dtype is "auto" and a GPU is present
    # AutoProcessor.from_pretrained kwargs; Qwen-VL "size" is in pixels: {"shortest_edge": min, "longest_edge": max}
    processor_options: dict[str, Any] = field(default_factory=dict)


# Qwen2-VL / Qwen2.5-VL: 16 to 512 visual tokens per image (each token covers 28 x 28 pixels).
QWEN_IMAGE_BOUNDS = {"size": {"shortest_edge": 16 * 28 * 28, "longest_edge": 512 * 28 * 28}}
# Qwen3-VL: the same 16 to 512 visual tokens, each covering 32 x 32 pixels (16-px patches, 2x2 merge).
QWEN3_IMAGE_BOUNDS = {"size": {"shortest_edge": 16 * 32 * 32, "longest_edge": 512 * 32 * 32}}
# InternVL3: at most 2 tiles of 448 px (a wide or tall image; a near-square one fits one tile) plus the
# thumbnail added to any tiled image, 256 visual tokens each: 256 to 768 tokens per image.
INTERNVL_IMAGE_BOUNDS = {"max_patches": 2}

PRESETS: Registry[BackbonePreset] = Registry("backbone preset")


def register_preset(preset: BackbonePreset, origin: str | None = None) -> BackbonePreset:
    """Make ``preset`` selectable as ``backbone.name`` (a taken name is refused)."""
    return PRESETS.register(preset.name, preset, origin=origin or f"{__name__}.{preset.name}")


for _preset in [
    BackbonePreset(
        "tiny-llava",
        "Shipped 5M-parameter LlavaForConditionalGeneration (CLIP tower + Llama), pretrained by `mmcl pretrain-tiny`",
        str(TINY_LLAVA_DIR),
        LLAMA_STYLE_LORA_TARGETS,
    ),
    BackbonePreset(
        "tiny-reader",
        "Tiny LlavaForConditionalGeneration at 96 px for synth-ability, pretrained with a reading mix by "
        "`mmcl pretrain-tiny --preset tiny-reader` (weights not shipped yet: the recipe does not read yet)",
        str(TINY_READER_DIR),
        LLAMA_STYLE_LORA_TARGETS,
    ),
    BackbonePreset(
        "llava-1.5-7b",
        "llava-hf/llava-1.5-7b-hf from the Hugging Face hub (needs a download and a GPU)",
        "llava-hf/llava-1.5-7b-hf",
        LANGUAGE_MODEL_LORA_TARGETS,
        dtype="bfloat16",
    ),
    BackbonePreset(
        "qwen2-vl-2b",
        "Qwen/Qwen2-VL-2B-Instruct from the Hugging Face hub (images capped at 512 visual tokens)",
        "Qwen/Qwen2-VL-2B-Instruct",
        LANGUAGE_MODEL_LORA_TARGETS,
        dtype="bfloat16",
        processor_options=QWEN_IMAGE_BOUNDS,
    ),
    BackbonePreset(
        "qwen2.5-vl-3b",
        "Qwen/Qwen2.5-VL-3B-Instruct from the Hugging Face hub (images capped at 512 visual tokens)",
        "Qwen/Qwen2.5-VL-3B-Instruct",
        LANGUAGE_MODEL_LORA_TARGETS,
        dtype="bfloat16",
        processor_options=QWEN_IMAGE_BOUNDS,
    ),
    BackbonePreset(
        "qwen3-vl-2b",
        "Qwen/Qwen3-VL-2B-Instruct from the Hugging Face hub (images capped at 512 visual tokens)",
        "Qwen/Qwen3-VL-2B-Instruct",
        LANGUAGE_MODEL_LORA_TARGETS,
        dtype="bfloat16",
        processor_options=QWEN3_IMAGE_BOUNDS,
    ),
    BackbonePreset(
        "internvl3-1b",
        "OpenGVLab/InternVL3-1B-hf (transformers-native InternVL) from the Hugging Face hub "
        "(up to 2 tiles of 448 px + thumbnail)",
        "OpenGVLab/InternVL3-1B-hf",
        LANGUAGE_MODEL_LORA_TARGETS,
        dtype="bfloat16",
        processor_options=INTERNVL_IMAGE_BOUNDS,
    ),
    BackbonePreset(
        "smolvlm-256m",
        "HuggingFaceTB/SmolVLM-256M-Instruct (Idefics3) from the Hugging Face hub (up to 3x3 tiles + global view)",
        "HuggingFaceTB/SmolVLM-256M-Instruct",
        TEXT_MODEL_LORA_TARGETS,
        dtype="bfloat16",
        processor_options={"size": {"longest_edge": 3 * 512}},
    ),
]:
    register_preset(_preset)


def _shipped_source(name: str) -> str:
    """The folder of a preset shipped with the package (or rebuilt by ``mmcl pretrain-tiny``); one line
    naming the command that builds it when its weights are missing."""
    shipped = SHIPPED_PRESET_DIRS[name]
    if not (shipped / "model.safetensors").is_file():
        command = "mmcl pretrain-tiny" + ("" if name == "tiny-llava" else f" --preset {name}")
        raise MmclError(f"backbone {name}: weights missing in {shipped}; build them with `{command}`")
    return str(shipped)


def resolve_source(name: str) -> tuple[str, str]:
    """(source, default LoRA target regex) for a preset name, a local directory or a hub id."""
    if name in SHIPPED_PRESET_DIRS:
        return _shipped_source(name), PRESETS[name].lora_targets
    if name in PRESETS:
        return PRESETS[name].source, PRESETS[name].lora_targets
    return name, DEFAULT_LORA_TARGETS


HUB_PROBE_TIMEOUT = 5.0  # seconds for the one request that asks the hub whether a model id exists


def probe_hub(repo_id: str) -> str | None:
    """Ask the hub once, without retries, whether model ``repo_id`` exists: None if it does (or is gated,
    i.e. exists behind a licence), else the reason it cannot be used (unknown id, hub unreachable)."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    try:
        model_info(repo_id, timeout=HUB_PROBE_TIMEOUT)
    except GatedRepoError:
        return None
    except RepositoryNotFoundError:
        return "no such model on the Hugging Face hub (a private one needs `hf auth login` or HF_TOKEN)"
    except Exception as exc:  # noqa: BLE001  (network errors of any HTTP client: one line, no retry)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"not in the local Hugging Face cache and the hub cannot be reached ({reason})"
    return None


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config.json (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001  (an id the hub would refuse, e.g. with spaces: not cached)
        return False


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve_backbone(name: str) -> str:
    """Check before any work that ``name`` can be loaded, and return its source: a preset, a local model
    directory, a hub id in the local Hugging Face cache, or (one short probe, no retries) a hub id the hub
    knows. Anything else is a one-line :class:`ConfigError` listing the presets and the closest name.
    A hub id found once is not probed again in the same process."""
    if name in _RESOLVED:
        return _RESOLVED[name]
    source = _resolve_backbone(name)
    if not Path(source).expanduser().is_dir():  # hub ids only: a local dir is checked again each time
        _RESOLVED[name] = source
    return source


_RESOLVED: dict[str, str] = {}


def _resolve_backbone(name: str) -> str:
    source = PRESETS[name].source if name in PRESETS else name
    if name in SHIPPED_PRESET_DIRS:
        return _shipped_source(name)
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"backbone.name: {local} is a directory but not a model directory (no config.json)")
        return str(local)
    if _looks_like_path(source) or local.exists():
        reason = "not a directory" if local.exists() else "no such directory"
        raise ConfigError(f"backbone.name: {source}: {reason}{_known_backbones(name)}")
    if in_hub_cache(source):
        return source
    reason = probe_hub(source)
    if reason is None:
        return source
    if name in PRESETS:
        raise ConfigError(f"backbone {name}: cannot use {source}: {reason}")
    raise ConfigError(f"backbone.name: unknown backbone {name!r}: not a preset or a local model directory, "
                      f"{reason}{_known_backbones(name)}")  # fmt: skip


def _known_backbones(name: str) -> str:
    closest = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.6)
    hint = f"; did you mean {closest[0]}?" if closest else ""
    return f"{hint} (presets: {', '.join(sorted(PRESETS))}; or a local model directory or Hugging Face hub id)"


def resolve_dtype(name: str, dtype: str, device: str):
    """The torch dtype for ``dtype``; ``auto`` = the preset's dtype on a GPU, float32 otherwise."""
    import torch

    if dtype == "auto":
        on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        dtype = PRESETS[name].dtype if name in PRESETS and on_gpu else "float32"
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ConfigError(f"backbone.dtype: unknown dtype {dtype!r} (float32, bfloat16, float16 or auto)")
    return torch_dtype


def four_bit_config(compute_dtype):
    """bitsandbytes NF4 with double quantisation (QLoRA, Dettmers et al. 2023) for the language model;
    a one-line ConfigError when there is no CUDA device or no bitsandbytes."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("backbone.load_in_4bit: 4-bit loading needs a CUDA GPU and none is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("backbone.load_in_4bit: needs the bitsandbytes package (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if compute_dtype == torch.float32 else compute_dtype,
        llm_int8_skip_modules=NOT_QUANTIZED_MODULES,
    )


def load_backbone(
    name: str,
    dtype: str = "float32",
    device: str = "auto",
    max_length: int = 512,
    load_in_4bit: bool = False,
    processor_options: dict[str, Any] | None = None,
) -> Backbone:
    """Load model + processor through ``AutoModelForImageTextToText`` and ``AutoProcessor``.

    ``processor_options`` (e.g. Qwen-VL ``max_pixels``) update the preset's; ``load_in_4bit`` loads the
    language model in NF4 for LoRA training on small GPUs."""
    import torch
    from transformers import AutoModelForImageTextToText

    from mmcl.backbones.processors import load_processor

    source, lora_targets = resolve_source(name)
    torch_dtype = resolve_dtype(name, dtype, device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_options: dict[str, Any] = {"dtype": torch_dtype}
    if load_in_4bit:
        model_options.update(quantization_config=four_bit_config(torch_dtype), device_map={"": device})
    options = {**(PRESETS[name].processor_options if name in PRESETS else {}), **(processor_options or {})}
    try:
        processor = load_processor(source, options)
        model = AutoModelForImageTextToText.from_pretrained(source, **model_options)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MmclError(f"backbone {name}: cannot load from {source!r} ({first_line})") from None
    if name not in PRESETS:
        lora_targets = MODEL_TYPE_LORA_TARGETS.get(getattr(model.config, "model_type", None), lora_targets)
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.to(device)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return Backbone(name=name, model=model, processor=processor, lora_targets=lora_targets, max_length=max_length)
