"""Tiny local models of the hub backbones' architectures, built from config (nothing is downloaded):
``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``, ``Idefics3ForConditionalGeneration`` (SmolVLM) and
``InternVLForConditionalGeneration`` (InternVL3-hf), each with a processor of the real class and a chat
template that renders the roles and image tokens the real processor's template renders.

They exist so that tests (and anyone without a GPU) can run the exact loading, chat formatting, training and
generation path of the hub presets; their weights are random. The tokenizer is a byte-level BPE trained
locally with :func:`mmcl.backbones.tiny.train_tokenizer` and given each family's special tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from mmcl.errors import ConfigError

TINY_ARCHITECTURES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "smolvlm", "internvl")


def chatml_template(image_markup: str, default_system: str | None = None) -> str:
    r"""ChatML (``<|im_start|>role\n ... <|im_end|>\n`` per turn, ``<|im_start|>assistant\n`` as the generation
    prompt) with ``image_markup`` in place of each image, and a system turn of ``default_system`` before a
    conversation that opens without one (none when it is None)."""
    default = (
        "{% if loop.first and message['role'] != 'system' %}"
        f"<|im_start|>system\n{default_system}<|im_end|>\n{{% endif %}}"
        if default_system is not None
        else ""
    )
    return (
        "{% for message in messages %}"
        f"{default}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{image_markup}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


QWEN_IMAGE_MARKUP = "<|vision_start|><|image_pad|><|vision_end|>"
# ChatML as Qwen2-VL / Qwen2.5-VL render it: a default system turn, an image as
# <|vision_start|><|image_pad|><|vision_end|> in place, every turn closed by <|im_end|>.
QWEN_CHAT_TEMPLATE = chatml_template(QWEN_IMAGE_MARKUP, "You are a helpful assistant.")
# Qwen3-VL (Instruct): the same ChatML and image markup, but no default system turn (a system turn is
# rendered only when the conversation has one).
QWEN3_CHAT_TEMPLATE = chatml_template(QWEN_IMAGE_MARKUP)
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

# InternVL3-hf: ChatML without a default system turn; the template writes "<IMG_CONTEXT>\n" per image and the
# processor expands each <IMG_CONTEXT> into <img>, image_seq_length <IMG_CONTEXT> per tile, </img>.
INTERNVL_CHAT_TEMPLATE = chatml_template("<IMG_CONTEXT>\n")
# the tokenizer attributes InternVLProcessor reads (transformers' conversion script sets the same four)
INTERNVL_IMAGE_TOKENS = {
    "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}  # fmt: skip
INTERNVL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_IMAGE_TOKENS.values()]

# SmolVLM (Idefics3): "<|im_start|>User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n";
# the role is followed by ":" alone when the turn opens with an image, else by ": ".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
SMOLVLM_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>",
    *[f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)],
]  # fmt: skip


@dataclass(frozen=True)
class TinyArchSpec:
    """Sizes shared by the tiny architectures (a few hundred thousand parameters each)."""

    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    text_intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 56  # Qwen: one 56x56 image = 4x4 patches of 14 px = 4 tokens after the 2x2 merge
    qwen3_image_size: int = 64  # Qwen3-VL: 16-px patches, so 64x64 = 4x4 patches = 4 tokens after the merge
    idefics_tile: int = 32  # Idefics3: tiles of 32 px, 8-px patches, pixel shuffle 2 = 4 tokens per tile
    internvl_tile: int = 32  # InternVL: tiles of 32 px, 8-px patches, pixel shuffle 0.5 = 4 tokens per tile
    internvl_max_tiles: int = 4  # a 48x48 image: a 2x2 grid of tiles plus the thumbnail = 20 tokens
    vocab_size: int = 512
    max_positions: int = 1024
    # real-size builds (benchmarks/scale_rehearsal.py) set these to a published checkpoint's values
    vision_mlp_ratio: int = 2  # vision MLP width / vision width (Qwen2-VL's mlp_ratio; SigLIP and CLIP use 4)
    idefics_patch: int = 8  # Idefics3 vision patch size (SmolVLM: 16)
    idefics_scale: int = 2  # Idefics3 pixel-shuffle factor (SmolVLM: 4)
    model_vocab: int | None = None  # rows of the embedding matrix; None = the tokenizer's length
    tie_embeddings: bool = False  # Qwen2-VL: input and output embeddings shared (Qwen2-VL-2B: true)
    llava_patch: int = 14  # LLaVA-1.5's CLIP ViT-L/14 (the tower sees ``image_size`` pixels)

    def vocabulary(self, tokenizer) -> int:
        return self.model_vocab or len(tokenizer)


def default_corpus() -> list[str]:
    """Questions and answers of the synthetic generators, so that their text tokenises compactly."""
    from mmcl.streams.synth import SYNTH_DOMAIN_TASKS, domain_examples

    corpus = ["You are a helpful assistant.", "system\n", "user\n", "assistant\n", "User:", "Assistant:"]
    for spec in SYNTH_DOMAIN_TASKS:
        for example in domain_examples(spec.name, 8, seed=0, split="train", image_size=32):
            corpus += [example.question, example.answer]
    return corpus + list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _family_tokenizer(corpus: Iterable[str], vocab_size: int, special_tokens: list[str], **roles):
    """The locally trained BPE of :mod:`mmcl.backbones.tiny`, re-wrapped with one family's special tokens
    (``roles``: pad/eos/bos tokens, and ``extra_special_tokens``, named tokens a processor reads)."""
    from transformers import PreTrainedTokenizerFast

    from mmcl.backbones.tiny import train_tokenizer

    trained = train_tokenizer(corpus, vocab_size)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trained.backend_tokenizer, padding_side="left", **roles)
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    return tokenizer


def _qwen_processor(tokenizer, spec: TinyArchSpec, chat_template: str):
    """A Qwen2-VL processor (image part only when torchvision, which its video processor needs, is absent)."""
    from transformers import Qwen2VLImageProcessorPil

    from mmcl.backbones.processors import qwen_vl_processor

    pixels = spec.image_size * spec.image_size
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels // 4, "longest_edge": pixels})
    return qwen_vl_processor(image_processor, tokenizer, chat_template)


def _qwen3_processor(tokenizer, spec: TinyArchSpec):
    """A Qwen3-VL processor: Qwen2-VL's image processor with 16-px patches and the mean/std of 0.5 of the
    hub checkpoints (image part only when torchvision is absent)."""
    from transformers import Qwen2VLImageProcessorPil

    from mmcl.backbones.processors import processor_for_images

    pixels = spec.qwen3_image_size * spec.qwen3_image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels // 4, "longest_edge": pixels},
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return processor_for_images("Qwen3VLProcessor", image_processor, tokenizer, QWEN3_CHAT_TEMPLATE)


def _qwen_token_ids(tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _qwen_text_config(tokenizer, spec: TinyArchSpec) -> dict:
    # M-RoPE splits the head_dim/2 rotary frequencies into (time, height, width) sections, 1/4 : 3/8 : 3/8 as
    # in Qwen2-VL's [16, 24, 24]
    frequencies = spec.text_hidden // spec.text_heads // 2
    spatial = 3 * frequencies // 8
    return {
        "vocab_size": spec.vocabulary(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": spec.max_positions,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [frequencies - 2 * spatial, spatial, spatial],
        },
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }


def build_qwen2_vl(tokenizer, spec: TinyArchSpec):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = {
        "depth": spec.vision_layers,
        "embed_dim": spec.vision_hidden,
        "hidden_size": spec.text_hidden,  # the merger projects into the language model's width
        "num_heads": spec.vision_heads,
        "mlp_ratio": spec.vision_mlp_ratio,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer, spec), vision_config=vision, **_qwen_token_ids(tokenizer),
        tie_word_embeddings=spec.tie_embeddings,
    )
    return Qwen2VLForConditionalGeneration(config)


def build_qwen2_5_vl(tokenizer, spec: TinyArchSpec):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = {
        "depth": spec.vision_layers,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * spec.vision_mlp_ratio,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.text_hidden,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,  # windowed attention over 2x2 merged units; the last block attends fully
        "fullatt_block_indexes": [spec.vision_layers - 1],
    }
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer, spec), vision_config=vision, **_qwen_token_ids(tokenizer)
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_qwen3_vl(tokenizer, spec: TinyArchSpec):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    head_dim = spec.text_hidden // spec.text_heads
    # interleaved M-RoPE over head_dim/2 frequencies, split (time, height, width) 24 : 20 : 20 as the hub's
    # [24, 20, 20] of 64
    frequencies = head_dim // 2
    spatial = 5 * frequencies // 16
    text = {
        **_qwen_text_config(tokenizer, spec),
        "head_dim": head_dim,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [frequencies - 2 * spatial, spatial, spatial],
            "mrope_interleaved": True,
        },
    }
    grid = spec.qwen3_image_size // 16
    vision = {
        "depth": spec.vision_layers,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * spec.vision_mlp_ratio,
        "num_heads": spec.vision_heads,
        "out_hidden_size": spec.text_hidden,  # the mergers project into the language model's width
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": grid * grid,  # a learned grid of patch positions, resampled to each image
        # DeepStack: the first block's output, through its own merger, is added to the image tokens' hidden
        # states after the first decoder layer (the hub's 2B model taps 3 of its 24 blocks)
        "deepstack_visual_indexes": [0],
    }
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True, **_qwen_token_ids(tokenizer)
    )
    return Qwen3VLForConditionalGeneration(config)


def _llama_text_config(tokenizer, spec: TinyArchSpec) -> dict:
    """The Llama decoder of SmolVLM (SmolLM2) and LLaVA-1.5 (Vicuna)."""
    return {
        "model_type": "llama",
        "vocab_size": spec.vocabulary(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": spec.max_positions,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _vit_sizes(spec: TinyArchSpec) -> dict:
    """Width, MLP width, depth and heads of a vision tower under the common ViT config names (SigLIP of
    SmolVLM, InternViT, CLIP of LLaVA)."""
    return {
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * spec.vision_mlp_ratio,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
    }


def build_idefics3(tokenizer, spec: TinyArchSpec):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    vision = {
        **_vit_sizes(spec),
        "image_size": spec.idefics_tile,
        "patch_size": spec.idefics_patch,
    }
    config = Idefics3Config(
        vision_config=vision,
        text_config=_llama_text_config(tokenizer, spec),
        scale_factor=spec.idefics_scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    return Idefics3ForConditionalGeneration(config)


def _idefics3_processor(tokenizer, spec: TinyArchSpec):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True,
        size={"longest_edge": 2 * spec.idefics_tile},  # a 2x2 grid of tiles plus the global view
        max_image_size={"longest_edge": spec.idefics_tile},
    )
    tokens_per_tile = (spec.idefics_tile // spec.idefics_patch) ** 2 // spec.idefics_scale**2
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=tokens_per_tile,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )


def build_internvl(tokenizer, spec: TinyArchSpec):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    vision = {
        **_vit_sizes(spec),
        "attention_bias": True,  # InternViT's qkv bias
        "image_size": spec.internvl_tile,
        "patch_size": 8,
    }
    text = {
        "model_type": "qwen2",  # InternVL3-1B's language model is a Qwen2.5
        "vocab_size": spec.vocabulary(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": spec.max_positions,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=_internvl_tokens_per_tile(spec),
        downsample_ratio=0.5,
    )
    return InternVLForConditionalGeneration(config)


# LLaVA-1.5's conversation format: "USER: <image>\n{question} ASSISTANT: {answer}</s>"
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_llava(tokenizer, spec: TinyArchSpec):
    """LLaVA-1.5: CLIP tower, 2-layer GELU projector, Llama decoder with untied embeddings, features from
    the tower's second-to-last layer (llava-hf's config)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = {
        "model_type": "clip_vision_model",
        **_vit_sizes(spec),
        "image_size": spec.image_size,
        "patch_size": spec.llava_patch,
        "projection_dim": 768,
    }
    config = LlavaConfig(
        vision_config=vision,
        text_config={**_llama_text_config(tokenizer, spec), "tie_word_embeddings": False},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(spec.image_size // spec.llava_patch) ** 2,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration(config)


def _llava_processor(tokenizer, spec: TinyArchSpec):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.llava_patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip


def _internvl_tokens_per_tile(spec: TinyArchSpec) -> int:
    return (spec.internvl_tile // 8) ** 2 // 4  # 8-px patches, then pixel shuffle by 0.5 in each direction


def _internvl_processor(tokenizer, spec: TinyArchSpec):
    """An InternVL processor: GOT-OCR2's image processor cutting an image into up to ``internvl_max_tiles``
    tiles plus a thumbnail, ImageNet mean/std as the hub checkpoints (image part only without torchvision)."""
    from transformers import GotOcr2ImageProcessorPil

    from mmcl.backbones.processors import processor_for_images

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": spec.internvl_tile, "width": spec.internvl_tile},
        max_patches=spec.internvl_max_tiles,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return processor_for_images(
        "InternVLProcessor", image_processor, tokenizer, INTERNVL_CHAT_TEMPLATE,
        image_seq_length=_internvl_tokens_per_tile(spec),
    )  # fmt: skip


def family_parts(architecture: str, corpus: Iterable[str] | None = None, spec: TinyArchSpec = TinyArchSpec()):
    """``(tokenizer, processor, build, processor_class)`` of ``architecture``: ``build(tokenizer, spec)``
    creates the model on the current default device and dtype (e.g. under ``torch.device("meta")``)."""
    corpus = list(corpus) if corpus is not None else default_corpus()
    if architecture in ("qwen2-vl", "qwen2.5-vl"):
        tokenizer = _family_tokenizer(
            corpus, spec.vocab_size, QWEN_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>"
        )
        processor = _qwen_processor(tokenizer, spec, QWEN_CHAT_TEMPLATE)
        build = build_qwen2_vl if architecture == "qwen2-vl" else build_qwen2_5_vl
        processor_class = "Qwen2VLProcessor" if architecture == "qwen2-vl" else "Qwen2_5_VLProcessor"
    elif architecture == "qwen3-vl":
        tokenizer = _family_tokenizer(
            corpus, spec.vocab_size, QWEN_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>"
        )
        processor = _qwen3_processor(tokenizer, spec)
        build, processor_class = build_qwen3_vl, "Qwen3VLProcessor"
    elif architecture == "internvl":
        tokenizer = _family_tokenizer(
            corpus, spec.vocab_size, INTERNVL_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>",
            extra_special_tokens=INTERNVL_IMAGE_TOKENS,
        )  # fmt: skip
        processor = _internvl_processor(tokenizer, spec)
        build, processor_class = build_internvl, "InternVLProcessor"
    elif architecture == "smolvlm":
        tokenizer = _family_tokenizer(
            corpus,
            spec.vocab_size,
            SMOLVLM_SPECIAL_TOKENS,
            bos_token="<|im_start|>",
            eos_token="<end_of_utterance>",
            pad_token="<|im_end|>",
        )
        processor = _idefics3_processor(tokenizer, spec)
        build, processor_class = build_idefics3, None
    elif architecture == "llava":  # real-size LLaVA-1.5 for the scale rehearsal; tests use mmcl.backbones.tiny
        tokenizer = _family_tokenizer(
            corpus, spec.vocab_size, ["<s>", "</s>", "<pad>", "<image>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>",
            extra_special_tokens={"image_token": "<image>"},
        )  # fmt: skip
        processor = _llava_processor(tokenizer, spec)
        build, processor_class = build_llava, None
    else:
        raise ConfigError(f"unknown tiny architecture {architecture!r} (known: {', '.join(TINY_ARCHITECTURES)})")
    tokenizer.chat_template = processor.chat_template
    return tokenizer, processor, build, processor_class


def build_tiny_arch(
    architecture: str,
    out_dir: Path,
    corpus: Iterable[str] | None = None,
    spec: TinyArchSpec = TinyArchSpec(),
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
) -> Path:
    """Build the tiny model + processor of ``architecture`` (one of :data:`TINY_ARCHITECTURES`) and save
    both with ``save_pretrained`` into ``out_dir``, loadable like a hub checkpoint; returns ``out_dir``.
    The weights are created in ``dtype`` on ``device`` (a real-size ``spec`` never makes an fp32 copy)."""
    import torch

    tokenizer, processor, build, processor_class = family_parts(architecture, corpus, spec)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = build(tokenizer, spec)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    if processor_class is not None:
        _name_processor_class(out_dir, processor_class)
    return out_dir


def _name_processor_class(out_dir: Path, processor_class: str) -> None:
    """Record the hub's processor class, as the real checkpoints do (the image-only stand-in used when
    torchvision is missing saves its own name otherwise)."""
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = out_dir / name
        if path.is_file():
            content = json.loads(path.read_text(encoding="utf-8"))
            if "processor_class" in content:
                content["processor_class"] = processor_class
                path.write_text(json.dumps(content, indent=2), encoding="utf-8")
