"""Loading a checkpoint's processor, with an image-only stand-in for the Qwen2-VL / Qwen2.5-VL / Qwen3-VL and
InternVL processors when torchvision is not installed.

transformers 5 builds these processors with a video processor that needs torchvision, even for image-only
use (huggingface/transformers#48558). mmcl only feeds images, so without torchvision it builds the same
processor minus the video part: identical image processor, tokenizer, image-token expansion and chat
template, hence identical model inputs.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from transformers import ProcessorMixin
from transformers.models.internvl.processing_internvl import InternVLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from mmcl.errors import MmclError


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


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without ``video_processor``. Its own ``__init__`` runs with no video processor;
    the attributes ``ProcessorMixin`` keeps (and saves, and loads) come from this signature."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """``InternVLProcessor`` without ``video_processor`` (same image-token expansion, ``image_seq_length``
    context tokens per tile between ``<img>`` and ``</img>``)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):  # fmt: skip
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)  # fmt: skip


# processor class a checkpoint records -> (its image-only stand-in, the video processor of the real class)
IMAGE_ONLY_PROCESSORS: dict[str, tuple[type[ProcessorMixin], str]] = {
    "Qwen2VLProcessor": (ImageOnlyQwen2VLProcessor, "Qwen2VLVideoProcessor"),
    "Qwen2_5_VLProcessor": (ImageOnlyQwen2VLProcessor, "Qwen2VLVideoProcessor"),
    "Qwen3VLProcessor": (ImageOnlyQwen3VLProcessor, "Qwen3VLVideoProcessor"),
    "InternVLProcessor": (ImageOnlyInternVLProcessor, "InternVLVideoProcessor"),
}


def processor_for_images(processor_class: str, image_processor, tokenizer, chat_template: str, **options):
    """A new processor of the hub class ``processor_class`` (a key of :data:`IMAGE_ONLY_PROCESSORS`): the real
    class when torchvision is installed (its video processor with default settings), else its image-only
    stand-in. ``options`` are further ``__init__`` arguments (InternVL's ``image_seq_length``)."""
    stand_in, video_class = IMAGE_ONLY_PROCESSORS[processor_class]
    if torchvision_available():
        import transformers

        video_processor = getattr(transformers, video_class)()
        return getattr(transformers, processor_class)(
            image_processor, tokenizer, video_processor, chat_template=chat_template, **options
        )
    return stand_in(image_processor, tokenizer, chat_template=chat_template, **options)


def qwen_vl_processor(image_processor, tokenizer, chat_template: str):
    """The real Qwen2-VL processor when torchvision is installed (its video processor with default settings),
    else :class:`ImageOnlyQwen2VLProcessor`."""
    return processor_for_images("Qwen2VLProcessor", image_processor, tokenizer, chat_template)


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
    """``AutoProcessor.from_pretrained(source, **options)``, or the image-only stand-in of a Qwen-VL or
    InternVL processor (:data:`IMAGE_ONLY_PROCESSORS`) where that one needs torchvision and torchvision is
    missing."""
    from transformers import AutoProcessor

    options = dict(options or {})
    if torchvision_available():
        return AutoProcessor.from_pretrained(source, **options)
    recorded = processor_class_name(source)
    if recorded in IMAGE_ONLY_PROCESSORS:
        return IMAGE_ONLY_PROCESSORS[recorded][0].from_pretrained(source, **options)
    try:
        return AutoProcessor.from_pretrained(source, **options)
    except (ImportError, AttributeError, TypeError) as exc:  # a video processor that needs torchvision
        raise MmclError(
            f"backbone {source}: its processor cannot be built without torchvision ({type(exc).__name__}); "
            "pip install torchvision"
        ) from None
