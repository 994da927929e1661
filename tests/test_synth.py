"""Synthetic data: deterministic, answers consistent with the drawn scene, balanced, readable, cached."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmcl.streams.synth import LETTERS, SYNTH_DOMAIN_TASKS, domain_examples, write_synth_domain
from mmcl.synthetic.pretrain_mix import PRETRAIN_TASK, pretrain_examples, write_synth_pretrain
from mmcl.data.readers import read_samples
from mmcl.errors import ConfigError, DataError

TASKS = [spec.name for spec in SYNTH_DOMAIN_TASKS]
SMALL = {"train_per_task": 10, "test_per_task": 5, "image_size": 32}


@pytest.fixture(scope="module")
def domain_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synth_domain(tmp_path_factory.mktemp("synth") / "domain", seed=1, **SMALL)


def _expected(task: str, qtype: str, facts: dict[str, Any], size: int = 48) -> str:
    """The answer recomputed from the scene facts alone."""
    yes_no = {True: "yes", False: "no"}
    if task == "rs":
        return str(facts["buildings"]) if qtype == "count" else yes_no[facts["river"]]
    if task == "med":
        return yes_no[facts["lesion"]] if qtype == "lesion" else facts["side"]
    if task == "ad":
        return facts["light"] if qtype == "light" else str(facts["cars"])
    if task == "sci":
        assert facts["target"] == facts[qtype] and sorted(facts["options"]) == sorted(set(facts["options"]))
        return LETTERS[facts["options"].index(facts[qtype])]
    if task == "fin":
        heights = facts["heights"]
        assert len(heights) == facts["bars"] == len(set(heights))
        return str(facts["bars"]) if qtype == "count" else yes_no[heights[-1] > heights[0]]
    objects = facts["objects"]
    if qtype == "color":
        (color,) = {o["color"] for o in objects if o["shape"] == facts["asked_shape"]}
        return color
    if qtype == "shape":
        assert len(objects) == 1
        return objects[0]["shape"]
    if qtype == "count":
        return str(len(objects))
    if qtype == "exists":
        return yes_no[any(o["color"] == facts["asked_color"] for o in objects)]
    if qtype == "side":
        x0, _, x1, _ = objects[0]["box"]
        assert len(objects) == 1 and abs((x0 + x1) / 2 - size / 2) > 0.1 * size - 1
        return "left" if x0 + x1 < size else "right"
    raise AssertionError(qtype)


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    first = write_synth_domain(tmp_path / "a", seed=7, **SMALL)
    second = write_synth_domain(tmp_path / "b", seed=7, **SMALL)
    other = write_synth_domain(tmp_path / "c", seed=8, **SMALL)
    for task in TASKS:
        for split in ("train", "test"):
            assert (first / task / f"{split}.json").read_bytes() == (second / task / f"{split}.json").read_bytes()
        assert (first / task / "test.json").read_bytes() != (other / task / "test.json").read_bytes()
        for png in sorted((first / task / "images").glob("*.png"))[:3]:
            assert png.read_bytes() == (second / task / "images" / png.name).read_bytes()


def test_train_and_test_images_differ(domain_root: Path) -> None:
    for task in TASKS:
        images = domain_root / task / "images"
        train = {png.read_bytes() for png in images.glob(f"{task}-train-*.png")}
        test = [png.read_bytes() for png in images.glob(f"{task}-test-*.png")]
        assert len(train) == 10 and len(test) == 5 and not train.intersection(test)


def test_readers_read_both_splits_with_existing_images(domain_root: Path) -> None:
    assert json.loads((domain_root / "manifest.json").read_text())["tasks"] == TASKS
    for task in TASKS:
        train = read_samples(domain_root / task / "train.json", task, split="train")
        test = read_samples(domain_root / task / "test.json", task, split="test")
        assert (len(train), len(test)) == (10, 5)
        assert train[0].id == f"{task}-train-00001" and test[-1].id == f"{task}-test-00005"
        for sample in train + test:
            assert sample.prompt.startswith("<image>\n") and sample.answer
            assert sample.metadata["qtype"] in SYNTH_DOMAIN_TASKS[TASKS.index(task)].question_types
            assert isinstance(sample.metadata["facts"], dict)
            (image,) = sample.images
            with Image.open(image) as img:
                assert img.size == (32, 32) and img.mode == "RGB"


def test_answers_match_the_scene(domain_root: Path) -> None:
    for task in TASKS:
        for sample in read_samples(domain_root / task / "train.json", task, split="train"):
            assert sample.answer == _expected(task, sample.metadata["qtype"], sample.metadata["facts"])
    for example in pretrain_examples(200, seed=3):
        if example.qtype == "caption":
            assert example.answer.endswith(f"{example.facts['background']} background")
        elif example.qtype == "propose":
            assert example.answer.endswith("?") and example.facts["proposal_answer"]
        else:
            assert example.answer == _expected(PRETRAIN_TASK, example.qtype, example.facts)


def test_sci_questions_are_multiple_choice() -> None:
    for example in domain_examples("sci", 8, seed=0, split="test"):
        lines = example.question.split("\n")
        assert [line[:3] for line in lines[1:5]] == ["A. ", "B. ", "C. ", "D. "]
        assert lines[-1] == "Answer with the option's letter from the given choices directly."


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_balanced(task: str) -> None:
    examples = list(domain_examples(task, 96, seed=5, split="train", image_size=24))
    by_qtype: dict[str, Counter[str]] = {}
    for example in examples:
        by_qtype.setdefault(example.qtype, Counter())[example.answer] += 1
    assert sorted(by_qtype) == sorted(SYNTH_DOMAIN_TASKS[TASKS.index(task)].question_types)
    for qtype, counts in by_qtype.items():
        assert sum(counts.values()) == 48
        tolerance = 1
        assert max(counts.values()) - min(counts.values()) <= tolerance, (qtype, counts)


def test_pretrain_mix_balance_and_files(tmp_path: Path) -> None:
    examples = list(pretrain_examples(150, seed=0, image_size=32))
    qtypes = Counter(e.qtype for e in examples)
    assert set(qtypes) == {"color", "shape", "count", "exists", "side", "caption", "propose"}
    counts = Counter(e.answer for e in examples if e.qtype == "count")
    assert max(counts.values()) - min(counts.values()) <= 1
    yes_no = Counter(e.answer for e in examples if e.qtype == "exists")
    assert abs(yes_no["yes"] - yes_no["no"]) <= 1
    root = write_synth_pretrain(tmp_path / "pre", seed=0, n_train=12, n_test=4, image_size=32)
    train = read_samples(root / PRETRAIN_TASK / "train.json", PRETRAIN_TASK, split="train")
    test = read_samples(root / PRETRAIN_TASK / "test.json", PRETRAIN_TASK, split="test")
    assert (len(train), len(test)) == (12, 4) and all(s.images[0].is_file() for s in train + test)


def test_second_call_is_cached_and_new_parameters_regenerate(tmp_path: Path) -> None:
    root = write_synth_domain(tmp_path / "d", seed=2, **SMALL)
    manifest, train = root / "manifest.json", root / "rs" / "train.json"
    stamps = (manifest.stat().st_mtime_ns, train.stat().st_mtime_ns)
    assert write_synth_domain(tmp_path / "d", seed=2, **SMALL) == root
    assert (manifest.stat().st_mtime_ns, train.stat().st_mtime_ns) == stamps
    write_synth_domain(tmp_path / "d", seed=2, train_per_task=3, test_per_task=2, image_size=32)
    assert len(json.loads(train.read_text())) == 3
    assert json.loads(manifest.read_text())["train_per_task"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folders left behind


def test_refuses_foreign_folder_and_bad_sizes(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_synth_domain(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="image_size"):
        write_synth_domain(tmp_path / "x", image_size=8)
    with pytest.raises(ConfigError, match="unknown task"):
        next(domain_examples("nope", 1))


def test_cache_finished_by_another_process_meanwhile_is_kept(tmp_path: Path) -> None:
    """Two runs of a sweep generate the same stream at once: the one that finishes second keeps the first
    one's folder (which that run may already be reading) instead of moving it away."""
    from mmcl.synthetic.files import write_cached

    root, params = tmp_path / "stream", {"generator": "synth-test", "n": 1}

    def fill(label: str):
        def write(folder: Path) -> None:
            if label == "second":  # the other process finishes while this one is still generating
                write_cached(root, params, fill("first"))
            (folder / "who.txt").write_text(label)
        return write

    assert write_cached(root, params, fill("second")) == root
    assert (root / "who.txt").read_text() == "first"
    assert [path.name for path in tmp_path.iterdir()] == ["stream"]  # no temp folder left behind
