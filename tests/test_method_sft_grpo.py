"""sft-grpo (MLLM-CTBench's SFT then RFT per task): the SFT step count on hand-computed numbers, the defaults
and refusals, the KL reference of the GRPO part bit-identical to the model right after the SFT part (KL exactly
0 at the first GRPO step) with GRPO then moving away from it, equality with ``grpo`` given a warm-up of the
same number of steps (the thin-subclass claim), the state round trip and a ``generate`` that ignores the task."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import set_up_on_tiny

import mmcl.methods.grpo as grpo_module
import mmcl.methods.sft_grpo  # noqa: F401  (registers "sft-grpo")
import mmcl.training.grpo as grpo_training
import mmcl.training.sft as sft_module
from mmcl.config import LoraSettings, TrainingConfig
from mmcl.errors import ConfigError
from mmcl.methods.base import METHODS
from mmcl.methods.grpo import Grpo, GrpoOptions
from mmcl.methods.sft_grpo import SftGrpo, SftGrpoOptions, sft_steps
from mmcl.training.grpo import RewardParts, trainable_snapshot

SFT = TrainingConfig(epochs=1, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, progress_bar=False)
TINY = {"steps": 2, "prompts_per_step": 2, "group_size": 2, "kl_coef": 0.1, "learning_rate": 1e-2}


def odd_length_reward(rollout, task, eos):
    """A reward that varies within groups whatever the tiny model says: odd-length answers are "right"."""
    return RewardParts(accuracy=float(len(rollout.text) % 2), format=0.0)


# -- hand-computed numbers and options ------------------------------------------------------------------
def test_sft_steps_follow_the_training_section():
    # ceil(10 / 4) = 3 steps per epoch, x 1.5 epochs = 4.5 -> 5
    assert sft_steps(10, TrainingConfig(epochs=1.5, batch_size=4)) == 5
    # batch 4 x accumulation 2 = 8 samples per step: 8 samples -> 1 step per epoch, 2 epochs -> 2
    assert sft_steps(8, TrainingConfig(epochs=2, batch_size=4, grad_accum=2)) == 2
    assert sft_steps(8, TrainingConfig(epochs=3, batch_size=4, max_steps=7)) == 7  # max_steps wins
    assert sft_steps(8, SFT) == 2


def test_defaults_and_refusals():
    assert "sft-grpo" in METHODS and METHODS["sft-grpo"].config_class is SftGrpoOptions
    options = SftGrpoOptions()
    # MLLM-CTBench run_jointft_worker.sh: --num_iterations 2 --epsilon 0.15 --num_generations 4, no filtering
    assert (options.iterations, options.clip_epsilon, options.group_size, options.filter) == (2, 0.15, 4, False)
    assert options.kl_coef == 0.04 and options.sft_warmup_steps == 0 and options.reference_after_warmup
    with pytest.raises(ConfigError, match="sft_warmup_steps"):
        SftGrpoOptions(sft_warmup_steps=5)
    with pytest.raises(ConfigError, match="group_size"):
        SftGrpoOptions(group_size=1)


# -- on the tiny model --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_model_dir, tasks, tmp_path_factory):
    """One sft-grpo stage on 8 samples of the first task, with snapshots taken at each hand-over."""
    monkeypatch = pytest.MonkeyPatch()
    method = set_up_on_tiny(SftGrpo(SftGrpoOptions(**TINY), LoraSettings(), seed=0), tiny_model_dir, tasks)
    method.reward = odd_length_reward
    seen: dict = {}
    original_sft, original_grpo = sft_module.train_on_samples, grpo_module.train_grpo

    def sft_spy(backbone, *args, **kwargs):
        result = original_sft(backbone, *args, **kwargs)
        seen["after_sft"] = trainable_snapshot(backbone.model)
        return result

    def grpo_spy(backbone, prompts, reward, config, seed, reference, log):
        seen["reference"] = {k: v.clone() for k, v in reference.items()}
        seen["at_grpo_start"] = trainable_snapshot(backbone.model)
        seen["history"] = original_grpo(backbone, prompts, reward, config, seed=seed, reference=reference, log=log)
        return seen["history"]

    def loss_spy(logprobs, old_logprobs, ref_logprobs, *args, **kwargs):
        loss, stats = original_loss(logprobs, old_logprobs, ref_logprobs, *args, **kwargs)
        seen.setdefault("losses", []).append((logprobs.detach().clone(), ref_logprobs.clone(), stats["kl"]))
        return loss, stats

    original_loss = grpo_training.grpo_loss
    monkeypatch.setattr(sft_module, "train_on_samples", sft_spy)
    monkeypatch.setattr(grpo_training, "grpo_loss", loss_spy)
    monkeypatch.setattr(grpo_module, "train_grpo", grpo_spy)
    try:
        seen["before_task"] = trainable_snapshot(method.backbone.model)
        method.before_task(0, tasks[0])
        seen["metrics"] = method.train(tasks[0].train_samples[:8], SFT, tmp_path_factory.mktemp("sft_grpo"), seed=1)
        method.after_task(0, tasks[0])
    finally:
        monkeypatch.undo()
    seen["after"] = trainable_snapshot(method.backbone.model)
    return method, seen


def test_kl_reference_is_the_model_right_after_sft_and_grpo_moves_away(trained, tasks):
    method, seen = trained
    before, after_sft, reference, after = seen["before_task"], seen["after_sft"], seen["reference"], seen["after"]
    assert set(reference) == set(after_sft) == set(before)
    assert any(not torch.equal(after_sft[k], before[k]) for k in before)  # the SFT part trained the adapter
    assert all(torch.equal(reference[k], after_sft[k]) for k in after_sft)  # reference = post-SFT, bit for bit
    assert all(torch.equal(seen["at_grpo_start"][k], after_sft[k]) for k in after_sft)  # GRPO starts there
    history = seen["history"]
    assert len(history) == 2
    # first update (before any GRPO step): the reference log-probs are the policy's, bit for bit, so the k3
    # estimator exp(ref - logp) - (ref - logp) - 1 is exactly 0 ...
    losses = seen["losses"]
    assert len(losses) == 2 * 2  # steps x iterations (one chunk each)
    logprobs, ref_logprobs, kl = losses[0]
    assert torch.equal(logprobs, ref_logprobs) and kl == 0.0
    # ... and the GRPO updates move the policy away from it (KL > 0 from the second update on)
    assert all(kl > 0.0 for _, _, kl in losses[1:])
    assert any(not torch.equal(after[k], after_sft[k]) for k in after)
    metrics, record = seen["metrics"], method.records[0]
    assert metrics["grpo_steps"] == 2 and metrics["sft_warmup_steps"] == 2 and math.isfinite(metrics["sft_train_loss"])
    assert record["kl_reference"] == "after SFT" and record["sft_warmup_steps"] == 2 and "kept" not in record
    assert record["tasks"] == [tasks[0].name] and method.reference is None  # released after the stage
    table = method.report_sections()[0]
    assert table["title"] == "SFT then GRPO training" and "SFT part" in table["columns"]
    assert table["rows"][0][2] == "SFT 2 steps (KL reference: model after SFT)"


def test_same_as_grpo_with_a_warm_up_of_the_same_steps(tiny_model_dir, tasks, trained, tmp_path):
    """sft-grpo == grpo whose sft_warmup_steps is the SFT part's step count (2 here), other options equal."""
    _, seen = trained
    options = GrpoOptions(**TINY, iterations=2, clip_epsilon=0.15, filter=False, sft_warmup_steps=2)
    grpo = set_up_on_tiny(Grpo(options, LoraSettings(), seed=0), tiny_model_dir, tasks)
    grpo.reward = odd_length_reward
    grpo.before_task(0, tasks[0])
    grpo.train(tasks[0].train_samples[:8], SFT, tmp_path, seed=1)
    after = trainable_snapshot(grpo.backbone.model)
    assert all(torch.equal(after[k], seen["after"][k]) for k in after)


def test_state_round_trip_and_generate_ignores_the_task(trained, tiny_model_dir, tasks):
    method, _ = trained
    tensors, state = method.saved_tensors(), method.state_json()
    restored = set_up_on_tiny(SftGrpo(SftGrpoOptions(**TINY), LoraSettings(), seed=0), tiny_model_dir, tasks)
    restored.restore_tensors(tensors)
    restored.load_state_json(state)
    assert restored.records == method.records
    now = trainable_snapshot(restored.backbone.model)
    assert all(torch.equal(now[k], v) for k, v in trainable_snapshot(method.backbone.model).items())
    assert restored.trainable_parameters() == method.trainable_parameters() > 0
    samples = tasks[0].test_samples[:3]
    answers = method.generate(samples, tasks[0], 8)
    assert restored.generate(samples, tasks[0], 8) == answers
    assert method.generate(samples, tasks[-1], 8) == answers  # no task identity at test time
