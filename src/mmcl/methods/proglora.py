"""``proglora``: ProgLoRA, a progressive pool of LoRA blocks, one new block per task, mixed per sample by a
key-query router (Yahan Yu, Duzhen Zhang, Yong Ren, Xuanle Zhao, Xiuyi Chen and Chenhui Chu, "Progressive
LoRA for Multimodal Continual Instruction Tuning", Findings of ACL 2025, pp. 2779-2796,
doi:10.18653/v1/2025.findings-acl.143; released code github.com/Yahan-Yu/proglora_codebase). Only the
abstract of the paper could be read here (no arXiv id found); every detail below comes from the released
code: ``CoIN/peft/tuners/clitmoelora.py`` (the layer, ``lora_method == "proglora"``),
``llava/model/language_model/llava_llama.py`` (``LlavaLlamaForCausalLM``: keys, router, ``cal_attention_share``),
``CoIN/peft/utils/save_and_load.py`` (how the previous task's key is frozen), ``CoIN/peft/tuners/lora.py``
(``mark_current_lora_wo_router_as_trainable``) and ``scripts/MCITlib/Train/Taskn.sh`` (settings).

**Blocks.** Every targeted linear layer ``W`` (frozen) of the language model holds one LoRA block per task,
``(A_k, B_k)`` of rank ``r = lora.rank`` with scaling ``s = lora.alpha / lora.rank``, ``B_k = 0`` at the
start (released: ``expert_num = task_id + 1`` blocks of the full rank each, old ones frozen). The layer class
is :class:`mmcl.methods.disco.TaskLoraLinear`, reused as is (its ``(batch, K)`` mixing path).

**Router** (task-aware allocation). Each task ``k`` owns a key ``key_k`` (a vector of the query width
``d``); a sample with query ``q`` gets the weights

    w = softmax_k( key_k . q / sqrt(d) )       (llava_llama.py ``cal_attention_share``: ``prompt_key(x) /
                                                 sqrt(model_dim)``, softmax over old and current keys)
    y = W x + b + sum_k w_k s B_k A_k dropout(x)     (clitmoelora.py ``forward``, ``attention_all_weight``)

in every layer, **during training too**: while task ``t`` trains, the output mixes blocks ``0..t`` with these
weights, so the frozen old blocks serve the new task as much as the router lets them; the trainable
parameters are block ``t`` and key ``t`` (older keys frozen: ``old_pro_key_share.requires_grad = False``).
The key is trained by the token cross-entropy through the softmax (the released code has no other loss on
it); ``key_loss_weight > 0`` adds a key-matching term ``key_loss_weight * mean_b (1 - cos(key_t, q_b))``
pulling the current key towards its task's queries (an addition, off by default). New keys are drawn
Xavier-uniform (released: ``nn.init.xavier_uniform`` on the ``(1, d)`` key), new ``A`` as in
:mod:`mmcl.methods.disco` (``a_init``).

**Query.** ``q`` is :class:`mmcl.methods.sample_features.TextFeatures` of the sample's instruction: the mean of
the backbone's input embeddings over the instruction's tokens (or a local encoder's mean last hidden state,
``text_encoder``). It is computed one sample at a time, so the weights of a sample never depend on its batch
(scores are elementwise products summed per row, not a matmul); the weights are a ``(batch, K)`` tensor set
on the shared :class:`~mmcl.methods.disco.Activation` before the forward, read by every layer. ``generate``
never uses ``task``.

Where this differs from the released code, and why:

- *Query.* Released: the element-wise **max** over all token positions of ``inputs_embeds`` (prompt, answer
  and, in LLaVA, the projected image features), passed through a trainable MLP ``trans_input_share``
  (``Linear(d, 100) -> Linear(100, d) -> SiLU -> LayerNorm``) before the dot product. Here: the mean input
  embedding of the instruction alone, no MLP. The max over the whole sequence differs between training
  (answer included) and decoding (with the KV cache, each step recomputes the query from the one new token),
  so it cannot give one route per sample; the MLP is left out because the released code re-initialises it at
  every task (``save_and_load.py`` moves the trained one to ``old_tra_input_share``, which the forward never
  uses) while the old keys stay frozen, so the old keys are scored through a projection they were never
  trained with. Without the MLP the frozen keys keep their meaning.
- *Per-sample routing.* Released: ``attn_scores - max(attn_scores)`` is taken over the whole batch (a
  constant shift per batch, so the softmax per row is unchanged up to rounding); here per row.
- *Not implemented*: "task recall" (realigning the model with learned tasks) and the static/dynamic split of
  the paper: the abstract names them but the released code holds no recall step that could be read, and the
  static variant needs the task identity at test time. Only the released dynamic router is implemented.
- *Layers.* Language-model linear layers only (released: ``q/k/v/o_proj``, ``gate/up/down_proj``); the
  projector's rows are images, not samples, so per-sample mixing cannot reach it (as in disco). The released
  LLaVA training also trains the projector fully (``--mm_projector_lr 2e-5``); here it stays frozen.
- *Init and settings.* ``A`` Kaiming-uniform by default (PEFT's, so mmcl's calibrated learning rates carry
  over); ``a_init: normal`` gives the released ``N(0, 0.01^2)``. Released rank/alpha: ``lora_alpha = 2 *
  rank`` (Taskn.sh), the default r 8 / alpha 16 of mmcl has the same ratio.

Stage state: every block (``lora::<k>::<layer>.lora_A`` / ``.lora_B``) and the keys ``(K, d)``; JSON: the
learned task names, rank, alpha, query width and text feature source.
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
from mmcl.methods.disco import (
    add_task_slot,
    A_INITS,
    Activation,
    TaskLoraLinear,
    language_model_linears,
    task_layers,
    wrap_layers,
)
from mmcl.methods.sample_features import TextFeatures
from mmcl.streams.stream import Task
from mmcl.methods.encoding_view import EncodingView, with_feature

QUERY_KEY = "proglora_query"  # the extra batch key carrying each training sample's (1, d) query
ROUTER_NAME = "proglora_router"  # the submodule holding the keys (inside the model, so the Trainer trains it)


@dataclass
class ProgLoraConfig:
    """ProgLoRA options; every block takes the run's ``lora`` rank, alpha and dropout. Source of the
    defaults: the released code (github.com/Yahan-Yu/proglora_codebase)."""

    # llava_llama.py cal_attention_share: attn_temperature = math.sqrt(self.model_dim_share)
    temperature: float | None = setting(None, "(0, inf)", "softmax temperature of the key-query scores; none = "
                                        "sqrt(query width), as the released code")
    # released code: no loss on the keys besides the cross-entropy through the mixing weights
    key_loss_weight: float = setting(0.0, "[0, inf)", "weight of the key-matching term mean_b (1 - cos(key_t, q_b)) "
                                     "on the current key (0 = released code: keys learn from the cross-entropy only)")
    text_encoder: str | None = setting(None, help="local transformers checkpoint for the query (mean last hidden "
                                       "state of the instruction); none = the backbone's mean input embedding")
    # clitmoelora.py reset_lora_parameters: normal(0, 0.01); PEFT / the other mmcl LoRA methods: Kaiming
    a_init: str = setting("kaiming", help="initialisation of each new block's A: kaiming (PEFT's, as the other "
                          "LoRA methods here) or normal (N(0, 0.01^2), released code)")

    def __post_init__(self) -> None:
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"method.options.temperature: must be > 0, got {self.temperature}")
        if not self.key_loss_weight >= 0:
            raise ConfigError(f"method.options.key_loss_weight: must be >= 0, got {self.key_loss_weight}")
        if self.a_init not in A_INITS:
            raise ConfigError(f"method.options.a_init: expected one of {', '.join(A_INITS)}, got {self.a_init!r}")


def router_weights(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax_k(key_k . q / temperature)`` for every row ``q`` of ``queries``: ``(n, K)``. Elementwise
    products summed per row, so a row's weights do not depend on the other rows."""
    if keys.shape[0] == 0:
        return queries.new_zeros(queries.shape[0], 0)
    scores = (queries[:, None, :].to(keys) * keys[None, :, :]).sum(dim=-1) / temperature
    return torch.softmax(scores, dim=-1)


