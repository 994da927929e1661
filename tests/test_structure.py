"""The shape of a run's outputs: RunLayout, typed Results (and older run dirs), the one results-affecting
flag shared by the fingerprint and compare, evaluation protocols as plugins, total time over sessions."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import make_stream_config, write_config
from mmcl.config import ExperimentConfig, config_from_stored, describe_fields, load_config, results_settings
from mmcl.errors import ConfigError
from mmcl.evaluation.protocols import PROTOCOLS, EvaluationProtocol, Row, RunView, register_protocol
from mmcl.layout import RunLayout
from mmcl.results import SCHEMA_VERSION, collect_results, load_results, results_from_dict
from mmcl.run_dir import same_results_settings
from test_runner import invoke, read_json

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"  # a run dir written by mmcl before results had a schema


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "run_v1"))


# -- older run dirs -----------------------------------------------------------------------------------------


def test_old_run_dir_loads_into_typed_results(old_run: Path) -> None:
    old = read_json(old_run / "results.json")
    assert "schema_version" not in old
    results = load_results(old_run)  # the old results.json is not of this schema: rebuilt from the files
    assert results.schema_version == SCHEMA_VERSION
    assert results.matrix == old["matrix"] and results.metrics == old["metrics"]
    assert results.task_names == old["tasks"] and results.complete is old["complete"] is True
    assert [task.chance for task in results.tasks] == list(old["chance"].values())
    assert results.part("general").scores == old["general"]["scores"]
    assert results.part("low_shot").matrix == old["low_shot"]["matrix"]
    assert results.part("superficial").summary == old["superficial"]["summary"]
    assert [task.train_samples for task in results.tasks] == [None] * 5  # not recorded then: "n/a", not invented
    assert results.timing.total_seconds is None and results.timing.sessions == []
    assert [stage.train_loss for stage in results.stages] == [
        read_json(old_run / "stages" / f"{i}_{t}" / "stage.json")["train_metrics"]["train_loss"]
        for i, t in enumerate(old["tasks"], start=1)
    ]


def test_results_round_trip_through_json(old_run: Path) -> None:
    results = collect_results(old_run)
    again = results_from_dict(json.loads(results.to_json()))
    assert again == results
    assert dataclasses.is_dataclass(again.part("superficial")) and again.examples.keys() == results.examples.keys()


def test_report_and_compare_read_an_old_run_dir(old_run: Path, tmp_path: Path) -> None:
    report = invoke(["report", str(old_run)])
    assert report.code == 0, report.err
    assert read_json(old_run / "results.json")["schema_version"] == SCHEMA_VERSION
    assert (old_run / "report.html").is_file()
    compared = invoke(["compare", str(old_run), str(FIXTURE), "--out", str(tmp_path / "cmp")])
    assert compared.code == 0, compared.err


def test_old_config_yaml_is_the_same_experiment(old_run: Path) -> None:
    """An older config.yaml (flat evaluation keys, fingerprint over other fields) resumes under today's rules."""
    stored = yaml.safe_load((old_run / "config.yaml").read_text(encoding="utf-8"))
    assert isinstance(stored["evaluation"]["superficial"], bool) and "general_scorer" in stored["evaluation"]
    config = config_from_stored(stored, "config.yaml")
    assert config.evaluation.superficial.enabled is True and config.evaluation.low_shot.shots == 4
    assert config.fingerprint() != stored["fingerprint"]  # the hash covers other fields now...
    assert same_results_settings(stored, config)  # ...and it is still the same experiment
    changed = dataclasses.replace(config, training=dataclasses.replace(config.training, learning_rate=0.5))
    assert not same_results_settings(stored, changed)


# -- one flag: results-affecting fields ---------------------------------------------------------------------


def test_every_config_field_documents_itself() -> None:
    rows = describe_fields(ExperimentConfig)
    undocumented = [key for key, _, _, help_text, _ in rows if not help_text]
    assert not undocumented
    neutral = {key for key, *_, affects in rows if not affects}
    assert neutral == {
        "name", "output_dir", "stream.cache_dir", "training.logging_steps", "training.progress_bar",
        "evaluation.superficial.enabled", "evaluation.input_cache_mb",
    }  # fmt: skip


def test_fingerprint_and_compare_use_the_same_fields() -> None:
    base = load_config(None)
    for neutral in ({"name": "other"}, {"training.progress_bar": False}, {"training.logging_steps": 3},
                    {"evaluation.superficial": True}, {"stream.cache_dir": "/elsewhere"}):  # fmt: skip
        assert load_config(None, neutral).fingerprint() == base.fingerprint(), neutral
        assert results_settings(load_config(None, neutral)) == results_settings(base)
    # left padding can change greedy answers with the batch size: it is part of the experiment
    assert load_config(None, {"evaluation.batch_size": 16}).fingerprint() != base.fingerprint()


def test_legacy_evaluation_keys_still_read() -> None:
    legacy = load_config(None, {"evaluation.general": "none", "evaluation.general_scorer": "contains",
                                "evaluation.superficial": True, "evaluation.low_shot": 3})  # fmt: skip
    sections = load_config(None, {"evaluation.general.set": "none", "evaluation.general.scorer": "contains",
                                  "evaluation.superficial.enabled": True, "evaluation.low_shot.shots": 3})  # fmt: skip
    assert legacy == sections
    with pytest.raises(ConfigError, match="evaluation.low_shot.shots: must be in"):
        load_config(None, {"evaluation.low_shot": -1})


