"""``keeplora``: KeepLoRA, residual gradient adaptation (Mao-Lin Luo, Zi-Hao Zhou, Yi-Lin Zhang, Yuanyu Wan,
Min-Ling Zhang, Tong Wei, "KeepLoRA: Continual Learning with Residual Gradient Adaptation", ICLR 2026,
arXiv:2601.19659; reference code github.com/MaolinLuo/KeepLoRA).

General knowledge of the pretrained model lives in the principal subspace of its weights; new tasks are
learned in the residual subspace. Every targeted linear layer ``y = W x + b`` (``W`` is ``out x in``; the
run's LoRA targets) keeps an orthonormal basis ``U_p`` (``in x k``, float32) of the protected *input*
directions, and

1. **initial basis** (before the first task): the top right singular vectors of the pretrained ``W``
   (``W = P diag(s) V^T``, ``U_p = V[:, :k]``) with ``k = max(1, #{i : sum_{j<=i} s_j^2 / sum s^2 <
   energy_initial})``, ``energy_initial = 0.6`` (``llava/train/extract_weights.py``: SVD of ``W^T``, left
   vectors, the ``cumsum < threshold`` count; ``scripts/Train_UCIT/train_all.sh`` passes 0.6). Note the
   count stops *before* the threshold is reached: 0.6 keeps the directions whose cumulative energy is
   still below 60%, at least one.
2. **before each task**: ``G`` = the gradient of the loss with respect to ``W`` (mean over batches of
   the token-mean answer cross-entropy), on ``gradient_fraction = 0.2`` of the task's training samples
   (evenly spaced indices ``linspace(0, n - 1, int(0.2 n))``, batch size 1, as ``extract_gradients.py``
   with ``train_all.sh``'s ratio 0.2), taken on the current (merged) model. It is projected out of the
   protected subspace on the input side, ``G' = G - G U_p U_p^T``, and ``A`` (``r x in``, frozen) = the
   top-``r`` right singular vectors of ``G'`` (rows of ``V^T``), ``r = lora.rank``. ``B`` (``out x r``)
   starts at zero and is the only trainable tensor. Since every row of ``A`` is orthogonal to
   ``span(U_p)``, ``(B A) x = 0`` for every ``x`` in ``span(U_p)`` whatever ``B`` becomes.
3. **training**: ``y = W x + b + (alpha / r) B A dropout(x)``.
4. **after each task**: ``W <- W + (alpha / r) B A`` (merged in float32, stored in ``W``'s dtype), ``B``
   and ``A`` reset, and ``U_p`` extended GPM-style to ``energy_after_task = 0.99`` from a matrix ``M``
   of the task measured on the merged model on the same 20% of its samples: ``total = ||M||_F^2``,
   ``M' = (I - U_p U_p^T) M``, directions of ``M'`` are added in order of energy until ``(total -
   ||M'||^2 + sum of the added s_i^2) / total >= 0.99`` (``MTIL/model/prin_subspace.py`` and the
   ``energy`` branch of ``extract_gradients.py``). ``M`` is

   - ``features`` (default): the layer's inputs ``M = [x_1 ... x_N]`` over all tokens of the samples,
     used through ``M M^T = sum_t x_t x_t^T`` (same directions and energies, ``in x in`` memory). The
     paper projects out "the dominant directions of previous task features" (abstract), and the authors'
     CLIP code does this (``MTIL/model/peft_modules.py::accumulate_features``, ``framework4MTIL.py``).
   - ``gradients``: the merged model's loss gradient ``M = G^T`` (``in x out``), what the authors'
     LLaVA code does (``scripts/Train_UCIT/train_all.sh`` runs ``extract_gradients.sh ... 0.2 energy``
     on the merged model, threshold 0.99 from ``configs/model_configs/LLaVA/UCIT/train_post/task*.json``).

No task identity is used at test time: the model is one merged network, generation is the backbone's.

Differences from the reference code, and why:

- LoRA is a small module swap of the run's LoRA targets (no PEFT), since ``A`` is computed and frozen and
  merging is done here. The targets include the projector for LLaVA-style backbones (the tiny model's
  default); the authors' LLaVA code applies KeepLoRA to the language model's linear layers only and
  trains the projector fully (LLaVA's LoRA recipe). Scaling, rank and dropout are the run's ``lora``
  settings (the authors' LLaVA scripts use ``r = 32``, ``alpha = r / 4``, PEFT's dropout 0.05).
- ``A`` comes from an exact SVD (the authors use ``torch.svd_lowrank`` with ``q = r``); directions whose
  singular value is negligible (``<= s_max * max(out, in) * eps``) are left as zero rows of ``A``, so a
  layer whose residual gradient is zero (or whose basis fills the input space) is not changed, instead
  of getting arbitrary, possibly protected, directions. The rows are re-projected once against ``U_p`` to
  remove round-off.
- The basis extension skips directions whose energy is negligible (the same tolerance) and
  re-orthonormalises the new directions against ``U_p``; the reference would add arbitrary null-space
  directions if the threshold cannot be met by the non-zero ones.
- The gradient and feature passes run in eval mode (the authors' gradient pass is in train mode; LLaVA
  has no dropout, so this only removes randomness). At least one sample is used when ``int(0.2 n) = 0``.
- A stage with several tasks (a joint stage) gets ``A`` from the mean gradient over all its tasks'
  selected samples; the basis is then extended with each task in turn.
- The authors' CLIP code (``MTIL/``) differs from their LLaVA code, which is followed here: it takes the
  initial basis from the *left* singular vectors of ``W`` (``prin_subspace_helper.py`` passes ``W`` as
  ``out x in``, ``prin_subspace.py`` keeps ``U``), i.e. output directions, which only line up with the
  input space because its attention matrices are square; it computes the gradient on all of the task's
  data; and it starts ``B`` at ``S V^T`` of the projected gradient (``trainer.py``,
  ``svd_lowrank(q = 4 r)``) rather than at zero.

State (resume): ``basis::<module>`` (``U_p``, float32, ``in x k``, at most ``in x in``) and, per finished
task, ``task<k>::<module>::A|B``; loading re-merges the saved ``(A, B)`` pairs in order into the
pretrained weights, which rebuilds the merged weights bit for bit (``r (in + out)`` numbers per layer and
task, far fewer than the ``in x out`` of the merged weights). Memory while computing: one float32
gradient per target weight, or one ``in x in`` Gram matrix per target layer (the ``features`` pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from mmcl.backbones.backbone import IGNORE_INDEX
from mmcl.config import LoraSettings, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, DataError, RunDirError
from mmcl.methods.base import Method, register_method
from mmcl.streams.stream import Task
from mmcl.methods.wrapped_linear import WrappedLinear, float_weights, wrap_linear_layers

SOURCES = ("features", "gradients")
BASIS = "basis"  # state group: module name -> U_p (in x k, float32)
TASK_PREFIX = "task"  # state groups task<k>: module name -> {"A", "B"} of the k-th finished task


@dataclass
class KeepLoraConfig:
    """KeepLoRA options; the rank ``r``, ``alpha`` and dropout come from the run's ``lora`` settings."""

    # MaolinLuo/KeepLoRA, MCITlib/KeepLoRA/scripts/Train_UCIT/train_all.sh (and Train_DCL): every
    # extract_gradients.sh call gets DATA_RATIO 0.2 (before the task and after it).
    gradient_fraction: float = setting(0.2, "(0, 1]", help="share of a task's training samples (evenly spaced) "
                                       "the gradient and the subspace update are computed on (reference: 0.2)")
    # train_all.sh: `extract_weights.sh configs/.../train_pre/task0.json 0.6`.
    energy_initial: float = setting(0.6, "[0, 1]", help="energy threshold of the pretrained weights' principal "
                                    "subspace protected from the first task on (reference: 0.6; 0 = none)")
    # configs/model_configs/LLaVA/UCIT/train_post/task*.json: "energy_threshold": 0.99; MTIL/configs/
    # keeplora_order1.yaml: v_/t_prin_subspace_threshold 0.99.
    energy_after_task: float = setting(0.99, "[0, 1]", help="energy threshold the protected subspace is extended "
                                       "to with each finished task (reference: 0.99; 0 = never extended)")
    # The paper's abstract ("dominant directions of previous task features") and the CLIP code
    # (MTIL/model/peft_modules.py accumulate_features) use features; the LLaVA code (MCITlib
    # extract_gradients.py, energy mode on the merged model) uses the gradient.
    subspace_source: str = setting("features", help="what extends the subspace after a task: features = the "
                                   "layer inputs (paper, CLIP code); gradients = the merged model's loss "
                                   "gradient (the authors' LLaVA code)")
    # llava/train/extract_gradients.py: --batch-size default 1 (the scripts do not set it).
    batch_size: int = setting(1, "[1, inf)", help="samples per forward pass in the gradient and feature "
                              "passes (reference: 1); padding tokens are left out of the features")

    def __post_init__(self) -> None:
        if not 0.0 < self.gradient_fraction <= 1.0:
            raise ConfigError(
                f"method.options.gradient_fraction: expected a share in (0, 1], got {self.gradient_fraction}"
            )
        for key in ("energy_initial", "energy_after_task"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"method.options.{key}: expected an energy share in [0, 1], got {value}")
        if self.subspace_source not in SOURCES:
            raise ConfigError(
                f"method.options.subspace_source: expected 'features' or 'gradients', got {self.subspace_source!r}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"method.options.batch_size: must be >= 1, got {self.batch_size}")


# -- pure functions ------------------------------------------------------------------------------
def _tolerance(values: torch.Tensor, size: int) -> float:
    """What counts as zero next to the largest of ``values`` (singular values or energies)."""
    if values.numel() == 0:
        return 0.0
    return float(values.max()) * size * torch.finfo(torch.float32).eps


def empty_basis(in_features: int, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.zeros(in_features, 0, dtype=torch.float32, device=device)


def weight_basis(weight: torch.Tensor, energy: float) -> torch.Tensor:
    """``(in, k)`` float32: the top-``k`` right singular vectors of ``weight`` (``out x in``), the input
    directions it responds to most, with ``k = max(1, #{i : cumulative energy share after i < energy})``
    (``extract_weights.py``); empty for ``energy <= 0`` or a zero weight."""
    in_features = weight.shape[1]
    if energy <= 0:
        return empty_basis(in_features, weight.device)
    _, values, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    energies = values.double() ** 2
    total = energies.sum()
    if total <= 0:
        return empty_basis(in_features, weight.device)
    k = max(1, int((torch.cumsum(energies / total, dim=0) < energy).sum()))
    return vh[:k].T.contiguous()


def extend_basis(basis: torch.Tensor, gram: torch.Tensor, energy: float) -> torch.Tensor:
    """``basis`` (``in x k``, orthonormal columns) extended GPM-style with the directions of ``M`` that it
    misses, given ``gram = M M^T`` (``in x in``): with ``total = tr(M M^T)`` and the residual ``R = (I - U U^T) M``,
    the eigen-directions of ``R R^T`` are added by decreasing energy until ``(total - tr(R R^T) + added) /
    total >= energy`` (nothing is added when ``basis`` already captures that share). Directions of
    negligible energy are never added; the result has at most ``in`` columns."""
    gram = gram.detach().float()
    basis = basis.detach().float().to(gram.device)
    in_features = gram.shape[0]
    total = float(torch.trace(gram).double())
    if energy <= 0 or total <= 0 or basis.shape[1] >= in_features:
        return basis
    residual = gram - basis @ (basis.T @ gram)
    residual = residual - (residual @ basis) @ basis.T  # (I - U U^T) M M^T (I - U U^T)
    residual = (residual + residual.T) / 2
    values, vectors = torch.linalg.eigh(residual)  # ascending
    values, vectors = values.flip(0).clamp_min(0).double(), vectors.flip(1)
    captured = (total - float(values.sum())) / total
    tolerance = _tolerance(values, in_features)
    added = 0
    while added < in_features - basis.shape[1] and captured < energy and float(values[added]) > tolerance:
        captured += float(values[added]) / total
        added += 1
    if added == 0:
        return basis
    new = vectors[:, :added]
    new = new - basis @ (basis.T @ new)
    new, _ = torch.linalg.qr(new)
    return torch.cat([basis, new], dim=1).contiguous()


def project_out(gradient: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``G - G U U^T``: the gradient (``out x in``) without its components along the input directions ``U``."""
    gradient = gradient.float()
    if basis.shape[1] == 0:
        return gradient
    basis = basis.to(gradient.device, torch.float32)
    return gradient - (gradient @ basis) @ basis.T


def frozen_a(gradient: torch.Tensor, basis: torch.Tensor, rank: int) -> torch.Tensor:
    """KeepLoRA's ``A`` (``rank x in``, float32): the top-``rank`` right singular vectors of the projected
    gradient ``G - G U U^T`` as rows; rows for negligible singular values (rank-deficient gradient, or a
    basis filling the input space) are zero. Every row is orthogonal to ``span(U)``."""
    in_features = gradient.shape[1]
    projected = project_out(gradient, basis)
    a = torch.zeros(rank, in_features, dtype=torch.float32, device=projected.device)
    _, values, vh = torch.linalg.svd(projected, full_matrices=False)
    keep = min(rank, values.numel())
    keep = int((values[:keep] > _tolerance(values, max(projected.shape))).sum()) if keep else 0
    if keep:
        a[:keep] = vh[:keep]
        if basis.shape[1]:
            basis = basis.to(a.device, torch.float32)
            a[:keep] -= (a[:keep] @ basis) @ basis.T  # remove round-off along U
    return a


def sample_indices(count: int, fraction: float) -> list[int]:
    """Evenly spaced indices of ``max(1, int(count * fraction))`` of ``count`` samples
    (``torch.linspace(0, count - 1, n).long()`` as in ``extract_gradients.py``)."""
    if count <= 0:
        return []
    n = max(1, int(count * fraction))
    return torch.linspace(0, count - 1, n).long().tolist()


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (labels not ``IGNORE_INDEX``), causal shift, float32."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


# -- the layer -----------------------------------------------------------------------------------
class KeepLoraLinear(WrappedLinear):
    """``base(x) + (alpha / rank) * B A dropout(x)`` with ``A`` a frozen buffer (``rank x in``) and ``B``
    the trainable ``(out x rank)`` parameter, both zero until a task sets ``A``; same dtype and device
    as the base weight. The base layer is frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base)
        self.rank = rank
        self.scaling = alpha / rank
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("lora_A", torch.zeros(rank, base.in_features, **factory), persistent=False)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        hidden = self.dropout(x.to(self.lora_A.dtype)) @ self.lora_A.T
        return result + (hidden @ self.lora_B.T * self.scaling).to(result.dtype)

    @torch.no_grad()
    def set_a(self, a: torch.Tensor) -> None:
        """Install a new frozen ``A`` and zero ``B``."""
        self.lora_A.copy_(a.to(self.lora_A.device, self.lora_A.dtype))
        self.lora_B.zero_()

    @torch.no_grad()
    def merge(self, a: torch.Tensor, b: torch.Tensor, sign: float = 1.0) -> None:
        """``W <- W + sign * scaling * B A`` (computed in float32 on the weight's device)."""
        weight = self.base.weight
        delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * (self.scaling * sign)
        weight.add_(delta.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def keeplora_layers(model: nn.Module) -> dict[str, KeepLoraLinear]:
    """Full module name -> KeepLoRA wrapper, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, KeepLoraLinear)}


# -- passes over data ----------------------------------------------------------------------------
def mean_gradients(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of the gradient of the answer-token mean cross-entropy w.r.t. ``weights``
    (float32, on their devices). Eval mode; the weights' ``requires_grad`` is restored afterwards.
    Batches without an answer token are skipped."""
    names, tensors = list(weights), list(weights.values())
    sums = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in weights.items()}
    flags = [t.requires_grad for t in tensors]
    was_training = model.training
    model.eval()
    used = 0
    try:
        for tensor in tensors:
            tensor.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                inputs = dict(batch)
                labels = inputs.pop("labels")
                if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
                    continue
                loss = answer_loss(model(**inputs).logits, labels)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        sums[name] += grad.float()
                used += 1
    finally:
        for tensor, flag in zip(tensors, flags):
            tensor.requires_grad_(flag)
        model.train(was_training)
    if used == 0:
        raise DataError("keeplora: no selected sample has an answer token to take the gradient of")
    return {name: value / used for name, value in sums.items()}


@torch.no_grad()
def feature_grams(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], layers: dict[str, KeepLoraLinear]
) -> dict[str, torch.Tensor]:
    """``sum_t x_t x_t^T`` (``in x in``, float32) of every layer's inputs over all tokens of ``batches``
    (positions where the batch's ``attention_mask`` is 0 are left out when the input lines up with it)."""
    grams = {name: None for name in layers}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(name: str) -> Callable:
        def hook(module: KeepLoraLinear, args: tuple, output: Any) -> None:
            x = args[0].detach()
            mask = current["mask"]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                rows = x[mask.to(x.device).bool()]
            else:
                rows = x.reshape(-1, x.shape[-1])
            rows = rows.float()
            gram = rows.T @ rows
            grams[name] = gram if grams[name] is None else grams[name] + gram

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = dict(batch)
            inputs.pop("labels", None)
            current["mask"] = inputs.get("attention_mask")
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    zeros = {name: torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device)
             for name, layer in layers.items() if grams[name] is None}  # a layer the batches never reached
    return {name: gram if gram is not None else zeros[name] for name, gram in grams.items()}


