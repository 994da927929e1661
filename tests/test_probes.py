"""The evaluations beside the accuracy matrix: the general-ability set and the superficial-forgetting
probes (format and content judged apart), as pure functions and through ``mmcl run``."""

from __future__ import annotations

import json

from pathlib import Path

import pytest

from conftest import make_stream_config, write_config
from mmcl.data.sample import Sample
from mmcl.evaluation.superficial import content_ok, format_ok, judge, make_probes, original_info, summarize
from test_runner import TRAINING, invoke, read_json

MC_PROMPT = "<image>\nWhich shape?\nA. circle\nB. square\nC. cross\nD. star\nAnswer with the option's letter from the given choices directly."


def sample(sample_id: str, prompt: str, answer: str, qtype: str) -> Sample:
    return Sample(sample_id, "t", (), prompt, answer, metadata={"qtype": qtype})


@pytest.mark.parametrize(
    ("prediction", "style", "content", "expected"),
    [
        ("B", "mc", "", True),
        ("(C) cross", "mc", "", True),
        ("E", "mc", "", False),  # not an offered letter
        ("square", "mc", "", False),
        ("3", "short", "2", True),
        ("no", "short", "2", False),  # a yes/no answer to a counting question has the wrong form
        ("green", "short", "red", True),
        ("7", "short", "red", False),
        ("B", "short", "square", False),  # a bare option letter is not an open answer
        ("yes, it is", "yesno", "", True),
        ("2", "yesno", "", False),
        ("no", "brief", "no", False),
        ("No, the scan shows no bright lesion at all.", "brief", "no", True),
    ],
)
def test_format_rules(prediction: str, style: str, content: str, expected: bool) -> None:
    assert format_ok(prediction, style, "ABCD", content) is expected


def test_content_is_judged_whatever_the_format() -> None:
    options = {"A": "circle", "B": "square", "C": "cross", "D": "star"}
    assert content_ok("B", "mc", "square", "B", options, options)
    assert not content_ok("A", "mc", "square", "B", options, options)
    assert content_ok("it is a square", "mc", "square", "B", options, options)  # right content, wrong form
    assert content_ok("B", "short", "square", "square", {}, options)  # old-style letter naming the right option
    assert not content_ok("A", "short", "square", "square", {}, options)
    assert content_ok("There are three.", "short", "3", "3", {}, {})
    assert not content_ok("13", "short", "3", "3", {}, {})
    assert content_ok("No, nothing bright is there.", "brief", "no", "no", {}, {})
    assert not content_ok("Yes, on the left.", "brief", "no", "no", {}, {})


def test_probes_ask_another_style_with_the_same_content() -> None:
    samples = [
        sample("c1", "<image>\nHow many cars?", "2", "count"),
        sample("c2", "<image>\nHow many cars?", "3", "count"),
        sample("c3", "<image>\nHow many cars?", "1", "count"),
        sample("c4", "<image>\nHow many cars?", "4", "count"),
        sample("s1", "<image>\nWhich side?", "left", "side"),
        sample("s2", "<image>\nWhich side?", "right", "side"),
        sample("m1", MC_PROMPT, "C", "shape"),
        sample("y1", "<image>\nIs there a lesion?", "yes", "lesion"),
    ]
    probes = {p.id: p for p in make_probes(samples, "t")}
    assert [probes[i].metadata["probe"]["style"] for i in ("c1", "s1", "m1", "y1")] == ["mc", "yesno", "short", "brief"]
    count = probes["c1"].metadata["probe"]
    assert count["options"][count["answer"]] == "2" and len(count["options"]) == 4
    assert judge(count["answer"], count) == (True, True)
    assert probes["m1"].answer == "cross" and "letter" not in probes["m1"].prompt
    assert probes["s1"].answer in ("yes", "no") and "Is the answer" in probes["s1"].prompt
    assert probes == {p.id: p for p in make_probes(samples, "t")}  # deterministic
    # the trained answer itself is right in form and content
    for s in samples:
        assert judge(s.answer, original_info(s)) == (True, True)


def test_summary_splits_forgetting_into_essential_and_superficial() -> None:
    def rates(fmt: float, content: float, right: float) -> dict[str, float]:
        return {"format": fmt, "content": content, "right": right, "probe_format": 0.0, "probe_content": 0.0}

    # the matrix holds the task scorer's numbers (here a soft score on another scale); the split uses
    # only the judge's: right (format and content) fell 80 -> 20, content 80 -> 50
    matrix = [[0.0, 0.0], [35.0, 10.0], [12.0, 90.0]]
    table = [[None, None], [rates(100, 80, 80), None], [rates(40, 50, 20), rates(100, 90, 90)]]
    summary = summarize(matrix, table)
    assert summary is not None and summary["tasks"] == [0]
    # right answers fell 60 points; content only 30: the other 30 are answers with the right content in the wrong form
    assert summary["forgetting"] == {"total": 60.0, "essential": 30.0, "superficial": 30.0}
    assert summary["after_learning"]["accuracy"] == 35.0 and summary["final"]["accuracy"] == 12.0  # shown beside
    assert summary["final"]["format"] == 40.0
    assert summary["format_drift"] == 60.0  # 100% of the answers in the asked form, then 40%
    assert summary["after_learning"]["right_given_format"] == 80.0 and summary["final"]["right_given_format"] == 50.0
    assert summarize(matrix[:2], table[:2]) is None  # one stage: nothing is old yet


