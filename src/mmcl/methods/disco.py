"""``disco``: DISCO, one LoRA subspace per task, selectively activated per sample by the instruction's
similarity to task prototypes (Guo, Zeng, Zhu, Liu, Wang, Xu, Zhang and Liu, 2025, "Federated Continual
Instruction Tuning", ICCV 2025, arXiv:2503.12897; code github.com/Ghy0501/FCIT, and the centralized form
that MCITlib runs, github.com/Ghy0501/MCITlib ``DISCO/``).

Variant implemented: MCITlib's centralized DISCO (``clients: 1``, the default), plus the federated
training of the paper as an option (``clients > 1``, below).

**Subspaces.** Every targeted linear layer ``W`` (frozen) of the language model gets one LoRA per task,
``(A_k, B_k)`` with ``A_k`` of shape ``(r, in)`` and ``B_k`` of shape ``(out, r)``, ``r = lora.rank``,
scaling ``s = lora.alpha / lora.rank``; ``B_k`` starts at zero. While task ``t`` trains, only LoRA ``t``
is active and trainable, the older ones frozen and switched off (MCITlib ``CoIN/peft/tuners/
clitmoelora.py``, ``CoINMOELoraLinear.forward``: in training mode only ``loraA[lora_id]`` /
``loraB[lora_id]`` with ``lora_id = cur_task``):

    training task t:   y = W x + b + s B_t A_t dropout(x)

**Prototypes.** After task ``t`` its prototype ``p_t`` is the mean text feature of the task's training
instructions (MCITlib ``llava/model/llava_arch.py`` accumulates the CLIP text features of every training
batch of the current task into ``global_text_feature[cur_task]``; its ``text_boundary`` stays 1, so it
keeps the sum, whose direction -- all a cosine sees -- is the mean's).

**Selective activation.** At inference the instruction of each sample gets its text feature ``f`` and the
mixing weights over the ``K`` learned tasks

    w = softmax_k( cos(f, p_k) / tau ),   tau = 0.05   (MCITlib llava_arch.py: ``F.softmax(cos_sim / 0.05)``
                                                        over the first ``num_task`` prototypes)
    y = W x + b + sum_k w_k s B_k A_k x

a weighted sum of the LoRA outputs in every layer (MCITlib: the block-diagonal ``lora_AB`` matrix holds
``w_k`` times the identity on LoRA ``k``'s rank slots between the concatenated ``A`` and ``B``). The
weights are decided per sample: a ``(batch, K)`` tensor that every :class:`TaskLoraLinear` reads in its
forward (rows = samples), so a batch gives the answers its samples get one by one. ``task`` is never
used to answer (only to count how often the sample's own LoRA got the largest weight, for the report).

Where this differs from the reference, and why:

- Text features come from :class:`mmcl.methods.sample_features.TextFeatures`: by default the mean of the
  backbone's input embeddings over the instruction's tokens; ``text_encoder: PATH`` uses a local encoder's
  mean last hidden state instead. The reference uses the pooled output of a CLIP ViT-L/14-336 text tower
  (nothing can be downloaded here). The image feature the reference also computes is unused there
  (``cos_sim = cos_sim_text``), and unused here.
- MCITlib computes one mixing vector per batch (from the batch-mean text feature) and sets it on every
  layer; its evaluation script answers one sample at a time, so that is per sample too. Here it is per
  sample whatever the batch.
- LoRA shape: MCITlib splits one rank-96 LoRA (alpha 192) into 6 task slots of rank 16 with scaling
  192/96 = 2 (``configs/model_configs/LLaVA/UCIT/train/task*.json``, ``scripts/CoIN/Train_UCIT/*.sh``:
  ``--lora_alpha $((RANK * 2))``); a slot is thus a rank-16 LoRA with alpha/r = 2. Here each task's LoRA
  takes the run's ``lora.rank`` and ``lora.alpha`` (the default r 8, alpha 16 also has alpha/r = 2), and
  the number of LoRAs grows with the stream instead of being fixed in advance.
- Layers: only targeted linear layers inside the language model get LoRAs (MCITlib: ``q/k/v/o_proj``,
  ``gate/up/down_proj`` of the 32 decoder layers). Per-sample mixing needs layers whose input has one row
  per sample; the projector's input has one row per image (or per patch, per tile), so the projector
  layers the backbone's default targets include are left out. The reference trains LLaVA's projector fully
  and shares it across tasks (``--mm_projector_lr 2e-5``); here it stays frozen, so no part of the model is
  shared between tasks.
- ``A`` is initialised Kaiming-uniform (``a = sqrt(5)``, as PEFT and the other LoRA methods of mmcl, so
  their calibrated learning rates carry over); ``a_init: normal`` gives MCITlib's ``N(0, 0.01^2)``.

**Federated form** (``clients > 1``; Guo et al. Sec. 4, FCIT ``ETrain/Fed_utils/model_aggregation.py``).
The stage's training data is split into ``clients`` equal shards (a seeded shuffle, then round robin). For
``rounds`` communication rounds, ``round(client_fraction * clients)`` clients are drawn; each starts from
the global LoRA ``t``, trains it on its shard with the run's ``training`` settings (a fresh optimizer and
schedule each time), and the server averages the clients' LoRA ``t`` weighted by shard size (FedAvg). The
paper's Dynamic Knowledge Organization clusters the clients of a round by the cosine similarity of their
mean text features (threshold 0.9) and averages each cluster into its own subspace, so that clients holding
different tasks in the same round do not overwrite each other. A stage of an mmcl stream holds one task,
so every client holds shards of the same task and the clustering has a single cluster: the cluster-wise
average is the plain FedAvg above, and it is what is implemented (no clustering code). The task prototype
is the size-weighted mean of the clients' mean features, i.e. the mean over the stage's data, as in the
centralized form. FCIT's Dirichlet split over the several datasets of a stage has no counterpart here
(shards are i.i.d.); FCIT scripts use 50 clients, 10 rounds, 10% of the clients per round, 1 local epoch
(``scripts/LLaVA/Train_FCIT_task_hom/task_*.sh``).

Stage state: every LoRA (``lora::<k>::<layer>.lora_A`` / ``.lora_B``) and the prototypes ``(K, width)``;
JSON: the learned task names, rank, alpha, and the text feature source.
"""