# -- the layout ---------------------------------------------------------------------------------------------


def test_layout_knows_every_path(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    assert layout.stage_dir(2, "med") == tmp_path / "stages" / "2_med"
    assert layout.stage_work_dir(2, "med").parent == layout.stages_dir
    assert layout.prediction_file("1_rs", "ad") == tmp_path / "predictions" / "1_rs" / "ad.jsonl"
    assert layout.row_file("general", "0_base") == tmp_path / "general" / "0_base.jsonl"
    files = {layout.config_file, layout.plan_file, layout.results_file, layout.report_file, layout.data_file,
             layout.lock_file, layout.sessions_file, layout.method_summary_file}  # fmt: skip
    assert len(files) == 8 and all(path.parent == tmp_path for path in files)


# -- a protocol added from outside ------------------------------------------------------------------------


@dataclass
class ShortAnswerSettings:
    tokens: int = field(default=1, metadata={"range": "[1, inf)", "help": "generation budget"})


@dataclass
class ShortAnswerPart:
    scores: list[list[float | None]]


class ShortAnswers(EvaluationProtocol):
    """A test protocol: the tasks learned so far asked with a generation budget of ``tokens``."""

    name = "short_answers"
    folder = "short_answers"
    title = "Short answers"
    order = 50
    config_class = ShortAnswerSettings
    part_class = ShortAnswerPart

    def planned_files(self, layout, row: Row, tasks, planned):
        return [layout.task_file(self.folder, row.name, tasks[j]) for j in range(row.seen)] if planned.get(self.name) else []

    def plan_entry(self):
        return {self.name: True}

    def evaluate(self, run, row: Row) -> None:
        from mmcl.evaluation.evaluator import write_predictions

        for task in run.tasks[: row.seen]:
            out = run.layout.task_file(self.folder, row.name, task.name)
            if run.exists_everywhere(out):
                continue
            samples = run.test_samples(task)
            answers = run.answers(row.index, task, samples, self.settings.tokens)
            if run.is_main():
                write_predictions(out, samples, answers, task.scorer, 0.0)

    def collect(self, view: RunView):
        from mmcl.evaluation.evaluator import score_prediction_file

        scores = [[score_prediction_file(f) if (f := view.layout.task_file(self.folder, row.name, t)).exists() else None
                   for t in view.tasks] for row in view.rows]  # fmt: skip
        return ShortAnswerPart(scores) if any(v is not None for row in scores for v in row) else None

    def metrics(self, part):
        final = [value for value in part.scores[-1] if value is not None]
        return {"short_answer_final": sum(final) / len(final)} if final else {}


@pytest.fixture
def short_answers():
    register_protocol(ShortAnswers)
    yield ShortAnswers
    PROTOCOLS.unregister(ShortAnswers.name)


def test_a_protocol_plugs_in(tmp_path: Path, tiny_model_dir: Path, stream_cache_dir: Path, short_answers) -> None:
    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "run",
                                evaluation={"batch_size": 8, "forward_transfer": False, "general": "none",
                                            "protocols": {"short_answers": {"tokens": 1}}})  # fmt: skip
    config["stream"]["options"] = {"train_per_task": 8, "test_per_task": 4}
    result = invoke(["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.code == 0, result.err
    results = load_results(tmp_path / "run")
    part = results.part("short_answers")
    assert part.scores[0] == [None] * 5 and all(value is not None for value in part.scores[5])
    assert "short_answer_final" in results.metrics and results.complete
    assert results.progress.evaluations_planned == 5 + 15 + 15  # base row + lower triangle + short answers
    assert len(list((tmp_path / "run" / "short_answers").rglob("*.jsonl"))) == 15
    register_protocol(ShortAnswers)  # the same definition again (a plugin loaded again on resume): a no-op
    with pytest.raises(ConfigError, match="already registered"):
        register_protocol(type("ShortAnswers", (ShortAnswers,), {}))
    unknown = dict(config, output_dir=str(tmp_path / "other"),
                   evaluation={"protocols": {"short_answerz": {}}})  # fmt: skip
    refused = invoke(["run", str(write_config(tmp_path / "u.yaml", unknown))])
    assert refused.code == 2 and "evaluation.protocols.short_answerz: unknown evaluation protocol" in refused.err
    assert "did you mean 'short_answers'" in refused.err


# -- total time over sessions -----------------------------------------------------------------------------


def test_total_time_is_the_sum_over_sessions(tmp_path: Path, tiny_model_dir: Path, stream_cache_dir: Path) -> None:
    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "run",
                                evaluation={"batch_size": 8, "general": "none"})  # fmt: skip
    path = write_config(tmp_path / "c.yaml", config)
    assert invoke(["run", str(path)]).code == 0
    first = read_json(tmp_path / "run" / "results.json")["timing"]
    started = time.perf_counter()
    assert invoke(["run", str(path)]).code == 0  # resumes: nothing left to do
    second = read_json(tmp_path / "run" / "results.json")["timing"]
    assert len(second["sessions"]) == 2 and second["sessions"][0] == first["sessions"][0]
    assert second["sessions"][1] <= time.perf_counter() - started
    assert second["total_seconds"] == pytest.approx(sum(second["sessions"]))