def key_matching_loss(queries: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``mean_b (1 - cos(key, q_b))``."""
    cosines = nn.functional.cosine_similarity(queries.to(key), key[None, :].expand_as(queries), dim=-1)
    return (1 - cosines).mean()


class Router(nn.Module):
    """One key per learned task (a ``ParameterList`` of ``(d,)`` float32 vectors); lives inside the model."""

    def __init__(self) -> None:
        super().__init__()
        self.keys = nn.ParameterList()

    def stacked(self) -> torch.Tensor:
        return torch.stack(list(self.keys)) if len(self.keys) else torch.zeros(0, 0)

    def keep(self, count: int) -> None:
        if count < len(self.keys):
            self.keys = nn.ParameterList(list(self.keys)[:count])


class RouteContext:
    """Set by the model's forward pre-hook from the batch: the queries of the current forward."""

    def __init__(self) -> None:
        self.queries: torch.Tensor | None = None


@register_method
class ProgLora(Method[ProgLoraConfig]):
    name = "proglora"
    state_growth = "per-task"
    supports_dora = False  # the blocks are plain B A pairs mixed per sample
    description = ("ProgLoRA: a new LoRA block per task (old ones frozen), mixed per sample in training and "
                   "inference by softmax(key_k . query / sqrt(d)) over per-task keys (Findings of ACL 2025)")

    def init_state(self) -> None:
        self.trained: list[str] = []
        self.width: int | None = None  # query width, known once a feature was computed or a state loaded
        self.activation = Activation()
        self.context = RouteContext()
        self.features = TextFeatures(self.config.text_encoder)
        self.router = Router()
        self._hook = None

    def setup(self, backbone) -> None:
        super().setup(backbone)
        model = backbone.model
        for parameter in model.parameters():
            parameter.requires_grad = False
        names = language_model_linears(model, self.lora.targets or backbone.lora_targets)
        wrap_layers(model, names, self.lora, self.activation)
        model.add_module(ROUTER_NAME, self.router)
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def _layers(self) -> dict[str, TaskLoraLinear]:
        assert self.backbone is not None, "setup() first"
        return task_layers(self.backbone.model)

    def temperature(self) -> float:
        assert self.width is not None
        return self.config.temperature if self.config.temperature is not None else math.sqrt(self.width)

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A training batch carries its queries: the mixing weights of this forward are computed from them
        (with gradient to the current key). Forwards without queries keep the weights set by ``mixing``."""
        queries = kwargs.pop(QUERY_KEY, None)
        if queries is not None:
            queries = queries.reshape(queries.shape[0], -1)
            self.context.queries = queries
            self.activation.task = None
            self.activation.weights = router_weights(queries, torch.stack(list(self.router.keys)), self.temperature())
        elif module.training and self.activation.weights is None and len(self.router.keys):
            raise ConfigError("proglora: a training forward without routing queries (train through ProgLora.train)")
        return args, kwargs

    # -- training --------------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        slot = len(self.trained)
        add_task_slot(self._layers(), slot, self.config.a_init, self.seed + task_index, "proglora")
        self.router.keep(slot)
        self._key_generator = torch.Generator().manual_seed(self.seed + 7919 * (task_index + 1))

    def train_data(self, task_index: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
        samples = list(samples)
        slot = len(self.trained)
        if len(self.router.keys) == slot:  # the new task's key, once the query width is known
            if self.width is None:
                if not samples:
                    raise RuntimeError(f"proglora: task {task.name} has no training data")
                self.width = int(self.features(self.backbone, samples[:1]).shape[1])
            key = torch.empty(1, self.width)
            nn.init.xavier_uniform_(key, generator=self._key_generator)
            self.router.keys.append(nn.Parameter(key[0].clone().to(self.backbone.device), requires_grad=True))
        return samples

    def train(self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int) -> dict[str, Any]:
        from mmcl.training.sft import train_on_samples

        view = EncodingView(self.backbone, with_feature(QUERY_KEY, self.backbone, self.features))
        try:
            return train_on_samples(view, samples, config, work_dir, seed=seed, extra_loss=self.extra_loss,
                                    log_dir=self.sft_log_dir())
        finally:
            self.activation.weights, self.context.queries = None, None

    def extra_loss(self, model: nn.Module, inputs: dict, outputs: Any) -> torch.Tensor | None:
        if self.config.key_loss_weight <= 0 or self.context.queries is None or not len(self.router.keys):
            return None
        return self.config.key_loss_weight * key_matching_loss(self.context.queries, self.router.keys[-1])

    def after_task(self, task_index: int, task: Task) -> None:
        self.trained.append(task.name)
        self.activation.task, self.activation.weights, self.context.queries = None, None, None
        for layer in self._layers().values():
            for parameter in (*layer.lora_A, *layer.lora_B):
                parameter.requires_grad = False
        for key in self.router.keys:
            key.requires_grad = False

    # -- inference -------------------------------------------------------------------------------
    def mixing_weights(self, samples: Sequence[Sample]) -> torch.Tensor:
        """``(len(samples), K)`` router weights over the learned blocks (features one sample at a time)."""
        count = len(self.trained)
        if not count:
            return torch.zeros(len(samples), 0)
        queries = self.features(self.backbone, samples)
        if queries.shape[1] != self.width:
            raise RunDirError(f"proglora: queries of width {queries.shape[1]}, keys of width {self.width} "
                              "(another text_encoder?)")
        with torch.no_grad():
            keys = torch.stack([key.detach() for key in list(self.router.keys)[:count]])
            return router_weights(queries.to(keys.device), keys, self.temperature())

    @contextmanager
    def mixing(self, weights: torch.Tensor) -> Iterator[None]:
        saved = self.activation.task, self.activation.weights
        self.activation.task, self.activation.weights = None, weights.to(self.backbone.device)
        try:
            yield
        finally:
            self.activation.task, self.activation.weights = saved

    def generate(self, samples: Sequence[Sample], task: Task, max_new_tokens: int) -> list[str]:
        """Answers with each sample's own router weights; ``task`` is not used."""
        if not self.trained:
            return self.backbone.generate(samples, max_new_tokens)
        with self.mixing(self.mixing_weights(samples)):
            return self.backbone.generate(samples, max_new_tokens)

    # -- state -----------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        """One task's block in every layer plus its key."""
        blocks = sum(layer.rank * (layer.in_features + layer.out_features) for layer in self._layers().values())
        return blocks + (self.width or 0)

    def state_tensors(self) -> dict[str, Any]:
        count = len(self.trained)
        if not count:
            return {}
        layers = self._layers()
        loras = {
            str(slot): {f"{name}.lora_{part}": getattr(layer, f"lora_{part}")[slot].detach().to("cpu", copy=True)
                        for name, layer in layers.items() for part in "AB"}
            for slot in range(count)
        }  # fmt: skip
        keys = torch.stack([key.detach().to("cpu", copy=True) for key in list(self.router.keys)[:count]])
        return {"lora": loras, "keys": keys.contiguous()}

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        count = len(self.trained)
        if not count:
            if tensors:
                raise RunDirError("proglora state: weights saved for no learned task")
            return
        keys, loras = tensors.get("keys"), tensors.get("lora")
        if not isinstance(keys, torch.Tensor) or tuple(keys.shape) != (count, self.width):
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else None
            raise RunDirError(f"proglora state: keys of shape {shape}, expected ({count}, {self.width})")
        if not isinstance(loras, dict) or sorted(loras) != sorted(str(slot) for slot in range(count)):
            raise RunDirError(f"proglora state: blocks {sorted(loras) if isinstance(loras, dict) else None}, "
                              f"expected 0..{count - 1}")
        layers = self._layers()
        for layer in layers.values():
            layer.keep_tasks(count)
            while layer.tasks < count:
                layer.add_task(None)
        with torch.no_grad():
            for slot in range(count):
                saved = loras[str(slot)]
                expected = {f"{name}.lora_{part}" for name in layers for part in "AB"}
                if not isinstance(saved, dict) or saved.keys() != expected:
                    raise RunDirError(f"proglora state: block {slot} does not hold the A and B of every layer")
                for name, layer in layers.items():
                    for part in "AB":
                        parameter = getattr(layer, f"lora_{part}")[slot]
                        value = saved[f"{name}.lora_{part}"]
                        if tuple(value.shape) != tuple(parameter.shape):
                            raise RunDirError(f"proglora state: {name}.lora_{part} of block {slot} has shape "
                                              f"{tuple(value.shape)}, expected {tuple(parameter.shape)}")
                        parameter.copy_(value)
                        parameter.requires_grad = False
        device = self.backbone.device
        self.router.keys = nn.ParameterList(
            [nn.Parameter(keys[slot].float().clone().to(device), requires_grad=False) for slot in range(count)]
        )
        self.activation.task, self.activation.weights = None, None

    def state_json(self) -> dict[str, Any]:
        return {"tasks": list(self.trained), "rank": self.lora.rank, "alpha": self.lora.alpha, "width": self.width,
                "text_encoder": self.config.text_encoder}

    def load_state_json(self, state: dict[str, Any]) -> None:
        tasks = state.get("tasks", []) if isinstance(state, dict) else None
        if not isinstance(tasks, list) or not all(isinstance(name, str) for name in tasks):
            raise RunDirError(f"proglora state: 'tasks' must be a list of task names, got {tasks!r}")
        if tasks:
            if (state.get("rank"), state.get("alpha")) != (self.lora.rank, self.lora.alpha):
                raise RunDirError(f"proglora state: saved with rank={state.get('rank')} alpha={state.get('alpha')}, "
                                  f"this run has rank={self.lora.rank} alpha={self.lora.alpha}")
            if state.get("text_encoder") != self.config.text_encoder:
                raise RunDirError(f"proglora state: keys made with text_encoder={state.get('text_encoder')!r}, this "
                                  f"run has {self.config.text_encoder!r}")
            if not isinstance(state.get("width"), int) or state["width"] < 1:
                raise RunDirError(f"proglora state: query width {state.get('width')!r}, expected an integer >= 1")
            self.width = state["width"]
        self.trained = list(tasks)
