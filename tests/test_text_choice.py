"""Text-only multiple-choice questions of tiny-reader's stage 3: the letter points at the right answer,
letters and kinds are balanced, and the written files read back without images."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from mmcl.data.answer_styles import LETTERS, MC_INSTRUCTION
from mmcl.data.readers import read_samples
from mmcl.synthetic.text_choice import TEXT_CHOICE_TASK, text_choice_examples, write_text_choice


def _expected(question: str) -> str:
    """The answer, worked out from the question text alone."""
    if match := re.fullmatch(r"Which option is (.+)\?", question):
        return match.group(1)
    if match := re.fullmatch(r"What is (\d) plus (\d)\?", question):
        return str(int(match.group(1)) + int(match.group(2)))
    if match := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", question):
        return str(max(int(match.group(1)), int(match.group(2))))
    match = re.fullmatch(r"Which letter comes after ([a-y])\?", question)
    assert match, question
    return chr(ord(match.group(1)) + 1)


def test_letters_point_at_the_answer_and_are_balanced() -> None:
    examples = list(text_choice_examples("text-choice", 400, 0, "train"))
    for example in examples:
        question, *option_lines, instruction = example.question.split("\n")
        assert example.image is None and instruction == MC_INSTRUCTION
        options = [line.split(". ", 1)[1] for line in option_lines]
        assert [line[0] for line in option_lines] == list(LETTERS) and len(set(options)) == 4
        assert options[LETTERS.index(example.answer)] == _expected(question) == example.facts["target"]
    assert set(Counter(e.answer for e in examples).values()) == {100}
    assert set(Counter(e.qtype for e in examples).values()) == {100}
    assert {e.qtype for e in examples} == set(TEXT_CHOICE_TASK.question_types)


def test_deterministic_and_splits_differ() -> None:
    def questions(seed: int, split: str) -> list[str]:
        return [e.question for e in text_choice_examples("text-choice", 50, seed, split)]

    assert questions(0, "train") == questions(0, "train")
    assert questions(0, "train") != questions(1, "train") and questions(0, "train") != questions(0, "test")


def test_written_files_have_no_images(tmp_path: Path) -> None:
    root = write_text_choice(tmp_path / "choice", seed=0, n_train=12, n_test=4)
    train = read_samples(root / "text-choice" / "train.json", "text-choice")
    test = read_samples(root / "text-choice" / "test.json", "text-choice", split="test")
    assert (len(train), len(test)) == (12, 4)
    assert all(sample.images == () and "<image>" not in sample.prompt for sample in train + test)
    assert train[0].metadata["qtype"].startswith("text-")