from __future__ import annotations

import math
import random
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.config import LoraSettings, TrainingConfig, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import Method, register_method
from mmcl.methods.sample_features import TextFeatures
from mmcl.streams.stream import Task
from mmcl.methods.wrapped_linear import WrappedLinear

A_INITS = ("kaiming", "normal")
NORMAL_INIT_STD = 0.01  # MCITlib clitmoelora.py reset_lora_parameters: nn.init.normal_(..., std=0.01)


@dataclass
class DiscoConfig:
    """DISCO options; each task's LoRA takes the run's ``lora`` rank, alpha and dropout. Sources: MCITlib
    (github.com/Ghy0501/MCITlib, ``DISCO/``) for the centralized form, FCIT (github.com/Ghy0501/FCIT) for
    the federated one."""

    # MCITlib DISCO/llava/model/llava_arch.py: cos_sim_softmax = F.softmax(cos_sim / 0.05)
    temperature: float = setting(0.05, "(0, inf)", "softmax temperature over the cosine similarities of the "
                                 "instruction to the task prototypes (MCITlib: 0.05)")
    text_encoder: str | None = setting(None, help="local transformers checkpoint for the instruction features "
                                       "(mean last hidden state); none = the backbone's mean input embedding "
                                       "(the paper: a CLIP text tower)")
    # MCITlib clitmoelora.py: normal(0, 0.01); PEFT / the other mmcl LoRA methods: Kaiming-uniform a=sqrt(5)
    a_init: str = setting("kaiming", help="initialisation of each new LoRA's A: kaiming (PEFT's, as the other "
                          "LoRA methods here) or normal (N(0, 0.01^2), MCITlib)")
    # 1 = MCITlib's centralized training. FCIT scripts (Train_FCIT_task_hom/task_*.sh): --num_clients 50
    clients: int = setting(1, "[1, inf)", "federated clients holding equal shards of each task's data; "
                           "1 = centralized training (MCITlib); FCIT scripts use 50")
    # FCIT scripts: --num_communication_rounds 10
    rounds: int = setting(10, "[1, inf)", "communication rounds per task when clients > 1 (FCIT: 10)")
    # FCIT scripts: --client_selection_frac 0.1
    client_fraction: float = setting(0.1, "(0, 1]", "share of the clients training in each round when "
                                     "clients > 1 (FCIT: 0.1)")

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"method.options.temperature: must be > 0, got {self.temperature}")
        if self.a_init not in A_INITS:
            raise ConfigError(f"method.options.a_init: expected one of {', '.join(A_INITS)}, got {self.a_init!r}")
        if self.clients < 1 or self.rounds < 1:
            raise ConfigError(f"method.options: clients and rounds must be >= 1, got {self.clients}, {self.rounds}")
        if not 0 < self.client_fraction <= 1:
            raise ConfigError(f"method.options.client_fraction: must be in (0, 1], got {self.client_fraction}")


