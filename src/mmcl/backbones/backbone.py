"""A loaded vision-language model with its processor: chat formatting, training encodings with
assistant-only labels, and batched greedy generation with left padding."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mmcl.data.images import sample_images
from mmcl.data.sample import IMAGE_PLACEHOLDER, Sample
from mmcl.errors import DataError

IGNORE_INDEX = -100

# Evaluation decoding, as ``transformers.GenerationConfig`` keyword arguments (plus ``max_new_tokens``, see
# :func:`decoding_settings`). Nothing else comes from the checkpoint's own ``generation_config`` (hub
# checkpoints ship sampling, repetition penalties, n-gram bans...): only its eos/bos ids and the tokenizer's
# pad id are added, and every setting left out here is transformers' neutral default.
GREEDY_DECODING: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "length_penalty": 1.0,
    "min_new_tokens": 0,
    "use_cache": True,
}


def decoding_settings(max_new_tokens: int) -> dict[str, Any]:
    """The decoding of one evaluation call as a plain dict (JSON-ready, e.g. for results.json)."""
    return {**GREEDY_DECODING, "max_new_tokens": int(max_new_tokens)}


def _hf_model(model):
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


@contextmanager
def only_generation_config(model, config):
    """Make ``config`` the model's own generation config while generating.

    ``generate`` fills every setting its ``generation_config`` argument leaves unset (None) from
    ``model.generation_config``, i.e. from the checkpoint's generation_config.json; swapping the model's
    config for ``config`` itself leaves nothing to inherit. PEFT wrappers read the attribute of the wrapped
    model, which is where it is swapped."""
    hf_model = _hf_model(model)
    saved = hf_model.generation_config
    hf_model.generation_config = config
    try:
        yield config
    finally:
        hf_model.generation_config = saved


def build_messages(sample: Sample, include_final_answer: bool) -> list[dict[str, Any]]:
    """Chat messages in the transformers multimodal format. ``<image>`` placeholders in the user text
    become image items in place; if no turn has a placeholder, all images go before the first text."""
    turns = sample.turns()
    placeholders = sum(user.count(IMAGE_PLACEHOLDER) for user, _ in turns)
    if placeholders not in (0, len(sample.images)):
        raise DataError(
            f"task {sample.task}: sample {sample.id}: {placeholders} '<image>' placeholders for {len(sample.images)} images"
        )
    messages: list[dict[str, Any]] = []
    for index, (user, assistant) in enumerate(turns):
        content: list[dict[str, str]] = []
        if placeholders == 0 and index == 0:
            content.extend({"type": "image"} for _ in sample.images)
        for position, piece in enumerate(user.split(IMAGE_PLACEHOLDER)):
            if position > 0:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": "user", "content": content})
        if index < len(turns) - 1 or include_final_answer:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    return messages


def image_count(messages: Sequence[dict[str, Any]]) -> int:
    """How many images ``messages`` (as built by :func:`build_messages`) refer to."""
    return sum(
        1
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part.get("type") == "image"
    )


def _is_token_aligned(value: torch.Tensor, input_ids: torch.Tensor) -> bool:
    """A (1, sequence length) integer or boolean tensor: one value per token of the single encoded row."""
    return (
        value.dim() == 2
        and tuple(value.shape) == (1, input_ids.shape[0])
        and not torch.is_floating_point(value)
    )


def _concat_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along dim 0 after zero-padding every later dim to the largest size in the batch."""
    sizes = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for tensor in tensors:
        pads: list[int] = []
        for dim in reversed(range(1, tensor.dim())):
            pads += [0, sizes[dim - 1] - tensor.shape[dim]]
        padded.append(torch.nn.functional.pad(tensor, pads) if any(pads) else tensor)
    return torch.cat(padded, dim=0)


