"""``der``: Dark Experience Replay (DER) and DER++ on the replay buffer of ``replay``, with one LoRA adapter
continued across tasks (as in ``seq-lora``).

Paper: Pietro Buzzega, Matteo Boschini, Angelo Porrello, Davide Abati, Simone Calderara, "Dark Experience for
General Continual Learning: a Strong, Simple Baseline", NeurIPS 2020, arXiv:2004.07211. Reference code:
github.com/aimagelab/mammoth (``models/der.py``, ``models/derpp.py``, the reservoir of ``utils/buffer.py``, the
grid-searched settings in ``utils/best_args.py``). Only the paper's abstract could be read here; the objective below
is the paper's as implemented by the released code. DER keeps, with each buffered input x', the network's logits
z' of the moment x' was seen, and adds alpha * E_{(x', z') ~ M} ||z' - h_theta(x')||^2 to the loss; DER++ also
replays the buffered labels: + beta * E_{(x'', y'') ~ M} CE(y'', f_theta(x'')). The released code averages the
squared error over the logit entries (``F.mse_loss``, mean reduction), which is what its alpha values are tuned
for; the same mean is taken here.

What is implemented (``variant: der`` or ``der++``). The buffer is :class:`mmcl.methods.replay.ExperienceReplay`'s,
unchanged (its ids, its ``random`` / ``reservoir`` selection, its ``train_data`` that appends the buffered samples
to the current task's training data). For a generative VLM the "logits" of a sample are the next-token logits at
its answer positions: position p such that token p + 1 is an answer token (``labels[p + 1] != -100``, the shift of
the causal-LM cross-entropy). Every training micro-batch B = C + M (current-task samples C, buffered samples M)
gets the loss

    L = CE(C) + alpha * D(M) [+ beta * CE(M) for der++]

    CE(C)  the model's token cross-entropy over C's answer tokens (the buffered samples' labels are set to -100
           in their encoding, so the model's own loss covers C only; a micro-batch with no current answer token
           contributes CE(C) = 0 instead of the model's 0/0);
    D(M)   = mean over the answer positions (b, p) of the buffered rows of d(h_{b,p}, z_{b,p}) / k, with h the
           current logits (float32), z the stored ones and k the stored entries per position (below);
    CE(M)  the token cross-entropy of the buffered rows' own answer tokens, mean over those tokens.

Stored logits and ``logit_top_k``. Full storage (``logit_top_k: null``, or k >= vocabulary size V) keeps all V
logits per answer position: d = ||h - z||^2, and D is exactly the released ``F.mse_loss`` (mean over positions
and entries). Top-k storage keeps the k largest logits (values, float32, and their vocabulary ids, int32) per
answer position, sorted; what is known of the rest is only that each was <= z_min, the smallest stored value.
With ``tail: bound`` (default) d is the squared Euclidean distance from h to the set of logit vectors consistent
with that record:

    d(h, z) = sum_{j in S} (h_j - z_j)^2 + sum_{j not in S} max(0, h_j - z_min)^2        (S: the stored ids)

i.e. stored entries are regressed to their values and the others only pushed down when they rise above z_min
(regressing them *to* z_min would raise every small logit). With ``tail: ignore`` only the first sum is taken.
Both are divided by k (the mean over stored entries), so k = V gives the full-storage formula and alpha keeps
the released code's per-entry scale. Default k = 32: a buffered answer token then costs 32 x 8 bytes instead
of V x 4 (Qwen2-VL's V = 151,646: 0.6 MB per token, gigabytes for a buffer of a few thousand answers), and the
answer-token distributions of an instruction-tuned model put nearly all their mass on far fewer than 32 ids;
the paper's own heads had 10 to 200 logits (Seq-CIFAR-10 to Seq-TinyImageNet). For the tiny test models
(V of a few hundred) ``logit_top_k: null`` stores everything.

When the logits are recorded (the accepted shortcut, a deviation): the paper stores z' from the training forward
pass at the step the sample enters the reservoir (mid-task, in train mode). Here they are recorded at the end of
each task, for the samples that enter the buffer then, with the model after that task (eval mode, no gradient,
one sample at a time, so a sample's record does not depend on the others). With ``selection: reservoir`` a
sample evicted earlier can come back into a grown buffer; it gets its logits recorded then, by the model of that
later moment, and the logits of evicted samples are dropped (the memory stays the buffer's size).

Other differences to the paper / released code, and why:

- Buffer samples enter the data stream. The paper draws a separate buffer minibatch at every step (DER++: two
  independent draws, one for each term). Here they are mixed into the training data by ``replay``'s
  ``train_data`` and reach the loss in the shuffled micro-batches, each once per epoch, with the same buffered
  samples serving both DER++ terms; the number of optimiser steps per task then grows with the buffer, as in
  ``replay``. This keeps the data of ``der`` and ``replay`` identical, so the two rows differ only in the loss.
- Buffer size. The released reservoir (``utils/buffer.py``) has a fixed size over the stream; ``replay``'s grows
  by ``per_task`` (or ``ratio`` x task size) with every task. ``selection`` defaults to ``reservoir`` here (the
  released sampling) instead of ``replay``'s ``random``.
- Defaults of alpha and beta: the released settings of Seq-CIFAR-10 with a buffer of 500 (``utils/best_args.py``:
  der alpha = 0.3; derpp alpha = 0.2, beta = 0.5); they were tuned for 10-way classifier logits and
  ResNet-18 training, so re-tune them for a VLM (every stage's mean D and CE(M) are written to state.json and to
  the stage's train metrics).

How the batch knows its buffered rows: :meth:`DarkExperienceReplay.train` runs the ordinary trainer
(:func:`mmcl.training.sft.train_on_samples`) on a thin view of the backbone whose ``encode_for_training`` adds two
keys to every encoding: ``der_slot`` (a ``(1, 1)`` index into this stage's table of buffered samples, -1 for a
current sample; ``collate`` stacks them into ``(batch, 1)``) and ``der_answer`` (the 0/1 answer-token mask of the
row, right-padded with 0 like any per-token tensor), and that masks the labels of buffered samples. A forward
pre-hook on the model, registered for the duration of the stage only, takes both keys out of the forward's
arguments; ``extra_loss`` reads them from the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmcl.backbones.backbone import IGNORE_INDEX
from mmcl.config import TrainingConfig, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, DataError, RunDirError
from mmcl.methods.base import register_method
from mmcl.methods.replay import ExperienceReplay, ReplayConfig
from mmcl.streams.stream import Task
from mmcl.methods.encoding_view import EncodingView, Rewrite

SLOT_KEY = "der_slot"  # (batch, 1) int64: row -> index into the stage's buffered-sample table, -1 = current sample
ANSWER_KEY = "der_answer"  # (batch, length) int64: 1 where the row's token is an answer token (its original labels)
LOGITS = "der_logits"  # state group: "values" (P, k) float32 and "indices" (P, k) int32 (absent for full storage)
VARIANTS = ("der", "der++")
TAILS = ("bound", "ignore")
# released settings, Seq-CIFAR-10 with a buffer of 500 (aimagelab/mammoth utils/best_args.py)
DEFAULT_ALPHA = {"der": 0.3, "der++": 0.2}
DEFAULT_BETA = 0.5

Key = tuple[str, str]  # (task name, sample id), as in the replay buffer
Stored = tuple[torch.Tensor, torch.Tensor | None]  # values (L, k) float32, vocabulary ids (L, k) int32 or None


@dataclass
class DerConfig(ReplayConfig):
    """DER / DER++ options on top of ``replay``'s buffer options (``ratio``, ``per_task``, ``selection``)."""

    selection: str = setting("reservoir", help="random: a draw from each finished task; reservoir: one uniform buffer "
                             "over every sample seen (released DER code: a reservoir, mammoth utils/buffer.py)")
    variant: str = setting("der", help="der: alpha * logit regression on buffered samples | der++: plus beta * "
                           "cross-entropy on their answers (mammoth models/der.py, models/derpp.py)")
    alpha: float | None = setting(None, "[0, inf)", help="weight of the logit term; none = the released Seq-CIFAR-10 "
                                  "buffer-500 value (mammoth utils/best_args.py): 0.3 for der, 0.2 for der++")
    beta: float | None = setting(None, "[0, inf)", help="der++: weight of the buffered answers' cross-entropy; none = "
                                 "0.5 (mammoth utils/best_args.py, Seq-CIFAR-10, buffer 500)")
    logit_top_k: int | None = setting(32, "[1, inf)", help="logits kept per answer position (the largest k); none = "
                                      "the whole vocabulary (k = 32 by storage: see the module docstring)")
    tail: str = setting("bound", help="top-k storage, logits not stored: bound = pushed down to the smallest stored "
                        "value when above it (distance to the consistent set) | ignore = not regressed")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ConfigError(f"method.options.variant: expected one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.tail not in TAILS:
            raise ConfigError(f"method.options.tail: expected one of {', '.join(TAILS)}, got {self.tail!r}")
        for key in ("alpha", "beta"):
            value = getattr(self, key)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"method.options.{key}: expected a finite weight >= 0, got {value}")
        if self.logit_top_k is not None and self.logit_top_k < 1:
            raise ConfigError(f"method.options.logit_top_k: expected at least 1 (or null for all), got {self.logit_top_k}")
        if self.variant == "der" and self.beta is not None:
            raise ConfigError("method.options.beta: only der++ replays the buffered answers; set variant: der++ or drop beta")

    @property
    def alpha_value(self) -> float:
        return DEFAULT_ALPHA[self.variant] if self.alpha is None else float(self.alpha)

    @property
    def beta_value(self) -> float:
        if self.variant != "der++":
            return 0.0
        return DEFAULT_BETA if self.beta is None else float(self.beta)