# -- the layer ------------------------------------------------------------------------------------
class Activation:
    """What every :class:`TaskLoraLinear` of a model reads in its forward (one shared object): ``task``, the
    one LoRA that is on (training), or else ``weights``, a ``(batch, K)`` tensor mixing the K LoRAs per
    sample (inference)."""

    def __init__(self) -> None:
        self.task: int | None = None
        self.weights: torch.Tensor | None = None


class TaskLoraLinear(WrappedLinear):
    """A frozen ``nn.Linear`` plus one LoRA per task (``lora_A[k]`` ``(r, in)``, ``lora_B[k]`` ``(out, r)``):

    - ``activation.task = t``: ``base(x) + s B_t A_t dropout(x)``;
    - else ``activation.weights = w`` ``(batch, K)``: ``base(x) + sum_k w[b, k] s B_k A_k dropout(x)`` for
      the rows ``x[b]`` (the first dimension of ``x`` is the sample), computed as two matmuls over the
      concatenated ``A`` and ``B``;
    - neither: ``base(x)`` (the runner evaluates the base model, row 0, with ``backbone.generate``).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, activation: Activation, dropout: float = 0.0):
        super().__init__(base)
        self.rank = rank
        self.scaling = alpha / rank
        self.activation = activation  # a plain object: not a submodule, not in the state dict
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def tasks(self) -> int:
        return len(self.lora_A)

    def add_task(self, a_init: str | None = "kaiming", generator: torch.Generator | None = None) -> None:
        """Append a LoRA: ``B = 0`` and ``A`` drawn on CPU from ``generator`` (``a_init`` None: left
        uninitialised, for weights about to be loaded); both take the base layer's dtype and device."""
        a = torch.zeros(self.rank, self.in_features)
        if a_init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        elif a_init == "normal":
            nn.init.normal_(a, std=NORMAL_INIT_STD, generator=generator)
        factory = {"dtype": self.base.weight.dtype, "device": self.base.weight.device}
        self.lora_A.append(nn.Parameter(a.to(**factory), requires_grad=False))
        self.lora_B.append(nn.Parameter(torch.zeros(self.out_features, self.rank, **factory), requires_grad=False))

    def keep_tasks(self, count: int) -> None:
        """Drop the LoRAs after the first ``count`` (a stage reloaded after a later one was trained)."""
        if count < self.tasks:
            self.lora_A = nn.ParameterList(list(self.lora_A)[:count])
            self.lora_B = nn.ParameterList(list(self.lora_B)[:count])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        task, weights = self.activation.task, self.activation.weights
        if task is not None:
            hidden = self.dropout(x.to(self.lora_A[task].dtype)) @ self.lora_A[task].T
            return result + ((hidden @ self.lora_B[task].T) * self.scaling).to(result.dtype)
        if weights is None:  # nothing activated: the base layer (the runner's row 0 is the base model)
            return result
        if weights.shape != (x.shape[0], self.tasks):
            raise RuntimeError(f"disco: mixing weights of shape {tuple(weights.shape)} for an input of "
                               f"{x.shape[0]} rows and {self.tasks} LoRAs")
        if not self.tasks:
            return result
        lora_A = torch.cat(list(self.lora_A))  # (K r, in)
        lora_B = torch.cat(list(self.lora_B), dim=1)  # (out, K r)
        hidden = self.dropout(x.to(lora_A.dtype)) @ lora_A.T  # (batch, ..., K r)
        mix = (weights.to(hidden) * self.scaling).reshape(x.shape[0], *[1] * (x.dim() - 2), self.tasks, 1)
        hidden = (hidden.unflatten(-1, (self.tasks, self.rank)) * mix).flatten(-2)
        return result + (hidden @ lora_B.T).to(result.dtype)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, rank={self.rank}, scaling={self.scaling:g}"


