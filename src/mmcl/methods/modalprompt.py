"""``modalprompt``: ModalPrompt, dual-modality guided prompt learning (Zeng, Zhu, Guo, Zhang and Liu,
"ModalPrompt: Dual-Modality Guided Prompt for Continual Learning of Large Multimodal Models", EMNLP 2025
main conference, arXiv:2410.05849; published title "ModalPrompt: Towards Efficient Multimodal Continual
Instruction Tuning with Dual-Modality Guided Prompt"). Reference code: github.com/AuroraZengfh/ModalPrompt
(read at commit c7bee7c: ``llava/model/language_model/ModalPrompt.py``, ``llava/model/llava_arch.py``,
``llava/train/train.py``, ``llava/train/llava_trainer.py``, ``scripts/ModalPrompt/Train/*.sh``).

The backbone is frozen; the method is rehearsal-free and needs no task identity at test time.

**Prompts.** Task ``t`` owns ``L`` virtual tokens ``<mp_t{t}_{i}>`` (i = 0..L-1) added to the tokenizer, and
their embedding rows ``E_t`` (L x h, h the language model's width), initialised as copies of random rows of
the original vocabulary (reference ``ModalPrompt.add_prompt_tokens``). Only the rows of the task being
trained receive gradients.

**Prototypes.** Task ``t`` also owns a projection ``g_t`` (``Linear(h, h) -> SiLU -> Linear``, the
reference's ``prompt_transform``); its prototype is the mean over the task's L prompt tokens of the projected
rows, ``p_t = mean_i g_t(E_t[i])`` (``llava_arch.prepare_inputs_labels_for_multimodal``).

**Selection** (per sample ``x``, never from the task identity): with ``f_img(x)`` the image feature and
``f_txt(x)`` the instruction feature (:mod:`mmcl.methods.sample_features`),

    s_t(x) = lambda * cos(f_img(x), p_t^img) + (1 - lambda) * cos(f_txt(x), p_t^txt),   lambda = 0.5

At inference the ``min(k, T)`` learned tasks with the highest ``s_t`` are chosen (k = 3, T = tasks learned)
and their tokens are prepended to the instruction in ascending order of ``s_t`` (the most similar prompt
nearest the instruction, as the reference's ``torch.flip(torch.topk(...))``). While task ``t`` trains, a
sample gets the ``k - 1`` most similar *earlier* prompts (all earlier ones, in task order, while there are
fewer than ``k - 1``) followed by task ``t``'s own prompt; the earlier prompts are frozen.

**Loss.** ``CE + w * [(1 - mean_x cos(f_img(x), p_t^img)) + (1 - mean_x cos(f_txt(x), p_t^txt))]``, w = 1
(``LLaVATrainer.compute_loss``): the cross-entropy trains the prompt rows, the two alignment terms pull the
task's prototype towards its samples' image and instruction features (they train the rows and ``g_t``).

Where this differs from the paper / released code, and why:

- *Features and two prototype heads.* The reference compares one 768-d prototype with CLIP-L/14's projected
  image embedding and CLIP text embedding, which share a space. Here the image feature is the backbone's own
  vision-encoder output and the text feature the mean input embedding of the instruction (or a local
  ``text_encoder``) over the final user turn without image placeholders (the reference encodes the
  decoded prompt after the system line, up to " ASSISTANT"); they live in different spaces of different
  widths, so ``g_t`` keeps the reference's
  first layer (``Linear(h, h) -> SiLU``) and ends in two output layers, an image head and a text head, giving
  ``p_t^img`` and ``p_t^txt``. With a shared feature space this is the reference's MLP with two copies of
  its last layer.
- *Alignment loss over the task instead of the batch.* The reference averages ``cos`` over the batch; the
  HF ``Trainer`` hands ``extra_loss`` a collated batch without sample identities, so the mean is taken over
  all the task's training samples: ``1 - mean_x cos(f(x), p) = 1 - m . p/|p|`` with ``m`` the mean of the
  unit-normalised features, computed once per task. It equals the reference's loss averaged over an epoch of
  equal batches (same expected gradient; identical when one batch holds the whole task). A sample without
  an image has a zero image feature (cosine 0 to every prototype), in the selection and in ``m``.
- *Where the prompts go.* The reference splices the prompt ids right after BOS (before the system prompt).
  Here the tokens' text is prepended to the sample's final user turn (``Sample.prompt``), so that every
  architecture's chat template, image-token expansion, image-token mask and M-RoPE positions are built by
  its own processor and model from the token ids (prompts passed as ``inputs_embeds`` would bypass the ids
  Qwen2-VL's M-RoPE positions and LLaVA's image-token mask are built from). Per-sample prompts are rewritten with ``dataclasses.replace`` and batched normally.
- *How the vocabulary grows.* The reference resizes the embedding matrix (``resize_token_embeddings``) and
  re-copies all other rows from a saved copy before every step. ``resize_token_embeddings`` also grows the
  output head (the same matrix when embeddings are tied, as in tiny-llava: the prompt rows would then be
  trained as output rows too and could be generated), and AdamW's decoupled weight decay moves rows whose
  gradient is masked to zero. Here the input embedding module itself is left untouched (same module, same
  ``weight`` tensor, tying kept, output head unchanged so virtual tokens can never be generated); two hooks on
  it look up the virtual ids in per-task parameters ``E_t`` registered under the model's ``modalprompt``
  submodule. Every original weight stays bit-identical whatever the optimiser does. Models whose embedding
  scales its output (``embed_scale``) scale the prompt rows the same way.
- *Frozen projector.* The released training script leaves LLaVA's ``mm_projector`` trainable (lr 2e-5,
  ``LlavaMetaModel.initialize_vision_modules`` sets ``requires_grad = True`` when it exists) although the
  paper describes a frozen backbone; here everything of the backbone is frozen.
- *Learning rate.* The reference trains prompts and projections at ``--mm_projector_lr 2e-5`` for 10 epochs;
  here they use the run's ``training`` settings.

Implementation notes: the stage state is, per learned task, its prompt rows and
projection (tensors) and its token names (JSON, re-added to the tokenizer in the saved order on load).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from mmcl.backbones.backbone import Backbone, _hf_model
from mmcl.config import LoraSettings, setting
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, DataError, RunDirError
from mmcl.methods.base import Method, register_method
from mmcl.methods.sample_features import TextFeatures, cosine_to, image_features, vision_width
from mmcl.streams.stream import Task

BANK_NAME = "modalprompt"  # the submodule of the model holding the prompt rows and the projections


def token_names(task_index: int, length: int) -> list[str]:
    """The virtual tokens of task ``task_index``: ``<mp_t{task}_{i}>``, i = 0..length-1."""
    return [f"<mp_t{task_index}_{i}>" for i in range(length)]


@dataclass
class ModalPromptConfig:
    """ModalPrompt options. Sources: "repo" = github.com/AuroraZengfh/ModalPrompt at commit c7bee7c."""

    # L. Repo scripts/ModalPrompt/Train/*.sh: ``--prefix_len 10``.
    prompt_length: int = setting(10, range="[1, inf)", help="L, virtual prompt tokens per task (repo scripts: --prefix_len 10)")
    # k. Repo llava_arch.py: ``transfer_num = 3`` (train.py ModelArguments.transfer_num = 3).
    top_k: int = setting(3, range="[1, inf)", help="prompts prepended at inference (the most similar tasks); while "
                         "training, k-1 earlier prompts plus the task's own (repo llava_arch.py: transfer_num = 3)")
    # lambda. Repo llava_arch.py: ``lam = 0.5``.
    image_weight: float = setting(0.5, range="[0, 1]", help="lambda in lambda*cos(image, prototype) + (1-lambda)*"
                                  "cos(instruction, prototype) (repo llava_arch.py: lam = 0.5)")
    # Repo llava_trainer.py compute_loss: ``loss + image_cos_sim_loss + text_cos_sim_loss`` (weight 1).
    alignment_weight: float = setting(1.0, range="[0, inf)", help="weight of the two prototype alignment losses "
                                      "1 - cos(feature, prototype) added to the cross-entropy (repo llava_trainer.py: 1)")
    # Repo: CLIP's text tower (scripts: --text_tower clip-vit-large-patch14-336); null here: nothing to download.
    text_encoder: str | None = setting(None, help="local transformers checkpoint whose mean last hidden state is the "
                                       "instruction feature (the paper uses CLIP's text encoder); null: the backbone's "
                                       "mean input embedding of the instruction")

    def __post_init__(self) -> None:
        for key in ("prompt_length", "top_k"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"method.options.{key}: must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ConfigError(f"method.options.image_weight: must be in [0, 1], got {self.image_weight}")
        if self.alignment_weight < 0:
            raise ConfigError(f"method.options.alignment_weight: must be >= 0, got {self.alignment_weight}")
        if self.text_encoder is not None and not str(self.text_encoder).strip():
            raise ConfigError("method.options.text_encoder: empty path (use null for the backbone's own embeddings)")


# -- the mechanism as pure functions ----------------------------------------------------------------
def guide_scores(
    image_feature: torch.Tensor,
    text_feature: torch.Tensor,
    image_prototypes: torch.Tensor,
    text_prototypes: torch.Tensor,
    image_weight: float = 0.5,
) -> torch.Tensor:
    """``lambda cos(f_img, p_t^img) + (1 - lambda) cos(f_txt, p_t^txt)`` for one sample (1-D features) against
    every task's prototypes (rows of ``(T, width)`` matrices): a ``(T,)`` float32 tensor. A zero feature
    (no image) has cosine 0 to every prototype."""
    image = cosine_to(image_feature.float().reshape(1, -1), image_prototypes.float())[0]
    text = cosine_to(text_feature.float().reshape(1, -1), text_prototypes.float())[0]
    return image_weight * image + (1.0 - image_weight) * text


def top_tasks(scores: torch.Tensor, tasks: Sequence[int], k: int) -> list[int]:
    """The ``min(k, len(tasks))`` entries of ``tasks`` with the highest ``scores`` (one per task), in
    ascending order of score: the most similar task last, i.e. nearest the instruction. Equal scores rank the
    earlier task higher (a stable sort)."""
    if len(tasks) != scores.numel():
        raise ValueError(f"{scores.numel()} scores for {len(tasks)} tasks")
    k = min(k, len(tasks))
    if k <= 0:
        return []
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k].tolist()
    return [tasks[i] for i in reversed(order)]


def training_tasks(scores: torch.Tensor, previous: Sequence[int], current: int, k: int) -> list[int]:
    """The prompts of a training sample of task ``current``: while fewer than ``k - 1`` tasks were learned
    before, all of them in task order; then the ``k - 1`` with the highest ``scores`` (over ``previous``), in
    ascending order; the current task's own prompt last (repo llava_arch.py, training branch)."""
    if len(previous) < k - 1:
        return [*previous, current]
    return [*top_tasks(scores, previous, k - 1), current]


