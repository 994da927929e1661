"""Sampled completions ("rollouts") of a backbone and their per-token log-probabilities.

# API stable

Shared by the reward-learning trainers (GRPO, EvoLMM). The prompt is encoded exactly as
:meth:`Backbone.prompt_batch` encodes it for generation (chat template with the generation prompt,
left padding), and :func:`completion_logprobs` scores prompt + completion in one forward pass with the
positions ``generate`` gives them, so that the log-probabilities are those of what was sampled. Plain
RoPE models (LLaVA, Idefics3) get explicit position ids (cumulative attention mask, which skips the
left padding). M-RoPE models (Qwen2-VL, Qwen2.5-VL: any model with a ``get_rope_index``) are left to
build their own 3-D (time, height, width) positions from the image grids when the batch holds images,
and get the cumulative positions (the same in all three sections) when it holds none. Per-token
inputs the processor returns over the prompt (``mm_token_type_ids``, ``token_type_ids``) are extended
over the completion as ``generate`` extends them (text type 0; the prompt's last value). Sampling is
pure ancestral sampling at ``temperature`` (``top_k`` disabled, nucleus
``top_p``); log-probabilities divide the logits by the same temperature (as TRL's GRPO does). Image
placeholder tokens are excluded from both (:func:`placeholder_token_ids`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mmcl.backbones.backbone import Backbone, decoding_settings, only_generation_config
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError


@dataclass(frozen=True)
class Rollout:
    sample: Sample  # the prompt sample; its answer is never used for sampling
    completion_ids: torch.Tensor  # 1-D LongTensor: generated ids after the prompt (EOS included if emitted)
    text: str  # decoded completion, special tokens skipped, stripped


def eos_token_ids(backbone: Backbone) -> set[int]:
    """The ids that end a completion (the generation config's EOS, else the tokenizer's)."""
    eos = getattr(backbone.model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = backbone.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({int(eos)} if eos is not None else set())


def placeholder_token_ids(backbone: Backbone) -> list[int]:
    """Ids of the image/video placeholder tokens the processor expands into visual features. They are
    never sampled (a completion holding one could not be re-encoded) and are left out of the
    distribution when scoring, so sampling and scoring use the same renormalised distribution."""
    config = getattr(backbone.model, "config", None)
    found = {
        value
        for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
        if isinstance(value := getattr(config, name, None), int) and value >= 0
    }
    token = getattr(backbone.processor, "image_token", None)
    if isinstance(token, str):
        token_id = backbone.tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != backbone.tokenizer.unk_token_id:
            found.add(token_id)
    return sorted(found)


def sampling_config(
    backbone: Backbone, max_new_tokens: int, per_sample: int, temperature: float, top_p: float, suppressed: list[int]
):
    """The explicit ``GenerationConfig`` of rollouts: the evaluation's decoding settings (no repetition
    penalty, n-gram ban, length penalty or minimum length from a checkpoint's generation_config.json)
    switched to pure ancestral sampling at ``temperature`` with nucleus ``top_p`` and no top-k."""
    from transformers import GenerationConfig

    settings = {**decoding_settings(max_new_tokens), "do_sample": True, "num_return_sequences": per_sample}
    return GenerationConfig(
        **settings, temperature=temperature, top_p=top_p, top_k=0, suppress_tokens=suppressed or None,
        **backbone.special_token_ids(),
    )  # fmt: skip


def seeded_sampling_config(backbone: Backbone, max_new_tokens: int, suppressed: list[int]):
    """The ``GenerationConfig`` of :class:`SeededSampling`: the evaluation's greedy decoding (the sampling is
    in the logits processor) with the placeholder tokens suppressed."""
    from transformers import GenerationConfig

    return GenerationConfig(**decoding_settings(max_new_tokens), suppress_tokens=suppressed or None,
                            **backbone.special_token_ids())


def _cut_at_eos(ids: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """``ids`` up to and including the first EOS; ``generate`` pads finished rows after it."""
    for position, token in enumerate(ids.tolist()):
        if token in eos_ids:
            return ids[: position + 1]
    return ids


def prompt_seed(seed: int, step: int, position: int) -> int:
    """The random stream of the prompt at ``position`` of a step's global batch of prompts: the same on every
    process whichever shard holds the prompt (``step`` -1 and below: before the steps, e.g. filtering)."""
    return (seed * 1_000_003 + step) * 1_000_003 + position


def completion_seed(prompt_stream: int, index: int) -> int:
    """The seed of completion ``index`` of the prompt whose stream is ``prompt_stream`` (a 63-bit hash of both)."""
    digest = hashlib.sha256(f"rollout/{prompt_stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class SeededSampling(LogitsProcessor):
    """Sampling with one random stream per row, for ``generate`` in greedy mode: the logits are divided by
    ``temperature``, cut to the nucleus ``top_p``, and perturbed by Gumbel noise drawn from the row's own
    generator; the argmax of ``logits / T + Gumbel`` is a draw from ``softmax(logits / T)`` (the Gumbel-max
    trick), so each row's tokens depend on its seed alone, not on the rows it is batched with."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:  # keep the most likely tokens until their mass reaches top_p
            ordered, order = torch.sort(scores, descending=True, dim=-1)
            probabilities = torch.softmax(ordered, dim=-1)
            outside = probabilities.cumsum(dim=-1) - probabilities >= self.top_p
            scores = scores.masked_fill(torch.empty_like(outside).scatter_(-1, order, outside), float("-inf"))
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float32).tiny)))
        return scores + gumbel.to(scores.device)


