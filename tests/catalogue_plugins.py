"""Bad-input catalogue: plugin files (``mmcl run --plugin``) that cannot be loaded. Each is refused before
the run dir exists, with one line naming the file."""

from __future__ import annotations

from pathlib import Path

from catalogue import Case, Fixtures, Invocation


def _plugin(fixtures: Fixtures, text: str, name: str = "plugin.py") -> Path:
    path = fixtures.tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _run_with(path: Path, fixtures: Fixtures) -> Invocation:
    out = fixtures.tmp_path / "run"
    return Invocation(["run", "--plugin", str(path), "--out", str(out), "--backbone", str(fixtures.tiny_model_dir)])


def _no_run_dir(fixtures: Fixtures) -> None:
    assert not (fixtures.tmp_path / "run").exists()


def _missing(fixtures: Fixtures) -> Invocation:
    return _run_with(fixtures.tmp_path / "no_such_plugin.py", fixtures)


def _syntax_error(fixtures: Fixtures) -> Invocation:
    return _run_with(_plugin(fixtures, "import torch\n\ndef broken(:\n    pass\n", "broken_syntax.py"), fixtures)


def _raises(fixtures: Fixtures) -> Invocation:
    text = "from mmcl.methods.base import register_method\n\nraise RuntimeError('no GPU here')\n"
    return _run_with(_plugin(fixtures, text, "raising.py"), fixtures)


def _duplicate(fixtures: Fixtures) -> Invocation:
    text = (
        "from mmcl.methods.base import Method, register_method\n\n\n"
        "@register_method\nclass Mine(Method):\n    name = 'seq-lora'\n    description = 'taken name'\n"
    )
    return _run_with(_plugin(fixtures, text, "duplicate.py"), fixtures)


def _list_missing(fixtures: Fixtures) -> Invocation:
    return Invocation(["list", "--plugin", str(fixtures.tmp_path / "absent.py")])


CASES = [
    Case("plugin file missing", _missing, 2, r"--plugin .*no_such_plugin\.py: file not found", _no_run_dir),
    Case("plugin file with a syntax error", _syntax_error, 2, r"broken_syntax\.py: line 3: invalid Python", _no_run_dir),
    Case("plugin raising while imported", _raises, 2,
         r"raising\.py: the plugin raised RuntimeError while being imported \(line 3\): no GPU here", _no_run_dir),
    Case("plugin registering a taken method name", _duplicate, 2,
         r"duplicate\.py: method 'seq-lora' is already registered by mmcl\.methods\.seq_lora\.SequentialLora", _no_run_dir),
    Case("list with a missing plugin file", _list_missing, 2, r"absent\.py: file not found"),
]
