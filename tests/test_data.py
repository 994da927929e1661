"""Readers (LLaVA conversations, test JSON, JSONL), data validation with errors that name the file and the
record (``Task.problems``, ``mmcl data check``, ``mmcl run``), loading a model directory, and the
assistant-only label mask."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import write_config
from mmcl.backbones.backbone import IGNORE_INDEX, Backbone, build_messages
from mmcl.backbones.registry import load_backbone
from mmcl.streams.stream import Task
from mmcl.cli import main
from mmcl.data.images import load_image
from mmcl.data.readers import read_samples
from mmcl.data.sample import Sample
from mmcl.errors import DataError, MmclError

# -- helpers ------------------------------------------------------------------------------------


def write_png(path: Path, seed: int = 0, size: int = 48) -> Path:
    """A real noisy PNG (noise keeps the compressed stream long enough to truncate it mid-data)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(path, format="PNG")
    return path


def write_truncated_png(path: Path, seed: int = 0) -> Path:
    write_png(path, seed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_json(path: Path, records: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def conv_record(index: int, image: str | None = "images/ok.png", answer: str = "yes") -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": f"t{index}",
        "conversations": [
            {"from": "human", "value": "<image>\nIs there a river?" if image else "Is there a river?"},
            {"from": "gpt", "value": answer},
        ],
    }
    if image:
        record["image"] = image
    return record


def qa_record(index: int, image: str = "images/ok.png", answer: Any = "no") -> dict[str, Any]:
    return {"question_id": f"q{index}", "image": image, "text": "<image>\nIs there a river?", "answer": answer}


def good_task(folder: Path, n_train: int = 2, n_test: int = 2) -> Path:
    write_png(folder / "images" / "ok.png")
    write_json(folder / "train.json", [conv_record(i) for i in range(n_train)])
    write_json(folder / "test.json", [qa_record(i) for i in range(n_test)])
    return folder


def task_of(folder: Path, name: str | None = None) -> Task:
    suffix = ".jsonl" if (folder / "train.jsonl").exists() else ".json"
    return Task(
        name=name or folder.name,
        description="",
        train_file=folder / f"train{suffix}",
        test_file=folder / "test.json",
        image_root=None,
        scorer="exact_match",
        max_new_tokens=4,
    )


# -- readers ------------------------------------------------------------------------------------


def test_llava_multi_turn_conversation_becomes_history(tmp_path: Path) -> None:
    record = {
        "id": 17,
        "image": "pics/scene.png",
        "source": "coin",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the light?"},
            {"from": "gpt", "value": "green"},
            {"from": "human", "value": "How many cars are there?"},
            {"from": "gpt", "value": "2"},
            {"from": "user", "value": "Is it safe to cross?"},  # 'user'/'assistant' roles are accepted too
            {"from": "assistant", "value": "no"},
        ],
    }
    path = write_json(tmp_path / "train.json", [record])
    (sample,) = read_samples(path, "ad")
    assert sample.id == "17" and sample.task == "ad"
    assert sample.images == (tmp_path / "pics" / "scene.png",)  # resolved against the file's folder
    assert sample.history == (("<image>\nWhat color is the light?", "green"), ("How many cars are there?", "2"))
    assert (sample.prompt, sample.answer) == ("Is it safe to cross?", "no")
    assert sample.turns()[-1] == ("Is it safe to cross?", "no") and len(sample.turns()) == 3
    assert sample.metadata == {"source": "coin"}


def test_test_json_and_numeric_answers(tmp_path: Path) -> None:
    records = [
        {"question_id": 1, "image": "a.png", "text": "<image>\nHow many?", "answer": 3, "qtype": "count"},
        {"question_id": "b", "image": ["a.png", "b.png"], "text": "Compare <image> and <image>", "answer": 2.5},
        {"id": "c", "text": "No image here?", "answer": "yes"},
    ]
    path = write_json(tmp_path / "test.json", records)
    first, second, third = read_samples(path, "t", image_root=tmp_path / "root", split="test")
    assert (first.id, first.answer, first.prompt) == ("1", "3", "<image>\nHow many?")
    assert isinstance(first.answer, str) and first.history == ()
    assert first.images == (tmp_path / "root" / "a.png",)  # explicit image root
    assert first.metadata == {"qtype": "count"}
    assert second.answer == "2.5" and second.images == (tmp_path / "root" / "a.png", tmp_path / "root" / "b.png")
    assert third.id == "c" and third.images == ()