def sample_rollouts(
    backbone: Backbone,
    samples: Sequence[Sample],
    per_sample: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int | None = None,
    prompt_seeds: Sequence[int] | None = None,
) -> list[list[Rollout]]:
    """``per_sample`` sampled completions for each sample (outer list follows ``samples``), under
    ``torch.no_grad`` with the model's currently active adapters; the model is put back in its
    previous train/eval mode. ``batch_size`` counts generated sequences per ``generate`` call (at
    least one prompt with all its ``per_sample`` completions). ``seed`` makes the draw reproducible
    (for the same ``batch_size``) without touching the global random state.

    ``prompt_seeds`` (one per sample) instead gives every completion its own random stream
    (:class:`SeededSampling`): a prompt's completions are then the same whichever prompts it is batched
    or sharded with (up to the float noise of padding), which multi-process training needs."""
    if per_sample < 1:
        raise ConfigError(f"rollouts: per_sample must be >= 1, got {per_sample}")
    if temperature <= 0:
        raise ConfigError(f"rollouts: temperature must be > 0 for sampling, got {temperature}")
    if prompt_seeds is not None and len(prompt_seeds) != len(samples):
        raise ValueError(f"rollouts: {len(prompt_seeds)} prompt seeds for {len(samples)} prompts")
    eos_ids = eos_token_ids(backbone)
    suppressed = placeholder_token_ids(backbone)
    prompts_per_call = max(1, batch_size // per_sample)
    if prompt_seeds is None:
        config = sampling_config(backbone, max_new_tokens, per_sample, temperature, top_p, suppressed)
    else:  # greedy over Gumbel-perturbed logits (SeededSampling), one row per completion
        config = seeded_sampling_config(backbone, max_new_tokens, suppressed)
    model = backbone.model
    was_training = model.training
    model.eval()
    results: list[list[Rollout]] = []
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(samples), prompts_per_call):
                chunk = list(samples[start : start + prompts_per_call])
                extra = {}
                if prompt_seeds is None:
                    batch = backbone.prompt_batch(chunk)
                else:
                    batch = backbone.prompt_batch([sample for sample in chunk for _ in range(per_sample)])
                    seeds = [completion_seed(stream, j) for stream in prompt_seeds[start : start + len(chunk)]
                             for j in range(per_sample)]  # fmt: skip
                    extra["logits_processor"] = LogitsProcessorList([SeededSampling(seeds, temperature, top_p)])
                with only_generation_config(model, config):
                    output = model.generate(**batch, generation_config=config, **extra)
                new_tokens = output[:, batch["input_ids"].shape[1] :].cpu()
                for index, sample in enumerate(chunk):
                    group = []
                    for row in new_tokens[index * per_sample : (index + 1) * per_sample]:
                        ids = _cut_at_eos(row, eos_ids).clone()
                        text = backbone.tokenizer.decode(ids, skip_special_tokens=True).strip()
                        group.append(Rollout(sample=sample, completion_ids=ids, text=text))
                    results.append(group)
    finally:
        model.train(was_training)
    return results


