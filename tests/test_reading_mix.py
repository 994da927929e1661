"""The reading mix of the tiny-reader pretraining: deterministic files, character cells that match the
drawn glyphs, per-patch character labels, and answers that follow from the facts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmcl.synthetic.ability import GUI_LABELS, OCR_LINE_WORDS, OCR_QUESTION, OCR_WORDS
from mmcl.synthetic.reading_mix import (
    CHAR_QUESTION,
    LENGTH_QUESTION,
    READ_QUESTION,
    READER_CHARSET,
    READING_TASK,
    char_patch_labels,
    contrast,
    reading_examples,
    write_reading_mix,
)  # fmt: skip

N = 60


@pytest.fixture(scope="module")
def examples():
    return list(reading_examples(N, seed=5, split="train", image_size=96))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    first = write_reading_mix(tmp_path / "a", seed=3, n_train=10, n_test=4, image_size=96)
    second = write_reading_mix(tmp_path / "b", seed=3, n_train=10, n_test=4, image_size=96)
    other = write_reading_mix(tmp_path / "c", seed=4, n_train=10, n_test=4, image_size=96)
    files = _files(first)
    assert f"{READING_TASK}/train.json" in files and f"{READING_TASK}/test.json" in files
    assert sum(name.endswith(".png") for name in files) == 14
    assert files == _files(second)
    assert files[f"{READING_TASK}/train.json"] != _files(other)[f"{READING_TASK}/train.json"]
    records = json.loads(files[f"{READING_TASK}/test.json"])
    assert all(record["qtype"] in ("read", "char", "length") and record["facts"]["chars"] for record in records)


def test_char_patch_labels_by_hand() -> None:
    cells = [{"char": "A", "line": 0, "box": [8, 8, 16, 16]}, {"char": "7", "line": 0, "box": [16, 8, 30, 16]}]
    facts = {"chars": cells}
    labels = char_patch_labels(facts, image_size=32, patch_size=8)  # 4 x 4 grid, centres at 4, 12, 20, 28
    expected = [0] * 16
    expected[1 * 4 + 1] = 1 + READER_CHARSET.index("A")  # centre (12, 12) in A's cell
    expected[1 * 4 + 2] = expected[1 * 4 + 3] = 1 + READER_CHARSET.index("7")  # (20, 12) and (28, 12)
    assert labels == expected
    assert READER_CHARSET.index("A") == 36 and 1 + READER_CHARSET.index("7") == 8
    assert char_patch_labels({"objects": []}, 32, 8) == [0] * 16  # no characters: no labels


def test_labelled_patches_lie_in_their_cells(examples) -> None:
    labelled = 0
    for example in examples:
        labels = char_patch_labels(example.facts, 96, 8)
        assert len(labels) == 144
        labelled += any(labels)  # a lone narrow character may cover no patch centre
        for index, label in enumerate(labels):
            if label:
                cx, cy = (index % 12 + 0.5) * 8, (index // 12 + 0.5) * 8
                assert any(cell["char"] == READER_CHARSET[label - 1]
                           and cell["box"][0] <= cx < cell["box"][2] and cell["box"][1] <= cy < cell["box"][3]
                           for cell in example.facts["chars"])  # fmt: skip
    assert labelled >= 0.9 * len(examples)


def test_cells_hold_the_ink(examples) -> None:
    """Every cell holds ink; outside the cells (1 pixel of slack) the image is paper."""
    for example in examples:
        image, paper = example.image, tuple(example.facts["paper"])
        pixels = image.load()
        cells = [cell["box"] for cell in example.facts["chars"]]
        for x0, y0, x1, y1 in cells:
            assert any(pixels[x, y] != paper for x in range(int(x0), int(x1)) for y in range(int(y0), int(y1)))
        for x in range(image.width):
            for y in range(image.height):
                inside = any(x0 - 1 <= x < x1 + 1 and y0 - 1 <= y < y1 + 1 for x0, y0, x1, y1 in cells)
                assert inside or pixels[x, y] == paper, (example.facts["lines"], x, y)


def test_answers_follow_from_the_facts(examples) -> None:
    ability_words = {w.lower() for lists in (OCR_WORDS, OCR_LINE_WORDS, GUI_LABELS)
                     for words in lists.values() for w in words}  # fmt: skip
    assert {e.qtype for e in examples} == {"read", "char", "length"}
    for example in examples:
        facts, lines = example.facts, example.facts["lines"]
        chars = "".join(cell["char"] for cell in facts["chars"])
        assert chars == "".join(lines) and set(chars) <= set(READER_CHARSET)
        assert 1 <= len(lines) <= 2 and all(1 <= len(line) <= 8 for line in lines)
        assert not any(line.lower() in ability_words for line in lines)
        assert [cell["line"] for cell in facts["chars"]] == [i for i, line in enumerate(lines) for _ in line]
        assert 11 <= facts["font_px"] <= 18 and contrast(tuple(facts["ink"]), tuple(facts["paper"])) >= 4.5
        assert example.question != OCR_QUESTION and example.image.size == (96, 96)
        if example.qtype == "read":
            assert example.question == READ_QUESTION and example.answer == " ".join(lines)
        elif example.qtype == "char":
            position = facts["position"]
            assert example.question == CHAR_QUESTION.format(position) and example.answer == chars[position - 1]
        else:
            assert example.question == LENGTH_QUESTION and example.answer == str(len(chars))


def test_small_images_fit() -> None:
    for example in reading_examples(24, seed=0, split="test", image_size=32):
        assert example.image.size == (32, 32)
        assert all(0 <= v <= 32 for cell in example.facts["chars"] for v in cell["box"])


@pytest.mark.parametrize("mix", ["shapes", "reading"])
def test_multiple_choice_variants_keep_the_answer_and_leave_the_other_examples_as_they_were(mix: str) -> None:
    from mmcl.data.answer_styles import LETTERS, MC_INSTRUCTION
    from mmcl.synthetic.pretrain_mix import pretrain_examples

    make = {"shapes": lambda f: pretrain_examples(80, seed=2, image_size=96, mc_fraction=f),
            "reading": lambda f: reading_examples(80, seed=2, image_size=96, mc_fraction=f)}[mix]  # fmt: skip
    plain, mixed = list(make(0.0)), list(make(0.5))
    asked = {"shapes": {"color", "shape", "count", "side"}, "reading": {"char", "length"}}[mix]
    variants = 0
    for before, after in zip(plain, mixed):
        assert before.image.tobytes() == after.image.tobytes()
        if not after.qtype.endswith("-mc"):
            assert (after.question, after.answer, after.qtype) == (before.question, before.answer, before.qtype)
            continue
        variants += 1
        options = after.facts["options"]
        assert after.qtype[: -len("-mc")] == before.qtype and before.qtype in asked
        assert options[LETTERS.index(after.answer)] == before.answer and len(set(options)) == len(options) >= 2
        assert after.question.startswith(before.question + "\nA. ") and after.question.endswith(MC_INSTRUCTION)
    assert 0 < variants < len(mixed)