def test_test_file_may_hold_conversations(tmp_path: Path) -> None:
    path = write_json(tmp_path / "test.json", [conv_record(0, answer="left")])
    (sample,) = read_samples(path, "med", split="test")
    assert sample.id == "t0" and sample.answer == "left"


def test_jsonl_train_and_test(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(conv_record(i, answer=str(i))) for i in range(3)) + "\n\n", encoding="utf-8")
    samples = read_samples(train, "t")
    assert [s.answer for s in samples] == ["0", "1", "2"]
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps(qa_record(0, answer=7)) + "\n" + json.dumps(qa_record(1)) + "\n", encoding="utf-8")
    assert [s.answer for s in read_samples(test, "t", split="test")] == ["7", "no"]


@pytest.mark.parametrize(
    ("records", "split", "pattern"),
    [
        ([conv_record(0), {"id": "x", "image": "a.png"}], "train", r"record 1: missing or empty 'conversations'"),
        ([conv_record(0), {"id": "x", "conversations": []}], "train", r"record 1: missing or empty 'conversations'"),
        ([conv_record(0), conv_record(1), {"conversations": [{"from": "gpt", "value": "a"}]}], "train",
         r"record 2: conversations\[0\] from 'gpt' breaks the human/gpt alternation"),
        ([{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}], "train",
         r"record 0: conversations\[1\] from 'human' breaks"),
        ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                             {"from": "human", "value": "c"}]}], "train", r"record 0: conversation ends with a human turn"),
        ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": [3]}]}], "train",
         r"record 0: conversations\[1\] needs a string 'value'"),
        ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": True}]}], "train",
         r"record 0: conversations\[1\] needs a string 'value'"),
        ([{"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> q"},
                                                          {"from": "gpt", "value": "b"}]}], "train",
         r"record 0: 1 '<image>' placeholder\(s\) for 2 image\(s\)"),
        ([qa_record(0), {"question_id": "q1", "text": "<image><image> q", "answer": "a"}], "test",
         r"record 1: 2 '<image>' placeholder\(s\) for 0 image\(s\)"),
        ([conv_record(0), "not an object"], "train", r"record 1: expected an object"),
        ([{"id": "x", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
           "image": 5}], "train", r"record 0: 'image' must be a path"),
        ([qa_record(0), {"image": "a.png", "text": "q", "answer": "a"}], "test", r"record 1: missing field 'question_id'"),
        ([qa_record(0), qa_record(1, answer=None)], "test", r"record 1: missing or non-string field 'answer'"),
        ([qa_record(0, answer=True)], "test", r"record 0: missing or non-string field 'answer'"),
        ([qa_record(0), qa_record(1), qa_record(0)], "test", r"record 2: duplicate id 'q0' \(first at record 0\)"),
    ],
)  # fmt: skip
def test_bad_records_name_file_and_index(tmp_path: Path, records: list, split: str, pattern: str) -> None:
    path = write_json(tmp_path / f"{split}.json", records)
    with pytest.raises(DataError, match=pattern) as info:
        read_samples(path, "t", split=split)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text('[\n {"id": "a", "conversations": []},\n {"id": "b",,}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.json: malformed JSON at line 3 column"):
        read_samples(path, "t")


def test_malformed_jsonl_line_and_wrong_top_level(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(conv_record(0)) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl: line 2: malformed JSON"):
        read_samples(path, "t")
    path = write_json(tmp_path / "obj.json", {"records": []})
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of records, found dict"):
        read_samples(path, "t")
    with pytest.raises(DataError, match=r"missing\.json: file not found"):
        read_samples(tmp_path / "missing.json", "t")


def test_load_image_errors_name_the_record(tmp_path: Path) -> None:
    assert load_image(write_png(tmp_path / "ok.png"), "r").size == (48, 48)
    with pytest.raises(DataError, match=r"^task t: sample 3: image not found: .*nope\.png$"):
        load_image(tmp_path / "nope.png", "task t: sample 3")
    with pytest.raises(DataError, match=r"^task t: sample 4: unreadable image .*cut\.png"):
        load_image(write_truncated_png(tmp_path / "cut.png"), "task t: sample 4")


# -- validation: Task.problems, mmcl data check, mmcl run ---------------------------------------


@pytest.fixture
def bad_data(tmp_path: Path) -> Path:
    """Four task folders; every problem below sits in its own file (see EXPECTED_PROBLEMS)."""
    root = tmp_path / "data"
    # a_json: malformed train file; test file with a missing image (record 1) and a truncated PNG (record 2)
    good_task(root / "a_json")
    (root / "a_json" / "train.json").write_text('[\n {"id": "x",\n', encoding="utf-8")
    write_truncated_png(root / "a_json" / "images" / "cut.png", seed=1)
    write_json(
        root / "a_json" / "test.json",
        [qa_record(0), qa_record(1, image="images/gone.png"), qa_record(2, image="images/cut.png")],
    )
    # b_missing: train record 1 has no conversations
    good_task(root / "b_missing")
    write_json(root / "b_missing" / "train.json", [conv_record(0), {"id": "t1", "image": "images/ok.png"}])
    # c_altern: train record 2 starts with the assistant
    good_task(root / "c_altern")
    broken = {"id": "t2", "conversations": [{"from": "gpt", "value": "yes"}, {"from": "human", "value": "q"}]}
    write_json(root / "c_altern" / "train.json", [conv_record(0), conv_record(1), broken])
    # d_ok: clean
    good_task(root / "d_ok")
    return root


# (task folder, file, pattern) of every problem in ``bad_data``
EXPECTED_PROBLEMS = [
    ("a_json", "train.json", "malformed JSON at line"),
    ("a_json", "test.json", "record 1: image not found"),
    ("a_json", "test.json", "record 2: unreadable image"),
    ("b_missing", "train.json", "record 1: missing or empty 'conversations'"),
    ("c_altern", "train.json", "record 2: conversations[0] from 'gpt' breaks"),
]


def _matching(lines: list[str], root: Path, folder: str, file: str, pattern: str) -> list[str]:
    return [line for line in lines if f"{root / folder / file}: " in line and pattern in line]


def test_task_problems_lists_every_bad_record(bad_data: Path) -> None:
    found = {name: task_of(bad_data / name).problems() for name in ("a_json", "b_missing", "c_altern", "d_ok")}
    assert found["d_ok"] == []
    assert sum(len(problems) for problems in found.values()) == len(EXPECTED_PROBLEMS)
    for folder, file, pattern in EXPECTED_PROBLEMS:
        assert len(_matching(found[folder], bad_data, folder, file, pattern)) == 1, (folder, pattern, found[folder])
    for problems in found.values():
        assert all("\n" not in problem for problem in problems)


def test_task_problems_lists_every_bad_record_of_one_file(tmp_path: Path) -> None:
    folder = good_task(tmp_path / "t")
    records = [
        conv_record(0),
        {"id": "t1"},  # no conversations
        conv_record(2, image="images/gone.png"),  # missing image
        {"id": "t3", "conversations": [{"from": "gpt", "value": "a"}]},  # broken alternation
    ]
    write_json(folder / "train.json", records)
    problems = task_of(folder).problems()
    assert [p for p in problems if "record 1:" in p] and [p for p in problems if "record 3:" in p]
    assert [p for p in problems if "record 2: image not found" in p]


def test_problems_stop_after_max_problems(bad_data: Path) -> None:
    assert len(task_of(bad_data / "a_json").problems(max_problems=1)) == 1


def test_cli_data_check_lists_every_problem(bad_data: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", str(bad_data)]) == 3
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and "(and 4 more, listed above)" in err
    assert "Traceback" not in captured.out + captured.err
    lines = captured.out.splitlines()
    for folder, file, pattern in EXPECTED_PROBLEMS:
        assert len(_matching(lines, bad_data, folder, file, pattern)) == 1, (folder, pattern, captured.out)
    assert "a_json: 3 problem(s)" in lines and "b_missing: 1 problem(s)" in lines
    assert "c_altern: 1 problem(s)" in lines and "d_ok: ok" in lines
    assert lines[-1] == "4 task(s), 5 problem(s)"


def test_cli_data_check_clean_folder_and_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good_task(tmp_path / "data" / "one")
    folder = good_task(tmp_path / "data" / "two")
    (folder / "train.jsonl").write_text(json.dumps(conv_record(0)) + "\n", encoding="utf-8")
    (folder / "train.json").unlink()
    assert main(["data", "check", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["lengths measured with the tiny-llava processor, max_length 512", "one: ok", "two: ok",
                   "2 task(s), 0 problem(s)"]


def test_cli_data_check_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no task folders" in err and "\n" not in err


def _files_stream_config(tiny_stream_config: dict, names: list[str], root: Path) -> dict:
    """The tiny experiment, but with its stream declared as task files (paths relative to the config)."""
    tasks = [
        {"name": name, "train": f"{root.name}/{name}/train.json", "test": f"{root.name}/{name}/test.json",
         "scorer": "yes_no", "max_new_tokens": 3}
        for name in names
    ]  # fmt: skip
    return {**tiny_stream_config, "stream": {"tasks": tasks}}


@pytest.mark.parametrize(
    ("names", "folder", "file", "pattern"),
    [
        (["d_ok", "b_missing"], "b_missing", "train.json", "record 1: missing or empty 'conversations'"),
        (["c_altern", "d_ok"], "c_altern", "train.json", "record 2: conversations[0] from 'gpt' breaks"),
        (["a_json"], "a_json", "train.json", "malformed JSON at line"),
    ],
)
def test_cli_run_refuses_bad_task_files(
    bad_data: Path, tiny_stream_config: dict, capsys: pytest.CaptureFixture, names, folder, file, pattern
) -> None:
    config = _files_stream_config(tiny_stream_config, names, bad_data)
    path = write_config(bad_data.parent / "exp.yaml", config)
    code = main(["run", str(path)])
    assert code != 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert f"{bad_data / folder / file}: " in err and pattern in err, err
    assert not Path(config["output_dir"]).exists()  # refused before anything was written


def test_cli_run_counts_the_other_problems(bad_data: Path, tiny_stream_config: dict, capsys) -> None:
    config = _files_stream_config(tiny_stream_config, ["a_json", "b_missing", "c_altern", "d_ok"], bad_data)
    path = write_config(bad_data.parent / "exp.yaml", config)
    assert main(["run", str(path)]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "(and 4 more; see `mmcl data check`)" in err


def test_cli_run_refuses_a_truncated_test_image(tmp_path: Path, tiny_stream_config: dict, capsys) -> None:
    root = tmp_path / "data"
    good_task(root / "img")
    write_truncated_png(root / "img" / "images" / "cut.png")
    write_json(root / "img" / "test.json", [qa_record(0), qa_record(1, image="images/cut.png")])
    path = write_config(tmp_path / "exp.yaml", _files_stream_config(tiny_stream_config, ["img"], root))
    assert main(["run", str(path)]) != 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    err = captured.err.strip()
    assert "\n" not in err and f"{root / 'img' / 'test.json'}: record 1: unreadable image" in err


def test_data_check_accepts_an_experiment_yaml(bad_data: Path, tiny_stream_config: dict, capsys) -> None:
    config = _files_stream_config(tiny_stream_config, ["d_ok", "b_missing"], bad_data)
    path = write_config(bad_data.parent / "exp.yaml", config)
    assert main(["data", "check", str(path)]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "2 task(s), 1 problem(s)"
    assert _matching(lines, bad_data, "b_missing", "train.json", "record 1:")


def test_run_on_declared_task_files(tmp_path: Path, tiny_stream_config: dict, capsys) -> None:
    """Good task files run end to end; the declared scorer and max_new_tokens are used."""
    root = tmp_path / "data"
    good_task(root / "one", n_train=4, n_test=3)
    config = _files_stream_config(tiny_stream_config, ["one"], root)
    path = write_config(tmp_path / "exp.yaml", config)
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    run_dir = Path(config["output_dir"])
    plan = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    assert plan["stream"] == "files" and plan["stages"] == ["one"]
    assert plan["tasks"] == [{"name": "one", "description": "one", "scorer": "yes_no", "max_new_tokens": 3, "chance": 50.0,
                             "train_samples": 4, "test_samples": 3}]
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert results["row_labels"] == ["base", "one"] and [task["scorer"] for task in results["tasks"]] == ["yes_no"]
    lines = (run_dir / "predictions" / "1_one" / "one.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["meta"]["scorer"] == "yes_no"
    assert [json.loads(line)["id"] for line in lines[1:]] == ["q0", "q1", "q2"]


# -- loading a model directory and the label mask -----------------------------------------------


@pytest.fixture(scope="module")
def backbone(tiny_model_dir: Path) -> Backbone:
    return load_backbone(str(tiny_model_dir), device="cpu")


def test_load_backbone_from_a_local_directory(backbone: Backbone, tiny_model_dir: Path, tmp_path: Path) -> None:
    assert type(backbone.model).__name__ == "LlavaForConditionalGeneration"
    assert type(backbone.processor).__name__ == "LlavaProcessor"
    assert backbone.name == str(tiny_model_dir) and backbone.lora_targets
    assert backbone.tokenizer.pad_token is not None and backbone.tokenizer.padding_side == "left"
    image = write_png(tmp_path / "x.png")
    samples = [
        Sample(id=str(i), task="t", images=(image,), prompt=f"<image>\nHow many bars{'?' * i}", answer="3")
        for i in range(1, 4)
    ]
    answers = backbone.generate(samples, max_new_tokens=3)
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)


def test_load_backbone_from_a_folder_without_a_model_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(MmclError, match="cannot load"):
        load_backbone(str(tmp_path))


def _spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges where the label is not IGNORE_INDEX."""
    spans, start = [], None
    for position, value in enumerate(labels.tolist() + [IGNORE_INDEX]):
        if value != IGNORE_INDEX and start is None:
            start = position
        elif value == IGNORE_INDEX and start is not None:
            spans.append((start, position))
            start = None
    return spans


def test_labels_cover_exactly_the_assistant_answers(backbone: Backbone, tmp_path: Path) -> None:
    image = write_png(tmp_path / "scene.png")
    answers = ("green light", "3")
    sample = Sample(
        id="s1",
        task="ad",
        images=(image,),
        prompt="How many cars are there?",
        answer=answers[1],
        history=(("<image>\nWhat color is the traffic light?", answers[0]),),
    )
    features = backbone.encode_for_training(sample)
    input_ids, labels = features["input_ids"], features["labels"]
    assert input_ids.shape == labels.shape == features["attention_mask"].shape
    assert features["pixel_values"].shape[0] == 1
    tokenizer = backbone.tokenizer
    eos = tokenizer.eos_token_id
    spans = _spans(labels)
    assert len(spans) == 2, spans
    for (start, end), answer in zip(spans, answers):
        expected = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        assert input_ids[start:end].tolist() == expected  # the answer's tokens, then the end token
        assert labels[start:end].tolist() == expected  # labels are the tokens themselves (shift is in the model)
        assert tokenizer.decode(labels[start:end], skip_special_tokens=True) == answer
    labelled = labels != IGNORE_INDEX
    assert int(labelled.sum()) == sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    assert not labelled[input_ids == image_token].any()
    assert (input_ids == image_token).sum() > 0


def test_collate_pads_labels_with_ignore_index(backbone: Backbone, tmp_path: Path) -> None:
    image = write_png(tmp_path / "scene.png")
    short = Sample(id="a", task="t", images=(image,), prompt="<image>\nColor?", answer="red")
    long = Sample(id="b", task="t", images=(image,), prompt="<image>\nWhat color is the big shape?", answer="red")
    features = [backbone.encode_for_training(short), backbone.encode_for_training(long)]
    batch = backbone.collate(features)
    width = features[1]["input_ids"].shape[0]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    pad = width - features[0]["input_ids"].shape[0]
    assert pad > 0
    assert (batch["labels"][0, -pad:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, -pad:] == 0).all()
    assert batch["pixel_values"].shape[0] == 2


def test_encode_errors_name_the_sample(backbone: Backbone, tmp_path: Path) -> None:
    image = write_png(tmp_path / "scene.png")
    sample = Sample(id="s9", task="med", images=(image,), prompt="<image>\nIs there a lesion?", answer="yes")
    tight = Backbone(backbone.name, backbone.model, backbone.processor, backbone.lora_targets, max_length=10)
    with pytest.raises(DataError, match=r"task med: sample s9: \d+ tokens exceed max_length 10"):
        tight.encode_for_training(sample)
    two_placeholders = Sample(id="s8", task="med", images=(image,), prompt="<image> <image> ?", answer="yes")
    with pytest.raises(DataError, match=r"task med: sample s8: 2 '<image>' placeholders for 1 images"):
        build_messages(two_placeholders, include_final_answer=True)
    missing = Sample(id="s7", task="med", images=(tmp_path / "gone.png",), prompt="<image>\nq", answer="yes")
    with pytest.raises(DataError, match=r"task med: sample s7: image not found"):
        backbone.encode_for_training(missing)


# -- issue 12: data check and run agree; numbers as answers; a folder as the stream -------------


def test_data_check_and_run_agree_on_every_data_case() -> None:
    """Every data case of the catalogue is a pair: ``mmcl data check`` and ``mmcl run`` on the same files,
    same exit code, same problem (the catalogue test runs both halves)."""
    from catalogue_config_data import DATA_CASES, DATA_PAIRS

    by_name = {case.name: case for case in DATA_PAIRS}
    assert len(by_name) == 2 * len(DATA_CASES)
    for name in DATA_CASES:
        check, run = by_name[f"data-check-{name}"], by_name[f"data-run-{name}"]
        assert (check.exit_code, check.message) == (run.exit_code, run.message) == (3, DATA_CASES[name][1])


def test_numeric_answers_are_text_in_training_and_test_records(tmp_path: Path) -> None:
    train = write_json(tmp_path / "train.json", [conv_record(0, answer=7), conv_record(1, answer=2.5)])
    assert [s.answer for s in read_samples(train, "t")] == ["7", "2.5"]
    test = write_json(tmp_path / "test.json", [qa_record(0, answer=7), qa_record(1, answer=2.5)])
    assert [s.answer for s in read_samples(test, "t", split="test")] == ["7", "2.5"]


def test_run_a_folder_of_task_files(tmp_path: Path, tiny_model_dir: Path, stream_cache_dir: Path, capsys) -> None:
    """``mmcl run FOLDER`` runs the stream declared by ``FOLDER/<task>/{train,test}.json``, labelled by the folder."""
    root = tmp_path / "mydata"
    good_task(root / "one", n_train=2, n_test=2)
    out = tmp_path / "run"
    settings = [f"backbone.name={tiny_model_dir}", "training.max_steps=1", "training.progress_bar=false",
                "evaluation.general=none", "evaluation.forward_transfer=false", f"stream.cache_dir={stream_cache_dir}"]
    assert main(["run", str(root), "--out", str(out), *[a for s in settings for a in ("--set", s)]]) == 0
    printed = capsys.readouterr().out
    assert "stream mydata" in printed and "synth-domain" not in printed
    import yaml

    stored = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    stored = stored.get("config", stored)
    assert stored["stream"]["name"] == "mydata" and stored["name"] == "mydata"
    assert [t["name"] for t in stored["stream"]["tasks"]] == ["one"]
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["row_labels"] == ["base", "one"]
