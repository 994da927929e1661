"""``lwf``: Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017) for generative VLMs.

One LoRA adapter is continued across tasks (as in ``seq-lora``). Before task t >= 1 the adapter as
it is then (the model after task t-1) is copied into a second, frozen PEFT adapter named
``teacher``. While training on task t, every batch of *task t's own inputs* is also run through
the teacher (same ``input_ids``, ``attention_mask``, ``pixel_values`` and any other image tensors;
no gradient; the model in eval mode so that dropout does not perturb the targets), and the student
is pulled towards the teacher's next-token distributions on the answer tokens:

    loss = CE + alpha * KD

    KD = s * (1 / |A|) * sum_{(b, p) in A} KL( softmax(z_teacher[b, p] / T) || softmax(z_student[b, p] / T) )

where ``A`` holds the positions ``p`` whose *next* token is an answer token (``labels[b, p + 1] !=
-100``: the logits at position p predict token p + 1, the same shift as the causal-LM
cross-entropy), so KD is a mean over answer tokens of the micro-batch, like the CE. Li & Hoiem's
loss is ``lambda_o * L_old + L_new`` with lambda_o = 1 and T = 2 and no further factor (s = 1, the
default); Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network") scale the soft-target
term by s = T^2 to keep its gradient scale independent of T (``t_squared: true``). Li & Hoiem write the old-task term as the cross-entropy H(p_teacher, p_student)
with T = 2; the KL used here differs from it only by the teacher's entropy, a constant for the
student, so the gradients are the same, and the KL is exactly 0 when the student equals the
teacher, which makes the value easy to read. The original paper distills the old task *heads* on
the new images; a generative VLM has one shared head (the vocabulary), so the "old outputs" are the
previous model's distributions over the vocabulary on the new task's answer tokens.

There is no teacher on the first task (plain fine-tuning), unless ``distill_from_base`` is set:
then the base model (adapters disabled) is the teacher on task 0.

Resuming needs no extra state: the teacher of task t is the adapter saved after stage t-1, and the
runner loads stage t-1's state before it calls ``before_task`` for task t, which is when the
teacher is copied. After each task the teacher adapter is deleted, so between stages the model
(and what is saved) is exactly that of ``seq-lora``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from mmcl.backbones.backbone import IGNORE_INDEX
from mmcl.streams.stream import Task
from mmcl.config import setting
from mmcl.errors import ConfigError
from mmcl.methods.base import register_method
from mmcl.methods.lora_utils import adapter_tensors, load_adapter_tensors
from mmcl.methods.seq_lora import SequentialLora

STUDENT = "default"
TEACHER = "teacher"


@dataclass
class LwfConfig:
    """Distillation strength and temperature; defaults are Li & Hoiem's (TPAMI 2017, Sec. 3: "lambda_o
    = 1", "T = 2", the old-task loss not rescaled by T^2)."""

    temperature: float = setting(2.0, help="softmax temperature T of teacher and student (Li & Hoiem: T = 2)")
    alpha: float = setting(1.0, help="weight of the distillation term, loss = CE + alpha * KD (Li & Hoiem: 1)")
    # mmcl before 2026-12 used T^2 with alpha 0.5
    t_squared: bool = setting(False, help="scale KD by T^2 as Hinton et al. 2015 (Li & Hoiem: no)")
    distill_from_base: bool = setting(False, help="on the first task, distill from the base model (no teacher otherwise)")

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"method.options.temperature: expected a positive number, got {self.temperature}")
        if not self.alpha >= 0:
            raise ConfigError(f"method.options.alpha: expected a non-negative number, got {self.alpha}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    t_squared: bool = False,
) -> torch.Tensor:
    """Mean over answer tokens of KL(softmax(teacher / T) || softmax(student / T)), times T^2 if ``t_squared``.

    ``*_logits`` are (batch, length, vocab) and aligned with ``labels`` (batch, length); the logits
    at position p are compared where ``labels[:, p + 1] != -100`` (next-token alignment). The
    teacher is detached, so the gradient reaches the student only. Computed in float32. Returns a
    zero (still attached to the student's graph) when the batch has no answer token.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher logits {tuple(teacher_logits.shape)}")
    if student_logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(student_logits.shape)} do not match labels {tuple(labels.shape)}")
    mask = labels[:, 1:] != IGNORE_INDEX
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    student = student_logits[:, :-1][mask].float() / temperature
    teacher = teacher_logits.detach()[:, :-1][mask].float() / temperature
    student_log_probs = F.log_softmax(student, dim=-1)
    teacher_log_probs = F.log_softmax(teacher, dim=-1)
    per_token = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    return per_token.mean() * (temperature**2 if t_squared else 1.0)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode inside the block; each module's own mode restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@register_method
class LearningWithoutForgetting(SequentialLora[LwfConfig]):
    name = "lwf"
    description = "Sequential LoRA + distillation from the previous model on the new task's answers (LwF)"

    def init_state(self) -> None:
        self.teacher: str | None = None  # None (no distillation), TEACHER (adapter copy) or "base"

    # -- teacher ---------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        super().before_task(task_index, task)
        if task_index >= 1:
            self._snapshot_teacher()
            self.teacher = TEACHER
        else:
            self._drop_teacher()
            self.teacher = "base" if self.config.distill_from_base else None

    def after_task(self, task_index: int, task: Task) -> None:
        super().after_task(task_index, task)
        self._drop_teacher()
        self.teacher = None

    def _snapshot_teacher(self) -> None:
        """Copy the student adapter, as it is now, into the frozen ``teacher`` adapter."""
        model = self.backbone.model
        if TEACHER not in model.peft_config:
            config = copy.deepcopy(model.peft_config[STUDENT])
            config.inference_mode = True
            model.add_adapter(TEACHER, config)
        load_adapter_tensors(self.backbone, adapter_tensors(self.backbone, STUDENT), TEACHER)
        self._activate(STUDENT)

    def _drop_teacher(self) -> None:
        model = self.backbone.model
        if TEACHER in model.peft_config:
            model.delete_adapter(TEACHER)
            self._activate(STUDENT)

    def _activate(self, adapter: str) -> None:
        """Make ``adapter`` the active one; only the student adapter is ever trainable."""
        model = self.backbone.model
        model.set_adapter(adapter, inference_mode=adapter != STUDENT)  # PEFT resets requires_grad here
        if TEACHER in model.peft_config:
            model.set_requires_grad(TEACHER, requires_grad=False)

    @contextmanager
    def _teacher_active(self) -> Iterator[None]:
        """Inside the block the model computes the teacher's outputs (eval mode, no gradient)."""
        peft_model = self.backbone.model
        with torch.no_grad(), eval_mode(peft_model):
            if self.teacher == "base":
                with peft_model.disable_adapter():
                    yield
                return
            self._activate(TEACHER)
            try:
                yield
            finally:
                self._activate(STUDENT)

    def teacher_logits(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        """The teacher's logits on the same inputs as the student (everything but the labels)."""
        features = {key: value for key, value in inputs.items() if key != "labels"}
        with self._teacher_active():
            return model(**features, use_cache=False).logits.detach()

    # -- loss ------------------------------------------------------------------------------
    def extra_loss(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> torch.Tensor | None:
        if self.teacher is None or self.config.alpha == 0:
            return None
        teacher = self.teacher_logits(model, inputs)
        return self.config.alpha * distillation_loss(
            outputs.logits, teacher, inputs["labels"], self.config.temperature, self.config.t_squared
        )
