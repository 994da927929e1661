"""Bad-input catalogue: ``mmcl reproduce`` and the determinism settings. Each is refused before anything
is trained or any folder is made."""

from __future__ import annotations

import yaml
from catalogue import Case, Fixtures, Invocation


def _run_dir(fixtures: Fixtures, stored: dict | str) -> str:
    run_dir = fixtures.tmp_path / "original"
    run_dir.mkdir()
    text = stored if isinstance(stored, str) else yaml.safe_dump(stored)
    (run_dir / "config.yaml").write_text(text, encoding="utf-8")
    return str(run_dir)


def _changed_plugin(fixtures: Fixtures) -> Invocation:
    plugin = fixtures.tmp_path / "my_method.py"
    plugin.write_text("# edited after the run\n", encoding="utf-8")
    stored = {"name": "x", "plugins": [{"path": str(plugin), "sha256": "0" * 64}]}
    return Invocation(["reproduce", _run_dir(fixtures, stored), "--out", str(fixtures.tmp_path / "rerun")])


def _nothing_made(fixtures: Fixtures) -> None:
    assert not (fixtures.tmp_path / "rerun").exists()


CASES = [
    Case("reproduce of a folder that is not a run dir", lambda f: Invocation(["reproduce", str(f.tmp_path)]), 4,
         r"no config\.yaml, not a run dir"),
    Case("reproduce of a run dir whose config.yaml is not YAML",
         lambda f: Invocation(["reproduce", _run_dir(f, "name: [x\n"), "--out", str(f.tmp_path / "rerun")]), 4,
         r"original/config\.yaml: unreadable \(", _nothing_made),
    Case("reproduce into the run dir itself",
         lambda f: Invocation(["reproduce", (d := _run_dir(f, {"name": "x"})), "--out", d]), 2,
         r"--out .*: the rerun needs a run dir of its own"),
    Case("reproduce with a plugin file changed since the run", _changed_plugin, 2,
         r"config\.yaml: plugin .*my_method\.py changed since the run \(sha256 000000000000\.\.\. recorded\)",
         _nothing_made),
    Case("deterministic kernels of an unknown instruction set",
         lambda f: Invocation(["run", "--set", "deterministic_isa=avx512", "--out", str(f.tmp_path / "rerun")]), 2,
         r"deterministic_isa: expected one of avx2, baseline, got 'avx512'", _nothing_made),
]
