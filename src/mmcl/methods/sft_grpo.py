"""``sft-grpo``: per task, supervised fine-tuning and then GRPO on the same task, one LoRA adapter continued.

Paper: "MLLM-CTBench: A Benchmark for Continual Instruction Tuning with Reasoning Process Diagnosis"
(arXiv:2508.08275; the reference repository yueluoshuangtian/MLLM-CTBench). Besides SFT-only and RFT-only
sequences, the benchmark trains a "Joint SFT -> RFT" sequence (its Table VIII "Joint" row; reference
``qwen_cl/run_jointft_worker.sh`` and ``qwen_cl/src/scripts_cl/sft+grpo.sh``): for every task in turn,

1. SFT on the task's training set (1 epoch, LoRA r=64, lr 1e-5, then the LoRA is merged);
2. GRPO on the same task's training set, starting from the merged SFT model (``--model_name_or_path`` is
   the SFT merge), so that the KL reference of GRPO is the model after the SFT part of this task (TRL's
   trainer builds the reference from the same checkpoint, or disables the PEFT adapter, which gives the
   same model); the GRPO LoRA is merged and the next task starts from there.

Implemented variant (a thin subclass of :class:`mmcl.methods.grpo.Grpo`, whose GRPO loop, reward, filtering,
records and report are reused unchanged):

* the SFT part is exactly the default SFT of every other method (``train_on_samples`` with the run's
  ``training`` section: epochs, max_steps, batch size, learning rate, scheduler), with :meth:`extra_loss`
  (None here) passed through as in :meth:`Method.train`;
* right after it the trainable weights are snapshotted and used as the KL reference of the GRPO part
  (``reference_after_warmup``, kept on by default; off = the model before the task, an ablation);
* then GRPO (:func:`mmcl.training.grpo.train_grpo`) with the options of ``grpo``.

What ``grpo`` already does: its ``sft_warmup_steps`` is an SFT of a *fixed number of steps* with the run's
``training`` settings, followed by GRPO with the reference taken after the warm-up. ``sft-grpo`` is that
with the warm-up replaced by the full SFT of the ``training`` section (its epochs, so the step count follows
each task's size), i.e. ``grpo`` with ``sft_warmup_steps = ceil(epochs x ceil(n / (batch_size x
grad_accum)))`` per task (or ``training.max_steps`` when set); ``tests/test_method_sft_grpo.py`` pins that
both give bit-identical adapters. ``sft_warmup_steps`` must therefore stay 0 here.

Defaults that differ from ``grpo`` (sources): ``iterations: 2`` and ``clip_epsilon: 0.15`` (MLLM-CTBench
``run_jointft_worker.sh``: ``--num_iterations 2 --epsilon 0.15``), ``filter: false`` (MLLM-CTBench trains
GRPO on the whole task, no rollout-based instance filtering). Kept from ``grpo``: ``group_size: 4``
(MLLM-CTBench ``--num_generations 4``), ``kl_coef: 0.04`` (MLLM-CTBench passes no ``--beta``; its pinned
``trl==0.16.0`` defaults to 0.04).

Deviations from MLLM-CTBench and why:

* one LoRA adapter is continued through SFT, GRPO and the following tasks instead of merging the SFT LoRA,
  training a fresh GRPO LoRA and merging it (mmcl's LoRA methods continue one adapter, as ``seq-lora`` and
  ``grpo``); the GRPO start point and its KL reference are the same model as in the paper;
* GRPO length: ``steps: 25`` per task (CPU budget, inherited from ``grpo``) instead of 2 epochs over the
  task (set ``epochs: 2`` to match); GRPO learning rate 1e-3 (calibrated on the tiny model; the paper's 1e-5
  is for a 3B model); the SFT epochs are the run's ``training.epochs`` (set ``training.epochs: 1`` for the
  paper's one SFT epoch per task);
* the reward is ``grpo``'s (the task's own scorer + a small format term for a short one-line answer) instead
  of MLLM-CTBench's ``<think>``/``<answer>`` format and answer matching, since mmcl's tasks are scored by
  their own scorers and expect short answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcl.config import TrainingConfig, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError
from mmcl.methods.base import register_method
from mmcl.methods.grpo import Grpo, GrpoOptions
from mmcl.training.grpo import trainable_snapshot


@dataclass
class SftGrpoOptions(GrpoOptions):
    """``grpo``'s options (see :class:`GrpoOptions`) with MLLM-CTBench's joint SFT -> RFT defaults; the SFT
    part takes the run's ``training`` section."""

    # MLLM-CTBench qwen_cl/run_jointft_worker.sh: --num_iterations 2
    iterations: int = setting(2, help="mu, policy updates per batch of rollouts (MLLM-CTBench: 2)")
    # MLLM-CTBench qwen_cl/run_jointft_worker.sh: --epsilon 0.15
    clip_epsilon: float = setting(0.15, "[0, inf)", "PPO clip range epsilon (MLLM-CTBench: 0.15)")
    # MLLM-CTBench's joint runs train GRPO on the whole task (no rollout-based instance filtering)
    filter: bool = setting(False, help="rollout-based instance filtering (RFT's RIF) before GRPO; MLLM-CTBench: off")
    sft_warmup_steps: int = setting(
        0, help="must stay 0: the SFT part of sft-grpo is the full `training` section (use grpo for a short warm-up)"
    )
    reference_after_warmup: bool = setting(
        True, help="KL reference = the model after the SFT part of the task (MLLM-CTBench); false: before the task"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sft_warmup_steps != 0:
            raise ConfigError(
                "method.options.sft_warmup_steps: sft-grpo runs the full SFT of the `training` section before GRPO; "
                f"expected 0, got {self.sft_warmup_steps} (use method grpo for a fixed-step warm-up)"
            )


def sft_steps(samples: int, config: TrainingConfig) -> int:
    """Optimizer steps of the SFT part (the formula of :func:`mmcl.training.sft.train_on_samples`):
    ``max_steps`` if > 0, else ``ceil(epochs x ceil(samples / (batch_size x grad_accum)))``."""
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = math.ceil(samples / (config.batch_size * config.grad_accum))
    return math.ceil(per_epoch * config.epochs)


@register_method
class SftGrpo(Grpo):
    name = "sft-grpo"
    description = "MLLM-CTBench's SFT then RFT per task: full SFT, then GRPO with the post-SFT model as KL reference"
    config_class = SftGrpoOptions

    def init_state(self) -> None:
        super().init_state()
        self.options: SftGrpoOptions = self.config

    def train(self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int) -> dict[str, Any]:
        from mmcl.training.sft import train_on_samples

        assert self.backbone is not None
        model = self.backbone.model
        if self.reference is None:  # no before_task (direct call): the model before the task
            self.reference = trainable_snapshot(model)
        sft_metrics = train_on_samples(
            self.backbone, samples, config, work_dir / "sft", seed=seed, extra_loss=self.extra_loss,
            log_dir=self.sft_log_dir(),
        )  # fmt: skip
        if self.options.reference_after_warmup:
            self.reference = trainable_snapshot(model)
        # the GRPO part: grpo's train with no warm-up of its own (sft_warmup_steps is 0) keeps self.reference
        metrics = super().train(samples, config, work_dir / "grpo", seed)
        steps = sft_steps(len(samples), config)
        record = self.records[-1]
        record["sft_warmup_steps"] = steps  # grpo's report table shows it as "SFT <n> steps"
        record["sft_loss"] = sft_metrics.get("train_loss")
        record["kl_reference"] = "after SFT" if self.options.reference_after_warmup else "before task"
        metrics.update(sft_warmup_steps=steps, sft_train_loss=sft_metrics.get("train_loss"))
        return metrics

    def report_sections(self) -> list[dict[str, Any]]:
        sections = super().report_sections()
        for section in sections:
            if section.get("kind") == "table":
                section["title"] = "SFT then GRPO training"
                section["columns"] = ["SFT part" if c == "warm-up" else c for c in section["columns"]]
                section["note"] = section["note"].replace("SFT warm-up", "the SFT part (the `training` section)")
        return sections
