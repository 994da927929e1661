"""The sweep file: strict parsing, expansion of the axes into runs with stable names, and the check of every
run's experiment config before anything is launched.

A sweep file (YAML, ``yaml.safe_load``)::

    name: methods                  # default: the file's stem
    base: default.yaml             # an experiment config, relative to this file (optional)
    config: {training: {epochs: 2}}  # inline experiment keys, over the base file's (optional)
    axes:                          # key -> list of values; the runs are their cartesian product
      method: [seq-lora, replay]   # method.name; also stream, backbone, seed, any dotted --set key
      seed: [0, 1]
    output_dir: runs/methods       # default runs/<name>
    launcher: local                # local | slurm
    jobs: 2                        # runs at once (local)
    threads: 1                     # CPU threads per run (default: cores // jobs)
    gpus_per_run: 0                # local: GPUs given to each run (CUDA_VISIBLE_DEVICES)
    plugins: [my_method.py]        # relative to this file
    slurm: {partition: gpu, time_min: 240, cpus_per_task: 8, gpus_per_node: 1, mem_gb: 32}

A run's name is made of its own axis values only, ``method=replay,seed=1`` (in the axes' order): the same
sweep file, or one with more values on an axis, always gives a run the same directory
``<output_dir>/<name>``, which is what makes re-running a sweep resume it. A value with characters that
are unsafe in a file name (``/``, spaces, a list) or longer than 40 characters is shortened to a readable
part plus a 6-character hash of the value; a name longer than 120 characters is cut and given an
8-character hash of all its values."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmcl.config import read_yaml_file
from mmcl.errors import ConfigError

SWEEP_KEYS = ("name", "base", "config", "axes", "output_dir", "launcher", "jobs", "threads", "gpus_per_run",
              "plugins", "slurm")  # fmt: skip
LAUNCHERS = ("local", "slurm")
SLURM_CLUSTERS = ("slurm", "local")  # ``local``: submitit's local executor (jobs are processes on this machine)
AXIS_ALIASES = {"method": "method.name", "stream": "stream.name", "backbone": "backbone.name", "seed": "seed"}
SET_BY_SWEEP = ("name", "output_dir", "plugins")  # every run gets its own; not a config or axis key
DEFAULT_TIME_MIN = 24 * 60  # a job's time limit unless slurm.time_min says otherwise

# slurm section key -> (submitit parameter, what it must be)
SLURM_SETTINGS: dict[str, tuple[str, str]] = {
    "partition": ("slurm_partition", "str"),
    "time_min": ("timeout_min", "int>=1"),
    "cpus_per_task": ("cpus_per_task", "int>=1"),
    "gpus_per_node": ("gpus_per_node", "int>=0"),
    "mem_gb": ("mem_gb", "number>0"),
    "array_parallelism": ("slurm_array_parallelism", "int>=1"),
}
# submitit's SLURM parameters that a sweep sets itself or that would run one run several times at once
SLURM_REFUSED = {"time": "time_min", "nodes": None, "ntasks_per_node": None, "job_name": None, "num_gpus": "gpus_per_node",
                 "gpus_per_task": "gpus_per_node", "use_srun": None}  # fmt: skip

_AXIS_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_-]+)*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
MAX_VALUE_CHARS = 40
MAX_NAME_CHARS = 120


@dataclass
class SweepRun:
    """One point of the grid: its name (its directory's name), axis values, the config keys they set,
    its run dir and its log file."""

    name: str
    values: dict[str, Any]  # axis key as written in the sweep file -> value
    overrides: dict[str, Any]  # dotted config key -> value
    run_dir: Path
    log_file: Path

    @property
    def experiment_name(self) -> str:
        """The run's ``name`` setting: its directory name as a safe experiment name."""
        return self.name.replace("=", "-").replace(",", "_")


@dataclass
class Sweep:
    """A parsed and expanded sweep file (paths absolute)."""

    file: Path
    name: str
    base: Path | None
    inline: dict[str, Any]  # the ``config`` mapping as dotted keys
    axes: dict[str, list[Any]]
    output_dir: Path
    launcher: str = "local"
    jobs: int = 1
    threads: int | None = None
    gpus_per_run: int = 0
    plugins: list[Path] = field(default_factory=list)
    slurm: dict[str, Any] = field(default_factory=dict)
    runs: list[SweepRun] = field(default_factory=list)
    where: str = ""  # the sweep file as the user named it (error messages)

    @property
    def logs_dir(self) -> Path:
        return self.output_dir / "logs"

    @property
    def compare_dir(self) -> Path:
        return self.output_dir / "compare"

    @property
    def submitit_dir(self) -> Path:
        return self.output_dir / "slurm"

    def settings(self, run: SweepRun) -> dict[str, Any]:
        """The dotted-key overrides of the base config that make ``run``'s config (what ``--set`` and ``--out``
        give its ``mmcl run``), in the order they apply: inline config, axis values, name and run dir."""
        return {**self.inline, **run.overrides, "name": run.experiment_name, "output_dir": str(run.run_dir)}

    def run_args(self, run: SweepRun) -> list[str]:
        """The ``mmcl run`` arguments of ``run`` (after the program): base file, ``--out``, ``--set``, ``--plugin``."""
        args = ["run", *([str(self.base)] if self.base else []), "--out", str(run.run_dir)]
        for key, value in {**self.inline, **run.overrides, "name": run.experiment_name}.items():
            args += ["--set", f"{key}={yaml_value(value)}"]
        for plugin in self.plugins:
            args += ["--plugin", str(plugin)]
        return args

    def default_threads(self, cores: int | None = None) -> int:
        """CPU threads per run: ``threads`` if set, else this machine's cores shared by ``jobs`` runs."""
        if self.threads is not None:
            return self.threads
        return max(1, (cores or available_cores()) // max(1, self.jobs))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML that ``yaml.safe_load`` reads back as the same value (``--set`` syntax)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    if text.endswith("\n...\n"):  # the document end marker after a plain scalar
        text = text[: -len("...\n")]
    return text.strip()


# -- names -----------------------------------------------------------------------------------------


def _digest(value: Any, length: int) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=repr).encode()).hexdigest()[:length]


