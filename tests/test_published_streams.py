"""Readers for the published benchmark layouts (``coin``, ``mllm-cl-domain``, ``mllm-cl-ability``,
``climb``): a few records written in each published layout under a temporary root, converted where the
layout needs it, run end to end with ``mmcl run`` on the tiny model, and missing files named exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import make_stream_config, write_config
from mmcl.streams.climb import CLIMB_RANDOM_SCORES
from mmcl.streams.stream import StreamConfig, build_stream
from mmcl.errors import ConfigError, DataError
from mmcl.evaluation.scorers import score_one
from test_runner import invoke, read_json

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40)]
QUICK = {"max_steps": 1, "batch_size": 4, "progress_bar": False, "learning_rate": 0.02, "warmup_ratio": 0.0}
QUICK_EVAL = {"batch_size": 4, "limit": 2, "forward_transfer": False, "evaluate_base": False}


def png(path: Path, index: int) -> str:
    """A tiny one-colour image (PNG, or JPEG when the name ends with .jpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), COLOURS[index % len(COLOURS)]).save(path)
    return path.name


def dump(path: Path, data: Any, lines: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(item) for item in data) + "\n" if lines else json.dumps(data)
    path.write_text(text, encoding="utf-8")


def conversation(record_id: str, image: str | list[str] | None, question: str, answer: str) -> dict[str, Any]:
    record: dict[str, Any] = {"id": record_id, "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


# ---------------------------------------------------------------------------------------------- layouts


def write_coin(root: Path, tasks: tuple[str, ...] = ("ScienceQA", "TextVQA", "VizWiz"), asd: bool = False) -> Path:
    """CoIN as SEFE arranges it: annotations/<Task>/{train,test}.json, images relative to the root,
    answers of ScienceQA and TextVQA kept in their separate official files."""
    for task in tasks:
        folder = {"ScienceQA": "ScienceQA/images", "TextVQA": "TextVQA/train_images", "VizWiz": "VizWiz/val"}[task]
        train, test = [], []
        for i in range(3):
            image = f"{folder}/{task}_{i}.png"
            png(root / image, i)
            answer = {"ScienceQA": "AB"[i % 2], "TextVQA": "stop", "VizWiz": "red"}[task]
            train.append(conversation(f"{task}-t{i}", image, f"What is shown? ({task})", answer))
            test.append({"question_id": f"{task}-q{i}", "image": image, "text": "What is shown?"})
        if task == "VizWiz":
            for record in test:
                record["answer"] = "red"
        dump(root / "annotations" / task / ("train_x20.json" if asd else "train.json"), train)
        dump(root / "annotations" / task / "test.json", test)
    if "ScienceQA" in tasks:
        problems = {f"ScienceQA-q{i}": {"answer": i % 2, "choices": ["yes", "no"]} for i in range(3)}
        dump(root / "ScienceQA" / "problems.json", problems)
    if "TextVQA" in tasks:
        answers = ["stop"] * 7 + ["stop sign"] * 3
        dump(root / "TextVQA" / "TextVQA_0.5.1_val.json",
             {"data": [{"question_id": f"TextVQA-q{i}", "answers": answers} for i in range(3)]})
    return root


def write_mllm_cl_domain(root: Path, tasks: tuple[str, ...] = ("RS", "Fin")) -> Path:
    for task in tasks:
        train, test = [], []
        for i in range(3):
            png(root / task / "images" / f"{i}.png", i)
            train.append(conversation(f"{task}-t{i}", f"images/{i}.png", "Which colour?", "red"))
            test.append({"question_id": f"{task}-q{i}", "image": f"images/{i}.png", "text": "Which colour?",
                         "answer": "red"})
        dump(root / task / "train.json", train)
        dump(root / task / "test.json", test)
    png(root / "num5sample_images20" / "0.png", 0)
    dump(root / "task5replay20_train.json", [conversation("r0", "num5sample_images20/0.png", "Which colour?", "red")])
    dump(root / "task5Router_train20.json", [conversation("s0", "num5sample_images20/0.png", "Which expert?", "A")])
    return root


def write_mllm_cl_ability(root: Path, tasks: tuple[str, ...] = ("OCR", "Math")) -> Path:
    """Ability layout: <Task>/train.json and a separate <Task>_test/test.json with its own images;
    OCR lists several accepted answers, Math uses MathVista's multiple-choice fields."""
    for task in tasks:
        train, test = [], []
        for i in range(3):
            png(root / task / "images" / f"{i}.png", i)
            png(root / f"{task}_test" / "images" / f"{i}.png", i + 1)
            train.append(conversation(f"{task}-t{i}", f"images/{i}.png", "Read it.", "open"))
            record = {"question_id": f"{task}-q{i}", "image": f"images/{i}.png", "text": "Read it."}
            if task == "OCR":
                record["answer"] = ["open", "opened"]
            elif task == "Math":
                record.update(answer="12", question_type="multi_choice", answer_option="B", choices=["10", "12"])
            else:
                record["answer"] = "open"
            test.append(record)
        dump(root / task / "train.json", train)
        dump(root / f"{task}_test" / "test.json", test)
    return root


def write_climb(root: Path) -> Path:
    """CLiMB's raw layouts: VQAv2 question/annotation files + COCO images, NLVR2 JSON lines + image
    pairs, SNLI-VE JSON lines + Flickr30K images, VCR JSON lines + drawn images."""
    for split, tag in (("train", "train"), ("val", "val")):
        questions, annotations = [], []
        for i in range(2):
            image_id = 100 + i + (10 if split == "val" else 0)
            png(root / "ms-coco" / "images" / f"{image_id:012d}.jpg", i)
            questions.append({"question_id": image_id * 10, "image_id": image_id, "question": "What colour?"})
            answers = [{"answer": "red"}] * 8 + [{"answer": "pink"}] * 2
            annotations.append({"question_id": image_id * 10, "image_id": image_id, "multiple_choice_answer": "red",
                                "answers": answers})
        dump(root / "vqav2" / f"v2_OpenEnded_mscoco_{tag}2014_questions.json", {"questions": questions})
        dump(root / "vqav2" / f"v2_mscoco_{tag}2014_annotations.json", {"annotations": annotations})
    for split in ("train", "dev"):
        lines = []
        for i in range(3):
            identifier = f"{split}-{i}-0-{i}"
            for k in (0, 1):
                png(root / "nlvr2" / "images" / split / f"{split}-{i}-0-img{k}.png", i + k)
            lines.append({"identifier": identifier, "sentence": "Both images are red.", "label": "True" if i % 2 else "False"})
        dump(root / "nlvr2" / "data" / f"{split}.json", lines, lines=True)
        snli = [{"Flickr30K_ID": str(500 + i), "sentence2": "A red square.", "gold_label": "entailment",
                 "pairID": f"{split}-{i}"} for i in range(3)]
        dump(root / "snli-ve" / f"snli_ve_{split}.jsonl", snli, lines=True)
    for i in range(3):
        png(root / "flickr30k" / "flickr30k_images" / f"{500 + i}.jpg", i)
    for split in ("train", "val"):
        lines = []
        for i in range(3):
            annot_id = f"{split}-{i}"
            png(root / "vcr" / "drawn_images" / "bbox" / split / "answer" / f"{annot_id}.jpg", i)
            lines.append({"annot_id": annot_id, "objects": ["person", "dog"], "question": ["Why", "is", [0], "here", "?"],
                          "answer_choices": [[[1], "ran"], ["nothing"], ["it", "rains"], ["to", "eat"]], "answer_label": i % 4})
        dump(root / "vcr" / "annotation" / f"{split}.jsonl", lines, lines=True)
    return root


# ---------------------------------------------------------------------------------------------- runs


def run_stream(tmp_path: Path, model_dir: Path, name: str, root: Path, tasks: list[str]):
    config = make_stream_config(model_dir, tmp_path / "cache", tmp_path / "run", training=dict(QUICK),
                                evaluation=dict(QUICK_EVAL))
    config["stream"] = {"name": name, "options": {"root": str(root), "tasks": tasks}, "cache_dir": str(tmp_path / "cache")}
    result = invoke(["run", str(write_config(tmp_path / "experiment.yaml", config))])
    assert result.code == 0, result.err
    results = read_json(tmp_path / "run" / "results.json")
    return results


@pytest.mark.parametrize(
    ("stream", "writer", "scorers"),
    [
        ("coin", write_coin, {"ScienceQA": "coin_scienceqa", "TextVQA": "textvqa_accuracy"}),
        ("mllm-cl-domain", write_mllm_cl_domain, {"RS": "mllm_cl_ai2d", "Fin": "mllm_cl_finvis"}),
        ("mllm-cl-ability", write_mllm_cl_ability, {"OCR": "mllm_cl_ocr", "Math": "mllm_cl_math"}),
        ("climb", write_climb, {"nlvr2": "yes_no", "vcr": "option_letter"}),
    ],
)
def test_run_completes_on_published_layout(tmp_path: Path, tiny_model_dir: Path, stream, writer, scorers) -> None:
    root = writer(tmp_path / "data")
    results = run_stream(tmp_path, tiny_model_dir, stream, root, list(scorers))
    assert [task["name"] for task in results["tasks"]] == list(scorers)
    assert results["matrix"][2][0] is not None and results["matrix"][2][1] is not None
    predictions = sorted((tmp_path / "run" / "predictions").rglob("*.jsonl"))
    assert [p.stem for p in predictions if p.parent.name.startswith("2_")] == sorted(scorers)
    for path in predictions:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert lines[0]["meta"]["scorer"] == scorers[path.stem]
        assert lines[0]["meta"]["n"] == 2 and len(lines) == 3  # evaluation.limit = 2
        if path.stem in ("TextVQA", "OCR"):  # all accepted answers reach the scorer
            assert all(isinstance(line["answer"], list) and len(line["answer"]) > 1 for line in lines[1:])
    if stream == "climb":  # CLiMB states its chance scores; T_F is normalised by them
        assert {task["name"]: task["chance"] for task in results["tasks"]} == {name: CLIMB_RANDOM_SCORES[name] for name in scorers}
    else:
        assert all(task["chance"] is not None for task in results["tasks"])


# ---------------------------------------------------------------------------------------------- readers


def build(tmp_path: Path, name: str, **options: Any):
    return build_stream(StreamConfig(name=name, options=options, cache_dir=str(tmp_path / "cache")), Path.cwd())


def test_coin_reads_answers_from_official_files_and_points_at_matching_files(tmp_path: Path) -> None:
    root = write_coin(tmp_path / "data")
    tasks = build(tmp_path, "coin", root=str(root), tasks=["ScienceQA", "TextVQA", "VizWiz"])
    by_name = {task.name: task for task in tasks}
    assert [t.scorer for t in tasks] == ["coin_scienceqa", "textvqa_accuracy", "coin_vizwiz"]
    assert by_name["VizWiz"].test_file == root / "annotations" / "VizWiz" / "test.json"  # read in place
    assert by_name["VizWiz"].train_file == root / "annotations" / "VizWiz" / "train.json"
    sqa = by_name["ScienceQA"].test_samples
    assert [s.answer for s in sqa] == ["A", "B", "A"]  # problems.json answer index -> letter
    assert sqa[0].prompt.endswith("\nAnswer with the option's letter from the given choices directly.")
    assert sqa[0].images == (root / "ScienceQA" / "images" / "ScienceQA_0.png",)
    textvqa = by_name["TextVQA"].test_samples[0]
    assert textvqa.answer == "stop" and textvqa.reference == ["stop"] * 7 + ["stop sign"] * 3
    assert score_one("textvqa_accuracy", "stop sign", textvqa.reference) == pytest.approx(0.9)
    # the conversion is cached: an unchanged root is not converted again
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.json")}
    build(tmp_path, "coin", root=str(root), tasks=["ScienceQA", "TextVQA"])
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.json")} == before


def test_coin_asd_trains_on_coin_asd_files(tmp_path: Path) -> None:
    root = write_coin(tmp_path / "data", tasks=("VizWiz",), asd=True)
    (task,) = build(tmp_path, "coin", root=str(root), tasks=["VizWiz"], asd=True)
    assert task.train_file.name == "train_x20.json" and len(task.train_samples) == 3
    with pytest.raises(ConfigError, match=r"stream.options.asd: expected true/false or the CoIN-ASD X"):
        build(tmp_path, "coin", root=str(root), tasks=["VizWiz"], asd="yes")


def test_mllm_cl_exposes_replay_and_router_files_and_converts_answer_lists(tmp_path: Path) -> None:
    root = write_mllm_cl_domain(tmp_path / "dom")
    rs, fin = build(tmp_path, "mllm-cl-domain", root=str(root), tasks=["RS", "Fin"])
    assert rs.test_file == root / "RS" / "test.json" and rs.scorer == "mllm_cl_ai2d" and fin.scorer == "mllm_cl_finvis"
    assert dict(rs.extra_files) == {"replay": root / "task5replay20_train.json",
                                    "router_train": root / "task5Router_train20.json",
                                    "sample_images": root / "num5sample_images20"}
    root = write_mllm_cl_ability(tmp_path / "ab")
    ocr, math = build(tmp_path, "mllm-cl-ability", root=str(root), tasks=["OCR", "Math"])
    assert ocr.extra_files == () and ocr.test_file.parent != root / "OCR_test"  # converted into the cache
    first = ocr.test_samples[0]
    assert first.reference == ["open", "opened"]
    assert first.images == (root / "OCR_test" / "images" / "0.png",)  # the test set's own images
    assert ocr.train_samples[0].images == (root / "OCR" / "images" / "0.png",)
    assert math.scorer == "mllm_cl_math" and math.test_samples[0].answer == "B"  # answer_option of multi_choice


def test_mllm_cl_sci_and_ocr_references_carry_the_rule_of_their_script(tmp_path: Path) -> None:
    """eval_sci.py picks its rule from the image name and the question, eval_ocr.py from the category:
    the converted references are tagged with it, and the training answer stays plain."""
    from mmcl.evaluation.published_scorers import OCR_HME, SCI_CONTAINS, SCI_EXACT, SCI_STATES

    root = write_mllm_cl_domain(tmp_path / "dom", tasks=("Sci",))
    dump(root / "Sci" / "test.json", [
        {"question_id": "s0", "image": "images/AI2D_0.png", "text": "Which label is the sun?", "answer": "A"},
        {"question_id": "s1", "image": "images/MapQA_1.png", "text": "Which states are above 5?",
         "answer": "alabama, texas"},
        {"question_id": "s2", "image": "images/MapQA_2.png", "text": "Which state is highest?", "answer": "texas"},
    ])
    (sci,) = build(tmp_path, "mllm-cl-domain", root=str(root), tasks=["Sci"])
    assert sci.scorer == "mllm_cl_sci" and sci.test_file.parent != root / "Sci"  # converted into the cache
    exact, states, contains = sci.test_samples
    assert [s.answer for s in sci.test_samples] == ["A", "alabama, texas", "texas"]
    assert exact.reference == [SCI_EXACT, "A"] and states.reference == [SCI_STATES, "alabama, texas"]
    assert contains.reference == [SCI_CONTAINS, "texas"]
    assert exact.images == (root / "Sci" / "images" / "AI2D_0.png",)
    assert score_one(sci.scorer, "A.", exact.reference) == 0.0
    assert score_one(sci.scorer, "alabama,texas", states.reference) == 0.5
    assert score_one(sci.scorer, "Texas is the highest", contains.reference) == 1.0

    root = write_mllm_cl_ability(tmp_path / "ab", tasks=("OCR",))
    test = json.loads((root / "OCR_test" / "test.json").read_text())
    test[0].update(answer="x ^ 2", answer_type="Handwritten Mathematical Expression Recognition")
    test[1].update(answer="open", answer_type="Regular Text Recognition")
    dump(root / "OCR_test" / "test.json", test)
    (ocr,) = build(tmp_path, "mllm-cl-ability", root=str(root), tasks=["OCR"])
    hme, regular, listed = ocr.test_samples
    assert hme.reference == [OCR_HME, "x ^ 2"] and regular.reference == "open"
    assert listed.reference == ["open", "opened"]
    assert score_one(ocr.scorer, "x^2", hme.reference) == 1.0 and score_one(ocr.scorer, "X^2", hme.reference) == 0.0


def test_mllm_cl_app_without_answers_names_the_record(tmp_path: Path) -> None:
    root = write_mllm_cl_ability(tmp_path / "ab", tasks=("APP",))
    test = json.loads((root / "APP_test" / "test.json").read_text())
    dump(root / "APP_test" / "test.json", [{k: v for k, v in r.items() if k != "answer"} for r in test])
    with pytest.raises(DataError) as error:
        build(tmp_path, "mllm-cl-ability", root=str(root), tasks=["APP"])
    assert str(error.value) == (
        f"{root / 'APP_test' / 'test.json'}: record 0: missing or non-string field 'answer' (MLLM-CL scored APP "
        "on MMT-Bench's closed eval.ai server: name MMT-Bench's published answers TSV with "
        "stream.options.gui_answers, or leave APP out with stream.options.tasks)"
    )


def write_mmt_bench_answers(path: Path, letters: list[str], indices: list[int] | None = None) -> Path:
    """An answers TSV in the layout of MMT-Bench_ALL_MI_anno.tsv: index, question, options, answer, categories,
    split and a base64 image column (long fields)."""
    header = ["index", "question", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]
    rows = ["\t".join(header)]
    for position, letter in enumerate(letters):
        index = indices[position] if indices else position
        rows.append("\t".join([str(index), f"Which action opens tab {position}?", "tap", "swipe", "type", "back",
                               letter, "gui_navigation", "GUI Navigation", "TEST", "iVBORw0KGgo" * 20_000]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def app_layout(root: Path) -> Path:
    """The ability layout with APP only, its test records named ALL_1, ALL_3, ALL_4 and carrying no answers."""
    write_mllm_cl_ability(root, tasks=("APP",))
    test = json.loads((root / "APP_test" / "test.json").read_text())
    dump(root / "APP_test" / "test.json",
         [{**{k: v for k, v in r.items() if k != "answer"}, "question_id": f"ALL_{k}"} for r, k in zip(test, (1, 3, 4))])
    return root


def test_mllm_cl_app_is_scored_against_mmt_bench_published_answers(tmp_path: Path) -> None:
    """APP question ALL_k takes the letter of row k of the answers file (the row position MLLM-CL's
    convert_result_to_submission.py writes into), or of the row whose index column is k."""
    root = app_layout(tmp_path / "ab")
    answers = write_mmt_bench_answers(tmp_path / "MMT-Bench_ALL_MI_anno.tsv", ["A", "B", "C", "D", "B"])
    (app,) = build(tmp_path, "mllm-cl-ability", root=str(root), tasks=["APP"], gui_answers=str(answers))
    assert [s.reference for s in app.test_samples] == ["B", "D", "B"]
    assert [score_one(app.scorer, reply, s.reference) for reply, s in zip([" b\n", "C", "B."], app.test_samples)] == [
        1.0, 0.0, 0.0]  # the submitted option is reply.strip().upper(); "B." is not a letter
    shuffled = write_mmt_bench_answers(tmp_path / "shuffled.tsv", ["C", "A", "D", "B", "A"], indices=[4, 3, 2, 1, 0])
    (by_index,) = build(tmp_path, "mllm-cl-ability", root=str(root), tasks=["APP"], gui_answers=str(shuffled),
                        gui_answers_match="index")
    assert [s.reference for s in by_index.test_samples] == ["B", "A", "C"]


def test_climb_converts_raw_annotations_to_generative_qa(tmp_path: Path) -> None:
    root = write_climb(tmp_path / "data")
    vqa, nlvr2, snli, vcr = build(tmp_path, "climb", root=str(root))
    assert [t.scorer for t in (vqa, nlvr2, snli, vcr)] == ["climb_vqa", "yes_no", "exact_match", "option_letter"]
    sample = vqa.test_samples[0]
    assert sample.answer == "red" and sample.reference == ["red"] * 8 + ["pink"] * 2
    assert sample.images == (root / "ms-coco" / "images" / "000000000110.jpg",)
    assert score_one("vqa_accuracy", "pink", sample.reference) == pytest.approx(0.6)
    pair = nlvr2.train_samples[1]
    assert pair.answer == "yes" and pair.images == tuple(
        root / "nlvr2" / "images" / "train" / f"train-1-0-img{k}.png" for k in (0, 1))
    assert [s.answer for s in snli.test_samples] == ["entailment"] * 3
    question = vcr.test_samples[1]
    assert question.answer == "B" and "Why is Casey here?" in question.prompt and "A. the gray dog ran" in question.prompt


def test_climb_metrics_normalise_by_single_task_and_chance() -> None:
    from mmcl.evaluation.metrics import climb_average_forgetting
    from mmcl.report.compare_runs import ComparedRun, with_climb_metrics
    from mmcl.results import TaskInfo
    from test_report import make_results

    # rows: base, after nlvr2, after vcr; columns: nlvr2, vcr (chance 50 and 25, as run.json records it)
    assert CLIMB_RANDOM_SCORES["nlvr2"] == 50.0 and CLIMB_RANDOM_SCORES["vcr"] == 25.0
    tasks = [TaskInfo(name, "", "exact_match", 4, CLIMB_RANDOM_SCORES[name], None, None) for name in ("nlvr2", "vcr")]
    matrix, single = [[40.0, 0.0], [80.0, 30.0], [65.0, 70.0]], [[40.0, 0.0], [90.0, 0.0], [90.0, 65.0]]
    made = [make_results(tasks=tasks, row_labels=["base", "nlvr2", "vcr"], matrix=matrix, metrics={}),
            make_results(method="experts", reference=True, tasks=tasks, row_labels=["base", "nlvr2", "vcr"],
                         matrix=single, metrics={})]  # fmt: skip
    runs = [ComparedRun(results, f"dir{i}", None, None, {}, {}) for i, results in enumerate(made)]
    transfer = [100 * (80 - 90) / (90 - 50), 100 * (70 - 65) / (65 - 25)]
    assert with_climb_metrics(runs)[0].metrics["T_K"] == pytest.approx(sum(transfer) / 2)
    assert climb_average_forgetting(matrix, [50.0, 25.0]) == pytest.approx(100 * (80 - 65) / (80 - 50))


# ---------------------------------------------------------------------------------------------- errors


def test_missing_files_are_named_by_data_check_and_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    root = write_coin(tmp_path / "data", tasks=("ScienceQA", "TextVQA"))
    (root / "annotations" / "TextVQA" / "test.json").unlink()
    (root / "ScienceQA" / "problems.json").unlink()
    for image in (root / "ScienceQA" / "images").iterdir():
        image.unlink()
    (root / "ScienceQA" / "images").rmdir()
    expected = (f"error: coin: root {root}: missing annotations/TextVQA/test.json, "
                "ScienceQA/images/ (images of annotations/ScienceQA/test.json), ScienceQA/problems.json\n")
    check = invoke(["data", "check", "coin", "--set", f"stream.options.root={root}",
                    "--set", "stream.options.tasks=[ScienceQA, TextVQA]", "--set", f"stream.cache_dir={tmp_path / 'cache'}"])
    assert (check.code, check.err, check.out) == (3, expected, "")
    config = make_stream_config(tiny_model_dir, tmp_path / "cache", tmp_path / "run")
    config["stream"] = {"name": "coin", "options": {"root": str(root), "tasks": ["ScienceQA", "TextVQA"]},
                        "cache_dir": str(tmp_path / "cache")}
    run = invoke(["run", str(write_config(tmp_path / "experiment.yaml", config))])
    assert (run.code, run.err) == (3, expected) and "Traceback" not in run.out


@pytest.mark.parametrize(
    ("stream", "options", "code", "message"),
    [
        ("mllm-cl-domain", {}, 2, "error: stream.options.root: required for mllm-cl-domain (the folder holding "
                                  "<Task>/{train,test}.json for RS, Med, AD, Sci, Fin)\n"),
        ("climb", {"root": "{tmp}/nowhere"}, 3, "error: climb: root {tmp}/nowhere: folder not found\n"),
        ("mllm-cl-ability", {"root": "{tmp}", "tasks": ["OCR", "Chess"]}, 2,
         "error: stream.options.tasks: unknown task 'Chess' of mllm-cl-ability (known: OCR, Math, VP, APP)\n"),
        ("mllm-cl-ability", {"root": "{tmp}", "tasks": ["VP"]}, 3,
         "error: mllm-cl-ability: root {tmp}: missing VP/train.json, VP_test/test.json\n"),
        ("climb", {"root": "{tmp}", "tasks": ["snli-ve"]}, 3,
         "error: climb: root {tmp}: missing snli-ve/snli_ve_train.jsonl, snli-ve/snli_ve_dev.jsonl, "
         "flickr30k/flickr30k_images/\n"),
    ],
)
def test_bad_options_and_missing_pieces_give_one_line(tmp_path: Path, stream, options, code, message) -> None:
    argv = ["data", "check", stream, "--set", f"stream.cache_dir={tmp_path / 'cache'}"]
    for key, value in options.items():
        value = [v for v in value] if isinstance(value, list) else value.format(tmp=tmp_path)
        argv += ["--set", f"stream.options.{key}={json.dumps(value)}"]
    result = invoke(argv)
    assert (result.code, result.err) == (code, message.replace("{tmp}", str(tmp_path)))
