"""Tests for mmcl.report.render: csv, terminal table, PNGs and the self-contained HTML report, on typed
Results built by hand (and on a run dir written by hand, read back with collect_results)."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from mmcl.evaluation.protocols.general import GeneralPart
from mmcl.evaluation.protocols.low_shot import LowShotPart
from mmcl.evaluation.protocols.superficial import SuperficialPart
from mmcl.report.html import method_section_view
from mmcl.report.render import format_table, plot_accuracy_curves, plot_heatmap, write_matrix_csv, write_report
from mmcl.results import (
    SCHEMA_VERSION,
    Example,
    Progress,
    Results,
    StageInfo,
    TaskInfo,
    Timing,
    collect_results,
    load_results,
    results_from_dict,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIXTURES = Path(__file__).parent / "fixtures"

SETTINGS = {
    "name": "default",
    "seed": 0,
    "stream": {"name": "synth-domain", "options": {}, "cache_dir": "/tmp/cache"},
    "backbone": {"name": "tiny-llava", "dtype": "float32"},
    "method": {"name": "replay", "options": {"buffer_size": 37, "selection": "reservoir"}},
    "lora": {"rank": 8, "alpha": 16.0},
    "training": {"epochs": 4.0, "learning_rate": 0.003, "batch_size": 8},
    "evaluation": {"batch_size": 64, "general": {"set": "auto"}, "low_shot": {"shots": 2}},
}


def make_results(**changes: Any) -> Results:
    """Three tasks, some not evaluated, every part filled; ``changes`` replace fields (``complete`` follows
    ``progress`` unless given)."""
    tasks = [
        TaskInfo("rs", "Remote sensing: count <objects> & ships", "exact_match", 8, 25.0, 120, 40),
        TaskInfo("med", "Medical VQA", "exact_match", 8, None, 80, 30),
        TaskInfo("ad", "Autonomous driving", "exact_match", 8, 50.0, None, None),
    ]
    stages = [
        StageInfo(1, "rs", True, 1.5, 120, 123456, 0.8125),
        StageInfo(2, "med", True, 2.0, 80, 123456, 0.4321),
        StageInfo(3, "ad", True, 2.5, 60, 123456, None),
    ]
    values: dict[str, Any] = dict(
        schema_version=SCHEMA_VERSION, name="default", method="seq-lora", stream="synth-domain", backbone="tiny-llava",
        seed=0, joint=False, reference=False, tasks=tasks, row_labels=["base", "rs", "med", "ad"],
        matrix=[[10.0, 20.0, 30.0], [90.0, None, 31.5], [60.0, 80.0, None], [50.0, 70.25, 95.0]],
        metrics={"ACC": 71.75, "MFT": 88.33, "MAA": 73.1, "BWT": -25.0, "Forgetting": 25.0, "FWT": None},
        per_task_forgetting=[40.0, 9.75, None], stages=stages, progress=Progress(3, 3, 10, 10),
        timing=Timing(train_seconds=6.0, eval_seconds=3.0, sessions=[2000.0, 1700.0], total_seconds=3700.0),
        settings=SETTINGS, evaluation_protocol={"limit": None, "decoding": {"do_sample": False}},
        protocols={"general": GeneralPart(scores=[40.0, 35.0, 30.0, 25.0], drop=15.0), "superficial": None,
                   "low_shot": None},
        examples={"rs": [Example("rs-7", "seven", "seven", "seven", "kept"),
                         Example("rs-9", ["nine", "9"], "nine", "The image shows nine ships.", "drifted")]},
        method_summary=None, method_sections=[], config_hash="abc123", versions={"torch": "2.13.0"}, git_commit=None,
    )  # fmt: skip
    values.update(changes)
    values.setdefault("complete", values["progress"].complete)
    return Results(**values)


def joint_results() -> Results:
    return make_results(method="joint", joint=True, reference=True, row_labels=["base", "joint"],
                        matrix=[[10.0, 20.0, 30.0], [85.0, 75.0, 92.0]], metrics={"ACC": 84.0},
                        per_task_forgetting=[], examples={}, stages=[StageInfo(1, "joint", True, 4.0, 200, 10, 1.0)],
                        progress=Progress(1, 1, 6, 6), protocols={"general": GeneralPart([40.0, 35.0], 5.0)})  # fmt: skip


def test_write_report_outputs(tmp_path: Path) -> None:
    results = make_results()
    results = results_from_dict(json.loads(results.to_json()))  # as results.json holds it
    html_path = write_report(tmp_path, results)

    assert html_path == tmp_path / "report.html"
    for name in ("matrix.csv", "heatmap.png", "accuracy_curves.png", "report.html"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "heatmap.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "accuracy_curves.png").read_bytes().startswith(PNG_MAGIC)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    assert (tmp_path / "matrix.csv").read_text() == (
        "stage,rs,med,ad\nbase,10.0,20.0,30.0\nrs,90.0,,31.5\nmed,60.0,80.0,\nad,50.0,70.25,95.0\n"
    )

    page = html_path.read_text(encoding="utf-8")
    assert "Remote sensing: count &lt;objects&gt; &amp; ships" in page and "<objects>" not in page
    heatmap_b64 = base64.b64encode((tmp_path / "heatmap.png").read_bytes()).decode("ascii")
    assert f'src="data:image/png;base64,{heatmap_b64}"' in page
    assert page.count("data:image/png;base64,") == 2
    assert "seq-lora" in page and "abc123" in page and "123,456" in page
    assert "-25.0" in page and "n/a" in page  # signed BWT, null FWT
    assert "Final average accuracy" in page  # the metrics' explanations
    assert 'style="background:hsl(' in page  # tinted cells
    assert "General ability" in page and "15.0" in page  # the general protocol's section


def _section(page: str, heading: str) -> str:
    start = page.index(f"<h2>{heading}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start : end if end > 0 else None]


def test_report_shows_hyperparameters_and_backbone(tmp_path: Path) -> None:
    page = write_report(tmp_path, make_results()).read_text(encoding="utf-8")
    settings = _section(page, "Hyperparameters")
    assert "method.options.buffer_size" in settings and ">37<" in settings and "reservoir" in settings
    assert "lora.rank" in settings and "training.learning_rate" in settings and "0.003" in settings
    assert "evaluation.low_shot.shots" in settings and "backbone.name" in settings and "tiny-llava" in settings
    assert "rank r of every LoRA adapter" in settings  # the field's help from the config's documentation
    assert "backbone <code>tiny-llava</code>" in page


def test_report_shows_sample_counts_losses_and_forgetting(tmp_path: Path) -> None:
    page = write_report(tmp_path, make_results()).read_text(encoding="utf-8")
    tasks = _section(page, "Tasks")
    rows = {name: row for name in ("rs", "med", "ad") for row in re.findall(r"<tr>.*?</tr>", tasks) if f"<th>{name}</th>" in row}
    assert ">120<" in rows["rs"] and ">40<" in rows["rs"] and ">80<" in rows["med"] and ">30<" in rows["med"]
    assert rows["ad"].count(">n/a<") == 2  # an older run dir: no sample counts recorded
    assert ">40.0<" in rows["rs"] and ">9.8<" in rows["med"]  # per-task forgetting
    stages = _section(page, "Training stages")
    assert "0.8125" in stages and "0.4321" in stages and "1.5 s" in stages and "2.5 s" in stages
    assert stages.count(">n/a<") == 1  # stage 3 recorded no loss


def test_report_shows_example_predictions(tmp_path: Path) -> None:
    page = write_report(tmp_path, make_results()).read_text(encoding="utf-8")
    examples = _section(page, "Example predictions")
    assert "<h3>rs</h3>" in examples and "rs-9" in examples and "nine | 9" in examples
    assert "The image shows nine ships." in examples and ">drifted<" in examples and ">kept<" in examples
    assert "Example predictions" not in write_report(tmp_path / "j", joint_results()).read_text(encoding="utf-8")


def test_report_shows_the_total_time(tmp_path: Path) -> None:
    page = write_report(tmp_path, make_results()).read_text(encoding="utf-8")
    run = _section(page, "Run")
    assert "<th>total time</th><td>1.03 h over 2 sessions</td>" in run
    assert "<th>training time</th><td>6.0 s</td>" in run and "<th>evaluation time</th><td>3.0 s</td>" in run
    assert "total 1.03 h over 2 sessions" in format_table(make_results())
    older = make_results(timing=Timing(6.0, 3.0, [], None))
    assert "<th>total time</th><td>n/a</td>" in write_report(tmp_path / "o", older).read_text(encoding="utf-8")


def test_unfinished_run_is_said_first(tmp_path: Path) -> None:
    results = make_results(progress=Progress(2, 3, 7, 12))
    notice = "UNFINISHED run: 2 of 3 stages, 7 of 12 evaluations"
    assert format_table(results).splitlines()[0].startswith(notice)
    page = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert f'<p class="unfinished"><strong>{notice}</strong>' in page and page.index(notice) < page.index("<h2>")
    finished = make_results()
    assert "UNFINISHED" not in format_table(finished) and "UNFINISHED" not in write_report(tmp_path, finished).read_text()


def test_format_table() -> None:
    text = format_table(make_results())
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "rs", "med", "ad", "avg", "general"]
    assert set(lines[1]) == {"-"}
    rs_row = next(line for line in lines if line.startswith("rs "))
    assert rs_row.split() == ["rs", "90.0", "-", "31.5", "60.8", "35.0"]  # avg over evaluated entries only
    assert "ACC 71.8" in text and "BWT -25.0" in text and "FWT n/a" in text
    assert "R[t][i]" in text  # not taken for markup
    table = lines[:6]  # header, rule, four rows; right-aligned numbers end in one column
    assert len({len(line) for line in table}) == 1
    assert "\x1b[" not in text  # no colour when stdout is not a terminal
    joint = format_table(joint_results()).splitlines()
    assert any(line.split()[:1] == ["joint*"] for line in joint) and "reference row" in joint[-1]
    assert joint[4] == "-" * len(joint[0])  # a rule between the matrix and the reference rows


def test_format_table_is_never_squeezed() -> None:
    """A stream of many long task names: the table grows as wide as it needs, no cell is cut."""
    names = [f"a_rather_long_task_name_{i}" for i in range(30)]
    tasks = [TaskInfo(name, "", "exact_match", 4, None, None, None) for name in names]
    wide = make_results(tasks=tasks, matrix=[[50.0] * 30, [60.0] * 30], row_labels=["base", names[0]],
                        protocols={}, per_task_forgetting=[], examples={})  # fmt: skip
    header = format_table(wide).splitlines()[0]
    assert header.split() == ["stage", *names, "avg"] and "…" not in format_table(wide)


def test_format_table_shows_the_forgetting_split() -> None:
    summary = {"forgetting": {"total": 20.0, "essential": 5.0, "superficial": 15.0}}
    part = SuperficialPart([], [], [], [], [], summary)
    text = format_table(make_results(protocols={"superficial": part}))
    assert "forgetting on old tasks 20.0 = essential 5.0 + superficial 15.0" in text


def test_protocol_sections_are_rendered_from_their_templates(tmp_path: Path) -> None:
    summary = {"tasks": [0, 1], "after_learning": {"accuracy": 90.0, "format": 95.0, "content": 92.0, "right": 90.0,
               "probe_format": 60.0, "probe_content": 70.0, "right_given_format": 94.7},
               "final": {"accuracy": 55.0, "format": 60.0, "content": 85.0, "right": 55.0, "probe_format": 50.0,
                         "probe_content": 65.0, "right_given_format": 91.7},
               "forgetting": {"total": 35.0, "essential": 7.0, "superficial": 28.0}, "format_drift": 35.0}  # fmt: skip
    grid = [[None] * 3, [88.0, None, None], [77.0, 66.0, None], [55.0, 44.0, 33.0]]
    protocols = {
        "general": GeneralPart([40.0, 35.0, 30.0, 25.0], 15.0),
        "superficial": SuperficialPart(grid, grid, grid, grid, grid, summary),
        "low_shot": LowShotPart([[5.0, 10.0, 15.0], [None, 20.0, 25.0], [None, None, 35.0], [None] * 3], 12.5),
        "my_plugin": {"score": 0.5, "per_row": [1, 2]},  # a plugin protocol without a template
    }
    page = write_report(tmp_path, make_results(protocols=protocols)).read_text(encoding="utf-8")
    superficial = _section(page, "Superficial vs essential forgetting")
    assert "Old tasks (rs, med)" in superficial and "essential (content lost) 7.0" in superficial and "94.7" in superficial
    low_shot = _section(page, "Low-shot transfer (CLiMB)")
    assert "+12.5" in low_shot and "fine-tuned from" in low_shot and ">35.0<" in low_shot
    plugin = _section(page, "my_plugin")
    assert "<th>score</th><td>0.5</td>" in plugin and "[1, 2]" in plugin


def test_method_sections_as_data(tmp_path: Path) -> None:
    sections = [
        {"title": "Router accuracy", "html": "<p id='router'>router 97%</p>"},
        {"title": "Routing", "kind": "table", "columns": ["task", "routed right <%>"], "rows": [["rs", 97.5], ["med", None]],
         "note": "share of <test> samples"},
        {"title": "Rewards", "kind": "curves", "x_label": "step", "y_label": "reward", "series": {"solver": [0.1, None, 0.3]},
         "x": [1, 2, 3], "note": "per step"},
        {"title": "Broken", "kind": "pie"},
    ]  # fmt: skip
    page = write_report(tmp_path, make_results(method_sections=sections)).read_text(encoding="utf-8")
    assert "<p id='router'>router 97%</p>" in page  # legacy html: inserted as it is
    routing = _section(page, "Routing")
    assert "routed right &lt;%&gt;" in routing and "<td>97.5</td>" in routing and "<td>none</td>" in routing
    assert "share of &lt;test&gt; samples" in routing
    rewards = _section(page, "Rewards")
    assert rewards.count("data:image/png;base64,") == 1 and "per step" in rewards
    assert "could not be shown" in _section(page, "Broken")
    assert method_section_view({"title": "t", "kind": "curves", "series": {"a": [1.0]}})["png"].startswith(PNG_MAGIC)


@pytest.mark.parametrize("fn", [plot_heatmap, plot_accuracy_curves])
def test_plots_standalone(tmp_path: Path, fn: Any) -> None:
    for results in (make_results(), joint_results()):
        out = fn(results, tmp_path / "sub" / "plot.png")
        assert Path(out).read_bytes().startswith(PNG_MAGIC)


def test_csv_reference_rows(tmp_path: Path) -> None:
    path = write_matrix_csv(joint_results(), tmp_path / "m.csv")
    assert Path(path).read_text().splitlines()[-2:] == ["joint,85.0,75.0,92.0", "ref:joint,85.0,75.0,92.0"]


def test_tolerates_an_empty_run(tmp_path: Path) -> None:
    """A run stopped before anything was evaluated: nothing but Nones."""
    empty = make_results(matrix=[[None] * 3], row_labels=["base"], metrics={}, per_task_forgetting=[], examples={},
                         stages=[StageInfo(1, "rs", False, None, None, None, None)], progress=Progress(0, 3, 0, 12),
                         timing=Timing(0.0, 0.0, [], None), protocols={}, settings={})  # fmt: skip
    assert write_report(tmp_path, empty).is_file()
    assert "n/a" in format_table(empty)


# -- from run dirs -------------------------------------------------------------------------------


def _write_run_dir(root: Path) -> Path:
    """A two-task run dir of the current layout, by hand: run.json, config.yaml, predictions, stage.json."""
    root.mkdir(parents=True)
    tasks = [{"name": t, "description": f"task {t}", "scorer": "exact_match", "max_new_tokens": 4, "chance": 0.0,
              "train_samples": 16, "test_samples": 2} for t in ("a", "b")]  # fmt: skip
    plan = {"name": "hand", "method": "seq-lora", "stream": "files", "backbone": "tiny", "seed": 0, "joint": False,
            "tasks": tasks, "stages": ["a", "b"]}  # fmt: skip
    (root / "run.json").write_text(json.dumps(plan), encoding="utf-8")
    (root / "config.yaml").write_text("name: hand\nseed: 0\nlora: {rank: 4}\n", encoding="utf-8")
    (root / "sessions.json").write_text(json.dumps({"sessions": [30.0, 12.5]}), encoding="utf-8")
    scores = {"0_base": {"a": [0, 0], "b": [0, 0]}, "1_a": {"a": [1, 1], "b": [0, 0]}, "2_b": {"a": [1, 0], "b": [1, 1]}}
    for row, by_task in scores.items():
        for task, marks in by_task.items():
            lines = [json.dumps({"meta": {"scorer": "exact_match", "n": 2, "seconds": 0.5}})]
            lines += [json.dumps({"id": f"{task}{i}", "prediction": "yes" if m else "no", "answer": "yes", "score": float(m)})
                      for i, m in enumerate(marks)]  # fmt: skip
            path = root / "predictions" / row / f"{task}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for k, label in enumerate(("a", "b"), start=1):
        stage = root / "stages" / f"{k}_{label}"
        stage.mkdir(parents=True)
        info = {"seconds": 2.0 * k, "train_samples": 16, "trainable_parameters": 99, "train_metrics": {"train_loss": 0.5 / k}}
        (stage / "stage.json").write_text(json.dumps(info), encoding="utf-8")
    return root


def test_report_of_a_collected_run_dir(tmp_path: Path) -> None:
    run_dir = _write_run_dir(tmp_path / "run")
    results = collect_results(run_dir)
    assert results.complete and [s.train_loss for s in results.stages] == [0.5, 0.25]
    page = write_report(run_dir, results).read_text(encoding="utf-8")
    assert "42.5 s over 2 sessions" in page and "UNFINISHED" not in page
    assert "lora.rank" in _section(page, "Hyperparameters")
    table = format_table(results)
    assert table.splitlines()[0].split() == ["stage", "a", "b", "avg"] and "ACC 75.0" in table


def test_old_results_json_is_rebuilt(tmp_path: Path) -> None:
    """results.json of an mmcl before the schema (no schema_version) is rebuilt from the run dir."""
    run_dir = _write_run_dir(tmp_path / "run")
    (run_dir / "results.json").write_text(json.dumps({"tasks": ["a", "b"], "matrix": [[0.0]], "metrics": {}}))
    results = load_results(run_dir)
    assert results.schema_version == SCHEMA_VERSION and results.matrix[2] == [50.0, 100.0]
    assert write_report(run_dir, results).is_file()


@pytest.mark.parametrize("run_dir", sorted(p.parent for p in FIXTURES.glob("**/run.json")), ids=str)
def test_committed_old_run_dirs_report(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    results = load_results(copy)
    assert write_report(copy, results).is_file() and format_table(results)
    assert dataclasses.asdict(results)["tasks"]