# -- pure functions ----------------------------------------------------------------------------------
def compress_logits(logits: torch.Tensor, top_k: int | None) -> Stored:
    """What is stored of ``(L, V)`` answer-position logits: all of them (float32, ids None) when ``top_k`` is None
    or >= V, else the ``top_k`` largest per row, sorted in descending order, with their vocabulary ids (int32)."""
    logits = logits.detach().float()
    if top_k is None or top_k >= logits.shape[-1]:
        return logits.cpu().clone().contiguous(), None
    values, indices = logits.topk(top_k, dim=-1, largest=True, sorted=True)
    return values.cpu().contiguous(), indices.to(torch.int32).cpu().contiguous()


def dark_distance(
    logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None, tail: str = "bound"
) -> torch.Tensor:
    """Per row (answer position), the squared distance of the current ``logits`` ``(P, V)`` to what is stored of
    the past ones, divided by the stored entries per row k, in float32 (see the module docstring):

    - full storage (``indices`` None, ``values`` ``(P, V)``): ``mean_j (h_j - z_j)^2``;
    - top-k (``values`` / ``indices`` ``(P, k)``): ``[sum_{j in S} (h_j - z_j)^2 + sum_{j not in S}
      max(0, h_j - min z)^2] / k`` with ``tail="bound"``, the first sum alone over k with ``tail="ignore"``."""
    if tail not in TAILS:
        raise ValueError(f"dark_distance: unknown tail {tail!r}")
    h = logits.float()
    z = values.to(device=h.device, dtype=torch.float32)
    if indices is None:
        if z.shape != h.shape:
            raise RuntimeError(f"der: stored logits of shape {tuple(z.shape)} for current logits {tuple(h.shape)}")
        return (h - z).pow(2).mean(dim=-1)
    ids = indices.to(device=h.device, dtype=torch.long)
    if ids.shape != z.shape or ids.shape[0] != h.shape[0] or int(ids.max()) >= h.shape[-1]:
        raise RuntimeError(f"der: stored top-k of shape {tuple(z.shape)} do not fit current logits {tuple(h.shape)}")
    total = (h.gather(-1, ids) - z).pow(2).sum(dim=-1)
    if tail == "bound":
        floor = z.min(dim=-1, keepdim=True).values
        excess = (h - floor).clamp(min=0.0).scatter(-1, ids, 0.0)
        total = total + excess.pow(2).sum(dim=-1)
    return total / z.shape[-1]


