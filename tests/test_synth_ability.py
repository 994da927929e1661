"""synth-ability: deterministic files, well-formed samples, a real train->test shift per task, references
that their own scorer accepts, and the synth_gui scorer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmcl.data.readers import read_samples
from mmcl.evaluation.scorers import score_one, synth_gui
from mmcl.streams.stream import StreamConfig, build_stream
from mmcl.synthetic.ability import (
    ABILITY_TASKS, GUI_LABELS, OCR_WORDS, AbilitySettings, ability_examples, vp_pairs, write_synth_ability,
)  # fmt: skip
from mmcl.synthetic.draw import SynthExample

SIZE = 96
SMALL = {"train_per_task": 6, "test_per_task": 6, "image_size": SIZE}
TASKS = [spec.name for spec in ABILITY_TASKS]
SCORER = {spec.name: spec.scorer for spec in ABILITY_TASKS}
BOX = re.compile(r"^\[(\d+),(\d+),(\d+),(\d+)\]$")
N_SHIFT = 48  # examples per split and task for the shift checks
Examples = dict[tuple[str, str], list[SynthExample]]


@pytest.fixture(scope="module")
def examples() -> Examples:
    return {(task, split): list(ability_examples(task, N_SHIFT, 3, split, SIZE))
            for task in TASKS for split in ("train", "test")}  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synth_ability(tmp_path_factory.mktemp("ability") / "data", seed=1, **SMALL)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    small = {"train_per_task": 3, "test_per_task": 3, "image_size": SIZE}
    first = _files(write_synth_ability(tmp_path / "a", seed=7, **small))
    assert first == _files(write_synth_ability(tmp_path / "b", seed=7, **small))
    other = _files(write_synth_ability(tmp_path / "c", seed=8, **small))
    for task in TASKS:
        assert first[f"{task}/test.json"] != other[f"{task}/test.json"]
        assert first[f"{task}/images/{task}-train-00001.png"] != other[f"{task}/images/{task}-train-00001.png"]


def test_cached_folder_is_reused_and_other_settings_regenerate(tmp_path: Path) -> None:
    small = {"train_per_task": 2, "test_per_task": 2, "image_size": SIZE}
    folder = write_synth_ability(tmp_path / "d", seed=0, **small)
    stamp = (folder / "ocr" / "test.json").stat().st_mtime_ns
    assert write_synth_ability(tmp_path / "d", seed=0, **small) == folder
    assert (folder / "ocr" / "test.json").stat().st_mtime_ns == stamp
    write_synth_ability(tmp_path / "d", seed=0, settings=AbilitySettings(fixed_option_order=True), **small)
    assert '"fixed_option_order": true' in (folder / "manifest.json").read_text()


def _check_answer(task: str, answer: str, prompt: str) -> None:
    options = re.findall(r"^([A-D])\. ", prompt, re.MULTILINE)
    if task == "ocr":
        assert answer.strip() == answer and answer and not options
    elif task == "math":
        assert (answer in options and len(options) == 4) or (re.fullmatch(r"\d+", answer) and not options)
    elif task == "vp":
        assert answer in options and len(options) == (4 if "How many" in prompt else 2)
    else:
        box = BOX.match(answer)
        if box:
            x1, y1, x2, y2 = map(int, box.groups())
            assert 0 <= x1 < x2 < SIZE and 0 <= y1 < y2 < SIZE and not options
        else:
            assert answer in options and len(options) == 4


def test_samples_are_well_formed(root: Path) -> None:
    for spec in ABILITY_TASKS:
        for split in ("train", "test"):
            samples = read_samples(root / spec.name / f"{split}.json", spec.name, split=split)
            assert len(samples) == 6
            for sample in samples:
                assert len(sample.images) == 1 and sample.prompt.startswith("<image>\n")
                assert sample.prompt.count("<image>") == 1
                with Image.open(sample.images[0]) as image:
                    assert image.size == (SIZE, SIZE) and image.mode == "RGB"
                _check_answer(spec.name, sample.answer, sample.prompt)


def test_registered_stream_builds_the_four_tasks_in_mllm_cl_order(tmp_path: Path) -> None:
    options = {"train_per_task": 2, "test_per_task": 2}
    tasks = build_stream(StreamConfig(name="synth-ability", options=options, cache_dir=str(tmp_path)), tmp_path)
    assert [(t.name, t.scorer) for t in tasks] == [
        ("ocr", "mllm_cl_ocr"), ("math", "mllm_cl_math"), ("vp", "option_letter"), ("gui", "synth_gui"),
    ]  # fmt: skip
    assert all(len(t.test_samples) == 2 for t in tasks)


def test_every_reference_is_accepted_by_its_own_scorer(examples: Examples) -> None:
    for (task, _), batch in examples.items():
        for example in batch:
            assert score_one(SCORER[task], example.answer, example.answer) == 1.0, (task, example.answer)
            _check_answer(task, example.answer, example.question)


def _option(example: SynthExample) -> str:
    return example.facts["options"]["ABCD".index(example.answer)]


def test_answers_follow_from_the_scene(examples: Examples) -> None:
    for split in ("train", "test"):
        for example in examples[("math", split)]:
            facts = example.facts
            value = _option(example) if example.qtype.endswith("-mc") else example.answer
            if example.qtype.startswith("arithmetic"):
                sign = 1 if facts["operator"] == "+" else -1
                assert int(value) == facts["a"] + sign * facts["b"] >= 0
            elif example.qtype.startswith("table"):
                assert int(value) == sum(facts["rows"][-1])
            elif example.qtype.startswith("sequence"):
                assert int(value) == 2 * facts["terms"][-2] - facts["terms"][-3]
            elif example.qtype.startswith("pie"):
                assert value == facts["colors"][facts["weights"].index(max(facts["weights"]))]
        for example in examples[("vp", split)]:
            objects, target = example.facts["objects"], _option(example)
            assert target == example.facts["target"]
            if example.qtype == "count":
                color, shape = re.search(r"How many (\w+) (\w+?)e?s are", example.question).groups()
                assert int(target) == sum(o["color"] == color and o["shape"].startswith(shape) for o in objects)
            elif example.qtype in ("size", "depth"):  # two named objects, in the order of the options
                names = [f"the {o['color']} {o['shape']}" for o in objects]
                named = [names.index(option) for option in example.facts["options"]]
                assert example.question.index(example.facts["options"][0]) < example.question.index(
                    example.facts["options"][1])
                sides = [o["box"][2] - o["box"][0] for o in objects]
                truth = max(named, key=lambda i: sides[i]) if example.qtype == "size" else max(named)  # drawn last
                assert target == names[truth] and (example.qtype == "depth" or sides[truth] == max(sides))
            else:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = (o["box"] for o in objects)
                dx, dy = (ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2
                axis = ["left", "right"] if abs(dx) > abs(dy) else ["above", "below"]
                assert example.facts["options"] == axis
                assert target == (axis[0] if (dx if axis[0] == "left" else dy) < 0 else axis[1])
        for example in examples[("gui", split)]:
            (element,) = [e for e in example.facts["elements"] if e["label"] == example.facts["target"]]
            x1, y1, x2, y2 = element["box"]
            if example.qtype == "box":
                assert example.answer == f"[{x1},{y1},{x2},{y2}]"
            else:
                assert _option(example).endswith(f"({(x1 + x2) // 2}, {(y1 + y2) // 2})")
                assert len(set(example.facts["options"])) == 4


def _facts(batch: list[SynthExample], key: str) -> set[Any]:
    return {example.facts[key] for example in batch}


def test_ocr_test_renderings_and_strings_are_unseen(examples: Examples) -> None:
    train, test = examples[("ocr", "train")], examples[("ocr", "test")]
    assert not {e.answer.lower() for e in test} & {e.answer.lower() for e in train}
    train_words = set(OCR_WORDS["train"])
    assert not any(word in train_words for e in test for word in e.answer.lower().split())
    assert max(_facts(train, "length")) < min(_facts(test, "length"))
    assert not _facts(train, "font_px") & _facts(test, "font_px")
    assert _facts(train, "stroke_px") == {0} and 1 in _facts(test, "stroke_px")
    assert _facts(train, "shear") == {0.0} and min(abs(s) for s in _facts(test, "shear")) >= 0.15
    assert not _facts(train, "colors") & _facts(test, "colors")


def test_math_test_ranges_and_layouts_are_harder(examples: Examples) -> None:
    def by_kind(split: str, kind: str) -> list[dict[str, Any]]:
        return [e.facts for e in examples[("math", split)] if e.qtype.startswith(kind)]

    for kind in ("arithmetic", "bar", "pie", "sequence", "table"):
        train_layouts = {f["layout"] for f in by_kind("train", kind)}
        assert train_layouts and not train_layouts & {f["layout"] for f in by_kind("test", kind)}
    train_operands = [v for f in by_kind("train", "arithmetic") for v in (f["a"], f["b"])]
    assert max(train_operands) < min(v for f in by_kind("test", "arithmetic") for v in (f["a"], f["b"]))
    for key in ("values", "weights"):
        kind = "bar" if key == "values" else "pie"
        assert max(len(f[key]) for f in by_kind("train", kind)) < min(len(f[key]) for f in by_kind("test", kind))
    assert max(max(f["values"]) for f in by_kind("train", "bar")) < min(min(f["values"]) for f in by_kind("test", "bar"))
    formats = {split: {e.qtype.rsplit("-", 1)[1] for e in examples[("math", split)]} for split in ("train", "test")}
    assert formats == {"train": {"mc", "free"}, "test": {"mc", "free"}}


def test_vp_test_counts_and_pairs_are_unseen(examples: Examples) -> None:
    def counts(split: str) -> set[int]:
        return {int(_option(e)) for e in examples[("vp", split)] if e.qtype == "count"}

    assert max(counts("train")) < min(counts("test"))
    train_pairs = set(vp_pairs("train"))
    assert not train_pairs & set(vp_pairs("test")) and len(train_pairs) == 8
    for example in examples[("vp", "test")]:
        assert not any((o["shape"], o["color"]) in train_pairs for o in example.facts["objects"])
    assert {(o["shape"], o["color"]) for e in examples[("vp", "train")] for o in e.facts["objects"]} <= train_pairs


def test_gui_test_labels_and_layouts_are_unseen(examples: Examples) -> None:
    assert not set(GUI_LABELS["train"]) & set(GUI_LABELS["test"])
    train, test = examples[("gui", "train")], examples[("gui", "test")]
    train_labels = {e["label"] for x in train for e in x.facts["elements"]}
    assert not train_labels & {e["label"] for x in test for e in x.facts["elements"]}
    assert not _facts(train, "layout") & _facts(test, "layout")
    assert {e.qtype for e in train} == {e.qtype for e in test} == {"action", "box"}
    boxes = [e.answer for e in train if e.qtype == "box"]
    assert len(set(boxes)) > len(boxes) // 3  # element counts and sizes vary within a layout


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("B", "B", 1.0),
        ("(B) tap (40, 12)", "B", 1.0),
        ("The answer is C", "B", 0.0),
        ("", "B", 0.0),
        ("[10,20,50,60]", "[10,20,50,60]", 1.0),
        ("The box is [10, 20, 50, 60].", "[10,20,50,60]", 1.0),
        ("[10,20,50,40]", "[10,20,50,60]", 1.0),  # IoU exactly 0.5 counts (>= 0.5)
        ("[10,20,50,39]", "[10,20,50,60]", 0.0),  # IoU 0.475
        ("[60,70,90,95]", "[10,20,50,60]", 0.0),  # no overlap
        ("[50,60,10,20]", "[10,20,50,60]", 0.0),  # inverted corners
        ("B", "[10,20,50,60]", 0.0),
        ("[10,20,50,60]", "B", 0.0),
    ],
)
def test_synth_gui_scores_letters_by_option_rule_and_boxes_by_iou(prediction: str, reference: str,
                                                                  expected: float) -> None:
    assert synth_gui(prediction, reference) == expected
    assert score_one("synth_gui", prediction, reference) == expected


@pytest.mark.parametrize(
    "named, expected",
    [({}, "tiny-reader"), ({"backbone.name": "tiny-llava"}, "tiny-llava")],
)
def test_synth_ability_runs_on_tiny_reader_unless_a_backbone_is_named(named: dict[str, Any], expected: str) -> None:
    from mmcl.cli import _stream_backbone
    from mmcl.config import load_config

    config = load_config(None, {"stream.name": "synth-ability", **named})
    _stream_backbone(config, named=bool(named))
    assert config.backbone.name == expected
    other = load_config(None, {"stream.name": "synth-domain"})
    _stream_backbone(other, named=False)
    assert other.backbone.name == "tiny-llava"


def test_tiny_reader_general_set_holds_shapes_and_reading_questions(tmp_path: Path) -> None:
    from mmcl.config import BackboneConfig, EvaluationConfig
    from mmcl.evaluation.general import general_task

    task = general_task(EvaluationConfig(), BackboneConfig(name="tiny-reader"), StreamConfig(cache_dir=str(tmp_path)),
                        tmp_path)  # fmt: skip
    samples = read_samples(task.test_file, "general", split="test")
    qtypes = {sample.metadata["qtype"] for sample in samples}
    assert {"read", "char", "length", "color", "count"} <= qtypes and "caption" not in qtypes
    assert all(Image.open(sample.images[0]).size == (96, 96) for sample in samples[::50])


def test_shifted_test_zero_draws_test_sets_from_the_training_profiles(tmp_path: Path) -> None:
    options = {"train_per_task": 2, "test_per_task": 8, "shifted_test": 0}
    iid = build_stream(StreamConfig(name="synth-ability", options=options, cache_dir=str(tmp_path)), tmp_path)
    assert iid[0].test_file.parent.parent.name.endswith("-iid-test")
    words = {w.lower() for w in OCR_WORDS["train"]}
    ocr = read_samples(iid[0].test_file, "ocr", split="test")
    assert any(s.answer.lower() in words for s in ocr)
    train_pairs = {f"{c} {s}" for s, c in vp_pairs("train")}
    vp = read_samples(iid[2].test_file, "vp", split="test")
    assert all(any(pair in s.prompt for pair in train_pairs) for s in vp if "How many" in s.prompt)
    train_ids = {s.id for s in read_samples(iid[0].train_file, "ocr")}
    assert train_ids.isdisjoint({s.id for s in ocr})


def test_a_seq_lora_run_of_synth_ability_scores_every_task_with_its_own_scorer(
    tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path
) -> None:
    """The stream end to end through ``mmcl run`` on a named backbone (the tests' tiny model, which cannot read),
    so the run's plumbing is checked without tiny-reader's weights: four stages in MLLM-CL's order, every cell
    of the lower triangle scored, and each task's chance taken from its own answers."""
    from conftest import make_stream_config, write_config
    from test_runner import invoke, prediction_records, read_json

    stream = {"name": "synth-ability", "options": {"train_per_task": 4, "test_per_task": 8},
              "cache_dir": str(stream_cache_dir)}  # fmt: skip
    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "run", stream=stream,
                                training={"epochs": 1, "batch_size": 4, "progress_bar": False})  # fmt: skip
    result = invoke(["run", str(write_config(tmp_path / "ability.yaml", config))])
    assert result.code == 0, result.err
    results = read_json(tmp_path / "run" / "results.json")
    assert results["row_labels"] == ["base", *TASKS]
    assert all(results["matrix"][t][i] is not None for t in range(5) for i in range(4) if t == 0 or i < t)
    tasks = {task["name"]: task for task in results["tasks"]}
    assert {name: task["scorer"] for name, task in tasks.items()} == SCORER
    assert tasks["ocr"]["chance"] == 0  # open answers
    assert 25 < tasks["vp"]["chance"] < 50  # four count options, two for the other kinds
    assert 0 < tasks["gui"]["chance"] < 25  # a letter among four, or an open box
    meta, _ = prediction_records(tmp_path / "run" / "predictions" / "4_gui" / "gui.jsonl")
    assert (meta["scorer"], meta["n"]) == ("synth_gui", 8)