def value_text(value: Any) -> str:
    """How a value reads in a run's name: YAML spellings for booleans and null, ``repr`` for numbers."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


def value_part(value: Any) -> str:
    """A value's part of a run name: the value itself when it is short and file-name safe, else a readable
    cut plus a short hash of the value (so two values never share a part)."""
    text = value_text(value)
    safe = _UNSAFE.sub("_", text)
    if safe == text and text and not isinstance(value, (list, dict)) and len(text) <= MAX_VALUE_CHARS:
        return text
    return f"{safe[: MAX_VALUE_CHARS - 7].strip('_')}-{_digest(value, 6)}".lstrip("-") or _digest(value, 6)


def run_name(values: dict[str, Any]) -> str:
    """``key=value,key=value`` in the axes' order (``base`` for a sweep without axes), cut with a hash when long."""
    if not values:
        return "base"
    name = ",".join(f"{key}={value_part(value)}" for key, value in values.items())
    if len(name) > MAX_NAME_CHARS:
        name = f"{name[: MAX_NAME_CHARS - 9]}-{_digest(list(values.items()), 8)}"
    return name


# -- parsing ---------------------------------------------------------------------------------------


def _shown(value: Any, limit: int = 50) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type(value: Any) -> str:
    return type(value).__name__


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml_file(path, "sweep file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file must be a mapping of keys to values, got {_type(data)}")
    return data


def check_number(value: Any, rule: str, key: str) -> Any:
    """``value`` if it satisfies ``rule`` (``int>=1``, ``int>=0``, ``number>0``, ``str``), else a ConfigError."""
    kind, _, bound = rule.partition(">")
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty string, got {_type(value)} {_shown(value)}")
        return value
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int" and not (numeric and isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {_type(value)} {_shown(value)}")
    if kind == "number" and not numeric:
        raise ConfigError(f"{key}: expected a number, got {_type(value)} {_shown(value)}")
    if bound.startswith("="):
        if value < int(bound[1:]):
            raise ConfigError(f"{key}: must be >= {bound[1:]}, got {value}")
    elif bound and not value > float(bound):
        raise ConfigError(f"{key}: must be > {bound}, got {value}")
    return value


