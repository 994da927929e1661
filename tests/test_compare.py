"""Tests for mmcl.report.compare on hand-made run dirs (no model, no training), read as typed Results."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from mmcl.errors import RunDirError
from mmcl.report.compare import (
    ComparedRun,
    aggregate_by_method,
    compare_runs,
    comparison_rows,
    format_comparison,
    load_run,
    plot_comparison,
    variant_series,
    with_climb_metrics,
    write_comparison,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIXTURES = Path(__file__).parent / "fixtures"
TASKS = ["a", "b", "c"]
N = 4  # predictions per file: scores are multiples of 25
EVAL_SECONDS_PER_FILE = 0.25

# Matrices (row 0 = base, row t = after stage t), every entry a multiple of 25.
SEQ_SEED0 = [[0, 25, 0], [100, 50, 25], [50, 100, 25], [25, 75, 100]]
SEQ_SEED1 = [[0, 25, 0], [75, 25, 0], [50, 100, 25], [50, 50, 75]]
EXPERTS = [[0, 25, 0], [100, 25, 0], [100, 100, 0], [100, 100, 100]]
JOINT = [[0, 25, 0], [75, 100, 75]]
CHANCE = {"a": 0.0, "b": 25.0, "c": 0.0}  # per-task chance scores recorded in run.json (CLiMB's S_rand)

# Metrics of SEQ_SEED0 and SEQ_SEED1, by hand.
SEED0_METRICS = {
    "ACC": (25 + 75 + 100) / 3,
    "MFT": 100.0,
    "MAA": (100 + (50 + 100) / 2 + (25 + 75 + 100) / 3) / 3,
    "BWT": ((25 - 100) + (75 - 100)) / 2,  # -50
    "Forgetting": ((100 - 25) + (100 - 75)) / 2,  # 50
    "FWT": ((50 - 25) + (25 - 0)) / 2,  # 25
}
SEED1_METRICS = {
    "ACC": (50 + 50 + 75) / 3,
    "MFT": (75 + 100 + 75) / 3,
    "MAA": (75 + (50 + 100) / 2 + (50 + 50 + 75) / 3) / 3,
    "BWT": ((50 - 75) + (50 - 100)) / 2,  # -37.5
    "Forgetting": ((75 - 50) + (100 - 50)) / 2,  # 37.5
    "FWT": ((25 - 25) + (25 - 0)) / 2,  # 12.5
}


def _write_predictions(path: Path, score: float) -> None:
    correct = round(score / 100 * N)
    lines = [json.dumps({"meta": {"scorer": "exact_match", "n": N, "seconds": EVAL_SECONDS_PER_FILE}})]
    for i in range(N):
        prediction = "yes" if i < correct else "no"
        record = {"id": f"s{i}", "prediction": prediction, "answer": "yes", "score": float(i < correct)}
        lines.append(json.dumps(record))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_run(
    root: Path,
    name: str,
    method: str,
    seed: int,
    matrix: list[list[float | None]],
    *,
    stage_seconds: list[float] | None = None,
    state_floats: list[int] | None = None,
    tasks: list[str] = TASKS,
    stream: str = "synth-domain",
    rank: int = 8,
    params: int = 1000,
    joint: bool | None = None,
    reference: bool | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """A run dir in the runner's layout: run.json, config.yaml, predictions, finished stage dirs. ``joint``
    (one stage on all tasks) defaults to ``method == "joint"``; ``reference`` to joint or ``experts``, as
    those methods declare it."""
    run_dir = root / name
    joint = method == "joint" if joint is None else joint
    reference = (joint or method == "experts") if reference is None else reference
    stages = ["joint"] if joint else list(tasks)
    plan = {
        "name": name,
        "method": method,
        "stream": stream,
        "backbone": "tiny",
        "seed": seed,
        "joint": joint,
        "reference": reference,
        "tasks": [{"name": t, "description": f"task {t}", "scorer": "exact_match", "max_new_tokens": 4,
                   "chance": CHANCE.get(t)} for t in tasks],  # fmt: skip
        "stages": stages,
    }
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(plan), encoding="utf-8")
    config = {
        "fingerprint": f"fp-{name}",
        "name": name,
        "output_dir": str(run_dir),
        "seed": seed,
        "stream": {"name": stream, "options": {}, "tasks": [], "cache_dir": str(root / "cache")},
        "method": {"name": method, "options": {}},
        "lora": {"rank": rank, "alpha": 16.0},
        "training": {"epochs": 1.0, "progress_bar": False, **(training or {})},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    row_labels = ["base", *stages]
    for r, row in enumerate(matrix):
        for task, score in zip(tasks, row):
            if score is not None:
                _write_predictions(run_dir / "predictions" / f"{r}_{row_labels[r]}" / f"{task}.jsonl", score)
    stage_seconds = stage_seconds or [1.0] * len(stages)
    state_floats = state_floats or [16] * len(stages)
    for k, label in enumerate(stages, start=1):
        if k >= len(matrix):
            break  # unfinished run: no stage dir
        stage_dir = run_dir / "stages" / f"{k}_{label}"
        stage_dir.mkdir(parents=True)
        save_file({"w": np.zeros(state_floats[k - 1], dtype=np.float32)}, str(stage_dir / "state.safetensors"))
        info = {"label": label, "train_samples": 8, "seconds": stage_seconds[k - 1], "trainable_parameters": params}
        (stage_dir / "stage.json").write_text(json.dumps(info), encoding="utf-8")
        (stage_dir / "state.json").write_text("{}", encoding="utf-8")
    return run_dir


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare_runs")
    make_run(root, "seq0", "seq-lora", 0, SEQ_SEED0, stage_seconds=[1.0, 2.0, 3.5], state_floats=[10, 20, 30])
    # An interrupted stage in progress and an unfinished stage dir must not count as stored state.
    tmp_stage = root / "seq0" / "stages" / ".tmp_4_x"
    tmp_stage.mkdir()
    save_file({"w": np.zeros(10_000, dtype=np.float32)}, str(tmp_stage / "state.safetensors"))
    make_run(root, "seq1", "seq-lora", 1, SEQ_SEED1, stage_seconds=[2.0, 2.0, 2.0], state_floats=[10, 20, 30])
    make_run(root, "experts0", "experts", 0, EXPERTS, state_floats=[100, 200, 300], params=500)
    make_run(root, "joint0", "joint", 0, JOINT, stage_seconds=[4.0], state_floats=[50], params=1000)
    return root


@pytest.fixture(scope="module")
def runs(runs_root: Path) -> list[ComparedRun]:
    return [load_run(runs_root / name) for name in ("seq0", "seq1", "experts0", "joint0")]


def _size(path: Path) -> int:
    return path.stat().st_size


def test_load_run_collects_and_measures_state(runs_root: Path, runs: list[ComparedRun]) -> None:
    seq0 = runs[0]
    assert seq0.results.matrix == [[float(v) for v in row] for row in SEQ_SEED0]
    for key, value in SEED0_METRICS.items():
        assert seq0.metrics[key] == pytest.approx(value), key
    stage_files = sorted((runs_root / "seq0" / "stages").glob("[0-9]*/state.safetensors"))
    assert len(stage_files) == 3
    sizes = [_size(p) for p in stage_files]
    assert sizes[0] < sizes[1] < sizes[2]  # 10, 20, 30 floats
    assert seq0.stored_bytes_per_task == pytest.approx(sum(sizes) / 3)
    assert seq0.stored_bytes_final == sizes[2]
    assert sizes[1] - sizes[0] == 40  # 10 more float32 values
    assert seq0.run_dir == str(runs_root / "seq0")
    assert seq0.variant["lora.rank"] == 8 and "seed" not in seq0.variant
    assert runs[3].stored_bytes_per_task == _size(runs_root / "joint0" / "stages" / "1_joint" / "state.safetensors")


def test_load_run_prefers_results_json(runs_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "copy"
    shutil.copytree(runs_root / "seq0", run_dir)
    results = load_run(run_dir).results
    results.metrics["ACC"] = 12.5
    (run_dir / "results.json").write_text(results.to_json(), encoding="utf-8")
    assert load_run(run_dir).metrics["ACC"] == 12.5
    # A broken results.json, or one of an mmcl before the schema, is rebuilt from the run dir.
    for stored in ("{not json", json.dumps({"tasks": TASKS, "matrix": [[0.0]], "metrics": {"ACC": 1.0}})):
        (run_dir / "results.json").write_text(stored, encoding="utf-8")
        assert load_run(run_dir).metrics["ACC"] == pytest.approx(SEED0_METRICS["ACC"])


def test_variants_are_the_fingerprinted_settings(tmp_path: Path) -> None:
    """Settings that do not enter the fingerprint (name, output_dir, cache_dir, logging, progress bar, probes)
    do not split a variant; the seed is the replicate axis; everything else does."""
    a = make_run(tmp_path, "a", "seq-lora", 0, SEQ_SEED0, training={"logging_steps": 1})
    b = make_run(tmp_path, "b", "seq-lora", 1, SEQ_SEED1, training={"logging_steps": 50})
    config = yaml.safe_load((b / "config.yaml").read_text(encoding="utf-8"))
    config["stream"]["cache_dir"] = "/elsewhere"
    config["evaluation"] = {"superficial": {"enabled": True}}
    (b / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    c = make_run(tmp_path, "c", "seq-lora", 2, SEQ_SEED1, training={"learning_rate": 0.5})
    rows = aggregate_by_method([load_run(a), load_run(b), load_run(c)])
    assert [(r["label"], r["n"]) for r in rows] == [
        ("seq-lora [training.learning_rate=0.003]", 2), ("seq-lora [training.learning_rate=0.5]", 1),
    ]  # fmt: skip
    assert load_run(a).variant["training.learning_rate"] == 0.003  # defaults filled in from the config's fields


def test_comparison_rows_values(runs_root: Path, runs: list[ComparedRun]) -> None:
    rows = comparison_rows(runs)
    assert [r["label"] for r in rows] == ["seq-lora seed=0", "seq-lora seed=1", "experts", "joint"]
    seq0, seq1, experts, joint = rows
    for key, value in SEED0_METRICS.items():
        assert seq0[key] == pytest.approx(value), key
    for key, value in SEED1_METRICS.items():
        assert seq1[key] == pytest.approx(value), key
    assert experts["ACC"] == pytest.approx(100.0)
    assert experts["BWT"] == pytest.approx(0.0) and experts["Forgetting"] == pytest.approx(0.0)
    assert experts["FWT"] == pytest.approx(0.0)
    assert joint["ACC"] == pytest.approx((75 + 100 + 75) / 3)
    assert joint["MFT"] is None and joint["BWT"] is None
    assert seq0["train_seconds"] == pytest.approx(6.5)
    assert seq0["eval_seconds"] == pytest.approx(12 * EVAL_SECONDS_PER_FILE)
    assert joint["train_seconds"] == pytest.approx(4.0)
    assert joint["eval_seconds"] == pytest.approx(6 * EVAL_SECONDS_PER_FILE)
    assert seq0["trainable_parameters"] == 1000 and experts["trainable_parameters"] == 500
    assert seq0["stored_bytes_per_task"] == runs[0].stored_bytes_per_task
    assert all(r["n"] == 1 and not r["aggregated"] and r["complete"] for r in rows)
    assert [r["reference"] for r in rows] == [False, False, True, True]

    text = format_comparison(rows)
    lines = text.splitlines()
    assert lines[0].split()[:7] == ["method", "ACC", "MFT", "MAA", "BWT", "Forgetting", "FWT"]
    line0 = next(line for line in lines if line.startswith("seq-lora seed=0"))
    assert "66.7" in line0 and "100.0" in line0 and "80.6" in line0
    assert "-50.0" in line0 and "50.0" in line0 and "+25.0" in line0
    assert "1,000" in line0 and "6.5 s" in line0 and "3.0 s" in line0
    assert f"{runs[0].stored_bytes_per_task:.0f} B" in line0
    joint_line = next(line for line in lines if line.startswith("joint"))
    assert "83.3" in joint_line and joint_line.count("n/a") == 7  # MFT..FWT, CLiMB's T_F, total time (no sessions)
    assert lines[4] == "-" * len(lines[1]) and lines[5].startswith("experts")  # reference runs below a rule
    assert "reference runs" in lines[-1]
    # T_F from results.json: chance [0, 25, 0]; T_F(a<-3) = 100 (100 - 25) / (100 - 0) = 75,
    # T_F(b<-3) = 100 (100 - 75) / (100 - 25) = 33.33; mean 54.17
    assert seq0["T_F"] == pytest.approx((75 + 100 / 3) / 2, abs=1e-3) and joint["T_F"] is None
    # Columns line up: the numbers are right-aligned, so every table line ends where the rule does.
    table_lines = [line for line in lines[: 3 + len(rows) + 1] if not line.startswith("-")]
    assert {len(line) for line in table_lines} == {len(lines[1])}


def test_labels_use_dir_names_when_seeds_collide(tmp_path: Path) -> None:
    a = make_run(tmp_path / "x", "run", "seq-lora", 0, SEQ_SEED0)
    b = make_run(tmp_path / "y", "run", "seq-lora", 0, SEQ_SEED1)
    rows = comparison_rows([load_run(a), load_run(b)])
    assert [r["label"] for r in rows] == ["seq-lora (x/run)", "seq-lora (y/run)"]


def test_aggregate_by_method_mean_std(runs: list[ComparedRun]) -> None:
    rows = aggregate_by_method(runs)
    assert [(r["label"], r["n"]) for r in rows] == [("seq-lora", 2), ("experts", 1), ("joint", 1)]
    seq = rows[0]
    assert seq["seeds"] == [0, 1] and seq["aggregated"]
    for key in SEED0_METRICS:
        a, b = SEED0_METRICS[key], SEED1_METRICS[key]
        assert seq[key] == pytest.approx((a + b) / 2), key
        assert seq[f"{key}_std"] == pytest.approx(abs(a - b) / math.sqrt(2)), key  # sample std (n-1) of two values
    assert seq["ACC"] == pytest.approx(62.5)
    assert seq["BWT"] == pytest.approx(-43.75) and seq["BWT_std"] == pytest.approx(12.5 / math.sqrt(2))
    assert seq["train_seconds"] == pytest.approx(6.25)
    assert seq["train_seconds_std"] == pytest.approx(0.25 * math.sqrt(2))
    assert rows[1]["ACC_std"] == 0.0  # a single run
    assert rows[2]["MFT"] is None and rows[2]["MFT_std"] is None

    text = format_comparison(rows)
    seq_line = next(line for line in text.splitlines() if line.startswith("seq-lora"))
    assert "62.5±5.9" in seq_line and "-43.8±8.8" in seq_line and "6.2±0.4 s" in seq_line
    assert seq_line.split()[1] == "2"  # the n column
    assert "mean ± sample std" in text


def test_aggregate_splits_configs_that_differ_beyond_seed(tmp_path: Path) -> None:
    a = load_run(make_run(tmp_path, "r8", "seq-lora", 0, SEQ_SEED0, rank=8))
    b = load_run(make_run(tmp_path, "r16", "seq-lora", 1, SEQ_SEED1, rank=16))
    rows = aggregate_by_method([a, b])
    assert [(r["label"], r["n"]) for r in rows] == [("seq-lora [lora.rank=8]", 1), ("seq-lora [lora.rank=16]", 1)]
    assert [r["label"] for r in comparison_rows([a, b])] == ["seq-lora (r8)", "seq-lora (r16)"]


def test_long_config_differences_label_groups_by_dir(tmp_path: Path) -> None:
    # an unknown setting: the stored config no longer reads, so its raw settings are compared
    a = load_run(make_run(tmp_path, "small", "seq-lora", 0, SEQ_SEED0, rank=8, params=10, training={"note": "x" * 60}))
    b = load_run(make_run(tmp_path, "big", "seq-lora", 0, SEQ_SEED1, rank=16, params=20, training={"note": "y" * 60}))
    assert a.variant["training.note"] == "x" * 60 and "name" not in a.variant and "stream.cache_dir" not in a.variant
    # a long differing value: not spelled out in the label
    assert [r["label"] for r in aggregate_by_method([a, b])] == ["seq-lora (small)", "seq-lora (big)"]


def test_unfinished_run_is_marked(tmp_path: Path) -> None:
    partial = load_run(make_run(tmp_path, "partial", "seq-lora", 0, SEQ_SEED0[:2]))
    assert partial.complete is False
    rows = comparison_rows([partial])
    assert rows[0]["ACC"] is None and rows[0]["stored_bytes_per_task"] is not None
    text = format_comparison(rows)
    assert "seq-lora *" in text and "unfinished run" in text


def test_write_comparison_files(runs_root: Path, tmp_path: Path) -> None:
    dirs = [runs_root / name for name in ("seq0", "seq1", "experts0", "joint0")]
    out = tmp_path / "cmp"
    text, csv_path, png_path = write_comparison([*dirs, dirs[0]], out)  # a repeated dir is read once
    assert csv_path == out / "comparison.csv" and png_path == out / "comparison.png"
    assert (out / "comparison.html").is_file()
    assert png_path.read_bytes()[:8] == PNG_MAGIC
    assert "Per method, mean ± std over seeds" in text
    with csv_path.open(encoding="utf-8", newline="") as fh:
        records = list(csv.DictReader(fh))
    assert [(r["kind"], r["label"]) for r in records] == [
        ("run", "seq-lora seed=0"),
        ("run", "seq-lora seed=1"),
        ("run", "experts"),
        ("run", "joint"),
        ("mean", "seq-lora"),
        ("mean", "experts"),
        ("mean", "joint"),
    ]
    assert float(records[0]["ACC"]) == pytest.approx(SEED0_METRICS["ACC"], abs=1e-4)
    assert float(records[4]["ACC"]) == pytest.approx(62.5) and records[4]["n"] == "2"
    assert records[4]["seeds"] == "0;1"
    assert [r["reference"] for r in records] == ["false", "false", "true", "true", "false", "true", "true"]
    assert records[3]["MFT"] == "" and records[0]["ACC_std"] == ""
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    # CLiMB knowledge transfer against the experts run's diagonal [100, 100, 100], chance [0, 25, 0]: seed 1 learns tasks 1 and 3 to 75, i.e. 100 (75 - 100) / (100 - 0) = -25 on each
    assert float(records[0]["T_K"]) == pytest.approx(0.0) and float(records[1]["T_K"]) == pytest.approx(-50 / 3, abs=1e-3)
    assert records[3]["T_K"] == "" and "T_K" in text.splitlines()[0]


def test_plot_comparison_single_run(runs: list[ComparedRun], tmp_path: Path) -> None:
    path = plot_comparison(runs[:1], tmp_path / "one.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_not_a_run_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match="empty: not a run directory") as info:
        load_run(empty)
    assert "\n" not in str(info.value)
    with pytest.raises(RunDirError, match="missing: not a run directory"):
        write_comparison([tmp_path / "missing"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_different_streams_and_tasks(runs_root: Path, tmp_path: Path) -> None:
    other_tasks = make_run(tmp_path, "other_tasks", "seq-lora", 0, SEQ_SEED0, tasks=["a", "b", "d"])
    other_stream = make_run(tmp_path, "other_stream", "seq-lora", 0, SEQ_SEED0, stream="files")
    for other in (other_tasks, other_stream):
        with pytest.raises(RunDirError) as info:
            write_comparison([runs_root / "seq0", other], tmp_path / "out")
        message = str(info.value)
        assert "\n" not in message
        assert str(runs_root / "seq0") in message and str(other) in message
        assert "different streams/task lists" in message
    with pytest.raises(RunDirError, match="no run directories"):
        comparison_rows([])


def test_comparison_html(runs_root: Path, tmp_path: Path) -> None:
    dirs = [runs_root / name for name in ("seq0", "seq1", "experts0", "joint0")]
    (runs_root / "seq0" / "report.html").write_text("<html></html>", encoding="utf-8")
    comparison = compare_runs(dirs, tmp_path / "cmp")
    assert comparison.html_path == tmp_path / "cmp" / "comparison.html"
    page = comparison.html_path.read_text(encoding="utf-8")
    png = base64.b64encode(comparison.png_path.read_bytes()).decode("ascii")
    assert f'src="data:image/png;base64,{png}"' in page  # the figure embedded
    assert "<h2>Runs</h2>" in page and "<h2>Per variant, mean ± std over seeds</h2>" in page
    assert "<th>seq-lora seed=0</th>" in page and ">66.7<" in page and ">-50.0<" in page
    assert '<tr class="ref first"><th>experts</th>' in page  # reference runs set apart
    link = Path(os.path.relpath(runs_root / "seq0" / "report.html", tmp_path / "cmp")).as_posix()
    assert f'href="{link}"' in page and page.count("report.html</a>") == 1


def test_reference_lines_follow_the_results_not_the_method_name(tmp_path: Path) -> None:
    seq = make_run(tmp_path, "seq", "seq-lora", 0, SEQ_SEED0)
    upper = make_run(tmp_path, "upper", "my-upper-bound", 0, EXPERTS, reference=True)  # any name
    named_joint = make_run(tmp_path, "named", "joint", 0, SEQ_SEED1, joint=False, reference=False)
    runs = [load_run(path) for path in (seq, upper, named_joint)]
    series = {variant.label: variant for variant in variant_series(runs)}
    assert series["my-upper-bound"].reference_level == pytest.approx(100.0) and not series["my-upper-bound"].curve
    assert series["joint"].reference_level is None and len(series["joint"].curve) == 3
    assert series["seq-lora"].reference_level is None
    assert series["seq-lora"].curve == pytest.approx([100.0, 75.0, (25 + 75 + 100) / 3])
    # the single-task reference run gives CLiMB's T_K, whatever its name
    climb = with_climb_metrics(runs)
    assert climb[0].metrics["T_K"] == pytest.approx(0.0) and climb[2].metrics["T_K"] is not None
    lines = format_comparison(comparison_rows(runs)).splitlines()
    assert lines[-3].startswith("my-upper-bound") and lines[-4] == lines[-2] == "-" * len(lines[1])
    assert plot_comparison(runs, tmp_path / "cmp.png").read_bytes()[:8] == PNG_MAGIC


def test_a_joint_reference_is_a_line(runs: list[ComparedRun]) -> None:
    series = {variant.label: variant for variant in variant_series(runs)}
    assert series["joint"].reference_level == pytest.approx((75 + 100 + 75) / 3) and not series["joint"].curve
    assert series["seq-lora"].n == 2 and series["seq-lora"].curve_std[0] == pytest.approx(25 / math.sqrt(2))


@pytest.mark.parametrize("run_dir", sorted(p.parent for p in FIXTURES.glob("**/run.json")), ids=str)
def test_committed_old_run_dirs_compare(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    comparison = compare_runs([copy], tmp_path / "cmp")
    assert comparison.html_path.is_file() and comparison.png_path.read_bytes()[:8] == PNG_MAGIC