def alignment_loss(mean_unit_feature: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """``1 - mean_x cos(f(x), p)`` written as ``1 - m . p / |p|`` with ``m`` the mean of the samples'
    unit-normalised features (zero rows for samples without the feature)."""
    return 1.0 - mean_unit_feature.to(prototype.device, torch.float32) @ nn.functional.normalize(prototype.float(), dim=-1)


def mean_unit(features: torch.Tensor) -> torch.Tensor:
    """The mean of the rows of ``features`` after scaling each to unit length (zero rows stay zero)."""
    return nn.functional.normalize(features.float(), dim=-1).mean(dim=0)


# -- modules ------------------------------------------------------------------------------------------
class Projection(nn.Module):
    """``g_t``: ``Linear(h, h) -> SiLU`` then an image head ``Linear(h, d_img)`` and a text head
    ``Linear(h, d_txt)`` (the reference's ``prompt_transform`` with its last layer doubled, see the module
    docstring). Float32 whatever the backbone's dtype."""

    def __init__(self, hidden: int, image_width: int, text_width: int):
        super().__init__()
        self.trunk = nn.Linear(hidden, hidden)
        self.image_head = nn.Linear(hidden, image_width)
        self.text_head = nn.Linear(hidden, text_width)

    def prototypes(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p^img, p^txt)``: the means over the prompt tokens of the heads' outputs."""
        hidden = nn.functional.silu(self.trunk(rows.to(self.trunk.weight.dtype)))
        return self.image_head(hidden).mean(dim=0), self.text_head(hidden).mean(dim=0)


class PromptBank(nn.Module):
    """Per task (keyed by its stream position as a string): the prompt rows ``E_t`` (L x h) and ``g_t``.
    Registered as a submodule of the model so that the trainer's optimiser sees the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts = nn.ParameterDict()
        self.projections = nn.ModuleDict()


class VirtualTokenLookup:
    """Hooks on the input embedding module: ids of virtual tokens are looked up in the bank's prompt rows,
    every other id in the embedding itself (which is called with the virtual ids replaced by 0)."""

    def __init__(self, embedding: nn.Module, bank: PromptBank):
        self.embedding = embedding
        self.bank = bank
        self.sorted_ids = torch.zeros(0, dtype=torch.long)  # virtual token ids, ascending
        self.rows_of_sorted: torch.Tensor = torch.zeros(0, dtype=torch.long)  # row of the concatenated table
        self.keys: list[str] = []  # bank keys in the order their rows are concatenated
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # copies of the two above
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.handles = [
            embedding.register_forward_pre_hook(self._before),
            embedding.register_forward_hook(self._after),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def set_tokens(self, entries: Sequence[tuple[str, list[int]]]) -> None:
        """``entries``: (bank key, the key's token ids in row order) for every task with prompts."""
        ids, rows = [], []
        offset = 0
        for _, token_ids in entries:
            ids.extend(token_ids)
            rows.extend(range(offset, offset + len(token_ids)))
            offset += len(token_ids)
        if len(set(ids)) != len(ids):
            raise RunDirError("modalprompt: two virtual tokens share one token id")
        order = sorted(range(len(ids)), key=ids.__getitem__)
        self.sorted_ids = torch.tensor([ids[i] for i in order], dtype=torch.long)
        self.rows_of_sorted = torch.tensor([rows[i] for i in order], dtype=torch.long)
        self.keys = [key for key, _ in entries]
        self._on_device = {}

    def _index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self.sorted_ids.to(device), self.rows_of_sorted.to(device))
        return self._on_device[device]

    def _before(self, module: nn.Module, args: tuple) -> tuple | None:
        self._pending = None
        if not self.keys or not args or not isinstance(args[0], torch.Tensor):
            return None
        ids = args[0]
        known = self._index(ids.device)[0]
        virtual = torch.isin(ids, known)
        if not bool(virtual.any()):
            return None
        position = torch.searchsorted(known, ids.clamp(min=0)).clamp(max=known.numel() - 1)
        self._pending = (virtual, position)
        return (torch.where(virtual, torch.zeros_like(ids), ids), *args[1:])

    def _after(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        virtual, position = pending
        table = torch.cat([self.bank.prompts[key] for key in self.keys], dim=0)
        rows = table[self._index(position.device)[1][position].to(table.device)]
        scale = getattr(module, "embed_scale", None)
        if scale is not None:
            rows = rows * (scale.to(rows.dtype) if isinstance(scale, torch.Tensor) else scale)
        return torch.where(virtual.unsqueeze(-1), rows.to(output.dtype), output)


# -- the method ---------------------------------------------------------------------------------------
@register_method
class ModalPrompt(Method[ModalPromptConfig]):
    name = "modalprompt"
    state_growth = "per-task"
    description = ("ModalPrompt: per-task prompt tokens, chosen per sample by image and instruction similarity "
                   "to learned prototypes; frozen backbone, no replay, no task identity")
    supports_dora = False  # trains no LoRA: lora.use_dora is refused instead of silently ignored

    def __init__(self, config: ModalPromptConfig, lora: LoraSettings, seed: int):
        super().__init__(config, lora, seed)
        self.text_features = TextFeatures(config.text_encoder)

    def init_state(self) -> None:
        self.bank: PromptBank | None = None
        self.lookup: VirtualTokenLookup | None = None
        self.trained: list[int] = []  # tasks (stream positions) whose prompts are learned, in order
        self.current: list[int] = []  # tasks being trained in this stage
        self.stage_tasks: list[int] = []  # the tasks of the latest stage (trainable_parameters)
        self.tokens: dict[int, list[str]] = {}  # task -> its virtual tokens, in row order
        self.feature_means: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # task -> (m_img, m_txt, n)
        self.widths: tuple[int, int, int] | None = None  # (h, image feature width, text feature width)
        self.base_vocab = 0  # prompt rows are initialised from rows [0, base_vocab)

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, backbone: Backbone) -> None:
        super().setup(backbone)
        model = _hf_model(backbone.model)
        old = getattr(model, BANK_NAME, None)
        if isinstance(old, PromptBank) and hasattr(old, "lookup"):
            old.lookup.remove()  # the backbone was set up by another instance before
        for parameter in model.parameters():
            parameter.requires_grad = False
        embedding = model.get_input_embeddings()
        self.base_vocab = min(len(backbone.tokenizer), embedding.weight.shape[0])
        self.bank = PromptBank()
        model.add_module(BANK_NAME, self.bank)
        self.lookup = VirtualTokenLookup(embedding, self.bank)
        self.bank.lookup = self.lookup  # plain attribute (not a module): found again by a later setup

    def _embedding(self) -> nn.Module:
        return _hf_model(self.backbone.model).get_input_embeddings()

    def _widths(self) -> tuple[int, int, int]:
        """(h, image feature width, text feature width); the text width is measured on a probe sample."""
        if self.widths is None:
            probe = Sample(id="modalprompt-width", task="", images=(), prompt="width", answer="")
            hidden = int(self._embedding().weight.shape[1])
            text_width = int(self.text_features(self.backbone, [probe]).shape[1])
            self.widths = (hidden, vision_width(self.backbone), text_width)
        return self.widths

    def _add_task(self, task_index: int) -> None:
        """Tokens, prompt rows (copies of random vocabulary rows) and projection of one task (seeded with
        ``seed + task_index``); nothing happens when the task has them already."""
        key = str(task_index)
        names = token_names(task_index, self.config.prompt_length)
        tokenizer = self.backbone.tokenizer
        tokenizer.add_tokens(names, special_tokens=True)
        ids = tokenizer.convert_tokens_to_ids(names)
        unknown = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or (unknown is not None and i == unknown) for i in ids):
            raise DataError(f"modalprompt: the tokenizer did not take the tokens {names[0]}..")
        self.tokens[task_index] = names
        if key not in self.bank.prompts:
            hidden, image_width, text_width = self._widths()
            weight = self._embedding().weight
            generator = torch.Generator().manual_seed(self.seed + task_index)
            source = torch.randint(self.base_vocab, (self.config.prompt_length,), generator=generator)
            rows = weight.detach()[source.to(weight.device)].clone()
            self.bank.prompts[key] = nn.Parameter(rows, requires_grad=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + task_index)
                projection = Projection(hidden, image_width, text_width)
            self.bank.projections[key] = projection.to(weight.device).requires_grad_(False)
        self._refresh_lookup()

    def _refresh_lookup(self) -> None:
        tokenizer = self.backbone.tokenizer
        entries = [(str(t), tokenizer.convert_tokens_to_ids(self.tokens[t])) for t in sorted(self.tokens)]
        self.lookup.set_tokens(entries)

    def _drop_task(self, task_index: int) -> None:
        """Forget a task's prompts (its tokens stay in the tokenizer, unused)."""
        key = str(task_index)
        self.tokens.pop(task_index, None)
        if key in self.bank.prompts:
            del self.bank.prompts[key]
            del self.bank.projections[key]
        self._refresh_lookup()

    def _set_trainable(self, task_index: int, trainable: bool) -> None:
        key = str(task_index)
        self.bank.prompts[key].requires_grad_(trainable)
        # with no alignment loss nothing reaches g_t: it stays frozen (no unused trainable parameters)
        self.bank.projections[key].requires_grad_(trainable and self.config.alignment_weight > 0)

    # -- hooks -----------------------------------------------------------------------------------
    def before_task(self, task_index: int, task: Task) -> None:
        if task_index in self.trained:
            raise DataError(f"modalprompt: task {task.name} (position {task_index}) was already learned")
        if not self.current:
            self.stage_tasks = []
        self._add_task(task_index)
        self._set_trainable(task_index, True)
        self.current.append(task_index)
        self.stage_tasks.append(task_index)

    def train_data(self, task_index: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
        """The task's samples with their prompts prepended (earlier prompts chosen per sample, then the
        task's own); also records the task's mean unit image and instruction features for the loss."""
        samples = list(samples)
        if task_index not in self.current:
            raise DataError(f"modalprompt: train_data for task {task.name} without before_task")
        images, texts = self.features(samples)
        self.feature_means[task_index] = (mean_unit(images), mean_unit(texts), len(samples))
        previous = list(self.trained)
        prototypes = self.prototypes(previous) if len(previous) >= self.config.top_k - 1 and previous else None
        rewritten = []
        for i, sample in enumerate(samples):
            scores = self._scores(images[i], texts[i], prototypes) if prototypes is not None else torch.zeros(len(previous))
            rewritten.append(self.with_prompts(sample, training_tasks(scores, previous, task_index, self.config.top_k)))
        return rewritten

    def extra_loss(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> torch.Tensor | None:
        """``w * sum_t n_t/N [(1 - m_img . p_img/|p_img|) + (1 - m_txt . p_txt/|p_txt|)]`` over the tasks of
        the stage (one task: the reference's loss with the batch mean replaced by the task mean)."""
        if self.config.alignment_weight <= 0 or not self.current:
            return None
        total_samples = sum(self.feature_means[t][2] for t in self.current if t in self.feature_means)
        loss = None
        for task_index in self.current:
            if task_index not in self.feature_means:
                continue
            image_mean, text_mean, count = self.feature_means[task_index]
            key = str(task_index)
            image_prototype, text_prototype = self.bank.projections[key].prototypes(self.bank.prompts[key])
            term = alignment_loss(image_mean, image_prototype) + alignment_loss(text_mean, text_prototype)
            term = term * (count / total_samples)
            loss = term if loss is None else loss + term
        return None if loss is None else self.config.alignment_weight * loss

    def after_task(self, task_index: int, task: Task) -> None:
        self._set_trainable(task_index, False)
        if task_index in self.current:
            self.current.remove(task_index)
        self.feature_means.pop(task_index, None)
        self.trained.append(task_index)

    # -- selection and generation ----------------------------------------------------------------
    def features(self, samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample image and instruction features (float32, CPU), computed one sample at a time; a sample
        without images gets a zero image feature of the vision encoder's width."""
        width = self._widths()[1]
        images = image_features(self.backbone, samples)
        if images.shape[1] != width:
            raise DataError(f"modalprompt: image features of width {images.shape[1]}, expected {width}")
        return images, self.text_features(self.backbone, samples)

    @torch.no_grad()
    def prototypes(self, tasks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, d_img)`` and ``(T, d_txt)`` float32 CPU prototypes of ``tasks``, in that order."""
        pairs = [self.bank.projections[str(t)].prototypes(self.bank.prompts[str(t)]) for t in tasks]
        return torch.stack([p[0] for p in pairs]).float().cpu(), torch.stack([p[1] for p in pairs]).float().cpu()

    def _scores(self, image: torch.Tensor, text: torch.Tensor, prototypes: tuple[torch.Tensor, torch.Tensor]):
        return guide_scores(image, text, prototypes[0], prototypes[1], self.config.image_weight)

    def select(self, samples: Sequence[Sample]) -> list[list[int]]:
        """Per sample, the learned tasks whose prompts it gets at inference, in prompt order (ascending
        similarity). Decided from the sample alone: one sample at a time, whatever the batch."""
        if not self.trained:
            return [[] for _ in samples]
        images, texts = self.features(samples)
        prototypes = self.prototypes(self.trained)
        return [
            top_tasks(self._scores(images[i], texts[i], prototypes), self.trained, self.config.top_k)
            for i in range(len(samples))
        ]

    def with_prompts(self, sample: Sample, tasks: Sequence[int]) -> Sample:
        """``sample`` with the virtual tokens of ``tasks`` (in that order) prepended to its final user turn."""
        prefix = "".join(name for t in tasks for name in self.tokens[t])
        return replace(sample, prompt=prefix + sample.prompt) if prefix else sample

    def generate(self, samples: Sequence[Sample], task: Task, max_new_tokens: int) -> list[str]:
        """Answers with each sample's selected prompts; ``task`` is not used (no task identity)."""
        samples = list(samples)
        if not samples:
            return []
        chosen = self.select(samples)
        return self.backbone.generate([self.with_prompts(s, c) for s, c in zip(samples, chosen)], max_new_tokens)

    # -- state -----------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        """Parameters trained in the latest stage: its tasks' prompt rows and projections."""
        tasks = self.stage_tasks or self.trained[-1:]
        total = 0
        for t in tasks:
            key = str(t)
            if key in self.bank.prompts:
                total += self.bank.prompts[key].numel()
                if self.config.alignment_weight > 0:
                    total += sum(p.numel() for p in self.bank.projections[key].parameters())
        return total

    def state_tensors(self) -> dict[str, Any]:
        def cpu(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().to("cpu", copy=True).contiguous()

        prompts = {str(t): cpu(self.bank.prompts[str(t)]) for t in self.trained}
        projections = {
            str(t): {name: cpu(p) for name, p in self.bank.projections[str(t)].state_dict().items()}
            for t in self.trained
        }
        return {"prompts": prompts, "projections": projections} if self.trained else {}

    def state_json(self) -> dict[str, Any]:
        hidden, image_width, text_width = self._widths()
        return {
            "prompt_length": self.config.prompt_length,
            "widths": {"hidden": hidden, "image": image_width, "text": text_width},
            "tasks": list(self.trained),
            "tokens": [list(self.tokens[t]) for t in self.trained],
        }

    def load_state_json(self, state: dict[str, Any]) -> None:
        """Re-create the saved tasks' tokens (added to the tokenizer in the saved order), rows and
        projections; their values come with :meth:`load_state_tensors`. Tasks not in ``state`` are dropped."""
        if not isinstance(state, dict):
            raise RunDirError("modalprompt state: expected a JSON object")
        tasks = state.get("tasks", [])
        tokens = state.get("tokens", [])
        if not state:
            tasks, tokens = [], []
        elif state.get("prompt_length") != self.config.prompt_length:
            raise RunDirError(f"modalprompt state: saved with prompt_length={state.get('prompt_length')!r}, "
                              f"this run has {self.config.prompt_length}")
        if (not isinstance(tasks, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tasks)
                or len(set(tasks)) != len(tasks)):
            raise RunDirError(f"modalprompt state: 'tasks' must list distinct task positions, got {tasks!r}")
        if not isinstance(tokens, list) or len(tokens) != len(tasks):
            raise RunDirError("modalprompt state: 'tokens' must hold one token list per task")
        for task_index, names in zip(tasks, tokens):
            if names != token_names(task_index, self.config.prompt_length):
                raise RunDirError(f"modalprompt state: task {task_index} has tokens {str(names)[:80]}, expected "
                                  f"{token_names(task_index, self.config.prompt_length)[:2]}...")
        if tasks:
            widths = state.get("widths")
            expected = dict(zip(("hidden", "image", "text"), self._widths()))
            if widths != expected:
                raise RunDirError(f"modalprompt state: saved for feature widths {widths!r}, this backbone has {expected}")
        for task_index in [t for t in self.tokens if t not in tasks]:
            self._drop_task(task_index)
        for task_index in tasks:  # tokens re-added task by task, in the saved order
            self._add_task(task_index)
            self._set_trainable(task_index, False)
        self.trained = list(tasks)
        self.current, self.stage_tasks = [], []
        self.feature_means.clear()

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        prompts = tensors.get("prompts", {}) if tensors else {}
        projections = tensors.get("projections", {}) if tensors else {}
        expected = {str(t) for t in self.trained}
        if set(prompts) != expected or set(projections) != expected or set(tensors or {}) - {"prompts", "projections"}:
            raise RunDirError(f"modalprompt state: tensors for tasks {sorted(prompts)} / {sorted(projections)}, "
                              f"expected {sorted(expected)}")
        with torch.no_grad():
            for key in sorted(expected):
                parameter = self.bank.prompts[key]
                value = prompts[key]
                if not isinstance(value, torch.Tensor) or value.shape != parameter.shape:
                    raise RunDirError(f"modalprompt state: prompts of task {key} have shape "
                                      f"{tuple(getattr(value, 'shape', ()))}, expected {tuple(parameter.shape)}")
                parameter.copy_(value)
                module = self.bank.projections[key]
                own = module.state_dict()
                saved = projections[key]
                if not isinstance(saved, dict) or set(saved) != set(own):
                    raise RunDirError(f"modalprompt state: projection of task {key} has keys "
                                      f"{sorted(saved) if isinstance(saved, dict) else saved!r}, expected {sorted(own)}")
                for name, target in own.items():
                    if saved[name].shape != target.shape:
                        raise RunDirError(f"modalprompt state: projection {key}.{name} has shape "
                                          f"{tuple(saved[name].shape)}, expected {tuple(target.shape)}")
                module.load_state_dict(saved)
