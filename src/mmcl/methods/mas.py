"""``mas``: Memory Aware Synapses (Aljundi, Babiloni, Elhoseiny, Rohrbach and Tuytelaars, "Memory Aware
Synapses: Learning what (not) to forget", ECCV 2018, arXiv:1711.09601) on the trainable parameters: one
LoRA adapter continued across tasks, as in ``seq-lora``.

After each task an importance Omega_i >= 0 is estimated for every trainable parameter theta_i, and the
parameters theta* at that moment become the anchor. While a later task trains, the loss gets

    lambda_t * sum_i Omega_i (theta_i - theta*_i) ** 2                 (float32; none on the first task)

The paper's objective L_new(theta) + lambda sum_ij Omega_ij (theta_ij - theta*_ij)^2 and the reference code
(rahafaljundi/MAS-Memory-Aware-Synapses, ``MAS_utils/MAS_based_Training.py``: ``Weight_Regularized_SGD``
adds ``2 * lambda * omega * (theta - theta*)`` to the gradient) have no 1/2 in front of the sum, so neither
has this file: ``lambda_`` here is the paper's lambda (a (lambda/2) form is the same penalty with lambda
doubled). One anchor is kept, the parameters after
the last task, and Omega is accumulated over tasks (``accumulate``).

Two importance estimates (``importance``):

output-norm (default; the paper: the gradient of the squared L2 norm of the learned function's output)
    Omega_i = (1/N) sum_n | d ||f(x_n)||_2^2 / d theta_i |, over N training samples of the finished task,
    one sample at a time (the reference code's ``b1`` online setting; a batch would take |.| of the summed
    batch gradient instead), model in eval mode (no dropout), no labels used as targets. f(x) is the
    learned function's output: the reference code squares the network's pre-softmax outputs
    (``compute_importance_l2``: ``MSELoss(size_average=False)(outputs, 0)``), so here f(x) are the logits
    (float32) at the positions that ``outputs`` selects:

    answer (default)  the positions whose logits predict an answer token (position t - 1 for every
                      labelled token t), teacher-forced on the sample's prompt and answer as in training.
                      These are the outputs the task trains and the evaluation reads (the first of them is
                      the last prompt position, which predicts the first answer token); the logits at image
                      and prompt positions are never used to answer, and with a vocabulary-wide output at
                      every one of hundreds of image tokens they would dominate Omega. ||f(x)||^2 sums the
                      squared logits over these positions and the whole vocabulary.
    all               every real (unpadded) position of the sequence.

    Omega accumulates over tasks by summation, Omega <- Omega + Omega_new (reference code,
    ``accumelate_reg_params``: ``torch.add(prev_omega, new_omega)``).

    lambda_ = 3.2e-3, calibrated as ``ewc``'s lambda_ was: on the default experiment (tiny-llava, rank-8
    LoRA, synth-domain 300 samples x 4 epochs, lr 3e-3, seed 0), with Omega of stage 1 (200 samples),
    sum Omega (theta - theta*)^2 = 2248 after an unpenalised stage 2, so 3.2e-3 gives 7.2, the scale of
    ewc's 700 x 1.04e-2 = 7.3; a penalised stage 2 then sees a mean penalty of 0.187 (ewc: 0.156). The
    paper's lambda = 1 (reference code: "In object recognition it was set to 1"; its outputs are a few
    hundred class scores, an LLM's are its whole vocabulary at every answer position) makes the penalty
    ~10^3 times the cross-entropy and the tiny model stops learning after the first task. The scale depends
    on the model, vocabulary, LoRA rank, learning rate, stage length and answer lengths: re-calibrate
    elsewhere (every stage's mean penalty is written to state.json under "penalty").

sft-loss (the LLaVA variant of MLLM-CTBench, yueluoshuangtian/MLLM-CTBench ``llava_cl/cl_learner/mas.py``,
which subclasses ``ewc.py``'s ``EWCLearner``)
    While the task trains, a tensor hook on every trainable parameter adds |grad| (NaNs set to 0) of each
    backward pass of the training loss (the token cross-entropy plus the penalty itself, as there); after
    the task the sum is divided by the number of passes, then (``update_Ipt``) each tensor is divided by
    its mean absolute value (``normalise``), only the k = floor((1 - sparsity) n) largest entries of each
    tensor of n entries are kept (``sparsity`` = 0.9; ties at the threshold kept; a tensor with k = 0 stays
    dense, as there; its threshold is the (k + 1)-th largest value, one entry more than k), and the result
    is merged with the older tasks' Omega by a running mean over tasks, Omega <- (Omega * m + Omega_new) /
    (m + 1) with m the estimates merged so far (``accumulate: mean``).
    The penalty there is (lambda / sqrt(t)) * 1/2 * sum Omega (theta - theta*)^2 while the t-th task
    (1-based) trains (``lambda_decay: inverse-sqrt``), with lambda = 5e-3 (``--ewc_lbd`` given to ``mas`` by
    ``llava_cl/scripts/ewc_seq_mas_seqback.sh``, for LLaVA-1.5-7B); the 1/2 is folded into this preset's
    lambda_ = 2.5e-3. (Measured on the default experiment as above: sum Omega (theta - theta*)^2 = 15.5 after
    an unpenalised stage 2, mean penalty 0.0083 in a penalised one: a weak constraint on the tiny model.)
    Not reproduced: its guard that drops the penalty of a step whose value exceeds 100x the cross-entropy
    (an engineering fallback that makes the objective depend on the loss scale), its bfloat16 storage of
    Omega and anchors (float32 here), and its hook being per process under DDP (here the per-process means
    are averaged over the processes after the task, so every process holds the same Omega).

Every option the two estimates disagree on (``lambda_``, ``normalise``, ``sparsity``, ``accumulate``,
``lambda_decay``) defaults to null = the preset of the chosen ``importance`` and can be set explicitly,
e.g. the output-norm importance with normalisation and sparsification.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmcl import distributed
from mmcl.backbones.backbone import IGNORE_INDEX
from mmcl.config import TrainingConfig, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, DataError, RunDirError
from mmcl.methods.base import register_method
from mmcl.methods.seq_lora import SequentialLora
from mmcl.streams.stream import Task

OMEGA = "omega"  # state group: parameter name -> accumulated importance (saved as omega::<name>)
ANCHOR = "anchor"  # state group: parameter name -> theta* (saved as anchor::<name>)
IMPORTANCES = ("output-norm", "sft-loss")
OUTPUTS = ("answer", "all")
ACCUMULATIONS = ("sum", "mean")
DECAYS = ("none", "inverse-sqrt")
# the options left null take the value of the chosen importance's source (see the module docstring)
PRESETS: dict[str, dict[str, Any]] = {
    "output-norm": {"lambda_": 3.2e-3, "normalise": False, "sparsity": 0.0, "accumulate": "sum", "lambda_decay": "none"},
    "sft-loss": {"lambda_": 2.5e-3, "normalise": True, "sparsity": 0.9, "accumulate": "mean",
                 "lambda_decay": "inverse-sqrt"},
}
# what a saved Omega means: a resumed run must agree on these
MEANING = ("importance", "outputs", "normalise", "sparsity", "accumulate")


@dataclass
class MasConfig:
    """Importance estimate, penalty weight and how the tasks' importances are combined (null options take the
    preset of ``importance``: output-norm = Aljundi et al. 2018, sft-loss = MLLM-CTBench's LLaVA MAS)."""

    importance: str = setting("output-norm", help="output-norm: |d ||logits||^2 / d theta| per sample after the task "
                              "(the paper); sft-loss: |grad| of the training loss accumulated while the task trains "
                              "(MLLM-CTBench's LLaVA variant)")
    lambda_: float | None = setting(None, "[0, inf)", "penalty weight of lambda_ * sum Omega (theta - theta*)^2 (null: "
                                    "3.2e-3 for output-norm, calibrated on the tiny model to ewc's penalty scale, the "
                                    "paper's 1 freezes it; 2.5e-3 for sft-loss, MLLM-CTBench's 5e-3 times the 1/2 of its "
                                    "penalty; re-calibrate for another model)")
    importance_samples: int = setting(200, "[0, inf)", "output-norm: training samples of the finished task Omega is "
                                      "estimated on, one at a time (0: all of them, as the paper; 200 = ewc's "
                                      "fisher_samples, the same cost)")
    outputs: str = setting("answer", help="output-norm: the logits f(x) whose squared norm is differentiated: answer = "
                           "the positions predicting answer tokens, all = every unpadded position")
    normalise: bool | None = setting(None, help="divide each tensor of a new Omega by its mean absolute value (null: "
                                     "off for output-norm, on for sft-loss as MLLM-CTBench)")
    sparsity: float | None = setting(None, "[0, 1)", "share of each tensor's entries of a new Omega set to 0, the "
                                     "smallest (null: 0 for output-norm, 0.9 for sft-loss as MLLM-CTBench)")
    accumulate: str | None = setting(None, help="sum: Omega <- Omega + Omega_new (the reference code); mean: running "
                                     "mean over tasks (MLLM-CTBench); null: the importance's preset")
    lambda_decay: str | None = setting(None, help="none: lambda_ on every task; inverse-sqrt: lambda_ / sqrt(t) on the "
                                       "t-th task (MLLM-CTBench); null: the importance's preset")

    def __post_init__(self) -> None:
        choices = {"importance": IMPORTANCES, "outputs": OUTPUTS, "accumulate": ACCUMULATIONS, "lambda_decay": DECAYS}
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value is not None and value not in allowed:
                raise ConfigError(f"method.options.{key}: expected one of {', '.join(allowed)}, got {value!r}")
        if self.importance is None:
            raise ConfigError(f"method.options.importance: expected one of {', '.join(IMPORTANCES)}, got null")
        if self.lambda_ is not None and self.lambda_ < 0:
            raise ConfigError(f"method.options.lambda_: expected a weight >= 0, got {self.lambda_}")
        if self.importance_samples < 0:
            raise ConfigError(f"method.options.importance_samples: expected >= 0 (0: all), got {self.importance_samples}")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"method.options.sparsity: expected a share in [0, 1), got {self.sparsity}")

    def value(self, key: str) -> Any:
        """The option ``key`` as set, or the preset of the chosen importance when it is null."""
        own = getattr(self, key)
        return PRESETS[self.importance][key] if own is None else own


