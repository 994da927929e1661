"""The typed experiment config: YAML in (``yaml.safe_load`` only), unknown keys and wrong types rejected
with a one-line error that names the key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmcl.streams.stream import StreamConfig, check_name
from mmcl.determinism import check_level
from mmcl.errors import ConfigError
from mmcl.evaluation.protocols.general import GeneralSettings
from mmcl.evaluation.protocols.low_shot import LowShotSettings
from mmcl.evaluation.protocols.superficial import SuperficialSettings

# A number as people write it: 1e-4, 1E-4, .5, 5., +1e3 (YAML 1.1 reads some of these as strings).
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)
_RANGE = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])")


def parse_range(text: str) -> tuple[float, bool, float, bool]:
    """``"[1, inf)"`` -> (low, low included, high, high included)."""
    match = _RANGE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"malformed range {text!r} (expected e.g. '[1, inf)' or '(0, 1]')")
    opening, low, high, closing = match.groups()
    return float(low), opening == "[", float(high), closing == "]"


_INT64_MAX = 2**63 - 1  # what torch and numpy hold in an integer
SEED_RANGE = "[0, 2147483647]"  # what numpy, torch and the HF Trainer accept as a seed (seed + stage too)


def setting(
    default: Any = dataclasses.MISSING, range: str | None = None, help: str = "", affects_results: bool = True,
    **kwargs: Any,
) -> Any:
    """A config field that documents itself: ``range`` is an interval such as ``"[1, inf)"`` or ``"(0, 1]"``
    (checked by :func:`from_dict` for every number, None allowed when the type is optional), ``help``
    says what it does, ``affects_results`` whether changing it can change a computed number (it then
    enters the run's fingerprint and tells runs apart in ``mmcl compare``)."""
    metadata: dict[str, Any] = {"help": help, "affects_results": affects_results}
    if range is not None:
        parse_range(range)  # a malformed declaration fails at import
        metadata["range"] = range
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def results_settings(config: Any) -> Any:
    """``config`` (a config dataclass) as plain data without the fields marked ``affects_results=False``:
    what the run fingerprint hashes and what ``mmcl compare`` groups runs by."""
    if dataclasses.is_dataclass(config):
        return {
            f.name: results_settings(getattr(config, f.name))
            for f in dataclasses.fields(config)
            if f.metadata.get("affects_results", True)
        }
    if isinstance(config, list):
        return [results_settings(item) for item in config]
    if isinstance(config, dict):
        return {key: results_settings(value) for key, value in config.items()}
    return config


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str, bool]]:
    """(dotted key, type, default, help, affects results) of every field of config dataclass ``cls``,
    nested sections expanded: the one source of the config's documentation."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_fields(hints[f.name], f"{key}.")
            continue
        rows.append((key, _type_name(hints[f.name]), default, f.metadata.get("help", ""),
                     bool(f.metadata.get("affects_results", True))))
    return rows


@dataclass
class LoraSettings:
    """LoRA adapter shape (Hu et al. 2021): W x + (alpha / rank) B A x on every targeted linear layer."""

    rank: int = setting(8, "[1, inf)", "rank r of every LoRA adapter")
    alpha: float = setting(16.0, "(0, inf)", "LoRA scale numerator: the update is scaled by alpha / rank")
    dropout: float = setting(0.0, "[0, 1)", "dropout on the LoRA input")
    targets: str | None = setting(None, help="regex over module names; none = the backbone's default (language model + projector)")
    use_dora: bool = setting(False, help="DoRA (Liu et al. 2024, PEFT's use_dora): a learned magnitude per output "
                             "column on top of the LoRA direction; refused by methods that read or merge A and B themselves")


@dataclass
class TrainingConfig:
    """Optimisation settings for one stage (one task) of supervised fine-tuning."""

    epochs: float = setting(4.0, "[0, inf)", "passes over the task's training data (> 0 unless max_steps > 0)")
    max_steps: int = setting(-1, "[-1, inf)", "if > 0, optimizer steps per stage, overriding epochs")
    batch_size: int = setting(8, "[1, inf)", "training samples per device and step")
    grad_accum: int = setting(1, "[1, inf)", "gradient accumulation steps")
    learning_rate: float = setting(
        3e-3, "(0, inf)", "LoRA on the tiny model (calibrated); use ~2e-4 for 7B LoRA, 2e-5 for full FT"
    )
    lr_scheduler: str = setting("cosine", help="the HF Trainer's learning-rate schedule (cosine, linear, constant, ...)")
    warmup_ratio: float = setting(0.03, "[0, 1]", "share of the steps with a linear warm-up")
    weight_decay: float = setting(0.0, "[0, inf)", "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "[0, inf)", "gradient clipping norm (0 = no clipping)")
    logging_steps: int = setting(10, "[1, inf)", "log the loss every this many steps (the loss curve's resolution)",
                                 affects_results=False)
    progress_bar: bool = setting(True, help="show a progress bar while training", affects_results=False)
    bf16: bool = setting(False, help="bfloat16 mixed precision (GPU)")
    activation_checkpointing: bool = setting(False, help="recompute activations in the backward pass (less memory)")
    deepspeed: str | None = setting(None, help="DeepSpeed JSON config for the HF Trainer (GPU; see examples/deepspeed/)")
    fsdp: str | None = setting(None, help="the HF Trainer's FSDP option string, e.g. 'full_shard auto_wrap' (GPU)")

    def check_values(self, where: str = "training") -> None:
        """Checks across fields (single fields' ranges are declared with them and checked by from_dict)."""
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError(
                f"{where}.epochs: must be > 0 when {where}.max_steps <= 0 (nothing would be trained), got {self.epochs:g}"
            )


@dataclass
class BackboneConfig:
    """Which model to continue training: a preset name (``mmcl list``), a hub id or a local directory."""

    name: str = setting("tiny-llava", help="a preset (`mmcl list`), a Hugging Face hub id or a local model directory")
    dtype: str = setting("float32", help="float32 | bfloat16 | float16 | auto (the preset's dtype on a GPU, else float32)")
    device: str = setting("auto", help="auto | cpu | cuda | cuda:1 ...")
    max_length: int = setting(512, "[1, inf)", "longest tokenised training conversation accepted")
    load_in_4bit: bool = setting(False, help="NF4 language model via bitsandbytes (QLoRA); needs CUDA and bitsandbytes")
    processor_options: dict[str, Any] = setting({}, help="AutoProcessor kwargs, e.g. Qwen-VL image size")


@dataclass
class MethodConfig:
    """The continual-learning method and its own options (checked against the method's config class)."""

    name: str = setting("seq-lora", help="a registered method (`mmcl list`; `mmcl list --method NAME` for its options)")
    options: dict[str, Any] = setting({}, help="the method's own options, checked against its config class")


@dataclass
class EvaluationConfig:
    """How the accuracy matrix is filled."""

    batch_size: int = setting(64, "[1, inf)", "test samples generated at once")
    max_new_tokens: int | None = setting(None, "[1, inf)", "overrides every task's own max_new_tokens when set")
    forward_transfer: bool = setting(True, help="after task t also evaluate tasks t+1..T (needed for FWT; costs T(T-1)/2 evals)")
    evaluate_base: bool = setting(True, help="row 0: the backbone before any training")
    limit: int | None = setting(None, "[1, inf)", "evaluate at most this many test samples per task (quick looks)")
    limit_selection: str = setting("random", help="which `limit` samples: random (a seeded subset, in file order) | first")
    limit_seed: int = setting(
        0, SEED_RANGE, "seed of the random subset (independent of the run seed: every seed sees the same test set)"
    )
    sort_by_length: bool = setting(False, help="generate each test set in order of prompt length (less padding, "
                                   "faster; batches change, which can change greedy answers); answers keep file order")
    input_cache_mb: int = setting(0, "[0, inf)", "keep processed test batches (images decoded and resized) up to "
                                  "this many MB for the later rows of the matrix (0 = off: no gain measured on the "
                                  "default run, docs/scale.md); never changes results",
                                  affects_results=False)
    # The protocols' own sections (each declared in its file under mmcl/evaluation/protocols/).
    general: GeneralSettings = setting(default_factory=GeneralSettings, help="the general-ability set after every stage")
    superficial: SuperficialSettings = setting(default_factory=SuperficialSettings, help="SEFE's superficial-forgetting probes")
    low_shot: LowShotSettings = setting(default_factory=LowShotSettings, help="CLiMB's low-shot transfer to unseen tasks")
    protocols: dict[str, Any] = setting({}, help="sections of protocols added by plugins, by protocol name")

    def __post_init__(self) -> None:
        if self.limit_selection not in ("random", "first"):
            raise ConfigError(f"evaluation.limit_selection: expected 'random' or 'first', got {self.limit_selection!r}")


@dataclass
class ExperimentConfig:
    """One continual-learning experiment: stream + method + backbone + training + evaluation."""

    name: str = field(default="default", metadata={
        "safe_name": True, "help": "names the run and its default dir runs/<name>", "affects_results": False})
    output_dir: str | None = setting(None, help="the run directory (default: runs/<name>)", affects_results=False)
    seed: int = setting(0, SEED_RANGE, "seed of everything random (stage k trains with seed + k)")
    deterministic: bool = setting(False, help="pin the CPU kernels before torch loads, so that the same seed gives "
                                  "the same matrix on every x86-64 machine (docs/reproducibility.md)")
    deterministic_isa: str = setting("avx2", help="the kernels deterministic pins: avx2 (no cost on an AVX2 CPU) | "
                                     "baseline (every x86-64 CPU, slower)")
    stream: StreamConfig = setting(default_factory=StreamConfig, help="the tasks, in training order")
    backbone: BackboneConfig = setting(default_factory=BackboneConfig, help="the model trained")
    method: MethodConfig = setting(default_factory=MethodConfig, help="the continual-learning method")
    lora: LoraSettings = setting(default_factory=LoraSettings, help="LoRA adapter shape (methods that train adapters)")
    training: TrainingConfig = setting(default_factory=TrainingConfig, help="optimisation settings of each stage")
    evaluation: EvaluationConfig = setting(default_factory=EvaluationConfig, help="what is evaluated after each stage")
    plugins: list[dict[str, str]] = setting([], help="plugin files loaded by `mmcl run --plugin` (path, sha256), recorded by mmcl")

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        check_level(self.deterministic_isa)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the settings that change results (:func:`results_settings`): a run dir made with the same
        fingerprint is resumed. Fields marked ``affects_results=False`` (where the run is written, progress
        output, the superficial probes, which only add files) are left out."""
        encoded = json.dumps(results_settings(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def check_range(value: Any, interval: str, key: str) -> None:
    """Refuse a number outside ``interval`` (and NaN or infinity) with a line naming ``key`` and the range."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, low_in, high, high_in = parse_range(interval)
    inside = (isinstance(value, int) or math.isfinite(value)) and (value > low or (low_in and value == low)) and (
        value < high or (high_in and value == high)
    )
    if not inside:
        shown = f"{value:g}" if isinstance(value, float) else _shown(value)
        raise ConfigError(f"{key}: must be in {interval}, got {shown}")


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked against ``annotation`` (dataclasses recurse); ints are accepted for floats, and so
    are strings that spell a number (``1e-4`` is a string in YAML 1.1)."""
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
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {_shown(value)}")
        (item_type,) = typing.get_args(annotation) or (Any,)
        return [coerce(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {_shown(value)}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and not isinstance(value, bool):
        if isinstance(value, int):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{key}: number too large, got {_shown(value)}") from None
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value.strip())
    if annotation is int and isinstance(value, int) and not isinstance(value, bool) and abs(value) > _INT64_MAX:
        raise ConfigError(f"{key}: number too large (at most {_INT64_MAX}), got {_shown(value)}")
    if annotation in (int, float, str, bool):
        if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {type(value).__name__} {_shown(value)}")
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to one short line."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, refusing unknown keys, wrong types and numbers outside
    a field's declared ``range`` (field metadata, see :func:`setting`)."""
    prefix = f"{where}." if where else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {_shown(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            shown = (key if isinstance(key, str) else repr(key)).replace("\n", " ")[:60]
            raise ConfigError(f"unknown config key '{prefix}{shown}' (known: {', '.join(sorted(fields))})")
    values = {}
    for key, value in data.items():
        values[key] = coerce(value, hints[key], f"{prefix}{key}")
        interval = fields[key].metadata.get("range")
        if interval is not None:
            check_range(values[key], interval, f"{prefix}{key}")
        if fields[key].metadata.get("safe_name"):
            check_name(values[key], f"{prefix}{key}")
    missing = [name for name, f in fields.items() if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # fmt: skip
    if missing:
        raise ConfigError(f"{where or 'config'}: missing required key(s) {', '.join(missing)}")
    try:
        instance = cls(**values)
        check_values = getattr(instance, "check_values", None)
        if callable(check_values):
            check_values(where)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None
    return instance


# evaluation keys of configs written before the protocols had sections -> (section, key)
LEGACY_EVALUATION_KEYS = {
    "general": ("general", "set"),
    "general_scorer": ("general", "scorer"),
    "superficial": ("superficial", "enabled"),
    "low_shot": ("low_shot", "shots"),
}


def upgrade_config_data(data: dict[str, Any]) -> dict[str, Any]:
    """Config data written before the protocols had sections (``evaluation.general: auto``,
    ``general_scorer``, ``superficial: true``, ``low_shot: 4``) moved into the sections, so older
    configs, ``--set evaluation.superficial=true`` and older run dirs keep working."""
    evaluation = data.get("evaluation")
    if not isinstance(evaluation, dict):
        return data
    evaluation = dict(evaluation)
    for old, (section, key) in LEGACY_EVALUATION_KEYS.items():
        if old not in evaluation or (old == section and isinstance(evaluation[old], dict)):
            continue
        value = evaluation.pop(old)
        target = evaluation.setdefault(section, {})
        if isinstance(target, dict):
            evaluation[section] = {key: value, **target}
    return {**data, "evaluation": evaluation}


def config_from_stored(stored: dict[str, Any], where: str) -> ExperimentConfig:
    """The config a run dir's ``config.yaml`` records (any mmcl version's layout), without the keys mmcl
    adds itself; a :class:`ConfigError` naming ``where`` if it no longer reads."""
    data = {key: value for key, value in stored.items() if key not in ("fingerprint", "base_dir")}
    try:
        return from_dict(ExperimentConfig, upgrade_config_data(data))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_yaml_file(path: Path, what: str = "config file") -> Any:
    """A YAML file's content (``yaml.safe_load``); a missing, unreadable or malformed file is one
    :class:`ConfigError` line naming it (and the line or character YAML stopped at)."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
            where, problem = f" character {exc.position}", f"{exc.reason}, code {exc.character!r}"
        else:
            problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path}:{where} invalid YAML ({' '.join(str(problem).split())})") from None


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted-key overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = read_yaml_file(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"--set {dotted}: '{where}' is not a mapping (it is {_shown(node)})")
        node[leaf] = value
    try:
        return from_dict(ExperimentConfig, upgrade_config_data(data))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
