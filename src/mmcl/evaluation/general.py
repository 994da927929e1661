"""The general-ability set: held-out questions outside the stream, evaluated after every stage so a
run shows how much of the base model's general ability survives continual training (the question
the RFT paper asks with MMMU / MMLU-Pro).

``evaluation.general.set`` selects it:

* ``auto`` (default): for the shipped ``tiny-llava`` backbone, held-out samples of its own
  pretraining mix (``synth-pretrain`` test split, the question types with a short checkable answer:
  colour, shape, count, exists, side; captions and question proposals are free-form and left out);
  for ``tiny-reader`` the same question types drawn at 96 pixels plus its reading mix's held-out
  questions (transcribe, character at a position, length);
  for any other backbone no general set, because mmcl cannot know what a hub model was trained on;
* ``none``: no general set;
* a path to a test file (JSON/JSONL, the stream test-file format) of any held-out benchmark the
  user names, scored with ``evaluation.general.scorer``.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmcl.streams.stream import StreamConfig, Task
from mmcl.config import BackboneConfig, EvaluationConfig
from mmcl.errors import ConfigError
from mmcl.utils import atomic_write_text

GENERAL_TASK = "general"
TINY_GENERAL_QTYPES = ("color", "shape", "count", "exists", "side")
TINY_GENERAL_SIZE = 300  # held-out pretraining samples written; the kept question types are ~5/7 of them
TINY_GENERAL_MAX_TOKENS = 8
READER_GENERAL_QTYPES = ("read", "char", "length")
READER_GENERAL_MAX_TOKENS = 16  # transcriptions of up to 12 characters


def general_task(
    evaluation: EvaluationConfig, backbone: BackboneConfig, stream: StreamConfig, base_dir: Path
) -> Task | None:
    """The general-ability set as a task named ``general`` (test split only), or ``None`` when off."""
    choice = evaluation.general.set.strip()
    if choice.lower() == "none":
        return None
    if choice.lower() == "auto":
        if backbone.name == "tiny-llava":
            return _tiny_pretrain_task(Path(stream.cache_dir).expanduser())
        if backbone.name == "tiny-reader":
            return _tiny_reader_task(Path(stream.cache_dir).expanduser())
        return None
    path = Path(choice).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise ConfigError(f"evaluation.general.set: test file not found: {path}")
    return Task(
        name=GENERAL_TASK,
        description=f"General ability: {path.name}",
        train_file=path,
        test_file=path,
        image_root=None,
        scorer=evaluation.general.scorer,
        max_new_tokens=16,
    )


def _kept_questions(folder: Path, qtypes: tuple[str, ...]) -> Path:
    """``folder/general.json``: the records of ``folder/test.json`` whose question type is in ``qtypes``."""
    test_file = folder / "general.json"
    if not test_file.is_file():
        records = json.loads((folder / "test.json").read_text(encoding="utf-8"))
        atomic_write_text(test_file, json.dumps([record for record in records if record.get("qtype") in qtypes]))
    return test_file


def _tiny_pretrain_task(cache: Path) -> Task:
    from mmcl.synthetic.pretrain_mix import PRETRAIN_TASK, PRETRAIN_VERSION, write_synth_pretrain

    folder = cache / "synth-pretrain" / f"general-{PRETRAIN_VERSION}-n{TINY_GENERAL_SIZE}"  # keyed by generator version
    root = write_synth_pretrain(folder, n_train=0, n_test=TINY_GENERAL_SIZE)
    return _general_set(_kept_questions(root / PRETRAIN_TASK, TINY_GENERAL_QTYPES), "tiny-llava", TINY_GENERAL_QTYPES)


def _tiny_reader_task(cache: Path) -> Task:
    """Half shapes questions at 96 pixels, half reading questions, both held out of tiny-reader's mix; the
    reading images sit beside the shapes folder, so their records name them by a relative path."""
    from mmcl.synthetic.pretrain_mix import PRETRAIN_TASK, PRETRAIN_VERSION, write_synth_pretrain
    from mmcl.synthetic.reading_mix import READING_TASK, READING_VERSION, write_reading_mix

    folder = cache / "synth-pretrain" / f"general-reader-{PRETRAIN_VERSION}-{READING_VERSION}-n{TINY_GENERAL_SIZE}"
    shapes = write_synth_pretrain(folder / "shapes", n_train=0, n_test=TINY_GENERAL_SIZE, image_size=96)
    reading = write_reading_mix(folder / "reading", n_train=0, n_test=TINY_GENERAL_SIZE // 2, image_size=96)
    qtypes = (*TINY_GENERAL_QTYPES, *READER_GENERAL_QTYPES)
    test_file = folder / "general.json"
    if not test_file.is_file():
        records = [
            {**record, "image": f"{part}/{record['image']}"}
            for part, file in ((f"shapes/{PRETRAIN_TASK}", _kept_questions(shapes / PRETRAIN_TASK, TINY_GENERAL_QTYPES)),
                               (f"reading/{READING_TASK}", reading / READING_TASK / "test.json"))
            for record in json.loads(file.read_text(encoding="utf-8"))
        ]  # fmt: skip
        atomic_write_text(test_file, json.dumps(records))
    return _general_set(test_file, "tiny-reader", qtypes, max_new_tokens=READER_GENERAL_MAX_TOKENS)


def _general_set(test_file: Path, backbone: str, qtypes: tuple[str, ...],
                 max_new_tokens: int = TINY_GENERAL_MAX_TOKENS) -> Task:
    return Task(
        name=GENERAL_TASK,
        description=f"General ability: held-out {backbone} pretraining questions (" + ", ".join(qtypes) + ")",
        train_file=test_file,
        test_file=test_file,
        image_root=None,
        scorer="exact_match",
        max_new_tokens=max_new_tokens,
    )
