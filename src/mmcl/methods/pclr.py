"""``pclr``: PCLR's LoRA Rank Pool (LRP), rank-1 LoRA components selected per sample by language- and
vision-side keys (Weicheng Meng, Jingyang Qiao, Zhizhong Zhang, Shaohui Liu and Yuan Xie, "PCLR: Progressively
Compressed LoRA for Multimodal Continual Instruction Tuning", ICLR 2026; no arXiv id found; released code
github.com/SII-HITclearlove777/PCLR, read in ``lrp_llava_hf/model/LrpModel.py``, ``lrp_llava_hf/model/utils.py``
(``LlmLrpLinear``, ``get_llm_query``), ``lrp_llava_hf/train/Lrp_trainer.py`` and the scripts
``lrp_llava_hf/scripts/train/*.sh``).

Variant implemented: the rank pool with key-based top-k selection and the key-matching loss (the "Learning"
step of the paper's Compression-Integration-Learning pipeline). The compression and integration steps are
**not** implemented (see below), so the pool grows by ``ranks_per_task`` components per task.

**Rank pool.** Every targeted linear layer ``W`` (frozen) of the language model holds ``N`` rank-1 components
``(a_i, b_i)`` (``a_i`` a row of ``A`` ``(N, in)``, ``b_i`` a column of ``B`` ``(out, N)``). Each task adds
``n = ranks_per_task`` components (released: ``train_rank_A_pool`` / ``train_rank_B_pool``, 64 per task);
those of earlier tasks are frozen (released: ``static_rank_*_pool``, ``requires_grad=False``). Every component
``i`` has a language key ``kt_i`` and a vision key ``kv_i``, shared by all layers here (one key pool).

**Selection.** A sample has a language query ``qt`` (the instruction feature, L2-normalised) and a vision query
``qv`` (the image feature, L2-normalised; zero without an image). The score of component ``i`` is

    s_i = qt . kt_i / |kt_i|  +  c * qv . kv_i / |kv_i|,   c = d_vision / d_language
                                          (LrpModel.get_score: ``k = vit_hidden_size / llm_hidden_size``)

and the ``k = top_k`` highest-scoring components are active, each with weight 1 (released: the scores of the
chosen indices are overwritten with 1, so no gradient reaches the keys through the selection):

    y = W x + b + (alpha / k) sum_{i in top-k(s)} b_i a_i . dropout(x)       (LlmLrpLinear.forward)

With every component selected (``k = N``) this is exactly a plain LoRA ``(alpha / k) B A x`` of rank ``N``.
While task ``t`` trains, the candidates are its own components (top-k among them; all of them when
``k >= n``), topped up with the best old components when ``k > n`` (released: ``top_rank > train_size``
branch); at inference the top-k runs over the whole pool. ``generate`` never uses ``task``.

**Keys.** The new task's keys start at its mean training query (released ``LrpModel.init_key``: every new key
= the task's mean query, loaded from ``--load_key_init_path``) and train with the key-matching loss
(``LrpModel.get_q_loss``, weight ``loss_weight1``, 1.0 in the scripts):

    L_key = key_loss_weight * ( mean_{b,i} (1 - cos(qt_b, kt_i)) + [mean_{b with image, i} (1 - cos(qv_b, kv_i))] )

over the current task's keys ``i``; the vision term only when the batch has an image (released: when the
summed vision scores exceed 1e-4). **Values** (``init_from_pool``, released ``init_value`` with
``--init_value True``): the new components start as copies of the old components whose keys score highest
against the new keys (the same score as above); with fewer old components than ``n``, the rest (or all, on
the first task) start with ``a_i ~ N(0, 1/in)`` and ``b_i = 0`` (released init).

Where this differs from the released code, and why:

- *Per-sample selection.* Released: the queries are averaged over the batch in training and the top-k is
  taken over the batch-summed scores (one selection per batch). Here every sample selects its own top-k (a
  ``(batch, N)`` 0/1 mask read by every layer), so batched answers equal one-by-one answers; the key loss
  averages per-sample cosines instead of the cosine to the batch-mean query.
- *Features.* Released: mean input embedding of the instruction tokens (``get_llm_query``, as here by default)
  and CLIP's pooled output for the image. Here the image feature is
  :func:`mmcl.methods.sample_features.image_features` (the mean of the backbone's own vision encoder's last
  hidden state) and the text feature :class:`~mmcl.methods.sample_features.TextFeatures` (``text_encoder``).
- *One key pool.* Released: keys per "pool" of layers (``llm_target_modules``: pool name -> layers, from a
  config file not in the repository); here one pool for all targeted layers, so a sample selects the same
  component indices in every layer.
- *Ties* in the top-k go to the lower index (a stable sort); the released ``torch.topk`` leaves them open
  (keys initialised to the same mean query tie exactly).
- *Not implemented*: the shared always-on ranks (``llm_share_rank_size``), the compression and integration
  phases (the second run of each task, ``*_2.sh``, ``LrpTSModel`` / ``LlmLrpTSLinear``: a teacher-student
  distillation that squeezes old components into fewer ranks and merges similar tasks), and the
  ``generate_part`` past/new switch of the released ``generate`` (it picks, per batch, whether to use the old
  or the new ranks by a task-query pool). The compression phase is a second distillation training per task
  with a teacher copy of the pool and its own loss; it does not fit this method's single ``train`` call
  without a separate training loop, and was left out to keep the implementation checkable. The memory
  budget of the paper (close to a non-extension method) is therefore *not* reproduced: the pool grows.
- *Layers.* Language-model linear layers only (the projector's rows are images, not samples).

Stage state: every task's components (``pool::<t>::<layer>.lora_A`` / ``.lora_B``) and keys
(``keys::text::<t>``, ``keys::vision::<t>``); JSON: the task names, ranks per task, alpha, top_k, widths.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.config import TrainingConfig, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import Method, register_method
from mmcl.methods.disco import language_model_linears
from mmcl.methods.sample_features import TextFeatures, image_features, vision_width
from mmcl.methods.wrapped_linear import WrappedLinear
from mmcl.streams.stream import Task
from mmcl.methods.encoding_view import EncodingView, Rewrite

TEXT_KEY, VISION_KEY = "pclr_text", "pclr_vision"  # extra batch keys: each training sample's (1, d) queries
KEYS_NAME = "pclr_keys"  # the submodule holding the keys (inside the model, so the Trainer trains them)


@dataclass
class PclrConfig:
    """PCLR rank-pool options; alpha and dropout come from the run's ``lora`` settings. Sources: the released
    scripts (``lrp_llava_hf/scripts/train/*.sh``: ``--llm_train_rank_size 64 --llm_top_rank 64
    --llm_lora_alpha 128 --loss_weight1 1.0 --init_value True``)."""

    # scripts: --llm_train_rank_size 64 (per task); here lora.rank by default (the scaled-down run's rank)
    ranks_per_task: int | None = setting(None, "[1, inf)", "rank-1 components added per task; none = lora.rank "
                                         "(released scripts: 64)")
    # scripts: --llm_top_rank 64
    top_k: int | None = setting(None, "[1, inf)", "components active per sample (the update is scaled by "
                                "lora.alpha / top_k); none = lora.rank (released scripts: 64)")
    # scripts: --loss_weight1 1.0
    key_loss_weight: float = setting(1.0, "[0, inf)", "weight of the key-matching loss (released loss_weight1: 1.0)")
    # LrpModel.get_score: the vision score is weighted by vit_hidden_size / llm_hidden_size
    vision_weight: float | None = setting(None, "[0, inf)", "weight c of the vision-side score; none = vision width "
                                          "/ language width (released get_score); 0 = language keys only")
    # scripts: --init_value True (LrpModel.init_value)
    init_from_pool: bool = setting(True, help="new components start as copies of the old components whose keys "
                                   "match the new keys best (released init_value: True)")
    text_encoder: str | None = setting(None, help="local transformers checkpoint for the language query (mean last "
                                       "hidden state); none = the backbone's mean input embedding (as released)")

    def __post_init__(self) -> None:
        for name in ("ranks_per_task", "top_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"method.options.{name}: must be an integer >= 1, got {value!r}")
        if not self.key_loss_weight >= 0:
            raise ConfigError(f"method.options.key_loss_weight: must be >= 0, got {self.key_loss_weight}")
        if self.vision_weight is not None and not self.vision_weight >= 0:
            raise ConfigError(f"method.options.vision_weight: must be >= 0, got {self.vision_weight}")


# -- the layer --------------------------------------------------------------------------------------
class Selection:
    """What every :class:`RankPoolLinear` reads: ``mask``, a ``(batch, N)`` tensor of component weights
    (1 = selected, 0 = not), or None (the base layer)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None


class RankPoolLinear(WrappedLinear):
    """A frozen ``nn.Linear`` plus a pool of rank-1 components stored per task: ``lora_A[t]`` ``(n_t, in)``
    (rows ``a_i``), ``lora_B[t]`` ``(out, n_t)`` (columns ``b_i``). Output:
    ``base(x) + scaling * sum_i mask[b, i] b_i (a_i . dropout(x))`` for the rows ``x[b]``."""

    def __init__(self, base: nn.Linear, scaling: float, selection: Selection, dropout: float = 0.0):
        super().__init__(base)
        self.scaling = scaling
        self.selection = selection  # a plain object: not a submodule
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def size(self) -> int:
        return sum(a.shape[0] for a in self.lora_A)

    def add_chunk(self, a: torch.Tensor, b: torch.Tensor) -> None:
        factory = {"dtype": self.base.weight.dtype, "device": self.base.weight.device}
        self.lora_A.append(nn.Parameter(a.to(**factory), requires_grad=False))
        self.lora_B.append(nn.Parameter(b.to(**factory), requires_grad=False))

    def keep_chunks(self, count: int) -> None:
        if count < len(self.lora_A):
            self.lora_A = nn.ParameterList(list(self.lora_A)[:count])
            self.lora_B = nn.ParameterList(list(self.lora_B)[:count])

    def pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``: ``(N, in)`` and ``(out, N)``, the chunks concatenated in task order."""
        return torch.cat(list(self.lora_A)), torch.cat(list(self.lora_B), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        mask = self.selection.mask
        if mask is None or not len(self.lora_A):
            return result
        if mask.shape != (x.shape[0], self.size):
            raise RuntimeError(f"pclr: selection of shape {tuple(mask.shape)} for an input of {x.shape[0]} rows "
                               f"and a pool of {self.size} components")
        lora_A, lora_B = self.pool()
        hidden = self.dropout(x.to(lora_A.dtype)) @ lora_A.T  # (batch, ..., N)
        hidden = hidden * mask.to(hidden).reshape(x.shape[0], *[1] * (x.dim() - 2), self.size)
        return result + ((hidden @ lora_B.T) * self.scaling).to(result.dtype)


def pool_layers(model: nn.Module) -> dict[str, RankPoolLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, RankPoolLinear)}


# -- scores and selection ---------------------------------------------------------------------------
def scores(text: torch.Tensor, vision: torch.Tensor | None, text_keys: torch.Tensor,
           vision_keys: torch.Tensor | None, vision_weight: float) -> torch.Tensor:
    """``(batch, N)``: ``qt . kt_i/|kt_i| + c qv . kv_i/|kv_i|`` (queries used as given: normalise them first),
    elementwise products summed per row so a row never depends on the others."""
    unit = nn.functional.normalize(text_keys.float(), dim=-1)
    result = (text.float()[:, None, :] * unit[None]).sum(-1)
    if vision is not None and vision_keys is not None and vision_weight:
        unit_v = nn.functional.normalize(vision_keys.float(), dim=-1)
        result = result + vision_weight * (vision.float()[:, None, :] * unit_v[None]).sum(-1)
    return result


def select(score: torch.Tensor, k: int, candidates: torch.Tensor | None = None,
           forced: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 mask ``(batch, N)``: per row, the ``forced`` components (a bool ``(N,)``) plus the best-scoring
    ``candidates`` (bool ``(N,)``, default all) up to ``k`` in total; ties go to the lower index."""
    n = score.shape[1]
    mask = torch.zeros_like(score)
    taken = 0
    if forced is not None and forced.any():
        mask[:, forced] = 1.0
        taken = int(forced.sum())
    allowed = torch.ones(n, dtype=torch.bool, device=score.device) if candidates is None else candidates.clone()
    if forced is not None:
        allowed &= ~forced
    room = min(k - taken, int(allowed.sum()))
    if room > 0:
        masked = score.masked_fill(~allowed[None, :], float("-inf"))
        order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :room]
        mask.scatter_(1, order, 1.0)
    return mask


def training_selection(score: torch.Tensor, k: int, current: torch.Tensor) -> torch.Tensor:
    """While a task trains (``current``: bool ``(N,)`` of its components): its top-k when ``k <= n``, else all
    of it plus the best old components (LlmLrpLinear.forward, ``top_rank <= train_size`` and else branches)."""
    if k <= int(current.sum()):
        return select(score, k, candidates=current)
    return select(score, k, forced=current)


class KeyPool(nn.Module):
    """Per-task chunks of language keys ``(n_t, d_text)`` and vision keys ``(n_t, d_vision)``."""

    def __init__(self) -> None:
        super().__init__()
        self.text = nn.ParameterList()
        self.vision = nn.ParameterList()

    def keep(self, count: int) -> None:
        if count < len(self.text):
            self.text = nn.ParameterList(list(self.text)[:count])
            self.vision = nn.ParameterList(list(self.vision)[:count])

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(list(self.text)), torch.cat(list(self.vision))


def query_rewrite(method: "Pclr") -> Rewrite:
    """Each training encoding carries the sample's (1, d) language and vision queries."""

    def rewrite(sample: Sample, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoded[TEXT_KEY], encoded[VISION_KEY] = method.queries([sample])
        return encoded

    return rewrite


# -- the method -------------------------------------------------------------------------------------
@register_method
class Pclr(Method[PclrConfig]):
    name = "pclr"
    state_growth = "per-task"
    supports_dora = False  # the pool holds plain rank-1 A/B components selected per sample
    description = ("PCLR's LoRA rank pool: rank-1 components with language and vision keys, the top-k by key "
                   "similarity active per sample, keys trained by a key-matching loss (ICLR 2026; no compression)")

    def init_state(self) -> None:
        self.trained: list[str] = []
        self.chunk_sizes: list[int] = []
        self.text_width: int | None = None
        self.vision_width: int | None = None
        self.selection = Selection()
        self.keys = KeyPool()
        self.features = TextFeatures(self.config.text_encoder)
        self.batch_queries: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return self.config.ranks_per_task or self.lora.rank

    @property
    def k(self) -> int:
        return self.config.top_k or self.lora.rank

    def setup(self, backbone) -> None:
        super().setup(backbone)
        model = backbone.model
        for parameter in model.parameters():
            parameter.requires_grad = False
        scaling = self.lora.alpha / self.k
        for name in language_model_linears(model, self.lora.targets or backbone.lora_targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, RankPoolLinear(getattr(parent, child), scaling, self.selection, self.lora.dropout))
        model.add_module(KEYS_NAME, self.keys)
        model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self.vision_width = vision_width(backbone)

    def _layers(self) -> dict[str, RankPoolLinear]:
        assert self.backbone is not None, "setup() first"
        return pool_layers(self.backbone.model)

    def c(self) -> float:
        if self.config.vision_weight is not None:
            return float(self.config.vision_weight)
        return self.vision_width / self.text_width

    def queries(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised language and vision queries ``(n, d)`` (a sample without image: zero vision query)."""
        text = nn.functional.normalize(self.features(self.backbone, samples), dim=-1)
        vision = nn.functional.normalize(image_features(self.backbone, samples), dim=-1)
        return text, vision

    def _scores(self, text: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        text_keys, vision_keys = self.keys.stacked()
        return scores(text.to(text_keys.device), vision.to(text_keys.device), text_keys.detach(),
                      vision_keys.detach(), self.c())

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        text, vision = kwargs.pop(TEXT_KEY, None), kwargs.pop(VISION_KEY, None)
        if text is not None:
            text, vision = text.reshape(text.shape[0], -1), vision.reshape(vision.shape[0], -1)
            self.batch_queries = (text, vision)
            current = torch.zeros(sum(self.chunk_sizes), dtype=torch.bool, device=text.device)
            current[-self.chunk_sizes[-1]:] = True
            self.selection.mask = training_selection(self._scores(text, vision), self.k, current)
        elif module.training and self.selection.mask is None and len(self.keys.text):
            raise ConfigError("pclr: a training forward without queries (train through Pclr.train)")
        return args, kwargs

    # -- training --------------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        count = len(self.trained)
        for name, layer in self._layers().items():
            if len(layer.lora_A) < count:
                raise RuntimeError(f"pclr: {name} holds {len(layer.lora_A)} chunks before task {count + 1}")
            layer.keep_chunks(count)
        self.keys.keep(count)
        self.chunk_sizes = self.chunk_sizes[:count]
        self._generator = torch.Generator().manual_seed(self.seed + task_index)

    def train_data(self, task_index: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
        samples = list(samples)
        if len(self.keys.text) > len(self.trained):
            return samples  # this stage's chunk exists already
        if not samples:
            raise RuntimeError(f"pclr: task {task.name} has no training data")
        text, vision = self.queries(samples)
        self.text_width = text.shape[1]
        new_text = nn.functional.normalize(text.mean(0), dim=0)  # released init_key: the task's mean query
        new_vision = nn.functional.normalize(vision.mean(0), dim=0)
        device = self.backbone.device
        old = sum(self.chunk_sizes)
        copied = None
        if self.config.init_from_pool and old:
            text_keys, vision_keys = self.keys.stacked()
            score = scores(new_text[None].to(device), new_vision[None].to(device), text_keys.detach(),
                           vision_keys.detach(), self.c())[0]
            copied = torch.sort(score, descending=True, stable=True).indices[: min(self.n, old)]
        for layer in self._layers().values():
            a = torch.randn(self.n, layer.in_features, generator=self._generator) / math.sqrt(layer.in_features)
            b = torch.zeros(layer.out_features, self.n)
            if copied is not None:
                old_a, old_b = layer.pool()
                a[: len(copied)] = old_a.detach()[copied].float().cpu()
                b[:, : len(copied)] = old_b.detach()[:, copied].float().cpu()
            layer.add_chunk(a, b)
            layer.lora_A[-1].requires_grad = True
            layer.lora_B[-1].requires_grad = True
        self.keys.text.append(nn.Parameter(new_text.expand(self.n, -1).clone().to(device), requires_grad=True))
        self.keys.vision.append(nn.Parameter(new_vision.expand(self.n, -1).clone().to(device), requires_grad=True))
        self.chunk_sizes.append(self.n)
        return samples

    def train(self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int) -> dict[str, Any]:
        from mmcl.training.sft import train_on_samples

        try:
            return train_on_samples(EncodingView(self.backbone, query_rewrite(self)), samples, config, work_dir, seed=seed,
                                    extra_loss=self.extra_loss, log_dir=self.sft_log_dir())
        finally:
            self.selection.mask, self.batch_queries = None, None

    def extra_loss(self, model: nn.Module, inputs: dict, outputs: Any) -> torch.Tensor | None:
        if self.config.key_loss_weight <= 0 or self.batch_queries is None:
            return None
        text, vision = self.batch_queries
        return self.config.key_loss_weight * key_loss(text, vision, self.keys.text[-1], self.keys.vision[-1])

    def after_task(self, task_index: int, task: Task) -> None:
        self.trained.append(task.name)
        self.selection.mask, self.batch_queries = None, None
        for parameter in (*self.keys.parameters(), *(p for l in self._layers().values() for p in l.parameters())):
            parameter.requires_grad = False

    # -- inference -------------------------------------------------------------------------------
    def selection_mask(self, samples: Sequence[Sample]) -> torch.Tensor:
        """``(len(samples), N)`` 0/1: each sample's top-k components over the whole pool."""
        text, vision = self.queries(samples)
        with torch.no_grad():
            return select(self._scores(text, vision), self.k)

    @contextmanager
    def selecting(self, mask: torch.Tensor) -> Iterator[None]:
        saved = self.selection.mask
        self.selection.mask = mask.to(self.backbone.device)
        try:
            yield
        finally:
            self.selection.mask = saved

    def generate(self, samples: Sequence[Sample], task: Task, max_new_tokens: int) -> list[str]:
        """Answers with each sample's own top-k components; ``task`` is not used."""
        if not self.trained:
            return self.backbone.generate(samples, max_new_tokens)
        with self.selecting(self.selection_mask(samples)):
            return self.backbone.generate(samples, max_new_tokens)

    # -- state -----------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        """One task's components in every layer plus their keys."""
        per_layer = sum(self.n * (layer.in_features + layer.out_features) for layer in self._layers().values())
        return per_layer + self.n * ((self.text_width or 0) + (self.vision_width or 0))

    def state_tensors(self) -> dict[str, Any]:
        count = len(self.trained)
        if not count:
            return {}
        layers = self._layers()
        pool = {str(t): {f"{name}.lora_{part}": getattr(layer, f"lora_{part}")[t].detach().to("cpu", copy=True)
                         for name, layer in layers.items() for part in "AB"} for t in range(count)}
        keys = {kind: {str(t): getattr(self.keys, kind)[t].detach().to("cpu", copy=True) for t in range(count)}
                for kind in ("text", "vision")}
        return {"pool": pool, "keys": keys}

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        count = len(self.trained)
        if not count:
            if tensors:
                raise RunDirError("pclr state: weights saved for no learned task")
            return
        pool, keys = tensors.get("pool"), tensors.get("keys")
        names = [str(t) for t in range(count)]
        if not isinstance(pool, dict) or sorted(pool) != sorted(names):
            raise RunDirError(f"pclr state: pool chunks {sorted(pool) if isinstance(pool, dict) else None}, "
                              f"expected 0..{count - 1}")
        if not isinstance(keys, dict) or any(not isinstance(keys.get(kind), dict) or sorted(keys[kind]) != sorted(names)
                                             for kind in ("text", "vision")):
            raise RunDirError("pclr state: keys must hold text and vision chunks for every learned task")
        widths = {"text": self.text_width, "vision": self.vision_width}
        for kind, width in widths.items():
            for t, size in enumerate(self.chunk_sizes):
                if tuple(keys[kind][str(t)].shape) != (size, width):
                    raise RunDirError(f"pclr state: {kind} keys of task {t} have shape "
                                      f"{tuple(keys[kind][str(t)].shape)}, expected ({size}, {width})")
        layers = self._layers()
        expected = {f"{name}.lora_{part}" for name in layers for part in "AB"}
        for t, size in enumerate(self.chunk_sizes):
            saved = pool[str(t)]
            if not isinstance(saved, dict) or saved.keys() != expected:
                raise RunDirError(f"pclr state: chunk {t} does not hold the A and B of every layer")
            for name, layer in layers.items():
                shapes = {"A": (size, layer.in_features), "B": (layer.out_features, size)}
                for part, shape in shapes.items():
                    if tuple(saved[f"{name}.lora_{part}"].shape) != shape:
                        raise RunDirError(f"pclr state: {name}.lora_{part} of chunk {t} has shape "
                                          f"{tuple(saved[f'{name}.lora_{part}'].shape)}, expected {shape}")
        for name, layer in layers.items():
            layer.keep_chunks(0)
            for t in range(count):
                layer.add_chunk(pool[str(t)][f"{name}.lora_A"].clone(), pool[str(t)][f"{name}.lora_B"].clone())
        device = self.backbone.device
        self.keys.text = nn.ParameterList([nn.Parameter(keys["text"][n_].float().clone().to(device), requires_grad=False)
                                           for n_ in names])
        self.keys.vision = nn.ParameterList([nn.Parameter(keys["vision"][n_].float().clone().to(device),
                                                          requires_grad=False) for n_ in names])
        self.selection.mask = None

    def state_json(self) -> dict[str, Any]:
        return {"tasks": list(self.trained), "chunk_sizes": list(self.chunk_sizes), "alpha": self.lora.alpha,
                "top_k": self.k, "text_width": self.text_width, "vision_width": self.vision_width,
                "text_encoder": self.config.text_encoder}

    def load_state_json(self, state: dict[str, Any]) -> None:
        tasks = state.get("tasks", []) if isinstance(state, dict) else None
        if not isinstance(tasks, list) or not all(isinstance(name, str) for name in tasks):
            raise RunDirError(f"pclr state: 'tasks' must be a list of task names, got {tasks!r}")
        if tasks:
            sizes = state.get("chunk_sizes")
            if not isinstance(sizes, list) or len(sizes) != len(tasks) or not all(
                    isinstance(s, int) and s >= 1 for s in sizes):
                raise RunDirError(f"pclr state: chunk_sizes {sizes!r} do not match {len(tasks)} tasks")
            if (state.get("alpha"), state.get("top_k")) != (self.lora.alpha, self.k):
                raise RunDirError(f"pclr state: saved with alpha={state.get('alpha')} top_k={state.get('top_k')}, "
                                  f"this run has alpha={self.lora.alpha} top_k={self.k}")
            if state.get("text_encoder") != self.config.text_encoder:
                raise RunDirError(f"pclr state: keys made with text_encoder={state.get('text_encoder')!r}, this run "
                                  f"has {self.config.text_encoder!r}")
            if state.get("vision_width") != self.vision_width or not isinstance(state.get("text_width"), int):
                raise RunDirError(f"pclr state: widths text={state.get('text_width')!r} "
                                  f"vision={state.get('vision_width')!r} do not fit this backbone")
            self.text_width = state["text_width"]
            self.chunk_sizes = list(sizes)
        else:
            self.chunk_sizes = []
        self.trained = list(tasks)


def key_loss(text: torch.Tensor, vision: torch.Tensor, text_keys: torch.Tensor, vision_keys: torch.Tensor) -> torch.Tensor:
    """``mean_{b,i} (1 - cos(qt_b, kt_i))`` plus the same over the samples with an image for the vision keys."""
    unit_t = nn.functional.normalize(text_keys, dim=-1)
    loss = (1 - nn.functional.normalize(text.to(unit_t), dim=-1) @ unit_t.T).mean()
    has_image = vision.abs().sum(-1) > 0
    if has_image.any():
        unit_v = nn.functional.normalize(vision_keys, dim=-1)
        loss = loss + (1 - nn.functional.normalize(vision[has_image].to(unit_v), dim=-1) @ unit_v.T).mean()
    return loss
