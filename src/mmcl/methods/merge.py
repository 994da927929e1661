"""``merge``: model merging as a continual method. A LoRA is trained on each task and the model evaluated
after task ``t`` is the base model plus a merge of the task vectors of tasks ``1..t``; one ``strategy``
option picks the merge.

Papers:

- ``task-arithmetic``: Gabriel Ilharco, Marco Tulio Ribeiro, Mitchell Wortsman, Suchin Gururangan, Ludwig
  Schmidt, Hannaneh Hajishirzi, Ali Farhadi, "Editing Models with Task Arithmetic", ICLR 2023,
  arXiv:2212.04089 (code: mlfoundations/task_vectors).
- ``ties``: Prateek Yadav, Derek Tam, Leshem Choshen, Colin Raffel, Mohit Bansal, "TIES-Merging: Resolving
  Interference When Merging Models", NeurIPS 2023, arXiv:2306.01708 (code: prateeky2806/ties-merging).
- ``magmax``: Daniel Marczak, Bartłomiej Twardowski, Tomasz Trzciński, Sebastian Cygert, "MagMax:
  Leveraging Model Merging for Seamless Continual Learning", ECCV 2024, arXiv:2407.06322 (code:
  danielm1405/magmax).

Task vectors. Every targeted linear layer (the run's LoRA targets) ``y = W x + b`` gets a LoRA ``(A, B)``
(``A``: ``r x in``, ``B``: ``out x r``, ``s = alpha / r``). A task vector is, per layer, the full update
matrix ``tau = s B A`` (``out x in``, float32); merging works on these matrices, never on ``A`` and ``B``
separately (trimming or picking entries of the factors is not the same as doing it on their product).
With ``tau_1 .. tau_t`` the vectors of the tasks learned so far and ``theta_0`` the pretrained weights:

- ``task-arithmetic``: ``theta = theta_0 + lambda * sum_i tau_i``. **Each task's LoRA is trained from the
  base model** (``theta_0``, a fresh LoRA: PEFT's default initialisation, ``A`` Kaiming-uniform, ``B = 0``),
  so ``tau_i`` is task ``i``'s own update, as the paper's task vectors (each fine-tuned from the
  pre-trained model).
- ``ties``: **each task's LoRA is trained from the base model**, as for task arithmetic. Then
  (1) *trim*: in each task vector keep the ``density = 20%`` entries of largest magnitude, the others set
  to 0: ``tau^_i = tau_i * [|tau_i| >= m_i]`` with ``m_i`` the ``K``-th largest ``|entry|`` of ``tau_i`` over
  *all* its layers together (the paper's whole-model vector), ``K = max(1, round(density * D))``, ``D`` the
  number of entries; entries tied with ``m_i`` are all kept;
  (2) *elect*: ``gamma = sign(sum_i tau^_i)`` per entry;
  (3) *disjoint mean*: per entry, the mean of the ``tau^_i`` whose sign equals ``gamma`` (zeros excluded),
  0 if there is none;
  ``theta = theta_0 + lambda * tau_TIES``.
- ``magmax``: **sequential fine-tuning**: task 1's LoRA starts fresh from the base model, task ``i > 1``'s
  LoRA *starts from task ``i-1``'s LoRA* (one adapter trained on task after task, as MagMax fine-tunes
  each task from the previous task's fine-tuned model, ``finetune_splitted.py --sequential-finetuning``,
  not from the merged one). The model after sequential task ``i`` is ``theta_i = theta_0 + s B_i A_i``
  with ``(A_i, B_i)`` the adapter as it was after task ``i``, so ``tau_i = theta_i - theta_0 = s B_i A_i``.
  Per entry the ``tau_i`` entry of largest magnitude is kept: ``tau_MagMax[p] = tau_k[p]``,
  ``k = argmax_i |tau_i[p]|``; ties go to the **later** task (the reference's ``merge_max_abs`` replaces the
  running choice when ``|tau_new| >= |tau_kept|``); ``theta = theta_0 + lambda * tau_MagMax``.

Training and evaluation. The layers keep a copy of ``theta_0`` (their pretrained weights, on the CPU).
Before a task the weights are set back to ``theta_0`` and the LoRA is switched on (fresh for
task-arithmetic/ties; for magmax the adapter of the previous task, so the model trained is ``theta_{t-1}``).
After the task its ``(A, B)`` are stored, the merged weights ``theta_0 + lambda * tau_merged`` (computed in
float32, stored in the weights' dtype) are written into the layers in place and the LoRA is switched off:
evaluation (and any later stage's loading) sees one plain merged network. Merges are always computed from
the stored factors, never from the live adapter, so a resumed stage rebuilds the same weights bit for bit.
No task identity is used at test time; generation is the backbone's, so batched answers equal
one-by-one answers.

Scaling ``lambda`` defaults (option ``scaling``, none = the strategy's default):

- task-arithmetic **0.4**: Ilharco et al. choose ``lambda`` on held-out validation data from
  ``{0, 0.05, ..., 1.0}`` (their task-addition experiments; the TIES repo's README searches 0.1..1.0), so
  the paper fixes no value; 0.4 is the fixed task-arithmetic ``lambda`` the TIES paper reports for merging
  without a validation set.
- ties **1.0** with ``density`` **0.2**: the TIES paper's default ``k = 20%`` (README: ``topk20``, sign by
  ``mass``, ``dis-mean``) and its no-validation ``lambda = 1`` (the README searches 0.8..2.5).
- magmax **0.5**: the MagMax reference's merge scripts (``merge_splitted.py``: ``merge_max_abs`` evaluated
  with ``scaling_coef`` 0.5).

``lambda`` scales the merge after every task, the first one included (the model after task 1 is
``theta_0 + lambda tau_1``, as the MagMax scripts evaluate the merged model after each split).

Differences from the papers and reference code, and why:

- The task vectors are LoRA updates of the targeted linear layers (the papers fine-tune all weights);
  other weights stay at ``theta_0``. For LLaVA-style backbones the default targets include the projector.
- TIES trim count: the reference keeps the entries ``>=`` the ``(D - int(D k))``-th smallest magnitude,
  i.e. ``int(D k) + 1`` entries; here ``round(D k)`` (the stated top-k%), which differs by one entry.
  The threshold over all layers is found exactly without concatenating the layers (two counting passes
  over the float32 bit patterns of the magnitudes), so memory stays one layer's update at a time.
- TIES sign election on an exact zero sum: the reference gives such entries the model-wide majority sign;
  here they merge to 0 (no trimmed value agrees with a zero sign). With trained float updates an exact
  cancellation is vanishingly rare.
- A stage that trains several tasks at once (not planned by the runner for this method) trains one LoRA
  and makes one task vector of them.
- MagMax with LoRA: "starting from the previous task's weights" means continuing the same adapter; the
  paper fine-tunes the full model.

State (resume): per task vector ``task<k>::<module>::A|B`` (float32, ``r (in + out)`` numbers per layer and
task; the ``out x in`` updates are rebuilt from them), and in JSON the strategy, rank, alpha and which
tasks each vector holds. Memory: the CPU copy of the targeted layers' pretrained weights, and while
merging a few float32 ``out x in`` matrices of one layer at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmcl.config import LoraSettings, setting
from mmcl.errors import ConfigError, DataError, RunDirError
from mmcl.methods.base import Method, register_method
from mmcl.methods.wrapped_linear import WrappedLinear, float_weights, wrap_linear_layers
from mmcl.streams.stream import Task

STRATEGIES = ("task-arithmetic", "ties", "magmax")
# lambda per strategy when `scaling` is not set (sources in the module docstring and MergeConfig)
DEFAULT_SCALING = {"task-arithmetic": 0.4, "ties": 1.0, "magmax": 0.5}
TASK_PREFIX = "task"  # state groups task<k>: module name -> {"A", "B"} of the k-th task vector


@dataclass
class MergeConfig:
    """Model-merging options; rank, alpha and dropout of the LoRA come from the run's ``lora`` settings."""

    # Ilharco et al. 2023 (task arithmetic), Yadav et al. 2023 (TIES), Marczak et al. 2024 (MagMax, the
    # one of the three designed and evaluated as a continual method: the default).
    strategy: str = setting("magmax", help="task-arithmetic (each task's LoRA from the base, theta_0 + lambda "
                            "sum tau), ties (each from the base, trim / elect sign / disjoint mean) or magmax "
                            "(sequential LoRA, per entry the task-vector value of largest magnitude)")
    # task-arithmetic 0.4: Ilharco et al. pick lambda on validation in {0, 0.05, ..., 1}; 0.4 is the TIES
    # paper's no-validation value for task arithmetic. ties 1.0: TIES paper (no validation set).
    # magmax 0.5: danielm1405/magmax merge_splitted.py (merge_max_abs with scaling_coef 0.5).
    scaling: float | None = setting(None, "(0, inf)", help="lambda, the factor of the merged task vector; none = "
                                    "the strategy's default: task-arithmetic 0.4, ties 1.0, magmax 0.5")
    # TIES paper Sec. 3 / README `topk20` (also the MagMax repo's TIES baseline: reset_thresh 20).
    density: float = setting(0.2, "(0, 1]", help="ties only: share of each task vector's entries kept by the "
                             "trim step, the largest magnitudes over all layers (paper: top 20%)")

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"method.options.strategy: expected one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.scaling is not None and not (self.scaling > 0 and math.isfinite(self.scaling)):
            raise ConfigError(f"method.options.scaling: must be a finite number > 0 (or none), got {self.scaling}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"method.options.density: expected a share in (0, 1], got {self.density}")

    @property
    def lam(self) -> float:
        """The lambda in use: ``scaling`` or the strategy's default."""
        return DEFAULT_SCALING[self.strategy] if self.scaling is None else float(self.scaling)


# -- the merges on task vectors (pure functions) ------------------------------------------------------
def task_arithmetic(deltas: Iterable[torch.Tensor], scaling: float) -> torch.Tensor:
    """``scaling * sum_i tau_i`` (float32)."""
    total = None
    for delta in deltas:
        total = delta.float().clone() if total is None else total.add_(delta.float())
    if total is None:
        raise ValueError("task_arithmetic: no task vector")
    return total.mul_(scaling)


def trim(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """TIES' trim: the entries of ``delta`` with ``|entry| >= threshold``, the others 0 (float32)."""
    delta = delta.float()
    return delta * (delta.abs() >= threshold)


def ties_merge(deltas: Sequence[torch.Tensor], thresholds: Sequence[float], scaling: float) -> torch.Tensor:
    """TIES-Merging of one layer: trim each ``tau_i`` at its ``thresholds[i]``, elect ``gamma = sign(sum_i
    trimmed_i)`` per entry, average the trimmed values whose sign is ``gamma`` (0 where none is), times
    ``scaling``. ``deltas`` is read twice (a sequence may build its items on demand)."""
    if len(deltas) != len(thresholds) or not len(deltas):
        raise ValueError("ties_merge: one threshold per task vector, at least one vector")
    elected = None
    for delta, threshold in zip(deltas, thresholds):
        trimmed = trim(delta, threshold)
        elected = trimmed if elected is None else elected.add_(trimmed)
    elected = torch.sign(elected)
    total = torch.zeros_like(elected)
    count = torch.zeros_like(elected)
    for delta, threshold in zip(deltas, thresholds):
        trimmed = trim(delta, threshold)
        agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
        total.add_(trimmed * agrees)
        count.add_(agrees.float())
    return total.div_(count.clamp_min(1.0)).mul_(scaling)


def magmax_merge(deltas: Iterable[torch.Tensor], scaling: float) -> torch.Tensor:
    """MagMax of one layer: per entry the ``tau_i`` value of largest magnitude, ties to the later task
    (``|tau_new| >= |tau_kept|`` replaces, as the reference's ``merge_max_abs``), times ``scaling``."""
    kept = None
    for delta in deltas:
        delta = delta.float()
        kept = delta.clone() if kept is None else torch.where(delta.abs() >= kept.abs(), delta, kept)
    if kept is None:
        raise ValueError("magmax_merge: no task vector")
    return kept.mul_(scaling)


def keep_count(entries: int, density: float) -> int:
    """How many entries TIES' trim keeps: ``max(1, round(density * entries))`` (half rounds up)."""
    return max(1, math.floor(density * entries + 0.5))


_HIGH = 1 << 15  # |x| as float32 has sign bit 0: its upper 16 bits are < 2^15
_LOW = 1 << 16


def _first_reaching(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Scanning ``counts`` (per bin, ascending bins) from the top: the bin in which the ``k``-th largest
    item falls, and how many items lie in higher bins."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)).item())
    index = counts.numel() - 1 - position
    return index, int(from_top[position].item() - counts[index].item())


def kth_largest_magnitude(chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """The ``k``-th largest ``|x|`` (1-based) over every entry of the tensors ``chunks()`` yields, exactly
    and without concatenating them: two counting passes over the bit patterns of ``|x|`` as float32 (for
    non-negative floats the bit pattern orders like the value): the upper 16 bits, then the lower 16 bits
    within the chosen upper bin. 0.0 when there are fewer than ``k`` entries."""
    if k < 1:
        raise ValueError(f"kth_largest_magnitude: k must be >= 1, got {k}")
    high_counts = torch.zeros(_HIGH, dtype=torch.int64)
    for chunk in chunks():
        bits = chunk.detach().float().abs().contiguous().view(torch.int32).flatten()
        high_counts += torch.bincount((bits >> 16).long(), minlength=_HIGH).cpu()
    if int(high_counts.sum()) < k:
        return 0.0
    high, above = _first_reaching(high_counts, k)
    low_counts = torch.zeros(_LOW, dtype=torch.int64)
    for chunk in chunks():
        bits = chunk.detach().float().abs().contiguous().view(torch.int32).flatten()
        inside = bits[(bits >> 16) == high]
        low_counts += torch.bincount((inside & 0xFFFF).long(), minlength=_LOW).cpu()
    low, _ = _first_reaching(low_counts, k - above)
    return float(torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32).item())


# -- the layer -----------------------------------------------------------------------------------------
class MergeLinear(WrappedLinear):
    """A frozen linear layer with a switchable LoRA: ``base(x) + s B A dropout(x)`` while ``active``, else
    ``base(x)`` (whose weight then holds the merged weights). ``A``/``B`` are float32 parameters; the
    pretrained weight is kept as ``base_weight`` (a CPU copy, outside the module's state)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base)
        self.rank = rank
        self.scaling = alpha / rank
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = False
        self.base_weight = base.weight.detach().to("cpu", copy=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if not self.active:
            return result
        hidden = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T
        return result + (hidden @ self.lora_B.T * self.scaling).to(result.dtype)

    def delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The update ``s B A`` (``out x in``, float32, on the weight's device)."""
        device = self.base.weight.device
        return (b.to(device, torch.float32) @ a.to(device, torch.float32)) * self.scaling

    @torch.no_grad()
    def set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_A.copy_(a.to(self.lora_A.device, torch.float32))
        self.lora_B.copy_(b.to(self.lora_B.device, torch.float32))

    @torch.no_grad()
    def fresh_factors(self, generator: torch.Generator) -> None:
        """PEFT's default LoRA initialisation: ``A`` Kaiming-uniform (a = sqrt(5)), ``B = 0``."""
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.set_factors(a, torch.zeros(self.lora_B.shape))

    @torch.no_grad()
    def write_weight(self, delta: torch.Tensor | None) -> None:
        """``W <- theta_0`` (``delta`` None) or ``W <- theta_0 + delta`` (added in float32)."""
        weight = self.base.weight
        if delta is None:
            weight.copy_(self.base_weight.to(weight.device))
        else:
            merged = self.base_weight.to(weight.device, torch.float32) + delta.to(weight.device, torch.float32)
            weight.copy_(merged.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, active={self.active}"


def merge_layers(model: nn.Module) -> dict[str, MergeLinear]:
    """Full module name -> merge wrapper, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MergeLinear)}


class _LayerDeltas(Sequence):
    """The task vectors of one layer, ``s B_i A_i``, built on demand (one at a time in memory)."""

    def __init__(self, layer: MergeLinear, factors: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layer, self.factors = layer, factors

    def __len__(self) -> int:
        return len(self.factors)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        a, b = self.factors[index]
        return self.layer.delta(a, b)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for a, b in self.factors:
            yield self.layer.delta(a, b)


# -- the method ----------------------------------------------------------------------------------------
@register_method
class Merge(Method[MergeConfig]):
    name = "merge"
    state_growth = "per-task"
    supports_dora = False  # the task vectors are s B A, merged entry by entry into the weights
    description = ("Model merging of per-task LoRA task vectors into the base weights after each task: task "
                   "arithmetic, TIES-Merging or MagMax (strategy option)")

    def __init__(self, config: MergeConfig, lora: LoraSettings, seed: int):
        super().__init__(config, lora, seed)

    def init_state(self) -> None:
        self.vectors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []  # per task vector: name -> (A, B)
        self.vector_tasks: list[list[int]] = []  # the task indices each vector was trained on
        self.thresholds: list[float] = []  # ties: each vector's trim threshold (derived, not saved)
        self._layers: dict[str, MergeLinear] = {}
        self._live = False  # a LoRA is being trained (before_task seen, after_task not yet)

    # -- set-up -------------------------------------------------------------------------------------
    def setup(self, backbone) -> None:
        super().setup(backbone)
        model = backbone.model
        for parameter in model.parameters():
            parameter.requires_grad = False
        settings = self.lora
        wrap_linear_layers(model, settings.targets or backbone.lora_targets, lambda name, base: MergeLinear(
            float_weights("merge", name, base), settings.rank, settings.alpha, settings.dropout))
        self._layers = merge_layers(model)
        self.vectors, self.vector_tasks, self.thresholds, self._live = [], [], [], False

    def layers(self) -> dict[str, MergeLinear]:
        assert self.backbone is not None, "setup() first"
        return self._layers

    @property
    def sequential(self) -> bool:
        """Whether each task's LoRA starts from the previous task's (magmax) rather than from scratch."""
        return self.config.strategy == "magmax"

    # -- hooks --------------------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        if self._live:  # a further task of the same stage: trained together, one task vector
            return
        generator = torch.Generator().manual_seed(self.seed + task_index)
        previous = self.vectors[-1] if self.sequential and self.vectors else None
        for name, layer in self.layers().items():
            layer.write_weight(None)  # back to theta_0
            if previous is None:
                layer.fresh_factors(generator)
            else:
                layer.set_factors(*previous[name])
            layer.active = True
        self._live = True

    def after_task(self, task_index: int, task: Task) -> None:
        if not self._live:
            if not self.vector_tasks:
                raise DataError(f"merge: after_task({task.name}) without before_task")
            self.vector_tasks[-1].append(task_index)
            return
        self.vectors.append({
            name: (layer.lora_A.detach().to("cpu", torch.float32, copy=True).contiguous(),
                   layer.lora_B.detach().to("cpu", torch.float32, copy=True).contiguous())
            for name, layer in self.layers().items()
        })  # fmt: skip
        self.vector_tasks.append([task_index])
        self._live = False
        if self.config.strategy == "ties":
            self.thresholds.append(self.trim_threshold(len(self.vectors) - 1))
        self.apply_merge()

    # -- merging ------------------------------------------------------------------------------------
    def layer_deltas(self, name: str) -> _LayerDeltas:
        return _LayerDeltas(self.layers()[name], [vector[name] for vector in self.vectors])

    def trim_threshold(self, index: int) -> float:
        """TIES: the magnitude of the ``keep_count``-th largest entry of task vector ``index`` over all layers."""
        vector, layers = self.vectors[index], self.layers()
        entries = sum(layer.in_features * layer.out_features for layer in layers.values())

        def chunks() -> Iterator[torch.Tensor]:
            for name, layer in layers.items():
                yield layer.delta(*vector[name])

        return kth_largest_magnitude(chunks, keep_count(entries, self.config.density))

    def merged_delta(self, name: str) -> torch.Tensor:
        """``lambda * tau_merged`` of layer ``name`` (float32, on the weight's device)."""
        deltas, lam = self.layer_deltas(name), self.config.lam
        if self.config.strategy == "task-arithmetic":
            return task_arithmetic(deltas, lam)
        if self.config.strategy == "ties":
            return ties_merge(deltas, self.thresholds, lam)
        return magmax_merge(deltas, lam)

    @torch.no_grad()
    def apply_merge(self) -> None:
        """Write ``theta_0 + lambda tau_merged`` (or ``theta_0`` before any task) into the layers; LoRA off."""
        for name, layer in self.layers().items():
            layer.write_weight(self.merged_delta(name) if self.vectors else None)
            layer.active = False

    # -- state --------------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        return sum(layer.lora_A.numel() + layer.lora_B.numel() for layer in self.layers().values())

    def state_tensors(self) -> dict[str, Any]:
        return {
            f"{TASK_PREFIX}{index}": {name: {"A": a, "B": b} for name, (a, b) in vector.items()}
            for index, vector in enumerate(self.vectors)
        }

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        layers = self.layers()
        incoming: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for key, group in tensors.items():
            if not (isinstance(group, dict) and key.startswith(TASK_PREFIX) and key[len(TASK_PREFIX):].isdigit()):
                raise RunDirError(f"merge state: unexpected key {key!r} (expected {TASK_PREFIX}<k> groups)")
            missing, unknown = sorted(layers.keys() - group.keys()), sorted(group.keys() - layers.keys())
            if missing or unknown:
                raise RunDirError(f"merge state: {key} has missing layers {missing[:3]}, unknown layers {unknown[:3]}")
            pairs = {}
            for name, layer in layers.items():
                pair = group[name]
                if not isinstance(pair, dict) or set(pair) != {"A", "B"}:
                    raise RunDirError(f"merge state: {key}::{name} must hold exactly A and B")
                a, b = pair["A"], pair["B"]
                if tuple(a.shape) != (layer.rank, layer.in_features) or tuple(b.shape) != (layer.out_features, layer.rank):
                    raise RunDirError(f"merge state: {key}::{name} has A {tuple(a.shape)}, B {tuple(b.shape)}; this "
                                      f"run needs A ({layer.rank}, {layer.in_features}), B ({layer.out_features}, "
                                      f"{layer.rank})")
                pairs[name] = (a.to("cpu", torch.float32).contiguous(), b.to("cpu", torch.float32).contiguous())
            incoming[int(key[len(TASK_PREFIX):])] = pairs
        if sorted(incoming) != list(range(len(incoming))) or len(incoming) != len(self.vector_tasks):
            raise RunDirError(f"merge state: {len(incoming)} task vectors saved (task0, task1, ...), state.json lists "
                              f"{len(self.vector_tasks)}")
        self.vectors = [incoming[i] for i in range(len(incoming))]
        self._live = False
        self.thresholds = []
        if self.config.strategy == "ties":
            self.thresholds = [self.trim_threshold(i) for i in range(len(self.vectors))]
        self.apply_merge()

    def state_json(self) -> dict[str, Any]:
        return {
            "strategy": self.config.strategy,
            "rank": self.lora.rank,
            "alpha": self.lora.alpha,
            "scaling": self.config.lam,
            "vector_tasks": [list(tasks) for tasks in self.vector_tasks],
        }

    def load_state_json(self, state: dict[str, Any]) -> None:
        for key, ours in (("strategy", self.config.strategy), ("rank", self.lora.rank), ("alpha", self.lora.alpha)):
            if key in state and state[key] != ours:
                raise RunDirError(f"merge state: saved with {key} {state[key]!r}, this run has {ours!r}")
        tasks = state.get("vector_tasks", [])
        if not isinstance(tasks, list) or not all(
            isinstance(group, list) and group and all(isinstance(i, int) for i in group) for group in tasks
        ):
            raise RunDirError(f"merge state: vector_tasks must be a list of non-empty lists of task indices, got {tasks!r}")
        self.vector_tasks = [list(group) for group in tasks]
