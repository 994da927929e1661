"""The bad-input catalogue: every bad input mmcl handles, one parametrized case each, held to one
contract (:mod:`catalogue`): expected exit code, one ``error:`` line naming the file, record or key,
no traceback, nothing already computed lost."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from catalogue import Case, Fixtures, run_case

CASE_MODULES = sorted(p.stem for p in Path(__file__).parent.glob("catalogue_*.py"))
CASES: list[Case] = [case for module in CASE_MODULES for case in importlib.import_module(module).CASES]


def test_case_names_are_unique() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path) -> None:
    run_case(case, Fixtures(tiny_model_dir, stream_cache_dir, tmp_path))
