"""``mmcl run --stop-after-stage K``: one stage per invocation (fresh process per stage, e.g. to measure each
stage's memory); running again continues to the end with the same numbers as one uninterrupted run."""

from __future__ import annotations

from pathlib import Path

from conftest import first_tasks_stream, make_stream_config, write_config
from test_runner import TRAINING, invoke, read_json


def test_stage_by_stage_run_equals_one_run(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path) -> None:
    stream = first_tasks_stream(stream_cache_dir, 3, train=4, test=2)
    configs = {}
    for name in ("steps", "whole"):
        config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / name, training=dict(TRAINING),
                                    stream=stream, evaluation={"batch_size": 8, "general": "none"})
        configs[name] = str(write_config(tmp_path / f"{name}.yaml", config))
    first = invoke(["run", configs["steps"], "--stop-after-stage", "1"])
    assert first.code == 0, first.err
    stages = tmp_path / "steps" / "stages"
    assert sorted(p.name for p in stages.iterdir() if p.is_dir()) == ["1_rs"]
    assert read_json(tmp_path / "steps" / "results.json")["complete"] is False
    assert invoke(["run", configs["steps"], "--stop-after-stage", "2"]).code == 0
    assert sorted(p.name for p in stages.iterdir() if p.is_dir()) == ["1_rs", "2_med"]
    assert invoke(["run", configs["steps"]]).code == 0
    assert invoke(["run", configs["whole"]]).code == 0
    stepped, whole = (read_json(tmp_path / name / "results.json") for name in ("steps", "whole"))
    assert stepped["complete"] and stepped["matrix"] == whole["matrix"]