# -- pure functions ----------------------------------------------------------------------------------
def output_positions(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], outputs: str) -> torch.Tensor:
    """The rows of ``logits`` (batch, positions, vocabulary) that ``outputs`` selects, as (n, vocabulary):
    ``answer`` = position t - 1 for every token t whose label is not ``IGNORE_INDEX`` (the causal shift),
    ``all`` = every position with attention mask 1 (every position without a mask)."""
    if outputs == "answer":
        labels = batch["labels"]
        if logits.shape[:2] != labels.shape:
            raise RuntimeError(f"MAS: logits of shape {tuple(logits.shape)} do not line up with labels {tuple(labels.shape)}")
        return logits[:, :-1][labels[:, 1:] != IGNORE_INDEX]
    if outputs == "all":
        mask = batch.get("attention_mask")
        if mask is None:
            return logits.flatten(0, 1)
        return logits[mask.bool()]
    raise ConfigError(f"MAS: unknown outputs {outputs!r}, expected one of {OUTPUTS}")


def output_norm_importance(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    params: Mapping[str, torch.nn.Parameter],
    outputs: str = "answer",
) -> dict[str, torch.Tensor]:
    """Omega_i = mean over ``batches`` (one sample each) of |d ||f(x)||_2^2 / d theta_i| (float32), f(x) the
    logits (float32) at :func:`output_positions`. ``labels`` (and ``attention_mask``) only select positions;
    they are not passed to the model. Runs in eval mode; leaves no gradients behind. Samples with no
    selected position are skipped."""
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    names, tensors = list(params), list(params.values())
    was_training = model.training
    model.eval()
    used = 0
    try:
        with torch.enable_grad():
            for batch in batches:
                inputs = {key: value for key, value in batch.items() if key != "labels"}
                if outputs == "answer" and not bool((batch["labels"][:, 1:] != IGNORE_INDEX).any()):
                    continue
                selected = output_positions(model(**inputs).logits.float(), batch, outputs)
                if selected.numel() == 0:
                    continue
                norm = selected.pow(2).sum()
                grads = torch.autograd.grad(norm, tensors, allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        sums[name] += grad.detach().float().abs()
                used += 1
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    if used == 0:
        raise DataError("MAS: no sample with an output position to estimate the importance from")
    return {name: value / used for name, value in sums.items()}


def normalise_importance(omega: Mapping[str, torch.Tensor], eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """Each tensor divided by (its mean absolute value + ``eps``); an all-zero tensor stays zero
    (MLLM-CTBench ``update_Ipt``: ``p / (p.abs().mean() + 1e-8)`` when the mean is > 0)."""
    result = {}
    for name, value in omega.items():
        mean = value.abs().mean()
        result[name] = value / (mean + eps) if bool(mean > 0) else value.clone()
    return result


def sparsify_importance(omega: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Per tensor of n entries, keep the k = floor((1 - sparsity) n) largest |values| (every entry >= the
    k-th largest, so ties at the threshold are kept) and set the others to 0; k = 0 leaves the tensor as
    it is (MLLM-CTBench ``update_Ipt``, whose threshold ``kthvalue(n - k)`` is the (k + 1)-th largest and
    so keeps one entry more than the k it computes)."""
    if sparsity <= 0.0:
        return {name: value.clone() for name, value in omega.items()}
    result = {}
    for name, value in omega.items():
        flat = value.reshape(-1).abs()
        keep = int((1.0 - sparsity) * flat.numel())
        if keep <= 0:
            result[name] = value.clone()
            continue
        threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values  # the keep-th largest
        result[name] = value * (value.abs() >= threshold)
    return result


def merge_importance(
    old: Mapping[str, torch.Tensor] | None, new: Mapping[str, torch.Tensor], merged: int, accumulate: str
) -> dict[str, torch.Tensor]:
    """Omega after one more estimate: ``sum`` -> old + new; ``mean`` -> (old * merged + new) / (merged + 1),
    ``merged`` being how many estimates ``old`` holds; just ``new`` when there is no old one."""
    if not old:
        return {name: value.clone() for name, value in new.items()}
    if accumulate == "sum":
        return {name: old[name] + value for name, value in new.items()}
    if accumulate == "mean":
        return {name: (old[name] * merged + value) / (merged + 1) for name, value in new.items()}
    raise ConfigError(f"MAS: unknown accumulate {accumulate!r}, expected one of {ACCUMULATIONS}")


def mas_penalty(
    params: Mapping[str, torch.Tensor], omega: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
    weight: float,
) -> torch.Tensor | None:
    """``weight * sum_i Omega_i (theta_i - theta*_i)^2`` in float32 (no 1/2, as the paper); None
    when there is no importance yet. ``params`` maps names to the current (differentiable) tensors."""
    total: torch.Tensor | None = None
    for name, value in omega.items():
        delta = params[name].float() - anchor[name]
        term = (value * delta * delta).sum()
        total = term if total is None else total + term
    return None if total is None else weight * total


def task_weight(lambda_: float, decay: str, task_number: int) -> float:
    """lambda_ for the ``task_number``-th task (1-based): as it is, or / sqrt(task_number)."""
    if decay == "none":
        return lambda_
    if decay == "inverse-sqrt":
        return lambda_ / math.sqrt(max(task_number, 1))
    raise ConfigError(f"MAS: unknown lambda_decay {decay!r}, expected one of {DECAYS}")


class AbsGradMeter:
    """Sums |grad| (float32, NaN -> 0) of every parameter over the backward passes while attached (one
    tensor hook per parameter), with the number of passes each parameter received a gradient in."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter]):
        self.sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self.passes = {name: 0 for name in params}
        self.handles = [p.register_hook(self._hook(name)) for name, p in params.items()]

    def _hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            self.sums[name].add_(torch.nan_to_num(grad.detach().float(), nan=0.0).abs())
            self.passes[name] += 1

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def mean(self) -> dict[str, torch.Tensor]:
        """The mean |grad| over the passes (a parameter without any gradient: zeros)."""
        return {name: value / max(self.passes[name], 1) for name, value in self.sums.items()}


# -- the method ---------------------------------------------------------------------------------------
@register_method
class Mas(SequentialLora[MasConfig]):
    name = "mas"
    description = "Sequential LoRA + Memory Aware Synapses (output-sensitivity importance, quadratic penalty)"

    def init_state(self) -> None:
        self.omega: dict[str, torch.Tensor] = {}  # accumulated importance by parameter name
        self.anchor: dict[str, torch.Tensor] = {}  # theta* by parameter name: the parameters after the last task
        self.tasks_done: list[int] = []  # tasks whose importance is in omega
        self.merged = 0  # importance estimates merged into omega (the running mean's count)
        self.penalty_log: list[dict[str, Any]] = []  # per stage: mean / last penalty seen in training
        self._online: dict[str, torch.Tensor] | None = None  # sft-loss: the stage's mean |grad|, until merged
        self._reset_penalty_stats()

    def _reset_penalty_stats(self) -> None:
        self._penalty_sum: torch.Tensor | None = None
        self._penalty_last: torch.Tensor | None = None
        self._penalty_steps = 0

    # -- helpers ----------------------------------------------------------------------------------
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.backbone.model.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable().values())

    def draw_importance_samples(self, task_index: int, task: Task) -> list[Sample]:
        """A seeded draw of ``importance_samples`` training samples of the task (all of them if 0 or fewer)."""
        samples = list(task.train_samples)
        count = self.config.importance_samples
        if count == 0 or count >= len(samples):
            return samples
        return random.Random(f"mas-{self.seed}-{task_index}").sample(samples, count)

    def single_batches(self, samples: Sequence[Sample]) -> Iterator[dict[str, torch.Tensor]]:
        """One-sample training batches on the model's device, encoded one at a time."""
        backbone, device = self.backbone, self.backbone.device
        for sample in samples:
            yield {k: v.to(device) for k, v in backbone.collate([backbone.encode_for_training(sample)]).items()}

    def compute_importance(self, task_index: int, task: Task) -> dict[str, torch.Tensor]:
        """The output-norm importance of the task at the current parameters (before normalise/sparsify)."""
        batches = self.single_batches(self.draw_importance_samples(task_index, task))
        return output_norm_importance(self.backbone.model, batches, self.trainable(), self.config.outputs)

    def current_weight(self) -> float:
        """lambda_ of the task being trained (the (len(tasks_done) + 1)-th)."""
        return task_weight(self.config.value("lambda_"), self.config.value("lambda_decay"), len(self.tasks_done) + 1)

    def shape_importance(self, omega: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A new estimate normalised and sparsified as configured."""
        shaped = normalise_importance(omega) if self.config.value("normalise") else dict(omega)
        return sparsify_importance(shaped, self.config.value("sparsity"))

    # -- hooks ------------------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        super().before_task(task_index, task)
        self._reset_penalty_stats()

    def train(self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int) -> dict[str, Any]:
        if self.config.importance != "sft-loss":
            return super().train(samples, config, work_dir, seed)
        meter = AbsGradMeter(self.trainable())
        try:
            metrics = super().train(samples, config, work_dir, seed)
        finally:
            meter.remove()
        online = meter.mean()
        if distributed.active() and torch.distributed.is_initialized():  # the hooks saw this process's gradients
            for value in online.values():
                torch.distributed.all_reduce(value)
                value /= distributed.world_size()
        self._online = online
        return metrics

    def extra_loss(self, model, inputs, outputs) -> torch.Tensor | None:
        if not self.omega:
            return None
        params = dict(self.backbone.model.named_parameters())
        penalty = mas_penalty(params, self.omega, self.anchor, self.current_weight())
        if penalty is not None:
            value = penalty.detach()
            self._penalty_sum = value if self._penalty_sum is None else self._penalty_sum + value
            self._penalty_last = value
            self._penalty_steps += 1
        return penalty

    def after_task(self, task_index: int, task: Task) -> None:
        if self._penalty_steps:
            self.penalty_log.append({
                "task": task_index,
                "calls": self._penalty_steps,
                "weight": self.current_weight(),
                "mean": float(self._penalty_sum) / self._penalty_steps,
                "last": float(self._penalty_last),
            })
            self._reset_penalty_stats()  # a stage of several tasks logs its training once
        if self.config.importance == "output-norm":
            new = self.compute_importance(task_index, task)
        else:
            new, self._online = self._online, None  # one estimate per stage: the first task of the stage takes it
        if new is not None:
            merged = merge_importance(self.omega, self.shape_importance(new), self.merged, self.config.value("accumulate"))
            self.omega, self.merged = merged, self.merged + 1
        self.anchor = {name: p.detach().float().clone() for name, p in self.trainable().items()}
        self.tasks_done.append(task_index)

    # -- state ------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Any]:
        """The adapter's weights, the accumulated importance and the anchor, by parameter name."""
        tensors: dict[str, Any] = dict(super().state_tensors())
        if self.omega:
            tensors[OMEGA] = {name: value.detach().cpu().contiguous() for name, value in self.omega.items()}
            tensors[ANCHOR] = {name: value.detach().cpu().contiguous() for name, value in self.anchor.items()}
        return tensors

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        super().load_state_tensors({k: v for k, v in tensors.items() if k not in (OMEGA, ANCHOR)})
        params = self.trainable()
        order = {name: position for position, name in enumerate(params)}  # the model's order: sums as before saving
        groups = []
        for group in (OMEGA, ANCHOR):
            part = tensors.get(group, {})
            if not isinstance(part, dict):
                raise RunDirError(f"MAS state: {group} is not a group of tensors by parameter name")
            for name, value in part.items():
                if name not in params:
                    raise RunDirError(f"MAS state: saved tensor {group}::{name} matches no trainable parameter")
                if not isinstance(value, torch.Tensor) or value.shape != params[name].shape:
                    raise RunDirError(f"MAS state: {group}::{name} does not have the shape of its parameter")
            groups.append({
                name: part[name].to(device=params[name].device, dtype=torch.float32)
                for name in sorted(part, key=order.__getitem__)
            })
        omega, anchor = groups
        if set(omega) != set(anchor):
            raise RunDirError("MAS state: the saved importance and anchor name different parameters")
        if bool(self.merged) != bool(omega):
            raise RunDirError(f"MAS state: {self.merged} importance estimates merged by state.json, "
                              f"{'none' if not omega else 'an importance'} in the tensors")
        self.omega, self.anchor = omega, anchor

    def state_json(self) -> dict[str, Any]:
        return {
            "settings": {key: self.config.value(key) if key != "importance" else self.config.importance
                         for key in MEANING},
            "tasks_done": list(self.tasks_done),
            "merged": self.merged,
            "penalty": list(self.penalty_log),
        }

    def load_state_json(self, state: dict[str, Any]) -> None:
        saved = state.get("settings", {})
        for key in MEANING:
            own = self.config.importance if key == "importance" else self.config.value(key)
            if key in saved and saved[key] != own:
                raise RunDirError(f"MAS state: saved with {key} = {saved[key]!r}, the config asks for {own!r}; "
                                  "the saved importance cannot be continued (start a new output directory)")
        self.tasks_done = [int(i) for i in state.get("tasks_done", [])]
        self.merged = int(state.get("merged", 0))
        self.penalty_log = [dict(entry) for entry in state.get("penalty", [])]