def answer_positions(answer_mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``(length - 1,)``: the positions p of one row whose next token p + 1 is an answer token."""
    return answer_mask[1:].bool()


# -- the backbone as the trainer sees it during a DER stage --------------------------------------------
def buffer_index_rewrite(slots: dict[Key, int]) -> Rewrite:
    """Every training encoding carries :data:`SLOT_KEY` and :data:`ANSWER_KEY`; a buffered sample's labels are all
    ``IGNORE_INDEX`` (its answers reach the loss through ``extra_loss`` only)."""

    def rewrite(sample: Sample, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = encoded["labels"]
        slot = slots.get((sample.task, sample.id), -1)
        encoded[ANSWER_KEY] = (labels != IGNORE_INDEX).to(torch.long)
        encoded[SLOT_KEY] = torch.tensor([[slot]], dtype=torch.long)
        if slot >= 0:
            encoded["labels"] = torch.full_like(labels, IGNORE_INDEX)
        return encoded

    return rewrite


def _strip_keys(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: the model does not know the DER keys."""
    kwargs.pop(SLOT_KEY, None)
    kwargs.pop(ANSWER_KEY, None)
    return args, kwargs


def _no_answer_no_loss(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook: a forward whose labels hold no answer token (every row buffered) has CE 0 (still attached to
    the graph) instead of the 0/0 the model's mean or token-count normalisation gives."""
    labels = kwargs.get("labels")
    loss = getattr(output, "loss", None)
    if labels is None or loss is None or bool((labels[..., 1:] != IGNORE_INDEX).any()):
        return output
    output.loss = output.logits.sum() * 0.0
    return output


@register_method
class DarkExperienceReplay(ExperienceReplay):
    name = "der"
    state_growth = "per-task"
    config_class = DerConfig
    description = (
        "Sequential LoRA + replay buffer whose samples also regress the model's answer logits recorded after their "
        "task (DER; der++ adds their answers' cross-entropy), Buzzega et al. NeurIPS 2020"
    )

    def init_state(self) -> None:
        super().init_state()
        self.logits: dict[Key, Stored] = {}  # buffered sample -> its stored answer logits
        self.der_log: list[dict[str, Any]] = []  # per stage: mean D and CE(M) seen in training
        self._pending_index: list[tuple[str, str, int]] | None = None  # from state.json until the tensors load
        self._slot_keys: list[Key] = []  # this stage's buffered-sample table (SLOT_KEY indexes it)
        self._sums: dict[str, Any] = {}

    # -- recording -----------------------------------------------------------------------------------
    def _samples(self, keys: Sequence[Key]) -> dict[Key, Sample]:
        """The training samples of the tasks seen so far named by ``keys``."""
        wanted = set(keys)
        found = {
            (task.name, sample.id): sample
            for task in self.tasks
            for sample in task.train_samples
            if (task.name, sample.id) in wanted
        }
        for task_name, sample_id in wanted - found.keys():
            raise RunDirError(f"der: buffered sample {sample_id!r} of task {task_name!r} is not among the tasks seen")
        return found

    @torch.no_grad()
    def answer_logits(self, sample: Sample) -> torch.Tensor:
        """``(L, V)`` float32: the model's logits (eval mode) at the positions predicting the L answer tokens."""
        backbone = self.backbone
        assert backbone is not None, "setup() first"
        batch = {k: v.to(backbone.device) for k, v in backbone.collate([backbone.encode_for_training(sample)]).items()}
        labels = batch.pop("labels")
        model = backbone.model
        was_training = model.training
        model.eval()
        try:
            logits = model(**batch, use_cache=False).logits
        finally:
            model.train(was_training)
        if logits.shape[:2] != labels.shape:
            raise RuntimeError(f"der: logits of shape {tuple(logits.shape)} do not line up with labels {tuple(labels.shape)}")
        mask = labels[0, 1:] != IGNORE_INDEX
        if not bool(mask.any()):
            raise DataError(f"task {sample.task}: sample {sample.id}: no answer token to record logits for")
        return logits[0, :-1][mask].float()

    def record(self, sample: Sample) -> Stored:
        """What is stored for ``sample``: its answer logits, compressed to ``logit_top_k`` entries per position."""
        return compress_logits(self.answer_logits(sample), self.config.logit_top_k)

    def after_task(self, task_index: int, task: Task) -> None:
        """The buffer as ``replay`` updates it; then logits for the buffered samples that have none (the ones
        entering now), and none kept for the ones that left."""
        super().after_task(task_index, task)
        buffered = set(self.buffer)
        self.logits = {key: value for key, value in self.logits.items() if key in buffered}
        missing = [key for key in self.buffer if key not in self.logits]
        samples = self._samples(missing)
        for key in missing:
            self.logits[key] = self.record(samples[key])

    # -- training --------------------------------------------------------------------------------------
    @contextmanager
    def buffered_batches(self) -> Iterator[EncodingView]:
        """The backbone view whose encodings carry the DER keys, with the model's hooks in place for the block."""
        assert self.backbone is not None, "setup() first"
        self._slot_keys = [key for key in self.buffer if key in self.logits]
        slots = {key: slot for slot, key in enumerate(self._slot_keys)}
        model = self.backbone.model
        hooks = [
            model.register_forward_pre_hook(_strip_keys, with_kwargs=True),
            model.register_forward_hook(_no_answer_no_loss, with_kwargs=True),
        ]
        try:
            yield EncodingView(self.backbone, buffer_index_rewrite(slots))
        finally:
            for hook in hooks:
                hook.remove()

    def train(self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int) -> dict[str, Any]:
        from mmcl.training.sft import train_on_samples

        self._sums = {"calls": 0, "distance": None, "ce": None}
        with self.buffered_batches() as view:
            metrics = train_on_samples(
                view, samples, config, work_dir, seed=seed, extra_loss=self.extra_loss, log_dir=self.sft_log_dir()
            )
        entry = self._stage_entry()
        if entry is not None:
            self.der_log.append(entry)
            metrics = {**metrics, "der_distance_mean": entry["distance_mean"], "der_ce_mean": entry["ce_mean"]}
        return metrics

    def _stage_entry(self) -> dict[str, Any] | None:
        calls = self._sums.get("calls", 0)
        if not calls:
            return None
        mean = {key: (None if self._sums[key] is None else float(self._sums[key]) / calls) for key in ("distance", "ce")}
        return {"stage": self.stage_name, "calls": calls, "distance_mean": mean["distance"], "ce_mean": mean["ce"]}

    def buffered_terms(self, inputs: dict, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(D(M), CE(M)) of the micro-batch's buffered rows, or None when it has none."""
        slots = inputs.get(SLOT_KEY)
        if slots is None:
            return None
        slots = slots.reshape(-1)
        rows = [int(row) for row in torch.nonzero(slots >= 0).flatten()]
        if not rows:
            return None
        answers = inputs[ANSWER_KEY]
        if logits.shape[:2] != answers.shape:
            raise RuntimeError(f"der: logits of shape {tuple(logits.shape)} do not line up with the batch {tuple(answers.shape)}")
        current, targets, values, indices = [], [], [], []
        for row in rows:
            key = self._slot_keys[int(slots[row])]
            stored_values, stored_indices = self.logits[key]
            mask = answer_positions(answers[row])
            h = logits[row, :-1][mask]
            if h.shape[0] != stored_values.shape[0]:
                raise RuntimeError(
                    f"der: sample {key[1]!r} of task {key[0]!r} has {h.shape[0]} answer positions now and "
                    f"{stored_values.shape[0]} stored"
                )
            current.append(h)
            targets.append(inputs["input_ids"][row, 1:][mask])
            values.append(stored_values)
            if stored_indices is not None:
                indices.append(stored_indices)
        if indices and len(indices) != len(values):
            raise RuntimeError("der: buffered samples stored with and without top-k in one batch")
        h = torch.cat(current).float()
        stored_ids = torch.cat(indices) if indices else None
        distance = dark_distance(h, torch.cat(values), stored_ids, self.config.tail).mean()
        ce = F.cross_entropy(h, torch.cat(targets).to(h.device))
        return distance, ce

    def extra_loss(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> torch.Tensor | None:
        terms = self.buffered_terms(inputs, outputs.logits)
        if terms is None:
            return None
        distance, ce = terms
        loss = self.config.alpha_value * distance
        if self.config.variant == "der++":
            loss = loss + self.config.beta_value * ce
        if self._sums:
            self._sums["calls"] += 1
            for name, value in (("distance", distance), ("ce", ce)):
                value = value.detach()
                self._sums[name] = value if self._sums[name] is None else self._sums[name] + value
        return loss

    # -- state -----------------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        assert self.backbone is not None
        return sum(p.numel() for p in self.backbone.model.parameters() if p.requires_grad)

    def _stored_order(self) -> list[Key]:
        return [key for key in self.buffer if key in self.logits]

    def state_tensors(self) -> dict[str, Any]:
        tensors: dict[str, Any] = dict(super().state_tensors())
        order = self._stored_order()
        if order:
            group = {"values": torch.cat([self.logits[key][0] for key in order]).contiguous()}
            ids = [self.logits[key][1] for key in order]
            if all(i is not None for i in ids):
                group["indices"] = torch.cat(ids).contiguous()
            elif any(i is not None for i in ids):
                raise RuntimeError("der: stored logits mix top-k and full storage")
            tensors[LOGITS] = group
        return tensors

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        super().load_state_tensors({key: value for key, value in tensors.items() if key != LOGITS})
        group = tensors.get(LOGITS, {})
        index = self._pending_index if self._pending_index is not None else []
        if not isinstance(group, dict) or set(group) - {"values", "indices"}:
            raise RunDirError(f"der state: unexpected entries under {LOGITS!r}")
        values, indices = group.get("values"), group.get("indices")
        total = sum(length for _, _, length in index)
        if not index:
            if values is not None:
                raise RunDirError("der state: stored logits saved without their index in state.json")
            self.logits = {}
            return
        if values is None or values.dim() != 2 or values.shape[0] != total:
            shape = None if values is None else tuple(values.shape)
            raise RunDirError(f"der state: {total} stored answer positions in state.json, logits of shape {shape}")
        top_k = self.config.logit_top_k
        if indices is None and top_k is not None and top_k < values.shape[1]:
            raise RunDirError(f"der state: all {values.shape[1]} logits saved, config asks for logit_top_k {top_k}")
        if indices is not None and (indices.shape != values.shape or values.shape[1] != top_k):
            raise RunDirError(f"der state: top-{values.shape[1]} logits saved, config asks for logit_top_k {top_k}")
        logits: dict[Key, Stored] = {}
        start = 0
        for task_name, sample_id, length in index:
            end = start + length
            ids = None if indices is None else indices[start:end].to(torch.int32).contiguous()
            logits[(task_name, sample_id)] = (values[start:end].float().contiguous(), ids)
            start = end
        if set(logits) != set(self.buffer):
            raise RunDirError("der state: the stored logits do not cover exactly the buffered samples")
        self.logits = logits

    def state_json(self) -> dict[str, Any]:
        state = super().state_json()
        state["der"] = {
            "variant": self.config.variant,
            "logit_top_k": self.config.logit_top_k,
            "tail": self.config.tail,
            "recorded": "end_of_task",
            "index": [[task, sample_id, int(self.logits[(task, sample_id)][0].shape[0])]
                      for task, sample_id in self._stored_order()],
            "log": list(self.der_log),
        }
        return state

    def load_state_json(self, state: dict[str, Any]) -> None:
        super().load_state_json(state)
        own = state.get("der")
        if own is None:
            if self.buffer:
                raise RunDirError("der state: a buffer without the DER record (saved by another method?)")
            self._pending_index = []
            self.der_log = []
            return
        if not isinstance(own, dict):
            raise RunDirError(f"der state: expected a JSON object under 'der', got {type(own).__name__}")
        for key in ("variant", "logit_top_k", "tail"):
            if own.get(key) != getattr(self.config, key):
                raise RunDirError(f"der state: saved with {key} {own.get(key)!r}, config asks for {getattr(self.config, key)!r}")
        try:
            self._pending_index = [(str(task), str(sample_id), int(length)) for task, sample_id, length in own["index"]]
        except (KeyError, TypeError, ValueError):
            raise RunDirError("der state: malformed index of stored logits in state.json") from None
        if any(length < 1 for _, _, length in self._pending_index):
            raise RunDirError("der state: a stored sample with no answer position")
        self.der_log = [dict(entry) for entry in own.get("log", [])]