@dataclass
class Backbone:
    """``model`` is the HF model (possibly wrapped by PEFT); ``processor`` its multimodal processor."""

    name: str
    model: Any
    processor: Any
    lora_targets: str
    max_length: int = 512
    # processed prompt batches kept across evaluations (mmcl.evaluation.input_cache.InputCache); None = off
    input_cache: Any = field(default=None, repr=False, compare=False)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _tokenize(self, text: str, images: list) -> dict[str, torch.Tensor]:
        return self.processor(text=[text], images=images or None, return_tensors="pt")

    def encode_for_training(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Token ids of the whole conversation with labels on assistant tokens only (``-100`` elsewhere).

        The boundary of each assistant turn is found by rendering the conversation up to that turn
        with and without the answer; this works for any chat template whose renderings are prefixes
        of each other, which the check below enforces."""
        images = sample_images(sample)
        messages = build_messages(sample, include_final_answer=True)
        full_text = self._render(messages, generation_prompt=False)
        encoded = self._tokenize(full_text, images)
        input_ids = encoded["input_ids"][0]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for turn_end in range(1, len(messages), 2):
            prompt_text = self._render(messages[:turn_end], generation_prompt=True)
            answer_text = self._render(messages[: turn_end + 1], generation_prompt=False)
            if not full_text.startswith(prompt_text) or not full_text.startswith(answer_text):
                raise DataError(f"backbone {self.name}: chat template renderings are not prefixes of each other")
            # a prefix is tokenized with the images it refers to (earlier turns may have none of them)
            prefix_images = images[: image_count(messages[:turn_end])]
            start = self._tokenize(prompt_text, prefix_images)["input_ids"].shape[1]
            is_last = turn_end + 1 == len(messages)
            end = input_ids.shape[0] if is_last else self._tokenize(answer_text, prefix_images)["input_ids"].shape[1]
            labels[start:end] = input_ids[start:end]
        # per-token tensors (attention_mask, mm_token_type_ids, ...) lose their batch dimension like input_ids
        features = {key: value[0] if _is_token_aligned(value, input_ids) else value for key, value in encoded.items()}
        features["labels"] = labels
        if input_ids.shape[0] > self.max_length:
            raise DataError(
                f"task {sample.task}: sample {sample.id}: {input_ids.shape[0]} tokens exceed max_length {self.max_length}"
            )
        return features

    def collate(self, features: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad per-token tensors (``input_ids``, ``labels``, ``attention_mask``, ``mm_token_type_ids``...);
        concatenate every other tensor the processor returned (``pixel_values``, ``image_grid_thw``,
        ``pixel_attention_mask``...) along dim 0, zero-padding trailing dims that differ (Idefics3 pads
        missing image tiles with zeros, which the model drops).

        The keys are those of every feature, not only the first: a text-only sample has no image tensors,
        so its absence adds nothing to an image key, and a per-token key it lacks is filled for its row."""
        fills = {"input_ids": self.tokenizer.pad_token_id, "labels": IGNORE_INDEX}
        width = max(f["input_ids"].shape[0] for f in features)
        keys = list(dict.fromkeys(key for feature in features for key in feature))
        batch: dict[str, torch.Tensor] = {}
        for key in keys:
            present = [f[key] for f in features if key in f]
            if present[0].dim() == 1:
                fill = fills.get(key, 0)
                rows = [f[key] if key in f else torch.full_like(f["input_ids"], fill, dtype=present[0].dtype)
                        for f in features]
                batch[key] = torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[0]), value=fill)
                                          for t in rows])
            else:
                batch[key] = _concat_padded(present)
        return batch

    def prompt_length(self, sample: Sample) -> tuple[int, int]:
        """(images, text tokens) of the sample's generation prompt: the order key of sorted evaluation."""
        messages = build_messages(sample, include_final_answer=False)
        text = self._render(messages, generation_prompt=True)
        return image_count(messages), len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_batch(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Left-padded prompts (generation prompt appended) with their images, on the model's device; taken
        from :attr:`input_cache` when the same texts and image files were processed before."""
        texts, image_files, image_counts = [], [], []
        for sample in samples:
            messages = build_messages(sample, include_final_answer=False)
            texts.append(self._render(messages, generation_prompt=True))
            image_counts.append(image_count(messages))
            image_files.extend(str(path) for path in sample.images[: image_counts[-1]])
        key = (tuple(texts), tuple(image_files))
        cached = self.input_cache.get(key) if self.input_cache is not None else None
        if cached is not None:
            from transformers import BatchFeature

            return BatchFeature(data=cached).to(self.device)
        images = [image for sample, count in zip(samples, image_counts) for image in sample_images(sample)[:count]]
        self.tokenizer.padding_side = "left"
        batch = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        if self.input_cache is not None:
            self.input_cache.put(key, batch)
        return batch.to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def special_token_ids(self) -> dict[str, Any]:
        """eos (one id or a list) and bos ids of the checkpoint's generation config, else the tokenizer's;
        the tokenizer's pad id (left padding of the prompts)."""
        own = getattr(_hf_model(self.model), "generation_config", None)
        ids: dict[str, Any] = {}
        for key in ("eos_token_id", "bos_token_id"):
            value = getattr(own, key, None)
            ids[key] = value if value is not None else getattr(self.tokenizer, key, None)
        pad = self.tokenizer.pad_token_id
        ids["pad_token_id"] = pad if pad is not None else getattr(own, "pad_token_id", None)
        return ids

    @staticmethod
    def decoding_settings(max_new_tokens: int) -> dict[str, Any]:
        """:func:`decoding_settings`: what :meth:`generate` decodes with, as a plain dict."""
        return decoding_settings(max_new_tokens)

    def generation_config(self, max_new_tokens: int):
        """The explicit ``GenerationConfig`` of :meth:`generate`: :func:`decoding_settings` plus the special ids."""
        from transformers import GenerationConfig

        return GenerationConfig(**decoding_settings(max_new_tokens), **self.special_token_ids())

    @torch.inference_mode()
    def generate(self, samples: Sequence[Sample], max_new_tokens: int) -> list[str]:
        """Greedy answers for one batch of samples (KV cache on, left padding), decoded exactly as
        :func:`decoding_settings` states whatever the checkpoint's generation_config.json holds."""
        batch = self.prompt_batch(samples)
        was_training = self.model.training
        self.model.eval()
        config = self.generation_config(max_new_tokens)
        try:
            with only_generation_config(self.model, config):
                output = self.model.generate(**batch, generation_config=config)
        finally:
            self.model.train(was_training)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
