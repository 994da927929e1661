"""Backbone presets and the one loading path for every image-text-to-text model (hub id or local dir)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmcl.backbones.backbone import Backbone
from mmcl.errors import ConfigError, MmclError

TINY_LLAVA_DIR = Path(__file__).parent / "tiny_llava"

# Language-model linear layers of Llama-style decoders (transformers 5 module paths), plus the projector.
LLAMA_STYLE_LORA_TARGETS = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"|.*multi_modal_projector\.linear_[12]"
)


@dataclass(frozen=True)
class BackbonePreset:
    name: str
    description: str
    source: str  # hub id or local directory
    lora_targets: str


PRESETS: dict[str, BackbonePreset] = {
    preset.name: preset
    for preset in [
        BackbonePreset(
            "tiny-llava",
            "Shipped 5M-parameter LlavaForConditionalGeneration (CLIP tower + Llama), pretrained by `mmcl pretrain-tiny`",
            str(TINY_LLAVA_DIR),
            LLAMA_STYLE_LORA_TARGETS,
        ),
        BackbonePreset(
            "llava-1.5-7b",
            "llava-hf/llava-1.5-7b-hf from the Hugging Face hub (needs a download and a GPU)",
            "llava-hf/llava-1.5-7b-hf",
            LLAMA_STYLE_LORA_TARGETS,
        ),
    ]
}


def resolve_source(name: str) -> tuple[str, str]:
    """(source, default LoRA target regex) for a preset name, a local directory or a hub id."""
    if name in PRESETS:
        return PRESETS[name].source, PRESETS[name].lora_targets
    return name, LLAMA_STYLE_LORA_TARGETS


def load_backbone(name: str, dtype: str = "float32", device: str = "auto", max_length: int = 512) -> Backbone:
    """Load model + processor through ``AutoModelForImageTextToText`` and ``AutoProcessor``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source, lora_targets = resolve_source(name)
    if name == "tiny-llava" and not (TINY_LLAVA_DIR / "model.safetensors").is_file():
        raise MmclError(f"backbone tiny-llava: weights missing in {TINY_LLAVA_DIR}; build them with `mmcl pretrain-tiny`")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ConfigError(f"backbone.dtype: unknown dtype {dtype!r}")
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MmclError(f"backbone {name}: cannot load from {source!r} ({first_line})") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return Backbone(name=name, model=model, processor=processor, lora_targets=lora_targets, max_length=max_length)