# the processor outputs from which an M-RoPE model derives its 3-D positions
_MROPE_GRIDS = ("image_grid_thw", "video_grid_thw")


def _has_mrope(model: torch.nn.Module) -> bool:
    """Whether the model (or a module inside a wrapper such as a ``PeftModel``) computes multimodal rotary
    positions itself (Qwen2-VL / Qwen2.5-VL ``get_rope_index``). Explicit 1-D positions would override
    them with text positions, so such a model must be left to build its own."""
    return any(callable(getattr(module, "get_rope_index", None)) for module in model.modules())


def _extend_token_types(key: str, types: torch.Tensor, width: int) -> torch.Tensor:
    """Per-token type ids of the prompt extended over ``width`` completion tokens, as ``generate`` extends
    them while decoding: ``mm_token_type_ids`` (and the like) with the text type 0, ``token_type_ids``
    with the prompt's last value."""
    if key == "token_type_ids":
        tail = types[:, -1:].expand(-1, width)
    else:
        tail = types.new_zeros((types.shape[0], width))
    return torch.cat([types, tail], dim=1)


def completion_logprobs(
    backbone: Backbone, rollouts: Sequence[Rollout], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [B, L], mask [B, L]): per-token log-probabilities of each rollout's completion given
    its prompt and images, under the model as currently configured (active adapters, or adapters
    disabled by the caller's context manager); differentiable when grad is enabled. L = longest
    completion; mask is 1 on real tokens. Logits are divided by ``temperature`` (1 = the model's own
    distribution)."""
    if not rollouts:
        raise ValueError("no rollouts to score")
    device = backbone.device
    prompt = backbone.prompt_batch([rollout.sample for rollout in rollouts])
    prompt_ids, prompt_mask = prompt["input_ids"], prompt["attention_mask"]
    lengths = [int(rollout.completion_ids.numel()) for rollout in rollouts]
    width = max(max(lengths), 1)
    pad_id = backbone.tokenizer.pad_token_id
    completion = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rollouts), width), dtype=torch.long)
    for row, (rollout, length) in enumerate(zip(rollouts, lengths)):
        completion[row, :length] = rollout.completion_ids
        mask[row, :length] = 1
    completion, mask = completion.to(device), mask.to(device)
    input_ids = torch.cat([prompt_ids, completion], dim=1)
    attention_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    extra = {key: value for key, value in prompt.items() if key not in ("input_ids", "attention_mask")}
    for key, value in extra.items():
        if key.endswith("token_type_ids") and value.shape == prompt_ids.shape:
            extra[key] = _extend_token_types(key, value, width)
    if _has_mrope(backbone.model) and any(extra.get(key) is not None for key in _MROPE_GRIDS):
        position_ids = None  # the model's get_rope_index builds the 3-D (time, height, width) positions
    else:
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    outputs = backbone.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra
    )
    prompt_width = prompt_ids.shape[1]
    # the logit at position p predicts token p + 1: completion tokens are predicted from prompt_width - 1 on
    logits = outputs.logits[:, prompt_width - 1 : prompt_width - 1 + width, :].float() / temperature
    suppressed = placeholder_token_ids(backbone)
    if suppressed:
        logits = logits.index_fill(-1, torch.tensor(suppressed, device=logits.device), float("-inf"))
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs)), mask
