"""The method interface the runner knows, and the registry methods join with ``@register_method``.

A method sees one task at a time through hooks (names after Avalanche's vocabulary, without shared
mutable state): ``setup`` once, ``see_tasks`` before each stage (the tasks learned so far and the
current one, never later ones), then per task ``before_task`` -> ``train_data`` -> training with
``extra_loss`` added to the cross-entropy -> ``after_task``. ``generate`` is overridden only when
inference differs from plain batched generation (e.g. routing). Everything a later stage needs is
returned by ``state_tensors`` (nested dicts of tensors, saved as safetensors) and ``state_json``
(JSON) so a stage can be resumed.
"""

from __future__ import annotations

import typing
from abc import ABC
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Sequence, TypeVar, Union

import torch

from mmcl.backbones.backbone import Backbone
from mmcl.streams.stream import Task
from mmcl.config import LoraSettings, TrainingConfig
from mmcl.data.sample import Sample
from mmcl.errors import ConfigError, RunDirError
from mmcl.registry import Registry

SEPARATOR = "::"  # joins the levels of nested state in a saved key: "fisher::0::<parameter name>"

NestedTensors = dict[str, Union[torch.Tensor, "NestedTensors"]]


def _check_key(key: object, where: str) -> str:
    if not isinstance(key, str) or not key or ":" in key:
        raise RunDirError(f"{where}: state key {key!r} must be a non-empty string without ':' "
                          f"({SEPARATOR!r} separates the levels of nested state)")
    return key