# -- the method ----------------------------------------------------------------------------------
@register_method
class KeepLora(Method[KeepLoraConfig]):
    name = "keeplora"
    state_growth = "per-task"
    supports_dora = False  # A is computed and B A merged into the weights
    description = ("KeepLoRA: frozen A from the task gradient projected out of the protected subspace "
                   "(pretrained principal + earlier tasks), train B, merge after each task")

    def __init__(self, config: KeepLoraConfig, lora: LoraSettings, seed: int):
        super().__init__(config, lora, seed)

    def init_state(self) -> None:
        self.bases: dict[str, torch.Tensor] = {}  # module name -> U_p (in x k, float32, on CPU)
        self.merged: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []  # per finished task: name -> (A, B)
        self.tasks_done: list[int] = []
        self.pending: list[tuple[int, Task]] = []  # tasks of the stage being trained (before_task seen)
        self.history: list[dict[str, Any]] = []  # per finished task: subspace size statistics
        self._layers: dict[str, KeepLoraLinear] = {}
        self._live = False  # the layers hold an A (and a B being trained) not merged yet

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self, backbone) -> None:
        super().setup(backbone)
        model = backbone.model
        for parameter in model.parameters():
            parameter.requires_grad = False
        settings = self.lora
        wrap_linear_layers(model, settings.targets or backbone.lora_targets, lambda name, base: KeepLoraLinear(
            float_weights("keeplora", name, base), settings.rank, settings.alpha, settings.dropout))
        self._layers = keeplora_layers(model)
        self.bases, self.merged, self.tasks_done, self.pending, self.history = {}, [], [], [], []
        self._live = False

    def layers(self) -> dict[str, KeepLoraLinear]:
        assert self.backbone is not None, "setup() first"
        return self._layers

    def initial_bases(self) -> None:
        """The pretrained weights' principal input subspaces (``energy_initial``), once."""
        self.bases = {
            name: weight_basis(layer.weight, self.config.energy_initial).cpu() for name, layer in self.layers().items()
        }

    # -- data -------------------------------------------------------------------------------------
    def selected_samples(self, task: Task) -> list[Sample]:
        samples = list(task.train_samples)
        return [samples[i] for i in sample_indices(len(samples), self.config.gradient_fraction)]

    def batches(self, samples: Sequence[Sample]) -> Iterator[dict[str, torch.Tensor]]:
        """Training encodings of ``samples`` in batches of ``batch_size``, on the model's device."""
        backbone, size = self.backbone, self.config.batch_size
        for start in range(0, len(samples), size):
            features = [backbone.encode_for_training(s) for s in samples[start : start + size]]
            yield {k: v.to(backbone.device) for k, v in backbone.collate(features).items()}

    def gradients(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        weights = {name: layer.weight for name, layer in self.layers().items()}
        return mean_gradients(self.backbone.model, self.batches(samples), weights)

    # -- hooks ------------------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        if not self.bases:
            self.initial_bases()
            self.history.append(self._subspace_summary("pretrained"))
        self.pending.append((task_index, task))
        samples = [s for _, pending in self.pending for s in self.selected_samples(pending)]
        gradients = self.gradients(samples)
        for name, layer in self.layers().items():
            layer.set_a(frozen_a(gradients.pop(name), self.bases[name], self.lora.rank))
        self._live = True

    def after_task(self, task_index: int, task: Task) -> None:
        layers = self.layers()
        if self._live:
            self._merge_current()  # the stage's first finished task: merge its B A once
        self.pending = [(index, t) for index, t in self.pending if index != task_index]
        if self.config.energy_after_task > 0:
            samples = self.selected_samples(task)
            if self.config.subspace_source == "features":
                grams = feature_grams(self.backbone.model, self.batches(samples), layers)
            else:
                grams = {name: g.T @ g for name, g in self.gradients(samples).items()}
            for name in layers:
                self.bases[name] = extend_basis(self.bases[name], grams.pop(name), self.config.energy_after_task).cpu()
        self.tasks_done.append(task_index)
        self.history.append(self._subspace_summary(task_index))

    def _merge_current(self) -> None:
        finished = {}
        for name, layer in self.layers().items():
            a, b = layer.lora_A.detach().to("cpu", copy=True), layer.lora_B.detach().to("cpu", copy=True)
            layer.merge(a, b)
            layer.set_a(torch.zeros_like(layer.lora_A))
            finished[name] = (a.contiguous(), b.contiguous())
        self.merged.append(finished)
        self._live = False

    def _subspace_summary(self, after: int | str) -> dict[str, Any]:
        """How much of the layers' input spaces is protected after ``after`` (a task index or "pretrained")."""
        shares = [basis.shape[1] / basis.shape[0] for basis in self.bases.values()]
        return {
            "after": after,
            "mean_protected_share": round(sum(shares) / len(shares), 6) if shares else 0.0,
            "full_layers": sum(1 for basis in self.bases.values() if basis.shape[1] >= basis.shape[0]),
        }

    # -- state ------------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        return sum(layer.lora_B.numel() for layer in self.layers().values())

    def state_tensors(self) -> dict[str, Any]:
        tensors: dict[str, Any] = {
            f"{TASK_PREFIX}{index}": {name: {"A": a, "B": b} for name, (a, b) in task_lora.items()}
            for index, task_lora in enumerate(self.merged)
        }
        if self.bases:
            tensors[BASIS] = {name: basis.contiguous() for name, basis in self.bases.items()}
        return tensors

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        layers = self.layers()
        incoming: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        bases: dict[str, torch.Tensor] = {}
        for key, group in tensors.items():
            if not isinstance(group, dict):
                raise RunDirError(f"keeplora state: unexpected tensor {key!r}")
            if key == BASIS:
                bases = dict(group)
                continue
            if not (key.startswith(TASK_PREFIX) and key[len(TASK_PREFIX):].isdigit()):
                raise RunDirError(f"keeplora state: unexpected key {key!r}")
            pairs = {}
            for name, pair in group.items():
                if not isinstance(pair, dict) or set(pair) != {"A", "B"}:
                    raise RunDirError(f"keeplora state: {key}::{name} must hold exactly A and B")
                pairs[name] = (pair["A"], pair["B"])
            incoming[int(key[len(TASK_PREFIX):])] = pairs
        if sorted(incoming) != list(range(len(incoming))) or len(incoming) != len(self.tasks_done):
            raise RunDirError(f"keeplora state: {len(incoming)} merged tasks saved, state.json lists "
                              f"{len(self.tasks_done)} finished tasks")
        merged = [incoming[i] for i in range(len(incoming))]
        if merged or bases:
            self._check_names(bases, "basis")
            for index, task_lora in enumerate(merged):
                self._check_names(task_lora, f"{TASK_PREFIX}{index}")
        for name, basis in bases.items():
            layer = layers[name]
            if basis.dim() != 2 or basis.shape[0] != layer.in_features or basis.shape[1] > layer.in_features:
                raise RunDirError(f"keeplora state: basis of {name} has shape {tuple(basis.shape)}, expected "
                                  f"({layer.in_features}, k <= {layer.in_features})")
        for index, task_lora in enumerate(merged):
            for name, (a, b) in task_lora.items():
                layer = layers[name]
                expected_a, expected_b = (layer.rank, layer.in_features), (layer.out_features, layer.rank)
                if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
                    raise RunDirError(f"keeplora state: {TASK_PREFIX}{index}::{name} has A {tuple(a.shape)}, B "
                                      f"{tuple(b.shape)}; this run needs A ({layer.rank}, {layer.in_features}), "
                                      f"B ({layer.out_features}, {layer.rank})")
        # keep the merges the weights already hold when they are a prefix of the saved ones (exact), undo
        # the others in reverse order, then merge the missing ones in order
        keep = 0
        while keep < min(len(self.merged), len(merged)) and _same(self.merged[keep], merged[keep]):
            keep += 1
        for task_lora in reversed(self.merged[keep:]):
            for name, (a, b) in task_lora.items():
                layers[name].merge(a, b, sign=-1.0)
        for task_lora in merged[keep:]:
            for name, (a, b) in task_lora.items():
                layers[name].merge(a, b)
        self.merged = self.merged[:keep] + merged[keep:]
        self.bases = {name: basis.float().cpu() for name, basis in bases.items()}
        self.pending, self._live = [], False
        for layer in layers.values():
            layer.set_a(torch.zeros_like(layer.lora_A))

    def _check_names(self, group: dict[str, Any], where: str) -> None:
        missing = sorted(self._layers.keys() - group.keys())
        unknown = sorted(group.keys() - self._layers.keys())
        if missing or unknown:
            raise RunDirError(
                f"keeplora state: {where} has missing layers {missing[:3]}, unknown layers {unknown[:3]}"
            )

    def state_json(self) -> dict[str, Any]:
        return {
            "tasks_done": list(self.tasks_done),
            "rank": self.lora.rank,
            "alpha": self.lora.alpha,
            "subspace_source": self.config.subspace_source,
            "subspace": list(self.history),
        }

    def load_state_json(self, state: dict[str, Any]) -> None:
        if state and state.get("rank", self.lora.rank) != self.lora.rank:
            raise RunDirError(
                f"keeplora state: saved with lora.rank {state.get('rank')}, this run has {self.lora.rank}"
            )
        done = state.get("tasks_done", [])
        if not isinstance(done, list) or not all(isinstance(i, int) for i in done):
            raise RunDirError(f"keeplora state: tasks_done must be a list of task indices, got {done!r}")
        self.tasks_done = list(done)
        self.history = [dict(entry) for entry in state.get("subspace", [])]


def _same(a: dict[str, tuple[torch.Tensor, torch.Tensor]], b: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
