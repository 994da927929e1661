"""``completion_logprobs`` scores exactly what ``generate`` sampled, on every architecture mmcl ships a tiny
model of (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3, InternVL): left-padded prompts of different
lengths, one forward pass over prompt + completion, compared with the log-softmax of ``generate``'s raw
logits at the sampled tokens. On the M-RoPE models (Qwen) this only holds when the model builds its own
3-D positions; batches with images, without, and mixed take the two position paths of those models."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest
import torch

from mmcl.backbones.backbone import Backbone
from mmcl.backbones.registry import load_backbone
from mmcl.backbones.tiny_archs import TINY_ARCHITECTURES, TinyArchSpec, build_tiny_arch
from mmcl.data.sample import Sample
from mmcl.training.rollouts import Rollout, completion_logprobs, eos_token_ids, placeholder_token_ids

ARCHITECTURES = ("llava", *TINY_ARCHITECTURES)
TEMPERATURE = 0.7
NEW_TOKENS = 10


def tiny_llava(out_dir: Path) -> Backbone:
    """A randomly initialised tiny LLaVA (no warm-up: only the agreement of two code paths matters)."""
    from mmcl.backbones.tiny import TinyLlavaSpec, build_model, build_processor, train_tokenizer
    from mmcl.backbones.tiny_archs import default_corpus

    spec = TinyLlavaSpec(
        image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=64,
        text_layers=2, text_heads=2, text_intermediate=128, vocab_size=512, max_positions=256,
    )  # fmt: skip
    tokenizer = train_tokenizer(default_corpus(), spec.vocab_size)
    processor = build_processor(tokenizer, spec)
    model = build_model(tokenizer, spec, seed=0)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return load_backbone(str(out_dir), device="cpu")


@pytest.fixture(scope="module")
def image_prompts(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    """Two image prompts of different lengths (so one row is left-padded)."""
    from mmcl.streams.synth import write_synth_domain
    from mmcl.data.readers import read_samples

    root = write_synth_domain(tmp_path_factory.mktemp("rollout_data"), seed=0, train_per_task=2, test_per_task=1)
    return read_samples(root / "sci" / "train.json", "sci")[:1] + read_samples(root / "med" / "train.json", "med")[:1]


def text_only(sample: Sample) -> Sample:
    return dataclasses.replace(sample, images=(), prompt=sample.prompt.replace("<image>", ""))


@pytest.fixture(params=("images", "text", "mixed"))
def prompts(request: pytest.FixtureRequest, image_prompts: list[Sample]) -> list[Sample]:
    if request.param == "images":
        return image_prompts
    if request.param == "text":
        return [text_only(sample) for sample in image_prompts]
    return [image_prompts[0], text_only(image_prompts[1])]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def backbone(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    out_dir = tmp_path_factory.mktemp(f"rollout_{request.param}")
    if request.param == "llava":
        return tiny_llava(out_dir)
    return load_backbone(str(build_tiny_arch(request.param, out_dir, spec=TinyArchSpec())), device="cpu")


def sampled_and_reference(backbone: Backbone, samples: list[Sample]) -> tuple[list[Rollout], torch.Tensor]:
    """Completions sampled by ``generate`` and the log-probabilities of their tokens under generate's own
    raw logits (at ``TEMPERATURE``, image placeholders excluded as ``completion_logprobs`` excludes them)."""
    batch = backbone.prompt_batch(samples)
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) > 1  # different lengths: left padding matters
    suppressed = placeholder_token_ids(backbone)
    backbone.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        out = backbone.model.generate(
            **batch, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=TEMPERATURE, top_k=0,
            suppress_tokens=suppressed, output_logits=True, output_scores=True, return_dict_in_generate=True,
            pad_token_id=backbone.tokenizer.pad_token_id, use_cache=True,
        )  # fmt: skip
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    logits = torch.stack(out.logits, dim=1).float() / TEMPERATURE
    logits = logits.index_fill(-1, torch.tensor(suppressed, dtype=torch.long), float("-inf"))
    reference = logits.log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    # the processed scores (what was sampled from) are the same distribution
    scores = torch.stack(out.scores, dim=1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(scores, reference, atol=1e-5)
    eos = eos_token_ids(backbone)
    rollouts = []
    for sample, row in zip(samples, new):
        ends = [i for i, token in enumerate(row.tolist()) if token in eos]
        rollouts.append(Rollout(sample, row[: ends[0] + 1] if ends else row, ""))
    return rollouts, reference


def test_completion_logprobs_reproduce_generate(backbone: Backbone, prompts: list[Sample]) -> None:
    rollouts, reference = sampled_and_reference(backbone, prompts)
    lengths = [rollout.completion_ids.numel() for rollout in rollouts]
    assert max(lengths) > 1
    with torch.no_grad():
        logprobs, mask = completion_logprobs(backbone, rollouts, temperature=TEMPERATURE)
    assert mask.sum(dim=1).tolist() == lengths
    real = mask.bool()
    difference = (logprobs - reference[:, : logprobs.shape[1]])[real].abs().max().item()
    assert difference < 1e-4, f"max |delta log p| = {difference:.2e}"
    assert torch.all(logprobs[~real] == 0)