def flatten_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested experiment mapping as dotted keys (non-empty mappings are descended, lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"config: {prefix}{_shown(key)}: keys must be non-empty strings")
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _relative_file(value: Any, key: str, folder: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a file path, got {_type(value)} {_shown(value)}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else folder / path
    if not path.is_file():
        raise ConfigError(f"{key}: {value} not found (relative paths start at the sweep file's folder, {folder})")
    return path.resolve()


def _axes(data: Any) -> dict[str, list[Any]]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"axes: expected a mapping of key -> list of values, got {_type(data)} {_shown(data)}")
    axes: dict[str, list[Any]] = {}
    targets: dict[str, str] = {}
    for key, values in data.items():
        if not isinstance(key, str) or not _AXIS_KEY.fullmatch(key):
            raise ConfigError(f"axes: {_shown(key)} is not a config key (method, seed, stream, backbone or a dotted "
                              "key such as training.learning_rate)")  # fmt: skip
        target = AXIS_ALIASES.get(key, key)
        if target in SET_BY_SWEEP:
            raise ConfigError(f"axes.{key}: set by the sweep for every run (the sweep's own `{key}` key, if any)")
        clash = next((other for other, seen in targets.items()
                      if seen == target or seen.startswith(target + ".") or target.startswith(seen + ".")), None)
        if clash is not None:
            raise ConfigError(f"axes.{key}: sets the same config key as axes.{clash}")
        targets[key] = target
        if not isinstance(values, list) or not values:
            raise ConfigError(f"axes.{key}: expected a non-empty list of values, got {_type(values)} {_shown(values)}")
        seen_values: dict[str, Any] = {}
        for value in values:
            canonical = json.dumps(value, sort_keys=True, default=repr)
            if canonical in seen_values:
                raise ConfigError(f"axes.{key}: the value {_shown(value)} is listed twice")
            seen_values[canonical] = value
        axes[key] = list(values)
    return axes


def _slurm(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"slurm: expected a mapping, got {_type(data)} {_shown(data)}")
    out: dict[str, Any] = {}
    passthrough: set[str] | None = None
    for key, value in data.items():
        where = f"slurm.{key}"
        if key == "cluster":
            if value not in SLURM_CLUSTERS:
                raise ConfigError(f"{where}: expected one of {', '.join(SLURM_CLUSTERS)}, got {_shown(value)}")
            out[key] = value
        elif key in SLURM_SETTINGS:
            out[key] = check_number(value, SLURM_SETTINGS[key][1], where)
        elif isinstance(key, str) and key in SLURM_REFUSED:
            instead = SLURM_REFUSED[key]
            raise ConfigError(f"{where}: set by the sweep (one task per run)" + (f"; use slurm.{instead}" if instead else ""))
        else:
            if passthrough is None:
                passthrough = _submitit_slurm_parameters()
            if key not in passthrough:
                known = sorted({*SLURM_SETTINGS, "cluster", *(passthrough - set(SLURM_REFUSED))})
                raise ConfigError(f"unknown sweep key '{where}' (known: {', '.join(known)})")
            out[key] = value
    return out


def _submitit_slurm_parameters() -> set[str]:
    """submitit's own SLURM parameters (``account``, ``qos``, ``constraint``, ``setup``, ...)."""
    try:
        from submitit.slurm.slurm import SlurmExecutor
    except ImportError:
        return set()
    return set(SlurmExecutor._valid_parameters())


