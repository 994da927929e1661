"""Tiny local models of the hub backbones' architectures, built from config (nothing is downloaded):
``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` and
``Idefics3ForConditionalGeneration`` (SmolVLM), each with a processor of the real class and a chat template
that renders the roles and image tokens the real processor's template renders.

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

TINY_ARCHITECTURES = ("qwen2-vl", "qwen2.5-vl", "smolvlm")

# ChatML as Qwen2-VL / Qwen2.5-VL render it: a default system turn, an image as
# <|vision_start|><|image_pad|><|vision_end|> in place, every turn closed by <|im_end|>.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

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
    idefics_tile: int = 32  # Idefics3: tiles of 32 px, 8-px patches, pixel shuffle 2 = 4 tokens per tile
    vocab_size: int = 512
    max_positions: int = 1024


def default_corpus() -> list[str]:
    """Questions and answers of the synthetic generators, so that their text tokenises compactly."""
    from mmcl.streams.synth import SYNTH_DOMAIN_TASKS, domain_examples

    corpus = ["You are a helpful assistant.", "system\n", "user\n", "assistant\n", "User:", "Assistant:"]
    for spec in SYNTH_DOMAIN_TASKS:
        for example in domain_examples(spec.name, 8, seed=0, split="train", image_size=32):
            corpus += [example.question, example.answer]
    return corpus + list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _family_tokenizer(corpus: Iterable[str], vocab_size: int, special_tokens: list[str], **roles: str):
    """The locally trained BPE of :mod:`mmcl.backbones.tiny`, re-wrapped with one family's special tokens."""
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
        "vocab_size": len(tokenizer),
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
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer, spec), vision_config=vision, **_qwen_token_ids(tokenizer)
    )
    return Qwen2VLForConditionalGeneration(config)


def build_qwen2_5_vl(tokenizer, spec: TinyArchSpec):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = {
        "depth": spec.vision_layers,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * 2,
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


def build_idefics3(tokenizer, spec: TinyArchSpec):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    vision = {
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * 2,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "image_size": spec.idefics_tile,
        "patch_size": 8,
    }
    text = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
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
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=2,
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
    tokens_per_tile = (spec.idefics_tile // 8) ** 2 // 4
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=tokens_per_tile,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )


def build_tiny_arch(
    architecture: str,
    out_dir: Path,
    corpus: Iterable[str] | None = None,
    spec: TinyArchSpec = TinyArchSpec(),
    seed: int = 0,
) -> Path:
    """Build the tiny model + processor of ``architecture`` (one of :data:`TINY_ARCHITECTURES`) and save
    both with ``save_pretrained`` into ``out_dir``, loadable like a hub checkpoint; returns ``out_dir``."""
    import torch

    corpus = list(corpus) if corpus is not None else default_corpus()
    if architecture in ("qwen2-vl", "qwen2.5-vl"):
        tokenizer = _family_tokenizer(
            corpus, spec.vocab_size, QWEN_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>"
        )
        processor = _qwen_processor(tokenizer, spec, QWEN_CHAT_TEMPLATE)
        build = build_qwen2_vl if architecture == "qwen2-vl" else build_qwen2_5_vl
        processor_class = "Qwen2VLProcessor" if architecture == "qwen2-vl" else "Qwen2_5_VLProcessor"
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
    else:
        raise ConfigError(f"unknown tiny architecture {architecture!r} (known: {', '.join(TINY_ARCHITECTURES)})")
    tokenizer.chat_template = processor.chat_template
    torch.manual_seed(seed)
    model = build(tokenizer, spec)
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
