"""Supervised fine-tuning on the HF ``Trainer``: one subclass whose ``compute_loss`` adds the
continual-learning method's extra loss term."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from mmcl import distributed
from mmcl.backbones.backbone import Backbone
from mmcl.config import TrainingConfig
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError
from mmcl.log import get_logger

ExtraLoss = Callable[[torch.nn.Module, dict, object], Optional[torch.Tensor]]


# Encoded samples kept for the later epochs of one training call, in bytes of tensors (beyond it, re-encoded).
ENCODED_CACHE_BYTES = 256 * 2**20


class SampleDataset(Dataset):
    """Samples encoded lazily by the backbone (images decoded when a batch is built). With ``keep``, an
    encoding is kept for the next epochs while all kept ones stay under ``ENCODED_CACHE_BYTES``: encoding
    (chat template, tokenizer, image processor) costs more than a tiny model's training step."""

    def __init__(self, samples: Sequence[Sample], backbone: Backbone, keep: bool = False):
        self.samples = list(samples)
        self.backbone = backbone
        self.keep = keep
        self.kept: dict[int, dict[str, torch.Tensor]] = {}
        self.kept_bytes = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index in self.kept:
            return self.kept[index]
        features = self.backbone.encode_for_training(self.samples[index])
        size = sum(value.nbytes for value in features.values())
        if self.keep and self.kept_bytes + size <= ENCODED_CACHE_BYTES:
            self.kept[index] = features
            self.kept_bytes += size
        return features


class ContinualTrainer(Trainer):
    """HF Trainer whose loss is the model's token cross-entropy plus ``extra_loss`` (EWC, LwF, ...).

    ``extra_loss`` gets the model itself: the wrapper the Trainer puts around it for distributed
    training (DDP under ``torchrun``, DeepSpeed, FSDP) is taken off with ``accelerator.unwrap_model``,
    so parameter and module names are the same as in a single process."""

    def __init__(self, *args, extra_loss: ExtraLoss | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_loss = extra_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.extra_loss is not None:
            extra = self.extra_loss(self.accelerator.unwrap_model(model), inputs, outputs)
            if extra is not None:
                if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                    # the CE is then summed over the accumulated batch and not divided by the
                    # accumulation steps; scale the per-micro-batch term to match
                    extra = extra / self.current_gradient_accumulation_steps
                loss = loss + extra
        return (loss, outputs) if return_outputs else loss


def step_line(state, logs: dict) -> str | None:
    """``  step 10/40 loss 1.23 lr 2e-04 grad norm 0.8`` for a logging step's ``logs`` (None for the
    end-of-training summary, which the runner reports itself)."""
    if "loss" not in logs:
        return None
    parts = [f"  step {state.global_step}/{state.max_steps}"]
    for key, label, spec in (("loss", "loss", ".4g"), ("learning_rate", "lr", ".3g"), ("grad_norm", "grad norm", ".3g")):
        if key in logs:
            try:
                parts.append(f"{label} {float(logs[key]):{spec}}")
            except (TypeError, ValueError):
                parts.append(f"{label} {logs[key]}")
    return " ".join(parts)


class StepLogCallback(TrainerCallback):
    """One line per logging step through the ``mmcl.training`` logger (instead of the Trainer's dicts)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = step_line(state, logs or {})
        if line is not None and state.is_world_process_zero:
            get_logger("training").info(line)


class StepBarCallback(ProgressCallback):
    """The Trainer's tqdm bar, writing :func:`step_line` above it instead of a dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = step_line(state, logs or {})
        if line is not None and state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.write(line)


def _show_bar(config: TrainingConfig) -> bool:
    """The bar only on a terminal (tqdm draws on stderr); logs and pipes get one line per logging step."""
    try:
        return config.progress_bar and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def train_on_samples(
    backbone: Backbone,
    samples: Sequence[Sample],
    config: TrainingConfig,
    work_dir: Path,
    seed: int,
    extra_loss: ExtraLoss | None = None,
    log_dir: Path | None = None,
) -> dict[str, float]:
    """Train ``backbone.model`` in place on ``samples``; returns the Trainer's final metrics. With
    ``log_dir``, the Trainer's own TensorBoard reporting writes its logging steps' scalars there
    (``train/loss``, ``train/learning_rate``, ``train/grad_norm``, ...); it changes no training number.

    Under ``torchrun`` the Trainer runs DDP; ``config.batch_size`` stays the global batch (split over
    the processes) so that a multi-process run takes the same optimisation steps as a single one."""
    processes = distributed.world_size()
    if config.batch_size % processes:
        raise ConfigError(f"training.batch_size: {config.batch_size} does not split over {processes} processes")
    steps_per_epoch = math.ceil(len(samples) / (config.batch_size * config.grad_accum))
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.epochs)
    show_bar = _show_bar(config)
    arguments = TrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size // processes,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=int(config.warmup_ratio * total_steps),  # rounded down: a 1-step stage still trains
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not show_bar,
        bf16=config.bf16,
        activation_checkpointing=config.activation_checkpointing,
        deepspeed=config.deepspeed,
        fsdp=config.fsdp,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = ContinualTrainer(
        model=backbone.model,
        args=arguments,
        train_dataset=SampleDataset(samples, backbone, keep=total_steps > steps_per_epoch),
        data_collator=backbone.collate,
        extra_loss=extra_loss,
    )
    trainer.remove_callback(PrinterCallback)  # no raw {'loss': ...} dicts on stdout
    if show_bar:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(StepBarCallback)
    else:
        trainer.add_callback(StepLogCallback)
    writer = None
    if log_dir is not None:  # transformers 5 has no logging_dir argument: the callback gets its writer
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        writer = SummaryWriter(log_dir=str(log_dir))
        trainer.add_callback(TensorBoardCallback(tb_writer=writer))
    try:
        result = trainer.train()
    finally:
        if writer is not None:
            writer.close()
    return dict(result.metrics)
