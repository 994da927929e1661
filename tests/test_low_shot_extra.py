"""CLiMB's unimodal low-shot transfer: tasks outside the stream (a language-only and a vision-only one from
``synth-unimodal``) fine-tuned on a few samples and evaluated after every row, and the data they come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import first_tasks_stream, make_stream_config, write_config
from test_runner import invoke, read_json

TRAINING = {"max_steps": 2, "batch_size": 4, "learning_rate": 0.01, "warmup_ratio": 0.0, "progress_bar": False}
UNIMODAL = {"name": "synth-unimodal", "options": {"train_per_task": 8, "test_per_task": 4}}


def test_synth_unimodal_has_a_text_only_and_an_image_only_task(tmp_path: Path) -> None:
    from mmcl.streams.stream import StreamConfig, build_stream

    text, image = build_stream(StreamConfig(**UNIMODAL, cache_dir=str(tmp_path)), tmp_path)
    assert (text.name, image.name) == ("text-arith", "image-shapes")
    assert all(not s.images and "<image>" not in s.prompt for s in text.train_samples + text.test_samples)
    assert {s.prompt for s in image.train_samples + image.test_samples} == {"<image>\nWhat shape is this?"}
    assert all(len(s.images) == 1 for s in image.test_samples)
    assert {s.answer for s in image.train_samples} == {"circle", "square", "triangle", "cross"}
    again = build_stream(StreamConfig(**UNIMODAL, cache_dir=str(tmp_path / "other")), tmp_path)
    assert [s.answer for s in again[0].test_samples] == [s.answer for s in text.test_samples]  # seeded


def test_low_shot_run_reports_a_text_only_and_an_image_only_extra_task(tiny_model_dir: Path, stream_cache_dir: Path,
                                                                      tmp_path: Path) -> None:
    """Every row (the base row too) fine-tunes on 4 samples of each extra task and scores it; the accuracy
    matrix is untouched; the gain per extra task is the mean over trained rows of (row - base row)."""
    stream = first_tasks_stream(stream_cache_dir, 2, train=8, test=4)
    config = make_stream_config(
        tiny_model_dir, stream_cache_dir, tmp_path / "run", training=dict(TRAINING), stream=stream,
        evaluation={"batch_size": 8, "forward_transfer": False, "general": "none",
                    "low_shot": {"shots": 4, "extra_tasks": {**UNIMODAL, "cache_dir": str(stream_cache_dir)}}},
    )  # fmt: skip
    result = invoke(["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.code == 0, result.err
    run_dir = tmp_path / "run"
    results = read_json(run_dir / "results.json")
    assert results["complete"]
    part = results["protocols"]["low_shot"]
    assert part["extra_tasks"] == ["image-shapes", "text-arith"]
    assert len(part["extra_matrix"]) == 3 and all(v is not None for row in part["extra_matrix"] for v in row)
    for j, task in enumerate(part["extra_tasks"]):
        gains = [row[j] - part["extra_matrix"][0][j] for row in part["extra_matrix"][1:]]
        assert part["extra_gain"][task] == pytest.approx(sum(gains) / len(gains), abs=1e-4)
    assert (run_dir / "low_shot" / "0_base" / "text-arith.jsonl").is_file()
    assert part["matrix"][1] == [None, part["matrix"][1][1]] and part["matrix"][1][1] is not None  # med unseen
    assert all(value is None for value in part["matrix"][2])  # after the last stage nothing of the stream is unseen
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "Tasks outside the stream" in html and "text-arith" in html and "image-shapes" in html
    plain = dict(config, evaluation={"batch_size": 8, "forward_transfer": False, "general": "none"},
                 output_dir=str(tmp_path / "plain"))
    assert invoke(["run", str(write_config(tmp_path / "plain.yaml", plain))]).code == 0
    assert results["matrix"] == read_json(tmp_path / "plain" / "results.json")["matrix"]
    assert invoke(["run", str(write_config(tmp_path / "c.yaml", config))]).code == 0  # resumes: all done
