"""End-to-end runs of the continual loop on the tiny model: run dir layout, resume after an interrupt,
refusing a run dir of another config, rebuilding results from stored predictions, joint and seq-full."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_stream_config, write_config
from mmcl.cli import main
from mmcl.evaluation.metrics import climb_average_forgetting, compute_all
from mmcl.results import SCHEMA_VERSION

TASKS = ["rs", "med", "ad", "sci", "fin"]
STAGES = [f"{index}_{task}" for index, task in enumerate(TASKS, start=1)]
ROWS = ["0_base", *STAGES]
METRIC_KEYS = {"ACC", "MFT", "MAA", "BWT", "Forgetting", "FWT"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# One optimizer step per stage (8 samples, batch 8): no warmup (its first step has learning rate 0) and a
# learning rate high enough that the step visibly moves the tiny model's answers.
TRAINING = {"epochs": 1, "batch_size": 8, "progress_bar": False, "learning_rate": 0.02, "warmup_ratio": 0.0}


@dataclass
class Invocation:
    code: int
    out: str
    err: str


def invoke(argv: list[str]) -> Invocation:
    """``mmcl <argv>`` in-process with stdout and stderr captured (usable from module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return Invocation(code, out.getvalue(), err.getvalue())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def prediction_records(path: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[0]["meta"], lines[1:]


def eval_lines(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if line.strip().startswith("eval [")]


@dataclass
class Experiment:
    config: dict[str, Any]
    config_path: Path
    run_dir: Path
    first: Invocation

    def results(self) -> dict[str, Any]:
        return read_json(self.run_dir / "results.json")


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("experiments")


def new_experiment(
    model_dir: Path, cache_dir: Path, folder: Path, name: str, **extra: Any
) -> tuple[dict[str, Any], Path]:
    config = make_stream_config(model_dir, cache_dir, folder / name, training=dict(TRAINING), **extra)
    return config, write_config(folder / f"{name}.yaml", config)


@pytest.fixture(scope="module")
def seq_lora_run(tiny_model_dir: Path, stream_cache_dir: Path, experiment_dir: Path) -> Experiment:
    """One complete seq-lora run on the tiny stream, shared by the tests of this module (read-only)."""
    config, path = new_experiment(tiny_model_dir, stream_cache_dir, experiment_dir, "seq_lora")
    first = invoke(["run", str(path)])
    assert first.code == 0, first.err
    return Experiment(config, path, Path(config["output_dir"]), first)


def copy_run(experiment: Experiment, destination: Path) -> Path:
    shutil.copytree(experiment.run_dir, destination)
    return destination


# -- (a) a complete run ---------------------------------------------------------------------------


def test_full_run_results(seq_lora_run: Experiment) -> None:
    results = seq_lora_run.results()
    assert results["method"] == "seq-lora" and results["stream"] == "synth-domain" and results["seed"] == 0
    assert [task["name"] for task in results["tasks"]] == TASKS and results["schema_version"] == SCHEMA_VERSION
    assert results["row_labels"] == ["base", *TASKS]
    chance = {task["name"]: task["chance"] for task in results["tasks"]}
    scorers = {task["name"]: task["scorer"] for task in results["tasks"]}
    matrix = results["matrix"]
    assert len(matrix) == 6 and all(len(row) == 5 for row in matrix)
    # forward_transfer is on by default: every row is full, including tasks not trained yet
    assert all(isinstance(value, float) and 0.0 <= value <= 100.0 for row in matrix for value in row)
    assert METRIC_KEYS <= set(results["metrics"])
    metrics = dict(results["metrics"])
    expected_tf = climb_average_forgetting(matrix, list(chance.values()))  # None: no task learned above chance
    assert metrics.pop("T_F", None) == (None if expected_tf is None else pytest.approx(expected_tf, abs=1e-4))
    assert metrics == pytest.approx(compute_all(matrix), nan_ok=True)
    # chance from each task's answer space: rs/med/fin mix yes/no (50) with open questions, ad is open,
    # sci has four options
    assert chance == {"rs": 25.0, "med": 25.0, "ad": 0.0, "sci": 25.0, "fin": 25.0}
    assert results["metrics"]["ACC"] == pytest.approx(sum(matrix[-1]) / 5)
    assert results["complete"] is True and [stage["label"] for stage in results["stages"] if stage["done"]] == TASKS
    assert all(task["train_samples"] == 8 and task["test_samples"] == 4 for task in results["tasks"])
    assert all(stage["train_loss"] > 0 for stage in results["stages"])
    timing = results["timing"]
    assert len(timing["sessions"]) == 1 and timing["total_seconds"] == pytest.approx(timing["sessions"][0])
    assert timing["total_seconds"] >= timing["train_seconds"] > 0
    stored = yaml.safe_load((seq_lora_run.run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert results["config_hash"] == stored["fingerprint"]
    assert stored["training"]["learning_rate"] == TRAINING["learning_rate"]
    assert scorers["sci"] == "option_letter"
    # the warmed-up tiny model gets some answers right: the matrix is not trivially all zeros
    assert any(value > 0 for row in matrix for value in row), matrix


def test_full_run_prints_table_and_paths(seq_lora_run: Experiment) -> None:
    out = seq_lora_run.first.out
    assert "Traceback" not in out + seq_lora_run.first.err
    assert f"run dir: {seq_lora_run.run_dir}" in out
    assert "stage 5/5 [fin]: training on 8 samples" in out
    assert "ACC" in out and "BWT" in out
    assert f"report: {seq_lora_run.run_dir / 'report.html'}" in out
    assert len(eval_lines(out)) == 30


def test_full_run_stage_dirs(seq_lora_run: Experiment) -> None:
    stages = seq_lora_run.run_dir / "stages"
    assert sorted(p.name for p in stages.iterdir()) == STAGES  # no leftover .tmp_ dirs
    adapters = []
    for name in STAGES:
        folder = stages / name
        tensors = load_file(str(folder / "state.safetensors"))
        assert tensors and all("lora_" in key for key in tensors)
        adapters.append(tensors)
        info = read_json(folder / "stage.json")
        assert info["label"] == name.split("_", 1)[1] and info["train_samples"] == 8
        assert info["trainable_parameters"] > 0 and "train_loss" in info["train_metrics"]
        assert read_json(folder / "state.json") == {}
        assert not (folder / "trainer").exists()
    # every stage trained the adapter further
    for before, after in zip(adapters, adapters[1:]):
        assert any(not torch.equal(before[key], after[key]) for key in before)


def test_full_run_predictions(seq_lora_run: Experiment, stream_cache_dir: Path) -> None:
    results = seq_lora_run.results()
    (data_root,) = (stream_cache_dir / "synth-domain").glob("*seed0-n8-4-px48")
    for row_index, row in enumerate(ROWS):
        for task_index, task in enumerate(TASKS):
            meta, records = prediction_records(seq_lora_run.run_dir / "predictions" / row / f"{task}.jsonl")
            test_ids = [record["question_id"] for record in read_json(data_root / task / "test.json")]
            assert meta["n"] == 4 and [record["id"] for record in records] == test_ids
            assert meta["scorer"] == {t["name"]: t["scorer"] for t in results["tasks"]}[task]
            assert all(isinstance(record["prediction"], str) for record in records)
            mean = 100.0 * sum(record["score"] for record in records) / len(records)
            assert results["matrix"][row_index][task_index] == pytest.approx(mean, abs=1e-3)


def test_full_run_report_files(seq_lora_run: Experiment) -> None:
    run_dir = seq_lora_run.run_dir
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "<html" in html.lower() and "seq-lora" in html and "ACC" in html
    assert (run_dir / "heatmap.png").read_bytes().startswith(PNG_MAGIC)
    rows = (run_dir / "matrix.csv").read_text(encoding="utf-8").strip().splitlines()
    assert len(rows) >= 7 and all(task in rows[0] for task in TASKS)
    assert rows[1].split(",")[0] == "base" and rows[6].split(",")[0] == "fin"
    plan = read_json(run_dir / "run.json")
    assert plan["stages"] == TASKS and [task["name"] for task in plan["tasks"]] == TASKS


# -- resume ---------------------------------------------------------------------------------------


def test_rerun_of_a_finished_run_skips_everything(seq_lora_run: Experiment, tmp_path: Path) -> None:
    run_dir = copy_run(seq_lora_run, tmp_path / "copy")
    second = invoke(["run", str(seq_lora_run.config_path), "--out", str(run_dir)])
    assert second.code == 0, second.err
    for index, task in enumerate(TASKS, start=1):
        assert f"stage {index}/5 [{task}]: done earlier, skipped" in second.out
    assert eval_lines(second.out) == [] and "loading backbone" not in second.out
    assert read_json(run_dir / "results.json")["matrix"] == seq_lora_run.results()["matrix"]


def test_rerun_redoes_only_a_missing_evaluation(seq_lora_run: Experiment, tmp_path: Path) -> None:
    """The stage's weights are restored from its directory to redo one lost evaluation, identically."""
    run_dir = copy_run(seq_lora_run, tmp_path / "copy")
    lost = run_dir / "predictions" / "3_ad" / "med.jsonl"
    original = prediction_records(lost)[1]
    lost.unlink()
    second = invoke(["run", str(seq_lora_run.config_path), "--out", str(run_dir)])
    assert second.code == 0, second.err
    assert [line.split(":")[0] for line in eval_lines(second.out)] == ["eval [3_ad] med"]
    assert prediction_records(lost)[1] == original
    assert read_json(run_dir / "results.json")["matrix"] == seq_lora_run.results()["matrix"]


def test_interrupted_run_resumes_to_the_same_result(
    seq_lora_run: Experiment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mmcl.training.sft as sft

    real_train = sft.train_on_samples
    calls: list[int] = []

    def interrupted_at_stage_3(*args: Any, **kwargs: Any) -> dict:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    run_dir = tmp_path / "resumed"
    argv = ["run", str(seq_lora_run.config_path), "--out", str(run_dir)]
    monkeypatch.setattr(sft, "train_on_samples", interrupted_at_stage_3)
    first = invoke(argv)
    assert first.code == 130
    assert "interrupted" in first.err and "Traceback" not in first.out + first.err
    stages = run_dir / "stages"
    assert (stages / "1_rs" / "state.safetensors").is_file() and (stages / "2_med" / "state.safetensors").is_file()
    assert not (stages / "3_ad").exists()
    assert not (run_dir / "results.json").exists()
    assert (run_dir / "predictions" / "2_med" / "fin.jsonl").is_file()  # evaluations before the interrupt are kept
    monkeypatch.setattr(sft, "train_on_samples", real_train)

    second = invoke(argv)
    assert second.code == 0, second.err
    assert "stage 1/5 [rs]: done earlier, skipped" in second.out
    assert "stage 2/5 [med]: done earlier, skipped" in second.out
    assert "stage 3/5 [ad]: training on 8 samples" in second.out
    evaluated_rows = {line.split("]")[0] for line in eval_lines(second.out)}
    assert evaluated_rows == {"eval [3_ad", "eval [4_sci", "eval [5_fin"}  # finished evaluations are not redone
    assert sorted(p.name for p in stages.iterdir()) == STAGES

    resumed, reference = read_json(run_dir / "results.json"), seq_lora_run.results()
    assert resumed["matrix"] == reference["matrix"]
    assert resumed["metrics"] == reference["metrics"]
    for stage in STAGES:
        ours = load_file(str(stages / stage / "state.safetensors"))
        theirs = load_file(str(seq_lora_run.run_dir / "stages" / stage / "state.safetensors"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours), stage
    for task in TASKS:
        path = Path("predictions") / "5_fin" / f"{task}.jsonl"
        assert prediction_records(run_dir / path)[1] == prediction_records(seq_lora_run.run_dir / path)[1]


# -- a run dir of another config ------------------------------------------------------------------


def test_run_dir_of_another_config_is_refused_then_overwritten(seq_lora_run: Experiment, tmp_path: Path) -> None:
    run_dir = copy_run(seq_lora_run, tmp_path / "copy")
    before = (run_dir / "results.json").read_bytes()
    changed = ["--set", "evaluation.limit=1", "--set", "evaluation.forward_transfer=false"]
    argv = ["run", str(seq_lora_run.config_path), "--out", str(run_dir), *changed]

    refused = invoke(argv)
    assert refused.code != 0
    err = refused.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in refused.out + refused.err
    assert "--overwrite" in err and str(run_dir) in err
    assert (run_dir / "results.json").read_bytes() == before  # nothing touched
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == STAGES

    replaced = invoke([*argv, "--overwrite"])
    assert replaced.code == 0, replaced.err
    results = read_json(run_dir / "results.json")
    stored = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert stored["evaluation"]["limit"] == 1 and results["config_hash"] == stored["fingerprint"]
    assert results["config_hash"] != seq_lora_run.results()["config_hash"]
    matrix = results["matrix"]
    # no forward transfer: nothing above the diagonal (old predictions were not reused)
    for row_index, row in enumerate(matrix[1:], start=1):
        assert all(value is not None for value in row[:row_index]) and all(value is None for value in row[row_index:])
    assert all(value is not None for value in matrix[0])
    assert prediction_records(run_dir / "predictions" / "0_base" / "rs.jsonl")[0]["n"] == 1
    assert not (run_dir / "predictions" / "1_rs" / "med.jsonl").exists()


# -- report from stored predictions ---------------------------------------------------------------


def test_report_rebuilds_results_from_predictions(seq_lora_run: Experiment, tmp_path: Path) -> None:
    run_dir = copy_run(seq_lora_run, tmp_path / "copy")
    reference = seq_lora_run.results()
    for name in ("results.json", "report.html", "matrix.csv", "heatmap.png"):
        (run_dir / name).unlink()
    rebuilt = invoke(["report", str(run_dir)])
    assert rebuilt.code == 0, rebuilt.err
    results = read_json(run_dir / "results.json")
    assert results["matrix"] == reference["matrix"]
    assert results["metrics"] == reference["metrics"]
    assert results["row_labels"] == reference["row_labels"] and results["tasks"] == reference["tasks"]
    for name in ("report.html", "matrix.csv", "heatmap.png"):
        assert (run_dir / name).is_file()
    assert "ACC" in rebuilt.out

    # scores are recomputed from predictions and answers, not copied: fix one wrong answer by hand
    path = run_dir / "predictions" / "5_fin" / "rs.jsonl"
    meta, records = prediction_records(path)
    step = 100.0 / len(records)
    index = next((i for i, record in enumerate(records) if record["score"] == 0), None)
    if index is None:  # all right: break one instead
        delta = -step
        records[0]["prediction"] = "definitely not " + records[0]["answer"]
    else:
        delta = step
        records[index]["prediction"] = records[index]["answer"]
    lines = [json.dumps({"meta": meta})] + [json.dumps(record) for record in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert invoke(["report", str(run_dir)]).code == 0
    edited = read_json(run_dir / "results.json")
    assert edited["matrix"][5][0] == pytest.approx(reference["matrix"][5][0] + delta)
    assert edited["metrics"]["ACC"] == pytest.approx(reference["metrics"]["ACC"] + delta / 5)


def test_report_on_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = invoke(["report", str(tmp_path)])
    assert result.code != 0 and "not a run directory" in result.err and "Traceback" not in result.err


# -- other methods --------------------------------------------------------------------------------


def test_joint_trains_once_on_all_tasks(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path) -> None:
    config, path = new_experiment(tiny_model_dir, stream_cache_dir, tmp_path, "joint", method={"name": "joint"})
    result = invoke(["run", str(path)])
    assert result.code == 0, result.err
    run_dir = Path(config["output_dir"])
    results = read_json(run_dir / "results.json")
    assert results["row_labels"] == ["base", "joint"]
    assert len(results["matrix"]) == 2 and all(value is not None for row in results["matrix"] for value in row)
    assert set(results["metrics"]) == {"ACC"}
    assert results["metrics"]["ACC"] == pytest.approx(sum(results["matrix"][1]) / 5)
    assert results["joint"] is True and results["reference"] is True
    assert [p.name for p in (run_dir / "stages").iterdir()] == ["1_joint"]
    assert read_json(run_dir / "stages" / "1_joint" / "stage.json")["train_samples"] == 40
    assert "stage 1/1 [joint]: training on 40 samples" in result.out
    assert sorted(p.name for p in (run_dir / "predictions").iterdir()) == ["0_base", "1_joint"]


def test_seq_full_run(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path) -> None:
    config, path = new_experiment(
        tiny_model_dir, stream_cache_dir, tmp_path, "full",
        method={"name": "seq-full"}, evaluation={"batch_size": 8, "forward_transfer": False},
    )  # fmt: skip
    result = invoke(["run", str(path)])
    assert result.code == 0, result.err
    run_dir = Path(config["output_dir"])
    results = read_json(run_dir / "results.json")
    assert results["method"] == "seq-full" and results["complete"] is True
    assert results["row_labels"] == ["base", *TASKS]
    assert all(results["matrix"][t][i] is not None for t in range(6) for i in range(5) if t == 0 or i < t)
    assert results["matrix"][1][1] is None  # forward transfer off
    assert METRIC_KEYS - {"FWT"} <= set(results["metrics"])
    first = load_file(str(run_dir / "stages" / "1_rs" / "state.safetensors"))
    last = load_file(str(run_dir / "stages" / "5_fin" / "state.safetensors"))
    assert first.keys() == last.keys()
    assert not any("lora_" in key or "vision_tower" in key for key in first)  # full weights, tower frozen
    assert any("language_model" in key for key in first) and any("multi_modal_projector" in key for key in first)
    assert any(not torch.equal(first[key], last[key]) for key in first)


# -- listing --------------------------------------------------------------------------------------


def test_list(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    sections = {}
    current = None
    for line in out.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            current = line[:-1]
            sections[current] = []
        elif line.startswith("  ") and current:
            sections[current].append(line.split()[0])
    assert "synth-domain" in sections["streams"]
    assert {"seq-lora", "seq-full", "joint"} <= set(sections["methods"])
    assert "tiny-llava" in sections["backbones"]
