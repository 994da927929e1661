"""Bad-input catalogue: sweep files (``mmcl sweep``). Each is refused before any run starts or any folder
is made, with one line naming the key, or the run and the key for a bad axis value."""

from __future__ import annotations

from typing import Any

import yaml
from catalogue import Case, Fixtures, Invocation


def _sweep(fixtures: Fixtures, data: dict[str, Any], *extra: str) -> Invocation:
    path = fixtures.tmp_path / "sweep.yaml"
    data = {"output_dir": str(fixtures.tmp_path / "runs"), **data}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return Invocation(["sweep", str(path), *extra])


def _nothing_made(fixtures: Fixtures) -> None:
    assert not (fixtures.tmp_path / "runs").exists()


def _not_yaml(fixtures: Fixtures) -> Invocation:
    path = fixtures.tmp_path / "sweep.yaml"
    path.write_text("axes: {seed: [0, 1]\n", encoding="utf-8")
    return Invocation(["sweep", str(path)])


CASES = [
    Case("sweep file with an unknown key", lambda f: _sweep(f, {"axes": {"seed": [0]}, "job": 2}), 2,
         r"sweep\.yaml: unknown sweep key 'job' \(known: ", _nothing_made),
    Case("sweep axis that is not a list", lambda f: _sweep(f, {"axes": {"seed": 1}}), 2,
         r"sweep\.yaml: axes\.seed: expected a non-empty list of values, got int 1", _nothing_made),
    Case("sweep axis value of the wrong type", lambda f: _sweep(f, {"axes": {"lora.rank": [8, "big"]}}, "--dry-run"), 2,
         r"sweep\.yaml: run lora\.rank=big: lora\.rank: expected int, got str 'big'", _nothing_made),
    Case("sweep file that is not YAML", _not_yaml, 2, r"sweep\.yaml: line \d+ invalid YAML", _nothing_made),
    Case("sweep file missing", lambda f: Invocation(["sweep", str(f.tmp_path / "absent.yaml")]), 2,
         r"absent\.yaml: sweep file not found"),
]
