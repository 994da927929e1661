"""The ``mmcl`` command line: run, list, report, reproduce, compare, data check, pretrain-tiny."""

from __future__ import annotations

import sys

try:  # Ctrl-C while this module is still importing: one line and exit code 130, as main() does later
    import argparse
    import json
    import os
    from pathlib import Path
    from typing import Any, Sequence

    from mmcl.errors import ConfigError, MmclError, OutputError
except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    raise SystemExit(130) from None


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for flag, key in (("method", "method.name"), ("stream", "stream.name"), ("out", "output_dir"),
                      ("seed", "seed"), ("backbone", "backbone.name"), ("name", "name")):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.deterministic:
        overrides["deterministic"] = True
    overrides.update(_set_assignments(args.set))
    return overrides


def _config_file_data(path: Path | None) -> dict[str, Any] | None:
    """A config file's top level, read early (before torch) for ``deterministic``; problems are reported
    later, when the config is loaded for real."""
    from mmcl.config import read_yaml_file

    if path is None or not path.is_file():
        return None
    try:
        data = read_yaml_file(path)
    except ConfigError:
        return None
    return data if isinstance(data, dict) else None


def _names_backbone(data: dict[str, Any] | None) -> bool:
    return isinstance(data, dict) and isinstance(data.get("backbone"), dict) and "name" in data["backbone"]


def _stream_backbone(config: Any, named: bool) -> None:
    """Use the stream's own backbone (e.g. ``tiny-reader`` for ``synth-ability``) when the user named none."""
    from mmcl.streams import registry  # noqa: F401  (registers the built-in streams)
    from mmcl.streams.stream import STREAMS

    spec = STREAMS[config.stream.name] if not config.stream.tasks and config.stream.name in STREAMS else None
    if named or spec is None or spec.backbone is None or spec.backbone == config.backbone.name:
        return
    config.backbone.name = spec.backbone
    print(f"backbone: {spec.backbone}, {config.stream.name}'s own (name another with --backbone or backbone.name)")