def flatten_state(nested: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{"fisher": {"0": {name: t}}}`` -> ``{"fisher::0::<name>": t}``, in the nested order. A key with
    ':' (or empty) could not be told apart after flattening: refused with a :class:`RunDirError`."""
    flat: dict[str, torch.Tensor] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = prefix + _check_key(key, prefix.rstrip(":") or "state")
            if isinstance(value, Mapping):
                walk(value, name + SEPARATOR)
            elif isinstance(value, torch.Tensor):
                flat[name] = value
            else:
                raise RunDirError(f"state: {name!r} holds a {type(value).__name__}, expected a tensor or a dict")

    walk(nested, "")
    return flat


def unflatten_state(flat: Mapping[str, Any]) -> NestedTensors:
    """The inverse of :func:`flatten_state` (order of first appearance kept). Values that are dicts already
    are merged in, so a nested dict comes back unchanged. A key whose levels collide with another's
    (``"a"`` and ``"a::b"``) or a malformed key is a :class:`RunDirError`."""
    nested: NestedTensors = {}
    for key, value in flat.items():
        if not isinstance(key, str):
            raise RunDirError(f"state: key {key!r} is not a string")
        *parents, leaf = [_check_key(part, f"state key {key!r}") for part in key.split(SEPARATOR)]
        node = nested
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RunDirError(f"state: key {key!r} collides with {SEPARATOR.join(parents[: depth + 1])!r}")
        if isinstance(value, Mapping):
            target = node.setdefault(leaf, {})
            if not isinstance(target, dict):
                raise RunDirError(f"state: key {key!r} is both a tensor and a group")
            for inner_key, inner in unflatten_state(value).items():
                if inner_key in target:
                    raise RunDirError(f"state: key {key + SEPARATOR + inner_key!r} appears twice")
                target[inner_key] = inner
        elif leaf in node:
            raise RunDirError(f"state: key {key!r} collides with another saved key")
        else:
            node[leaf] = value
    return nested


ConfigT = TypeVar("ConfigT")


@dataclass
class NoOptions:
    """This method has no options of its own."""


def _config_type(cls: type) -> type | None:
    """The options class named by a generic base such as ``Method[EwcConfig]``, or None."""
    for base in getattr(cls, "__orig_bases__", ()):
        origin = typing.get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Method):
            args = typing.get_args(base)
            if args and isinstance(args[0], type):
                return args[0]
    return None


class Method(ABC, Generic[ConfigT]):
    """Base class: sequential training with no protection against forgetting unless hooks add it.

    Subclass ``Method[MyOptions]`` to make the dataclass ``MyOptions`` the method's ``config_class``
    (its fields are ``method.options``); setting ``config_class`` explicitly still wins."""

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type] = NoOptions
    trains_jointly: ClassVar[bool] = False  # True: one stage on the union of all tasks (multitask reference)
    # True: an upper bound drawn as a reference row (joint, experts), not a continual learner to rank
    reference: ClassVar[bool] = False
    # False: the method reads, merges or builds LoRA factors itself, which DoRA's magnitude vector would break
    supports_dora: ClassVar[bool] = True
    # how the stored state (state.safetensors) grows with the tasks learned: "constant" (one set of weights,
    # statistics folded in) or "per-task" (by design: an adapter, expert, prompt, basis, penalty or buffer
    # part per task); benchmarks/scale_rehearsal.py checks the measured growth against it
    state_growth: ClassVar[str] = "constant"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" not in cls.__dict__:
            derived = _config_type(cls)
            if derived is not None:
                cls.config_class = derived

    def __init__(self, config: ConfigT, lora: LoraSettings, seed: int):
        if getattr(lora, "use_dora", False) and not self.supports_dora:
            raise ConfigError(f"lora.use_dora: method {self.name} builds, reads or merges its LoRA factors itself "
                              "(or trains no LoRA), which DoRA's magnitude vector would break; set lora.use_dora: false")
        self.config: ConfigT = config
        self.lora = lora
        self.seed = seed
        self.log_dir: Path | None = None  # set by the runner: where per-step training scalars go (TensorBoard)
        self.stage_name = "stage"  # set by the runner before ``train``: the stage's name, e.g. "2_med"
        self.backbone: Backbone | None = None
        self.tasks: list[Task] = []  # the tasks learned so far and the current one (see_tasks)
        self.n_tasks = 0  # how many tasks the stream has (a count: the later tasks stay unseen)
        self.init_state()

    def init_state(self) -> None:
        """Set up the method's own state fields (called at the end of ``__init__``)."""

    # -- hooks -------------------------------------------------------------------------------
    def setup(self, backbone: Backbone) -> None:
        """Wrap the backbone's model (adapters, frozen parts) once, before anything is trained or loaded."""
        self.backbone = backbone

    def see_tasks(self, tasks: Sequence[Task], n_tasks: int) -> None:
        """Called by the runner before a stage is trained or a stage's state is loaded: ``tasks`` are the
        tasks learned by then plus the one being trained (``tasks[:k]`` for stage k), ``n_tasks`` the
        length of the stream."""
        self.tasks = list(tasks)
        self.n_tasks = n_tasks

    def before_task(self, task_index: int, task: Task) -> None:
        """Called before training on ``task`` (0-based ``task_index``)."""

    def train_data(self, task_index: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
        """The samples to train on for this task (replay and data rewriting hook in here)."""
        return list(samples)

    def extra_loss(self, model: torch.nn.Module, inputs: dict, outputs: Any) -> torch.Tensor | None:
        """A term added to the token cross-entropy during training, or None; ``model`` is the model itself
        (under ``torchrun`` the Trainer's DDP wrapper is taken off first)."""
        return None

    def train(self, samples: Sequence[Sample], config: TrainingConfig, work_dir: Path, seed: int) -> dict[str, Any]:
        """Train the model on one stage's ``samples`` (after ``train_data``); returns metrics for stage.json.

        Default: supervised fine-tuning with :meth:`extra_loss` added. Methods that learn from
        rewards (GRPO, EvoLMM) override this; ``work_dir`` is scratch space removed afterwards."""
        from mmcl.training.sft import train_on_samples

        assert self.backbone is not None
        return train_on_samples(
            self.backbone, samples, config, work_dir, seed=seed, extra_loss=self.extra_loss, log_dir=self.sft_log_dir()
        )

    def sft_log_dir(self, part: str = "sft") -> Path | None:
        """Where a supervised training of the current stage writes its TensorBoard curves:
        ``<log_dir>/<part>/<stage name>`` (e.g. ``tensorboard/sft/2_med``), None when nothing is logged."""
        if self.log_dir is None:
            return None
        return self.log_dir / part / self.stage_name

    def after_task(self, task_index: int, task: Task) -> None:
        """Called after training on ``task`` (statistics, experts, routers)."""

    def evaluates_stage(self, index: int, n_stages: int) -> bool:
        """Whether the model after stage ``index`` (0 = the base model) of ``n_stages`` is one the method
        defines and the runner should evaluate; a row it skips stays empty (``None``) in the matrix.
        Only protocols that build their model at the end (MR-LoRA's paper protocol) say no."""
        return True

    def generate(self, samples: Sequence[Sample], task: Task, max_new_tokens: int) -> list[str]:
        """Answers for one batch of test samples of ``task``; the task identity is for oracle methods."""
        assert self.backbone is not None
        return self.backbone.generate(samples, max_new_tokens)

    # -- evaluation summary (stored by the runner in method_summary.json after each evaluation) --
    def evaluation_summary(self) -> dict[str, Any] | None:
        """Method-specific facts about the evaluations so far (e.g. routing statistics), or None."""
        return None

    def load_evaluation_summary(self, summary: dict[str, Any]) -> None:
        """Restore what ``evaluation_summary`` returned when a run is resumed."""

    def sync_evaluation(self) -> None:
        """Multi-process runs: called on every process after the answers of each evaluated file are
        gathered, so that statistics each process counted over its own shard can be combined (a collective
        call: every process makes it at the same point)."""

    def report_sections(self) -> list[dict[str, Any]]:
        """Extra report sections built from the evaluation summary, as data (never HTML): tables
        ``{"title", "kind": "table", "columns", "rows", "note"}`` and panels of curves ``{"title",
        "kind": "curves", "x_label", "y_label", "series": {name: [y or None, ...]}, "x", "note", "y_log",
        "x_marks"}`` (see :mod:`mmcl.report.html`, which draws them; a method imports nothing from
        ``mmcl.report``)."""
        return []

    # -- state -------------------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        assert self.backbone is not None
        return sum(p.numel() for p in self.backbone.model.parameters() if p.requires_grad)

    def state_tensors(self) -> NestedTensors:
        """Tensors that define the model after a stage (adapter weights, statistics), grouped in nested
        dicts (keys without ':'), e.g. ``{"fisher": {"0": {name: tensor}}}``."""
        return {}

    def load_state_tensors(self, tensors: NestedTensors) -> None:
        """Restore what ``state_tensors`` returned."""

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """``state_tensors`` flattened for safetensors (levels joined by ``::``)."""
        return flatten_state(self.state_tensors())

    def restore_tensors(self, flat: Mapping[str, torch.Tensor]) -> None:
        """Restore a stage from what ``saved_tensors`` returned (or a state file read back)."""
        self.load_state_tensors(unflatten_state(flat))

    def state_json(self) -> dict[str, Any]:
        """JSON-serialisable state (buffers of ids, counters)."""
        return {}

    def load_state_json(self, state: dict[str, Any]) -> None:
        """Restore what ``state_json`` returned."""


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make the method selectable by ``cls.name`` (a taken name is refused)."""
    return METHODS.register(cls.name, cls)
