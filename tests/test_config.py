"""The typed experiment config: unknown keys and wrong types are refused with a one-line error naming the
key; command-line overrides; method options checked against the method's own config class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import write_config
from mmcl.cli import _overrides, build_parser, main
from mmcl.config import ExperimentConfig, from_dict, load_config
from mmcl.errors import ConfigError
from mmcl.runner import create_method


def _yaml(tmp_path: Path, data: Any, name: str = "exp.yaml") -> Path:
    return write_config(tmp_path / name, data)


def _config_error(tmp_path: Path, data: Any) -> str:
    path = _yaml(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message  # the file is named
    return message


# -- unknown keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "dotted"),
    [
        ({"epochs": 2}, "'epochs'"),
        ({"training": {"lrr": 0.1}}, "'training.lrr'"),
        ({"evaluation": {"batchsize": 4}}, "'evaluation.batchsize'"),
        ({"backbone": {"name": "x", "revision": "main"}}, "'backbone.revision'"),
        ({"lora": {"rnk": 4}}, "'lora.rnk'"),
        ({"stream": {"tasks": [{"name": "a", "train": "a.json", "test": "b.json", "scorrer": "x"}]}},
         "'stream.tasks[0].scorrer'"),
    ],
)  # fmt: skip
def test_unknown_key_is_named_with_its_dotted_path(tmp_path: Path, data: dict, dotted: str) -> None:
    message = _config_error(tmp_path, data)
    assert f"unknown config key {dotted}" in message


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    message = _config_error(tmp_path, {"training": {"lrr": 0.1}})
    assert "learning_rate" in message and "epochs" in message


# -- wrong types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"training": {"epochs": "two"}}, "training.epochs"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),  # a bool is not an int
        ({"evaluation": {"forward_transfer": 3}}, "evaluation.forward_transfer"),
        ({"evaluation": {"limit": "all"}}, "evaluation.limit"),  # Optional[int]
        ({"training": {"batch_size": 8.0}}, "training.batch_size"),  # float for int is refused
        ({"method": {"options": [1, 2]}}, "method.options"),
        ({"stream": {"tasks": {"name": "a"}}}, "stream.tasks"),
        ({"training": "fast"}, "training"),
        ({"name": 7}, "name"),
    ],
)
def test_wrong_type_names_the_key(tmp_path: Path, data: dict, key: str) -> None:
    message = _config_error(tmp_path, data)
    assert f"{key}:" in message or f"{key} " in message, message
    assert "expected" in message


def test_int_is_accepted_for_float(tmp_path: Path) -> None:
    config = load_config(_yaml(tmp_path, {"training": {"learning_rate": 1, "epochs": 2}, "lora": {"alpha": 32}}))
    assert config.training.learning_rate == 1.0 and isinstance(config.training.learning_rate, float)
    assert config.training.epochs == 2.0 and isinstance(config.training.epochs, float)
    assert config.lora.alpha == 32.0 and isinstance(config.lora.alpha, float)


def test_valid_config_round_trips_to_typed_objects(tmp_path: Path) -> None:
    data = {
        "name": "exp",
        "seed": 3,
        "stream": {"tasks": [{"name": "a", "train": "a/train.json", "test": "a/test.json", "max_new_tokens": 8}]},
        "evaluation": {"limit": None, "max_new_tokens": 6},
    }
    config = load_config(_yaml(tmp_path, data))
    assert config.name == "exp" and config.seed == 3
    (task,) = config.stream.tasks
    assert (task.name, task.train, task.max_new_tokens, task.scorer) == ("a", "a/train.json", 8, "exact_match")
    assert config.evaluation.limit is None and config.evaluation.max_new_tokens == 6
    assert config.run_dir == Path("runs/exp")


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config == ExperimentConfig()
    assert config.method.name == "seq-lora" and config.backbone.name == "tiny-llava"
    assert config.stream.name == "synth-domain"


def test_fingerprint_ignores_where_results_go_but_not_what_changes_them() -> None:
    base = load_config(None)
    assert load_config(None, {"output_dir": "elsewhere"}).fingerprint() == base.fingerprint()
    assert load_config(None, {"training.progress_bar": False}).fingerprint() == base.fingerprint()
    assert load_config(None, {"evaluation.superficial": True}).fingerprint() == base.fingerprint()
    assert load_config(None, {"evaluation.low_shot": 8}).fingerprint() != base.fingerprint()
    assert load_config(None, {"seed": 1}).fingerprint() != base.fingerprint()
    assert load_config(None, {"training.epochs": 1}).fingerprint() != base.fingerprint()


# -- files --------------------------------------------------------------------------------------


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nseed: 1\ntraining:\n  epochs: [1, 2\n  batch_size: 4\nevaluation: {\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "invalid YAML" in message
    assert "line " in message
    line = int(message.split("line ", 1)[1].split()[0])
    assert 4 <= line <= 6  # where the unclosed bracket is detected


def test_invalid_yaml_tab_indentation_line(tmp_path: Path) -> None:
    path = tmp_path / "tabs.yaml"
    path.write_text("name: x\ntraining:\n\tepochs: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"tabs\.yaml: line 3 invalid YAML"):
        load_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


# -- overrides ----------------------------------------------------------------------------------


def _parse(argv: list[str]):
    return build_parser().parse_args(argv)


def test_set_overrides_and_flags(tmp_path: Path) -> None:
    path = _yaml(tmp_path, {"name": "exp", "seed": 1, "training": {"epochs": 3, "batch_size": 4}})
    args = _parse(
        [
            "run", str(path),
            "--set", "training.epochs=2",
            "--set", "evaluation.limit=null",
            "--set", "stream.options={train_per_task: 3}",
            "--set", "lora.targets=.*q_proj",
            "--method", "joint",
            "--seed", "5",
            "--out", str(tmp_path / "out"),
            "--name", "renamed",
            "--stream", "synth-domain",
            "--backbone", "some/dir",
        ]
    )  # fmt: skip
    config = load_config(path, _overrides(args))
    assert config.training.epochs == 2.0
    assert config.training.batch_size == 4  # untouched keys of the file survive
    assert config.evaluation.limit is None
    assert config.stream.options == {"train_per_task": 3}
    assert config.lora.targets == ".*q_proj"
    assert config.method.name == "joint"
    assert config.seed == 5
    assert config.output_dir == str(tmp_path / "out") and config.run_dir == tmp_path / "out"
    assert config.name == "renamed"
    assert config.backbone.name == "some/dir"


def test_set_values_are_typed_and_checked(tmp_path: Path) -> None:
    path = _yaml(tmp_path, {})
    with pytest.raises(ConfigError, match=r"training\.epochs"):
        load_config(path, _overrides(_parse(["run", str(path), "--set", "training.epochs=two"])))
    with pytest.raises(ConfigError, match=r"'training\.lrr'"):
        load_config(path, _overrides(_parse(["run", str(path), "--set", "training.lrr=1"])))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        _overrides(_parse(["run", "--set", "training.epochs"]))


def test_seed_flag_must_be_an_int() -> None:
    with pytest.raises(SystemExit) as info:
        _parse(["run", "--seed", "one"])
    assert info.value.code == 2


# -- through the command line -------------------------------------------------------------------


def _assert_one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize(
    ("data", "extra", "needles"),
    [
        ({"training": {"lrr": 1}}, [], ["'training.lrr'"]),
        ({"training": {"epochs": "two"}}, [], ["training.epochs"]),
        ({"seed": 1.5}, [], ["seed"]),
        ({"evaluation": {"forward_transfer": 3}}, [], ["evaluation.forward_transfer"]),
        ({}, ["--set", "evaluation.batch_size=big"], ["evaluation.batch_size"]),
        ({}, ["--set", "nokey"], ["expected KEY=VALUE"]),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, data: dict, extra: list[str], needles: list[str]
) -> None:
    path = _yaml(tmp_path, data)
    out_dir = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out_dir), *extra]) == 2
    _assert_one_line_error(capsys, *needles)
    assert not out_dir.exists()  # nothing was created


def test_cli_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntraining: {epochs: 1\n", encoding="utf-8")
    assert main(["run", str(path)]) == 2
    _assert_one_line_error(capsys, str(path), "line ", "invalid YAML")


# -- method options -----------------------------------------------------------------------------


def test_method_options_are_checked_against_the_method_config() -> None:
    config = load_config(None, {"method.name": "seq-lora", "method.options": {"rank": 4}})
    with pytest.raises(ConfigError, match=r"'method\.options\.rank'"):
        create_method(config)
    config = load_config(None, {"method.name": "joint"})
    assert create_method(config).name == "joint"


def test_unknown_method_lists_known_ones() -> None:
    config = load_config(None, {"method.name": "ewc-typo"})
    with pytest.raises(ConfigError, match=r"method\.name: unknown method 'ewc-typo'.*seq-lora"):
        create_method(config)


def test_cli_refuses_unknown_method_option_before_creating_the_run_dir(
    tiny_stream_config: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = {**tiny_stream_config, "method": {"name": "seq-lora", "options": {"rank": 4}}}
    path = _yaml(tmp_path, config)
    assert main(["run", str(path)]) == 2
    _assert_one_line_error(capsys, "method.options.rank")
    assert not Path(config["output_dir"]).exists()


def test_cli_refuses_unknown_stream_option(tiny_stream_config: dict, tmp_path: Path, capsys) -> None:
    config = dict(tiny_stream_config)
    config["stream"] = {**config["stream"], "options": {"train_per_tsk": 8}}
    path = _yaml(tmp_path, config)
    assert main(["run", str(path)]) == 2
    _assert_one_line_error(capsys, "train_per_tsk")



# -- numbers as people write them, and ranges ---------------------------------------------------


@pytest.mark.parametrize("text", ["1e-4", "1E-4", "1.0e-4", ".0001", "+1e-4", "'1e-4'", "0.0001"])
def test_float_fields_take_every_spelling_of_a_number(tmp_path: Path, text: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(f"training:\n  learning_rate: {text}\n", encoding="utf-8")
    assert load_config(path).training.learning_rate == pytest.approx(1e-4)
    config = load_config(None, _overrides(_parse(["run", "--set", f"training.learning_rate={text}"])))
    assert config.training.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize("text", ["5.", "+1e3", " 1e3 "])
def test_more_number_spellings(text: str) -> None:
    expected = {"5.": 5.0, "+1e3": 1000.0, " 1e3 ": 1000.0}[text]
    assert load_config(None, {"lora.alpha": text}).lora.alpha == expected


@pytest.mark.parametrize(("value", "pattern"), [
    ("abc", "expected float, got str 'abc'"), (True, "expected float, got bool"), ("1e-4x", "expected float"),
    ("inf", r"must be in \(0, inf\), got inf"), (".nan", "expected float"), (float("nan"), "got nan"),
    (10**400, "number too large"),
])  # fmt: skip
def test_float_fields_refuse_what_is_not_a_finite_number(value, pattern: str) -> None:
    with pytest.raises(ConfigError, match=rf"training\.learning_rate: .*{pattern}|training\.learning_rate: {pattern}"):
        load_config(None, {"training.learning_rate": value})


def _config_dataclasses() -> list[type]:
    import dataclasses

    from mmcl.streams.stream import StreamConfig, TaskFiles

    found, todo = [], [ExperimentConfig, StreamConfig, TaskFiles]
    while todo:
        cls = todo.pop()
        if cls in found:
            continue
        found.append(cls)
        todo += [f.type for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.type)]
    return found


def test_every_numeric_field_declares_its_range() -> None:
    import dataclasses
    import typing

    from mmcl.config import parse_range

    missing = []
    for cls in _config_dataclasses():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = set(typing.get_args(hints[f.name])) | {hints[f.name]}
            if kinds & {int, float} and bool not in kinds:
                if "range" not in f.metadata:
                    missing.append(f"{cls.__name__}.{f.name}")
                else:
                    parse_range(f.metadata["range"])
    assert not missing, missing


def test_epochs_zero_is_fine_with_max_steps() -> None:
    assert load_config(None, {"training.epochs": 0, "training.max_steps": 3}).training.max_steps == 3
    with pytest.raises(ConfigError, match=r"training\.epochs: must be > 0 when training\.max_steps <= 0"):
        load_config(None, {"training.epochs": 0})


@pytest.mark.parametrize("name", ["exp-1", "a.b_c", "run2", "..a"])
def test_safe_names_are_accepted(name: str) -> None:
    assert load_config(None, {"name": name}).name == name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a b", "é", "a\\b", "x\n"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^name: .* is not a safe name"):
        load_config(None, {"name": name})
    tasks = [{"name": name, "train": "a.json", "test": "b.json"}]
    with pytest.raises(ConfigError, match=r"^stream\.tasks\[0\]\.name: .* is not a safe name"):
        load_config(None, {"stream.tasks": tasks})


def test_a_stream_of_files_is_labelled_files() -> None:
    config = load_config(None, {"stream.tasks": [{"name": "a", "train": "a.json", "test": "b.json"}]})
    assert config.stream.name == "files" and config.to_dict()["stream"]["name"] == "files"
    assert load_config(None).stream.name == "synth-domain"


def test_every_numeric_method_option_refuses_an_out_of_range_value() -> None:
    """Every method's numeric options are range-checked at config load (declared ranges or the config
    class's own checks): -1 is out of range for each of them, so each is refused with a ConfigError."""
    import dataclasses
    import typing

    from mmcl.methods import METHODS

    accepted = []
    for name, method in sorted(METHODS.items()):
        if method.config_class is None:
            continue
        hints = typing.get_type_hints(method.config_class)
        for option in dataclasses.fields(method.config_class):
            kinds = typing.get_args(hints[option.name]) or (hints[option.name],)
            if str in kinds or not ({int, float} & set(kinds)):
                continue
            try:
                from_dict(method.config_class, {option.name: -1}, "method.options")
                accepted.append(f"{name}.{option.name}")
            except ConfigError:
                pass
    assert accepted == []
