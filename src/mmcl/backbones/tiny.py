"""Build the ``tiny-llava`` architecture from scratch: a real ``LlavaForConditionalGeneration`` with a small
CLIP vision tower and a small Llama language model, plus a byte-level BPE tokenizer trained locally.

Nothing here downloads anything. The weights that ship with mmcl are produced from this architecture by
``mmcl pretrain-tiny`` (see :mod:`mmcl.backbones.pretrain`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

# Chat format of the tiny model: one user turn, then one assistant turn that ends with <|end|>.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>\n{% else %}<|assistant|>\n{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}<|end|>{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<unk>", "<image>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of the tiny architecture; the defaults give about 3.5M parameters (14 MB in float32)."""

    image_size: int = 48
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 512
    vocab_size: int = 2048
    max_positions: int = 512


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on ``corpus`` (deterministic), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return _as_fast_tokenizer(tokenizer)


def _as_fast_tokenizer(tokenizer_object):
    """A ``tokenizers.Tokenizer`` with the tiny models' special tokens and chat template, as a transformers
    fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=TINY_CHAT_TEMPLATE,
        padding_side="left",
    )


def build_processor(tokenizer, spec: TinyLlavaSpec):
    """A real ``LlavaProcessor`` around a CLIP image processor sized for the tiny tower."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TINY_CHAT_TEMPLATE,
    )


def build_model(tokenizer, spec: TinyLlavaSpec, seed: int = 0):
    """A randomly initialised tiny ``LlavaForConditionalGeneration`` matching ``tokenizer``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def add_whole_words(tokenizer, words: Iterable[str]):
    """A copy of the tiny models' byte-level BPE ``tokenizer`` in which each of ``words`` (pre-tokens as the tokenizer splits
    text, e.g. ``"Ġletter"`` for " letter") is one token: merges that join its present pieces left to right are
    appended after the existing ones, so they act only once the old merges are done (another word that holds
    such a pair of pieces changes too). New ids follow the last id; returns the new tokenizer and, per new id
    (each word and the prefixes on the way), the ids of the old pieces it joins."""
    import json

    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    next_id = 1 + max([*vocab.values(), *(token["id"] for token in state["added_tokens"])])
    pieces_of: dict[int, list[int]] = {}
    bpe = tokenizer.backend_tokenizer.model
    for word in words:
        pieces = [token.value for token in bpe.tokenize(word)]
        joined = pieces[0]
        for count, piece in enumerate(pieces[1:], start=2):
            left, joined = joined, joined + piece
            if joined not in vocab:
                vocab[joined] = next_id
                merges.append([left, piece])
                pieces_of[next_id] = [vocab[part] for part in pieces[:count]]
                next_id += 1
    return _as_fast_tokenizer(Tokenizer.from_str(json.dumps(state))), pieces_of