def load_sweep(path: Path | str) -> Sweep:
    """Parse a sweep file (unknown keys and wrong types refused with one line naming the key) and expand it."""
    file = Path(path).expanduser().resolve()
    data = _read_yaml(file)
    try:
        sweep = _parse(file, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    sweep.where = str(path)
    return sweep


def _parse(file: Path, data: dict[str, Any]) -> Sweep:
    from mmcl.streams.stream import check_name

    for key in data:
        if key not in SWEEP_KEYS:
            shown = key if isinstance(key, str) else repr(key)
            raise ConfigError(f"unknown sweep key '{shown[:60]}' (known: {', '.join(sorted(SWEEP_KEYS))})")
    folder = file.parent
    if "name" in data:
        name = check_name(data["name"], "name")
    else:
        try:
            name = check_name(file.stem, "name")
        except ConfigError:
            raise ConfigError(f"name: the file's stem {file.stem!r} is not a safe name; set `name:` in the sweep file") from None
    base = _relative_file(data["base"], "base", folder) if data.get("base") is not None else None
    inline_data = data.get("config")
    if inline_data is not None and not isinstance(inline_data, dict):
        raise ConfigError(f"config: expected a mapping of experiment keys, got {_type(inline_data)} {_shown(inline_data)}")
    inline = flatten_config(inline_data or {})
    for key in inline:
        if key.split(".")[0] in SET_BY_SWEEP:
            raise ConfigError(f"config.{key}: set by the sweep for every run (use the sweep's own `{key.split('.')[0]}` key)")
    output = data.get("output_dir", f"runs/{name}")
    if not isinstance(output, str) or not output:
        raise ConfigError(f"output_dir: expected a path, got {_type(output)} {_shown(output)}")
    launcher = data.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher: expected one of {', '.join(LAUNCHERS)}, got {_shown(launcher)}")
    jobs = check_number(data.get("jobs", 1), "int>=1", "jobs")
    threads = data.get("threads")
    if threads is not None:
        check_number(threads, "int>=1", "threads")
    gpus_per_run = check_number(data.get("gpus_per_run", 0), "int>=0", "gpus_per_run")
    plugins_data = data.get("plugins") or []
    if not isinstance(plugins_data, list):
        raise ConfigError(f"plugins: expected a list of Python files, got {_type(plugins_data)} {_shown(plugins_data)}")
    plugins = [_relative_file(item, f"plugins[{index}]", folder) for index, item in enumerate(plugins_data)]
    sweep = Sweep(
        file=file, name=name, base=base, inline=inline, axes=_axes(data.get("axes")),
        output_dir=Path(output).expanduser().resolve(), launcher=launcher, jobs=jobs, threads=threads,
        gpus_per_run=gpus_per_run, plugins=plugins, slurm=_slurm(data.get("slurm")),
    )  # fmt: skip
    sweep.runs = expand(sweep)
    return sweep


def expand(sweep: Sweep) -> list[SweepRun]:
    """The cartesian product of the axes, in file order (the last axis varies fastest)."""
    runs: list[SweepRun] = []
    by_name: dict[str, dict[str, Any]] = {}
    keys = list(sweep.axes)
    for combination in itertools.product(*(sweep.axes[key] for key in keys)):
        values = dict(zip(keys, combination))
        name = run_name(values)
        if name in by_name:  # e.g. 1 and "1": different YAML, one spelling
            raise ConfigError(f"axes: {_shown(by_name[name])} and {_shown(values)} give the same run name {name!r}")
        by_name[name] = values
        overrides = {AXIS_ALIASES.get(key, key): value for key, value in values.items()}
        runs.append(SweepRun(name, values, overrides, sweep.output_dir / name, sweep.logs_dir / f"{name}.log"))
    return runs


# -- checking the runs' configs --------------------------------------------------------------------


def check_runs(sweep: Sweep) -> dict[str, Any]:
    """Every run's :class:`~mmcl.config.ExperimentConfig` (by run name), read by ``load_config`` from the
    base file and the run's settings, its method and options and its stream looked up: a bad value fails
    here, naming the run, before anything is launched. Loads the sweep's plugins."""
    from mmcl.config import from_dict, load_config
    from mmcl.methods import METHODS
    from mmcl.plugins import load_plugins
    from mmcl.streams import registry  # noqa: F401  (registers the built-in streams)
    from mmcl.streams.stream import STREAMS

    records = load_plugins(sweep.plugins)
    prefix = f"{sweep.base}: " if sweep.base else ""
    try:
        load_config(sweep.base, dict(sweep.inline))
    except ConfigError as exc:
        where = "base config" if sweep.base else "config"
        raise ConfigError(f"{sweep.where or sweep.file}: {where}: {exc}") from None
    configs: dict[str, Any] = {}
    for run in sweep.runs:
        try:
            config = load_config(sweep.base, sweep.settings(run))
            method_class = METHODS.lookup(config.method.name, "method.name")
            from_dict(method_class.config_class, config.method.options, "method.options")
            if not config.stream.tasks:
                STREAMS.lookup(config.stream.name, "stream.name")
        except ConfigError as exc:
            message = str(exc)
            message = message[len(prefix):] if prefix and message.startswith(prefix) else message
            raise ConfigError(f"{sweep.where or sweep.file}: run {run.name}: {message}") from None
        config.plugins = records
        configs[run.name] = config
    return configs
