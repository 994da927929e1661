"""The general-ability set: held-out questions outside the stream, evaluated after every stage so a
run shows how much of the base model's general ability survives continual training (the question
the RFT paper asks with MMMU / MMLU-Pro).

``evaluation.general.set`` selects it:

* ``auto`` (default): for the shipped ``tiny-llava`` backbone, held-out samples of its own
  pretraining mix (``synth-pretrain`` test split, the question types with a short checkable answer:
  colour, shape, count, exists, side; captions and question proposals are free-form and left out);
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


def general_task(
    evaluation: EvaluationConfig, backbone: BackboneConfig, stream: StreamConfig, base_dir: Path
) -> Task | None:
    """The general-ability set as a task named ``general`` (test split only), or ``None`` when off."""
    choice = evaluation.general.set.strip()
    if choice.lower() == "none":
        return None
    if choice.lower() == "auto":
        if backbone.name != "tiny-llava":
            return None
        return _tiny_pretrain_task(Path(stream.cache_dir).expanduser())
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


def _tiny_pretrain_task(cache: Path) -> Task:
    from mmcl.synthetic.pretrain_mix import PRETRAIN_TASK, PRETRAIN_VERSION, write_synth_pretrain

    folder = cache / "synth-pretrain" / f"general-{PRETRAIN_VERSION}-n{TINY_GENERAL_SIZE}"  # keyed by generator version
    root = write_synth_pretrain(folder, n_train=0, n_test=TINY_GENERAL_SIZE)
    test_file = root / PRETRAIN_TASK / "general.json"
    if not test_file.is_file():
        records = json.loads((root / PRETRAIN_TASK / "test.json").read_text(encoding="utf-8"))
        kept = [record for record in records if record.get("qtype") in TINY_GENERAL_QTYPES]
        atomic_write_text(test_file, json.dumps(kept))
    return Task(
        name=GENERAL_TASK,
        description="General ability: held-out tiny-llava pretraining questions (" + ", ".join(TINY_GENERAL_QTYPES) + ")",
        train_file=test_file,
        test_file=test_file,
        image_root=None,
        scorer="exact_match",
        max_new_tokens=TINY_GENERAL_MAX_TOKENS,
    )
