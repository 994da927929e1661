"""Loading a checkpoint's processor, with an image-only stand-in for Qwen2-VL / Qwen2.5-VL processors when
torchvision is not installed.

transformers 5 builds the Qwen-VL processors with a video processor that needs torchvision, even for
image-only use (huggingface/transformers#48558). mmcl only feeds images, so without torchvision it builds the
same processor minus the video part: identical image processor, tokenizer, image-token expansion and chat
template, hence identical model inputs.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from transformers import ProcessorMixin
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from mmcl.errors import MmclError

QWEN_VL_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without ``video_processor``: the attributes come from this ``__init__``'s signature."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def qwen_vl_processor(image_processor, tokenizer, chat_template: str):
    """The real Qwen2-VL processor when torchvision is installed (its video processor with default settings),
    else :class:`ImageOnlyQwen2VLProcessor`."""
    if torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        return Qwen2VLProcessor(image_processor, tokenizer, Qwen2VLVideoProcessor(), chat_template=chat_template)
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=chat_template)


def processor_class_name(source: str) -> str | None:
    """``processor_class`` recorded by a checkpoint (local dir or hub id), or None when it records none."""
    import json

    from transformers.utils import cached_file

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            path = None
        if path:
            with open(path, encoding="utf-8") as handle:
                found = json.load(handle).get("processor_class")
            if found:
                return found
    return None


def load_processor(source: str, options: dict[str, Any] | None = None):
    """``AutoProcessor.from_pretrained(source, **options)``, or the image-only Qwen-VL processor where that
    one needs torchvision and torchvision is missing."""
    from transformers import AutoProcessor

    options = dict(options or {})
    if torchvision_available():
        return AutoProcessor.from_pretrained(source, **options)
    if processor_class_name(source) in QWEN_VL_PROCESSORS:
        return ImageOnlyQwen2VLProcessor.from_pretrained(source, **options)
    try:
        return AutoProcessor.from_pretrained(source, **options)
    except (ImportError, AttributeError, TypeError) as exc:  # a video processor that needs torchvision
        raise MmclError(
            f"backbone {source}: its processor cannot be built without torchvision ({type(exc).__name__}); "
            "pip install torchvision"
        ) from None