def language_model_linears(model: nn.Module, targets: str) -> list[str]:
    """Names of the ``nn.Linear`` layers inside the language model whose full name ``re.fullmatch``-es
    ``targets`` (ConfigError when none)."""
    from mmcl.backbones.parts import find_layout

    try:
        pattern = re.compile(targets)
    except re.error as exc:
        raise ConfigError(f"lora.targets: invalid regex {targets!r} ({exc})") from None
    layout, root = find_layout(model)
    inside = {id(module) for module in getattr(root, layout.language_model).modules()}
    names = [
        name for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and id(module) in inside and pattern.fullmatch(name)
    ]  # fmt: skip
    if not names:
        raise ConfigError(f"lora.targets: regex {targets!r} matches no linear layer of the language model (disco "
                          "puts its LoRAs there only)")
    return names


def wrap_layers(model: nn.Module, names: Sequence[str], lora: LoraSettings, activation: Activation) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, TaskLoraLinear(getattr(parent, child), lora.rank, lora.alpha, activation, lora.dropout))


def task_layers(model: nn.Module) -> dict[str, TaskLoraLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, TaskLoraLinear)}


def activation_weights(features: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax_k(cos(f, p_k) / temperature)`` for every row ``f`` of ``features``: ``(n, K)``. The cosines
    are elementwise products summed per row (not a matmul), so a row's weights do not depend on the
    other rows of the batch, to the last bit."""
    if prototypes.shape[0] == 0:
        return features.new_zeros(features.shape[0], 0)
    unit_features = nn.functional.normalize(features.float(), dim=-1)
    unit_prototypes = nn.functional.normalize(prototypes.float(), dim=-1)
    cosines = (unit_features[:, None, :] * unit_prototypes[None, :, :]).sum(dim=-1)
    return torch.softmax(cosines / temperature, dim=-1)


def client_shards(n_samples: int, clients: int, seed: int) -> list[list[int]]:
    """Sample indices of each client: a seeded shuffle dealt round robin (sizes differ by at most one)."""
    order = list(range(n_samples))
    random.Random(f"disco-clients/{seed}").shuffle(order)
    return [sorted(order[client::clients]) for client in range(clients)]


# -- the method -----------------------------------------------------------------------------------

def add_task_slot(layers: dict[str, TaskLoraLinear], slot: int, a_init: str, seed: int, method: str) -> None:
    """Every layer drops LoRAs past ``slot`` (left by an interrupted stage) and gets a fresh trainable one
    there, ``A`` drawn from a generator seeded with ``seed``; the older ones stay frozen."""
    generator = torch.Generator().manual_seed(seed)
    for name, layer in layers.items():
        if layer.tasks < slot:
            raise RuntimeError(f"{method}: {name} holds {layer.tasks} LoRAs before task {slot + 1} (state not loaded?)")
        layer.keep_tasks(slot)
        layer.add_task(a_init, generator)
        layer.lora_A[slot].requires_grad = True
        layer.lora_B[slot].requires_grad = True

@register_method
class Disco(Method[DiscoConfig]):
    name = "disco"
    state_growth = "per-task"
    supports_dora = False  # the task LoRAs are plain B A pairs, concatenated and mixed per sample
    description = ("DISCO: a LoRA per task, mixed per sample by softmax(cos(instruction feature, task "
                   "prototypes) / temperature); optional federated training (FedAvg of client LoRAs)")

    def init_state(self) -> None:
        self.trained: list[str] = []  # task names, one LoRA each, in learning order
        self.prototypes = torch.zeros(0, 0)  # (K, width) float32
        self.pending: torch.Tensor | None = None  # the prototype of the task being trained
        self.activation = Activation()
        self.features = TextFeatures(self.config.text_encoder)
        self.routing: dict[str, dict[str, dict[str, float]]] = {}  # stage -> task -> counters

    def setup(self, backbone) -> None:
        super().setup(backbone)
        model = backbone.model
        for parameter in model.parameters():
            parameter.requires_grad = False
        names = language_model_linears(model, self.lora.targets or backbone.lora_targets)
        wrap_layers(model, names, self.lora, self.activation)

    def _layers(self) -> dict[str, TaskLoraLinear]:
        assert self.backbone is not None, "setup() first"
        return task_layers(self.backbone.model)

    # -- training --------------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        slot = len(self.trained)
        add_task_slot(self._layers(), slot, self.config.a_init, self.seed + task_index, "disco")
        self.activation.task, self.activation.weights = slot, None

    def train_data(self, task_index: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
        samples = list(samples)
        if samples:
            self.pending = self.features(self.backbone, samples).mean(dim=0)
        return samples

    def train(self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int) -> dict[str, Any]:
        if self.config.clients <= 1:
            return super().train(samples, config, work_dir, seed)
        return self.train_federated(samples, config, work_dir, seed)

    def _slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, layer in self._layers().items():
            tensors[f"{name}.lora_A"] = layer.lora_A[slot].detach().clone()
            tensors[f"{name}.lora_B"] = layer.lora_B[slot].detach().clone()
        return tensors

    def _load_slot(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, layer in self._layers().items():
                layer.lora_A[slot].copy_(tensors[f"{name}.lora_A"])
                layer.lora_B[slot].copy_(tensors[f"{name}.lora_B"])

    def train_federated(
        self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int
    ) -> dict[str, Any]:
        """FedAvg of the current task's LoRA over ``clients`` shards for ``rounds`` rounds (module docstring)."""
        from mmcl.training.sft import train_on_samples

        options, slot = self.config, self.activation.task
        assert slot is not None, "before_task() first"
        shards = client_shards(len(samples), options.clients, seed)
        per_round = max(1, round(options.client_fraction * options.clients))
        state, losses = self._slot_tensors(slot), []
        for round_index in range(options.rounds):
            draw = random.Random(f"disco-round/{seed}/{round_index}")
            chosen = sorted(draw.sample(range(options.clients), per_round))
            total: dict[str, torch.Tensor] = {}
            size = 0
            for client in chosen:
                shard = [samples[index] for index in shards[client]]
                if not shard:
                    continue
                self._load_slot(slot, state)
                local_dir = work_dir / f"round{round_index}_client{client}"
                metrics = train_on_samples(self.backbone, shard, config, local_dir,
                                           seed=seed + 1000 * (round_index + 1) + client, extra_loss=self.extra_loss)
                shutil.rmtree(local_dir, ignore_errors=True)
                losses.append(float(metrics.get("train_loss", float("nan"))))
                for key, value in self._slot_tensors(slot).items():
                    total[key] = total.get(key, 0) + value.double() * len(shard)
                size += len(shard)
            if size:
                state = {key: (value / size).to(state[key].dtype) for key, value in total.items()}
        self._load_slot(slot, state)
        return {"train_loss": sum(losses) / len(losses) if losses else float("nan"),
                "rounds": options.rounds, "clients_per_round": per_round, "local_trainings": len(losses)}

    def after_task(self, task_index: int, task: Task) -> None:
        if self.pending is None:
            raise RuntimeError(f"disco: task {task.name} trained without training data (no prototype)")
        old = [self.prototypes] if self.trained else []
        self.prototypes = torch.cat([*old, self.pending[None].float()])
        self.trained.append(task.name)
        self.pending = None
        self.activation.task = None
        for layer in self._layers().values():
            for parameter in (*layer.lora_A, *layer.lora_B):
                parameter.requires_grad = False

    # -- inference -------------------------------------------------------------------------------
    def mixing_weights(self, samples: Sequence[Sample]) -> torch.Tensor:
        """``(len(samples), K)``: each sample's activation of the K learned LoRAs (features one by one)."""
        if not self.trained:
            return torch.zeros(len(samples), 0)
        features = self.features(self.backbone, samples)
        if features.shape[1] != self.prototypes.shape[1]:
            raise RunDirError(f"disco: text features of width {features.shape[1]}, prototypes of width "
                              f"{self.prototypes.shape[1]} (another text_encoder?)")
        return activation_weights(features, self.prototypes, self.config.temperature)

    @contextmanager
    def mixing(self, weights: torch.Tensor) -> Iterator[None]:
        """Every layer mixes its LoRAs with ``weights`` (rows = the samples of the batch) inside the block."""
        saved = self.activation.task, self.activation.weights
        self.activation.task, self.activation.weights = None, weights.to(self.backbone.device)
        try:
            yield
        finally:
            self.activation.task, self.activation.weights = saved

    def generate(self, samples: Sequence[Sample], task: Task, max_new_tokens: int) -> list[str]:
        weights = self.mixing_weights(samples)
        self._count(task, weights)  # statistics only: the answers never depend on ``task``
        with self.mixing(weights):
            return self.backbone.generate(samples, max_new_tokens)

    # -- routing statistics (method_summary.json, report) -----------------------------------------
    def _count(self, task: Task, weights: torch.Tensor) -> None:
        if not self.trained or task.name not in self.trained:
            return
        own = self.trained.index(task.name)
        stage = f"{len(self.trained)}_{self.trained[-1]}"
        entry = self.routing.setdefault(stage, {}).setdefault(task.name, {"n": 0, "top1": 0, "own_weight": 0.0})
        entry["n"] += weights.shape[0]
        entry["top1"] += int((weights.argmax(dim=1) == own).sum())
        entry["own_weight"] += float(weights[:, own].sum())

    def evaluation_summary(self) -> dict[str, Any] | None:
        return {"routing": self.routing} if self.routing else None

    def load_evaluation_summary(self, summary: dict[str, Any]) -> None:
        routing = summary.get("routing", {}) if isinstance(summary, dict) else {}
        for stage, tasks in routing.items():
            if stage not in self.routing and isinstance(tasks, dict):
                self.routing[stage] = {name: dict(entry) for name, entry in tasks.items()}

    def report_sections(self) -> list[dict[str, Any]]:
        if not self.routing:
            return []
        tasks = list(dict.fromkeys(name for entries in self.routing.values() for name in entries))
        rows = []
        for stage, entries in self.routing.items():
            cells = []
            for name in tasks:
                entry = entries.get(name)
                cells.append("-" if not entry or not entry["n"] else
                             f"{100 * entry['top1'] / entry['n']:.1f} ({entry['own_weight'] / entry['n']:.2f})")
            rows.append([stage, *cells])
        return [{
            "title": "DISCO subspace activation",
            "kind": "table",
            "columns": ["after stage", *tasks],
            "rows": rows,
            "note": "Per learned task: % of its test samples whose own LoRA got the largest mixing weight, and in "
                    "brackets the mean weight on it (the weights are a softmax over the learned tasks).",
        }]  # fmt: skip

    # -- state -----------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        """Parameters of one task's LoRA (the one trained in a stage)."""
        return sum(layer.rank * (layer.in_features + layer.out_features) for layer in self._layers().values())

    def state_tensors(self) -> dict[str, Any]:
        if not self.trained:
            return {}
        loras = {}
        for slot in range(len(self.trained)):
            loras[str(slot)] = {key: value.to("cpu").contiguous() for key, value in self._slot_tensors(slot).items()}
        return {"lora": loras, "prototypes": self.prototypes.clone().contiguous()}

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        count = len(self.trained)
        if not count:
            if tensors:
                raise RunDirError("disco state: weights saved for no learned task")
            return
        prototypes, loras = tensors.get("prototypes"), tensors.get("lora")
        if not isinstance(prototypes, torch.Tensor) or prototypes.dim() != 2 or prototypes.shape[0] != count:
            shape = tuple(prototypes.shape) if isinstance(prototypes, torch.Tensor) else None
            raise RunDirError(f"disco state: prototypes of shape {shape}, expected ({count}, width)")
        if not isinstance(loras, dict) or sorted(loras) != sorted(str(slot) for slot in range(count)):
            raise RunDirError(f"disco state: LoRAs {sorted(loras) if isinstance(loras, dict) else None}, "
                              f"expected 0..{count - 1}")
        layers = self._layers()
        expected = {f"{name}.lora_{part}" for name in layers for part in "AB"}
        for slot in range(count):
            saved = loras[str(slot)]
            if not isinstance(saved, dict) or saved.keys() != expected:
                keys = set(saved) if isinstance(saved, dict) else set()
                raise RunDirError(f"disco state: LoRA {slot}: missing keys {sorted(expected - keys)[:3]}, "
                                  f"unexpected keys {sorted(keys - expected)[:3]}")
        for layer in layers.values():
            layer.keep_tasks(count)
            while layer.tasks < count:
                layer.add_task(None)
        for slot in range(count):
            saved = loras[str(slot)]
            for name, layer in layers.items():
                for part, parameter in (("A", layer.lora_A[slot]), ("B", layer.lora_B[slot])):
                    shape = tuple(saved[f"{name}.lora_{part}"].shape)
                    if shape != tuple(parameter.shape):
                        raise RunDirError(f"disco state: {name}.lora_{part} of LoRA {slot} has shape {shape}, "
                                          f"expected {tuple(parameter.shape)}")
            self._load_slot(slot, saved)
        self.prototypes = prototypes.float().clone()
        self.activation.task, self.activation.weights = None, None

    def state_json(self) -> dict[str, Any]:
        return {"tasks": list(self.trained), "rank": self.lora.rank, "alpha": self.lora.alpha,
                "text_encoder": self.config.text_encoder}

    def load_state_json(self, state: dict[str, Any]) -> None:
        tasks = state.get("tasks", []) if isinstance(state, dict) else None
        if not isinstance(tasks, list) or not all(isinstance(name, str) for name in tasks):
            raise RunDirError(f"disco state: 'tasks' must be a list of task names, got {tasks!r}")
        if tasks and (state.get("rank"), state.get("alpha")) != (self.lora.rank, self.lora.alpha):
            raise RunDirError(f"disco state: saved with rank={state.get('rank')} alpha={state.get('alpha')}, this "
                              f"run has rank={self.lora.rank} alpha={self.lora.alpha}")
        if tasks and state.get("text_encoder") != self.config.text_encoder:
            raise RunDirError(f"disco state: prototypes made with text_encoder={state.get('text_encoder')!r}, this "
                              f"run has {self.config.text_encoder!r}")
        self.trained = list(tasks)
        self.pending = None
