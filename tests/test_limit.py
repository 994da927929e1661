"""``evaluation.limit``: the first N test samples or a seeded random subset, recorded in run.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmcl.config import ExperimentConfig, from_dict
from mmcl.errors import ConfigError
from mmcl.runner import limited


def test_first_and_random_subsets() -> None:
    items = list(range(100))
    assert limited(items, 5, "first", 0, "t") == [0, 1, 2, 3, 4]
    chosen = limited(items, 5, "random", 0, "t")
    assert chosen == sorted(chosen) and len(set(chosen)) == 5 and chosen != [0, 1, 2, 3, 4]
    assert limited(items, 5, "random", 0, "t") == chosen  # deterministic
    assert limited(items, 5, "random", 1, "t") != chosen  # limit_seed changes it
    assert limited(items, 5, "random", 0, "other") != chosen  # drawn per task
    assert limited(items, None, "random", 0, "t") == items and limited(items, 500, "random", 0, "t") == items


def test_random_subset_is_spread_over_the_file() -> None:
    """Over many tasks every position is about equally likely (the first-N subset never reaches the tail)."""
    counts = [0] * 20
    for task in range(2000):
        for index in limited(list(range(20)), 5, "random", 0, f"t{task}"):
            counts[index] += 1
    assert all(abs(count / 2000 - 0.25) < 0.04 for count in counts), counts


def test_limit_selection_is_validated() -> None:
    with pytest.raises(ConfigError, match="evaluation.limit_selection: expected 'random' or 'first', got 'last'"):
        from_dict(ExperimentConfig, {"evaluation": {"limit_selection": "last"}})


def test_run_records_the_subset_rule(tiny_stream_config, tmp_path: Path) -> None:
    from conftest import write_config
    from mmcl.cli import main

    tiny_stream_config["evaluation"] = {"batch_size": 8, "limit": 2, "limit_seed": 3}
    tiny_stream_config["stream"]["options"]["test_per_task"] = 6
    tiny_stream_config["training"]["max_steps"] = 1
    tiny_stream_config["method"] = {"name": "seq-lora"}
    assert main(["run", str(write_config(tmp_path / "c.yaml", tiny_stream_config))]) == 0
    run_dir = Path(tiny_stream_config["output_dir"])
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert results["evaluation_protocol"]["limit"] == 2
    assert results["evaluation_protocol"]["limit_selection"] == "random"
    assert results["evaluation_protocol"]["limit_seed"] == 3
    decoding = results["evaluation_protocol"]["decoding"]
    assert decoding["do_sample"] is False and decoding["num_beams"] == 1 and decoding["repetition_penalty"] == 1.0
    lines = (run_dir / "predictions" / "0_base" / "rs.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["meta"]["n"] == 2