def test_right_is_format_and_content_of_the_same_answer(tmp_path: Path) -> None:
    from mmcl.evaluation.superficial import judged_rates

    own = {"style": "short", "content": "red", "answer": "red", "options": {}, "original_options": {}}
    probe = {"style": "yesno", "content": "red", "answer": "yes", "options": {}, "original_options": {}}
    records = [
        {"id": "1", "own": own, "prediction": "red", "probe": probe, "probe_prediction": "yes"},  # right
        {"id": "2", "own": own, "prediction": "It is red, I am quite sure of it.", "probe": probe,
         "probe_prediction": "no"},  # content, wrong format
        {"id": "3", "own": own, "prediction": "blue", "probe": probe, "probe_prediction": "yes"},  # format only
    ]  # fmt: skip
    path = tmp_path / "judged.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    rates = judged_rates(path)
    assert rates["format"] == pytest.approx(200 / 3) and rates["content"] == pytest.approx(200 / 3)
    assert rates["right"] == pytest.approx(100 / 3) and rates["probe_content"] == pytest.approx(200 / 3)


def test_run_evaluates_general_set_probes_and_low_shot(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path) -> None:
    """The extra evaluations fill their own files and leave the accuracy matrix exactly as a plain run's
    (low-shot fine-tuning restores each stage's state before training goes on)."""
    from mmcl.streams.stream import StreamConfig, build_stream

    options = {"train_per_task": 8, "test_per_task": 4}
    tasks = build_stream(StreamConfig(options=options, cache_dir=str(stream_cache_dir)), Path.cwd())
    general_file = tasks[0].test_file  # any held-out test file works as a general set
    stream = {"name": "synth-domain", "options": options, "cache_dir": str(stream_cache_dir)}
    config = make_stream_config(
        tiny_model_dir, stream_cache_dir, tmp_path / "run", training=dict(TRAINING),
        stream={**stream}, evaluation={"batch_size": 8, "forward_transfer": False, "superficial": True,
                                       "general": str(general_file), "low_shot": 4},
    )  # fmt: skip
    result = invoke(["run", str(write_config(tmp_path / "c.yaml", config))])
    assert result.code == 0, result.err
    run_dir = tmp_path / "run"
    results = read_json(run_dir / "results.json")
    plain_config = dict(config, evaluation={"batch_size": 8, "forward_transfer": False, "general": "none"},
                        output_dir=str(tmp_path / "plain"))  # fmt: skip
    plain = invoke(["run", str(write_config(tmp_path / "plain.yaml", plain_config))])
    assert plain.code == 0, plain.err
    assert results["matrix"] == read_json(tmp_path / "plain" / "results.json")["matrix"]

    low_shot = results["protocols"]["low_shot"]["matrix"]
    assert all(value is not None for value in low_shot[0])  # from the base model: every task is unseen
    assert low_shot[2][:2] == [None, None] and all(value is not None for value in low_shot[2][2:])
    assert low_shot[5] == [None] * 5
    gains = [low_shot[r][j] - low_shot[0][j] for r in range(1, 5) for j in range(r, 5)]
    assert results["metrics"]["low_shot_transfer"] == pytest.approx(sum(gains) / len(gains))
    assert "Low-shot transfer (CLiMB)" in (run_dir / "report.html").read_text(encoding="utf-8")
    scores = results["protocols"]["general"]["scores"]
    assert len(scores) == 6 and all(value is not None for value in scores)
    assert results["metrics"]["general_drop"] == pytest.approx(scores[0] - scores[-1])
    assert (run_dir / "general" / "3_ad.jsonl").is_file()
    superficial = results["protocols"]["superficial"]
    assert superficial["format"][0] == [None] * 5  # no probes for the base model
    assert all(value is not None for value in superficial["content"][5])
    assert superficial["content"][2][2:] == [None, None, None]  # unseen tasks are not probed
    assert (run_dir / "superficial" / "5_fin" / "rs.jsonl").is_file()
    split = superficial["summary"]["forgetting"]
    assert split["total"] == pytest.approx(split["essential"] + split["superficial"])
    assert "Superficial vs essential forgetting" in (run_dir / "report.html").read_text(encoding="utf-8")
    assert "forgetting on old tasks" in result.out

    bad = dict(config, evaluation={"general": str(tmp_path / "missing.json")}, output_dir=str(tmp_path / "r2"))
    missing = invoke(["run", str(write_config(tmp_path / "bad.yaml", bad))])
    assert missing.code == 2 and "evaluation.general.set: test file not found" in missing.err