def _set_assignments(assignments: list[str] | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for assignment in assignments or []:
        key, separator, raw = assignment.partition("=")
        if not separator or not key:
            raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set training.epochs=2")
        import yaml

        try:
            overrides[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or type(exc).__name__
            raise ConfigError(f"--set {key}: {raw[:40]!r} is not a YAML value ({problem})") from None
    return overrides


def command_run(args: argparse.Namespace) -> int:
    from mmcl.determinism import pin_environment, requested_level

    config_path = Path(args.config) if args.config else None
    if args.stop_after_stage is not None and args.stop_after_stage < 1:
        raise ConfigError(f"--stop-after-stage: must be >= 1, got {args.stop_after_stage}")
    overrides = _overrides(args)
    file_data = _config_file_data(config_path)  # read once: determinism level and whether it names a backbone
    level = requested_level(file_data, overrides)
    if level is not None:  # before anything imports torch
        pin_environment(level)
    from mmcl.config import load_config
    from mmcl.plugins import load_plugins

    plugins = load_plugins(args.plugin or [])  # on every torchrun process, before anything is looked up by name
    if config_path is not None and config_path.is_dir():  # a folder of <task>/{train,test}.json: its stream
        config = load_config(None, {**_folder_stream(config_path), **overrides})
        config_path = None
    else:
        config = load_config(config_path, overrides)
    _stream_backbone(config, named="backbone.name" in overrides or _names_backbone(file_data))
    if hasattr(config, "plugins"):
        config.plugins = plugins
    base_dir = config_path.parent if config_path else Path.cwd()
    return _run(config, base_dir, overwrite=args.overwrite, recompute_changed=args.recompute_changed,
                stop_after=args.stop_after_stage)


def _run(config: Any, base_dir: Path, overwrite: bool = False, recompute_changed: bool = False,
         stop_after: int | None = None) -> int:
    """Run (or resume) ``config``'s experiment between joining and leaving the process group (under torchrun)."""
    from mmcl import distributed

    distributed.init_from_env()
    finished = False
    try:
        code = _run_and_report(config, base_dir, overwrite, recompute_changed, stop_after)
        finished = code == 0  # an interrupted process's peers may never reach the barrier
        return code
    finally:
        distributed.shutdown(wait=finished)


def _run_and_report(config: Any, base_dir: Path, overwrite: bool, recompute_changed: bool,
                    stop_after: int | None) -> int:
    """Run (or resume) the experiment; process 0 writes its report and prints its table."""
    from mmcl import distributed
    from mmcl.report.render import format_table, write_report
    from mmcl.runner import ContinualRun

    if not distributed.is_main():  # under torchrun, process 0 alone reports
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
    run = ContinualRun(config, base_dir, overwrite=overwrite, recompute_changed=recompute_changed)
    print(f"run dir: {run.run_dir}  (method {config.method.name}, stream {config.stream.name}, backbone {config.backbone.name})")
    try:
        results = run.run(stop_after=stop_after)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished stages and evaluations are kept in {run.run_dir}. "
              "Run the same command again to continue.", file=sys.stderr)
        return 130
    except (OutputError, OSError) as exc:  # full or read-only disk mid-run: what is finished stays
        raise _kept_output_error(exc, run.run_dir) from None
    if not distributed.is_main():
        return 0
    report = write_report(run.run_dir, results)
    print()
    print(format_table(results))
    print(f"\nreport: {report}\nresults: {run.run_dir / 'results.json'}")
    _print_warnings(results)
    return 0


def _print_warnings(results: Any) -> None:
    for warning in results.environment_warnings:
        print(f"warning: {warning}", file=sys.stderr)


def command_reproduce(args: argparse.Namespace) -> int:
    """Rerun a run dir from its recorded config, plugins and kernels; exit 0 when every number is identical."""
    from mmcl.determinism import pin_environment, requested_level
    from mmcl.reproduce import base_dir_of, read_stored_config

    run_dir = Path(args.run_dir)
    stored = read_stored_config(run_dir)
    level = requested_level(stored, {})
    if level is not None:  # before anything imports torch
        pin_environment(level)
    from mmcl.config import config_from_stored
    from mmcl.layout import RunLayout
    from mmcl.reproduce import compare_runs_exactly, load_recorded_plugins

    config_file = RunLayout(run_dir).config_file
    out = Path(args.out) if args.out else run_dir.with_name(run_dir.name + "-reproduced")
    if out.resolve() == run_dir.resolve():
        raise ConfigError(f"--out {out}: the rerun needs a run dir of its own, not {run_dir}")
    load_recorded_plugins(stored, config_file)
    config = config_from_stored(stored, str(config_file))
    config.output_dir = str(out)
    status = _run(config, base_dir_of(stored, run_dir, print))
    if status != 0:
        return status
    print(f"\nreproducing {run_dir} in {out}:")
    reproduction = compare_runs_exactly(run_dir, out)
    for line in reproduction.lines():
        print(f"  {line}")
    return 0 if reproduction.identical else 1


def _kept_output_error(exc: BaseException, run_dir: Path) -> BaseException:
    """An output failure in the middle of a run, saying that the finished work is kept (others: as they are)."""
    from mmcl.utils import as_output_error

    error = exc if isinstance(exc, OutputError) else as_output_error(exc)
    if error is None:
        return exc
    return OutputError(f"{error}; finished stages and evaluations are kept in {run_dir}")


def _folder_stream(folder: Path) -> dict[str, Any]:
    """Overrides that make a folder of ``<task>/{train,test}.json`` the stream, labelled by the folder's name
    (which also names the experiment when it is a safe name)."""
    import dataclasses

    from mmcl.streams.stream import check_name, task_folders

    label = folder.resolve().name or "files"
    overrides: dict[str, Any] = {"stream.tasks": [dataclasses.asdict(entry) for entry in task_folders(folder)]}
    try:
        overrides["stream.name"] = overrides["name"] = check_name(label, "name")
    except ConfigError:
        overrides["stream.name"] = "files"
    return overrides


def command_report(args: argparse.Namespace) -> int:
    from mmcl.layout import RunLayout
    from mmcl.report.render import format_table, write_report
    from mmcl.results import collect_results, write_results

    run_dir = Path(args.run_dir)
    results = collect_results(run_dir)
    write_results(RunLayout(run_dir), results)
    report = write_report(run_dir, results)
    print(format_table(results))
    print(f"\nreport: {report}")
    _print_warnings(results)
    if not results.complete:
        from mmcl.errors import UnfinishedRunError
        from mmcl.report.render import unfinished_notice

        raise UnfinishedRunError(f"{run_dir}: {unfinished_notice(results)}; the report holds the numbers so far "
                                 "(run the same `mmcl run` command to finish it)")
    return 0


def command_compare(args: argparse.Namespace) -> int:
    from mmcl.report.compare import compare_runs

    comparison = compare_runs([Path(d) for d in args.run_dirs], Path(args.out))
    print(comparison.text)
    print(f"\ntable: {comparison.csv_path}\npairs: {comparison.pairs_path}\nplot: {comparison.png_path}"
          f"\npage: {comparison.html_path}")  # fmt: skip
    return 0


def command_list(args: argparse.Namespace) -> int:
    from mmcl.backbones.registry import PRESETS
    from mmcl.plugins import load_plugins
    from mmcl.streams import registry  # noqa: F401
    from mmcl.streams.stream import STREAMS
    from mmcl.methods import METHODS

    load_plugins(args.plugin or [])
    if args.method is not None:
        method = METHODS.lookup(args.method, "--method")
        print(f"{args.method}: {method.description}")
        print(f"defined by {_origin_shown(METHODS.origin(args.method))}")
        _print_options(method.config_class, "method.options")
        return 0
    if args.stream is not None:
        spec = STREAMS.lookup(args.stream, "--stream")
        print(f"{args.stream}: {spec.description}")
        print(f"defined by {_origin_shown(STREAMS.origin(args.stream))}")
        if spec.options_class is not None:
            _print_options(spec.options_class, "stream.options")
        elif spec.defaults:
            print("options (stream.options.<name>):")
            for key, value in spec.defaults.items():
                print(f"  {key}: {type(value).__name__} = {_shown_default(value)}")
        else:
            print("options: none declared")
        return 0
    sections = [
        ("streams", {name: spec.description for name, spec in STREAMS.items()}),
        ("methods", {name: cls.description for name, cls in METHODS.items()}),
        ("backbones", {name: preset.description for name, preset in PRESETS.items()}),
    ]
    for title, entries in sections:
        print(f"{title}:")
        width = max(map(len, entries)) if entries else 0
        for name, description in sorted(entries.items()):
            print(f"  {name.ljust(width)}  {description}")
    print("backbones also accept any Hugging Face image-text-to-text hub id or local model directory")
    return 0


def _origin_shown(origin: str) -> str:
    """``module.qualname``; for a plugin file's definition, the file instead of its content-hash module name."""
    from mmcl.plugins import MODULE_PREFIX

    module, _, qualname = origin.partition(".")
    source = getattr(sys.modules.get(module), "__file__", None) if module.startswith(MODULE_PREFIX) else None
    return f"{qualname} in {source}" if source else origin


def _type_label(annotation: Any) -> str:
    """``int | None``, ``dict[str, str]``, ``float`` ... as the annotation reads."""
    import types
    import typing

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_label(option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _shown_default(value: Any) -> str:
    """A default as it is written in YAML (``null``, ``true``, quoted strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (str, dict, list)) else str(value)


def _print_options(options_class: type, key: str) -> None:
    """Every field of the dataclass ``options_class``: type, default, range and help."""
    import dataclasses
    import typing

    fields = [f for f in dataclasses.fields(options_class) if f.init] if dataclasses.is_dataclass(options_class) else []
    if not fields:
        print("options: none")
        return
    hints = typing.get_type_hints(options_class)
    print(f"options ({key}.<name>):")
    for f in fields:
        if f.default is not dataclasses.MISSING:
            default = f" = {_shown_default(f.default)}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f" = {_shown_default(f.default_factory())}"
        else:
            default = " (required)"
        interval = f", range {f.metadata['range']}" if f.metadata.get("range") else ""
        print(f"  {f.name}: {_type_label(hints.get(f.name, f.type))}{default}{interval}")
        if f.metadata.get("help"):
            print(f"      {f.metadata['help']}")


def command_data_check(args: argparse.Namespace) -> int:
    """Every problem ``mmcl run`` would refuse at data load, listed on stdout; the first one (and how many
    more) is the error line. Lengths are measured with the config's backbone processor (tiny-llava's for a
    folder or a stream name unless ``--set backbone.name=...``)."""
    from mmcl.streams.stream import build_stream
    from mmcl.config import load_config
    from mmcl.errors import DataError

    target = Path(args.target)
    settings = _set_assignments(args.set)
    if target.is_dir():
        config = load_config(None, {**_folder_stream(target), **settings})
        base_dir = Path.cwd()
    elif target.suffix in (".yaml", ".yml"):
        config = load_config(target, settings)
        base_dir = target.parent
    else:
        config = load_config(None, {"stream.name": args.target, **settings})
        base_dir = Path.cwd()
    tasks = build_stream(config.stream, base_dir)
    general = _general_file_task(config, base_dir)
    lengths = _length_checker_or_note(config)
    found: list[str] = []
    for task, splits in [*((task, ("train", "test")) for task in tasks), *((general, ("test",)) for _ in [0] if general)]:
        problems = task.problems(splits=splits)
        if lengths is not None and "train" in splits:
            problems += lengths.problems(task)
        found += problems
        print(f"{task.name}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for problem in problems:
            print(f"  {problem}")
    print(f"{len(tasks) + (1 if general else 0)} task(s), {len(found)} problem(s)")
    if found:
        more = f" (and {len(found) - 1} more, listed above)" if len(found) > 1 else ""
        raise DataError(found[0] + more)
    return 0


def _general_file_task(config: Any, base_dir: Path):
    """The general-ability test file when the config names one (``auto`` is generated data, ``none`` is off)."""
    if config.evaluation.general.set.strip().lower() in ("auto", "none"):
        return None
    from mmcl.evaluation.general import general_task

    return general_task(config.evaluation, config.backbone, config.stream, base_dir)


def _length_checker_or_note(config: Any):
    """The over-long sample checker of the config's backbone, or None (with a note) if its processor is unavailable."""
    from mmcl.backbones.registry import resolve_backbone
    from mmcl.data.lengths import length_checker

    try:
        resolve_backbone(config.backbone.name)  # data check does not need the backbone: an unknown one is a note
        checker = length_checker(config.backbone)
    except MmclError as exc:
        print(f"lengths not checked: {exc}")
        return None
    print(f"lengths measured with {checker.label}")
    return checker


def command_pretrain_tiny(args: argparse.Namespace) -> int:
    from mmcl.backbones.pretrain import pretrain_tiny, recipe_for

    config, _ = recipe_for(args.preset, steps=args.steps, seed=args.seed)
    out = pretrain_tiny(config, Path(args.out) if args.out else None)
    print(f"{config.preset} written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcl", description="Continual learning of multimodal LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug output, dependencies' warnings and logs (also MMCL_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run an experiment (default: seq-lora on synth-domain with tiny-llava)")
    run.add_argument("config", nargs="?", help="experiment YAML; omitted = the default experiment")
    run.add_argument("--method", help="override method.name")
    run.add_argument("--stream", help="override stream.name")
    run.add_argument("--backbone", help="override backbone.name")
    run.add_argument("--out", help="run directory (override output_dir)")
    run.add_argument("--name", help="override the experiment name")
    run.add_argument("--seed", type=int, help="override the seed")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any key, e.g. training.epochs=2")
    run.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="debug output, dependencies' warnings and logs (also MMCL_DEBUG=1)")
    run.add_argument("--plugin", action="append", metavar="FILE",
                     help="a Python file that registers methods, streams, scorers or presets (repeatable)")
    run.add_argument("--deterministic", action="store_true",
                     help="pin the CPU kernels: the same seed gives the same matrix on every x86-64 machine "
                          "(--set deterministic_isa=baseline for CPUs without AVX2)")
    run.add_argument("--overwrite", action="store_true", help="replace a run dir made by a different config")
    run.add_argument("--stop-after-stage", type=int, metavar="K", default=None,
                     help="train and evaluate up to stage K, then stop; running again continues (one stage per "
                          "process, e.g. to measure each stage's memory)")
    run.add_argument("--recompute-changed", action="store_true",
                     help="the data changed since the run dir was made: redo the stages and evaluations that depend on it")
    run.set_defaults(handler=command_run)

    listing = commands.add_parser("list", help="registered streams, methods and backbones")
    one = listing.add_mutually_exclusive_group()
    one.add_argument("--method", metavar="NAME", help="one method: its description and options")
    one.add_argument("--stream", metavar="NAME", help="one stream: its description and options")
    listing.add_argument("--plugin", action="append", metavar="FILE", help="load a plugin file first (repeatable)")
    listing.set_defaults(handler=command_list)

    report = commands.add_parser("report", help="rebuild results.json and the report from stored predictions")
    report.add_argument("run_dir")
    report.set_defaults(handler=command_report)

    reproduce = commands.add_parser("reproduce", help="rerun a run dir from its recorded config; say if it is identical")
    reproduce.add_argument("run_dir", metavar="RUN_DIR")
    reproduce.add_argument("--out", help="run directory of the rerun (default: RUN_DIR-reproduced)")
    reproduce.set_defaults(handler=command_reproduce)

    compare = commands.add_parser("compare", help="compare runs of the same stream: metrics table, CSV and plot")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (same stream and tasks)")
    compare.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    compare.set_defaults(handler=command_compare)

    data = commands.add_parser("data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser("check", help="validate a stream's files and images")
    check.add_argument("target", help="stream name, a folder of <task>/{train,test}.json, or an experiment YAML")
    check.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="stream setting for a stream name, e.g. stream.options.root=/data/CoIN")
    check.set_defaults(handler=command_data_check)

    pretrain = commands.add_parser("pretrain-tiny", help="rebuild a shipped tiny backbone's weights (reproducible)")
    pretrain.add_argument("--preset", choices=["tiny-llava", "tiny-reader"], default="tiny-llava",
                          help="which backbone: tiny-llava (48-px shapes; default) or tiny-reader (96 px, with a reading mix)")
    pretrain.add_argument("--out", help="output directory (default: the package's folder of the preset)")
    pretrain.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.set_defaults(handler=command_pretrain_tiny)

    from mmcl.sweep.command import add_sweep_parser

    add_sweep_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C at any point, the imports of torch and transformers included, is one line and exit code 130.
    try:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        args = build_parser().parse_args(argv)
        from mmcl.log import setup_logging

        setup_logging(verbose=getattr(args, "verbose", False))
        return args.handler(args)
    except MmclError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a read-only or full disk, a file where a folder should be: one line naming the path
        from mmcl.utils import as_output_error

        error = as_output_error(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
