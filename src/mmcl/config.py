"""The typed experiment config: YAML in (``yaml.safe_load`` only), unknown keys and wrong types rejected
with a one-line error that names the key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmcl.benchmarks.stream import StreamConfig
from mmcl.errors import ConfigError


@dataclass
class LoraSettings:
    """LoRA adapter shape (Hu et al. 2021): W x + (alpha / rank) B A x on every targeted linear layer."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | None = None  # regex over module names; None = the backbone's default (language model + projector)


@dataclass
class TrainingConfig:
    """Optimisation settings for one stage (one task) of supervised fine-tuning."""

    epochs: float = 4.0  # passes over the task's training data
    max_steps: int = -1  # if > 0, overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 3e-3  # LoRA on the tiny model (calibrated); use ~2e-4 for 7B LoRA, 2e-5 for full FT
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    progress_bar: bool = True
    bf16: bool = False
    activation_checkpointing: bool = False
    deepspeed: str | None = None  # DeepSpeed JSON config for the HF Trainer (GPU; see examples/deepspeed/)
    fsdp: str | None = None  # the HF Trainer's FSDP option string, e.g. "full_shard auto_wrap" (GPU)


@dataclass
class BackboneConfig:
    """Which model to continue training: a preset name (``mmcl list``), a hub id or a local directory."""

    name: str = "tiny-llava"
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (the preset's dtype on a GPU, else float32)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    max_length: int = 512  # longest tokenised training conversation accepted
    load_in_4bit: bool = False  # NF4 language model via bitsandbytes (QLoRA); needs CUDA and bitsandbytes
    processor_options: dict[str, Any] = field(default_factory=dict)  # AutoProcessor kwargs, e.g. Qwen-VL size


@dataclass
class MethodConfig:
    """The continual-learning method and its own options (checked against the method's config class)."""

    name: str = "seq-lora"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationConfig:
    """How the accuracy matrix is filled."""

    batch_size: int = 64
    max_new_tokens: int | None = None  # overrides every task's own max_new_tokens when set
    forward_transfer: bool = True  # after task t also evaluate tasks t+1..T (needed for FWT; costs T(T-1)/2 evals)
    evaluate_base: bool = True  # row 0: the backbone before any training
    limit: int | None = None  # evaluate at most this many test samples per task (quick looks)
    limit_selection: str = "random"  # which `limit` samples: random (a seeded subset, in file order) | first
    limit_seed: int = 0  # seed of the random subset (independent of the run seed: every seed sees the same test set)
    general: str = "auto"  # general-ability set after every stage: auto | none | a test file (mmcl.evaluation.general)
    general_scorer: str = "exact_match"  # scorer of a general test file named by path
    superficial: bool = False  # also ask seen tasks in another answer format; score format and content apart
    low_shot: int = 0  # CLiMB low-shot transfer: after each stage, fine-tune a copy on this many samples of each unseen task (0 = off)

    def __post_init__(self) -> None:
        if self.limit_selection not in ("random", "first"):
            raise ConfigError(f"evaluation.limit_selection: expected 'random' or 'first', got {self.limit_selection!r}")


@dataclass
class ExperimentConfig:
    """One continual-learning experiment: stream + method + backbone + training + evaluation."""

    name: str = "default"
    output_dir: str | None = None  # default: runs/<name>
    seed: int = 0
    stream: StreamConfig = field(default_factory=StreamConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not where they are written). The superficial
        probes only add files, so turning them on for a finished run just runs the missing probes."""
        content = self.to_dict()
        content.pop("output_dir")
        content["training"].pop("progress_bar")
        content["evaluation"].pop("superficial")
        encoded = json.dumps(content, sort_keys=True, default=str).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked against ``annotation`` (dataclasses recurse); ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: unexpected value {value!r}")
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_type,) = typing.get_args(annotation) or (Any,)
        return [coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    prefix = f"{where}." if where else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(known))})")
    values = {key: coerce(value, hints[key], f"{prefix}{key}") for key, value in data.items()}
    return cls(**values)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted-key overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return from_dict(ExperimentConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
