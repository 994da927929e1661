"""A 4-task stream in which two tasks show the same kind of images (CoIN's VQAv2 and Grounding both
use COCO): ``maps`` asks synth-domain's aerial-map questions with short answers, ``mapdesc`` asks for
a one-sentence description of the same kind of map; ``med`` and ``fin`` are synth-domain's own.
Files are LLaVA JSON (train: conversations; test: question_id/text/answer) with PNG images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmcl.streams.synth import domain_examples

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

# name, synth-domain generator, description (the first line is what the router sees), scorer
SHARED_IMAGE_TASKS = (
    ("maps", "rs", "AerialQA: short questions about aerial maps", "exact_match"),
    ("med", "med", "Medical scan: detect a bright lesion and tell its side", "exact_match"),
    ("mapdesc", "rs", "AerialCaption: describe an aerial map in one sentence", "exact_match"),
    ("fin", "fin", "Finance chart: count bars and compare the first and last bar", "exact_match"),
)


def _describe_map(facts: dict[str, Any]) -> str:
    count = facts["buildings"]
    noun = "building" if count == 1 else "buildings"
    river = "a river" if facts["river"] else "no river"
    return f"A map with {NUMBER_WORDS.get(count, str(count))} {noun} and {river}."


def write_shared_image_stream(root: Path, train: int = 24, test: int = 8, image_size: int = 48) -> list[dict]:
    """Write the four tasks under ``root`` and return their ``stream.tasks`` entries (TaskFiles dicts)."""
    entries = []
    for name, source, description, scorer in SHARED_IMAGE_TASKS:
        folder = root / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for split, n in (("train", train), ("test", test)):
            records = []
            # the same generator seed for both map tasks: they share the very images, as VQAv2 and Grounding share COCO
            for index, example in enumerate(domain_examples(source, n, seed=3, split=split, image_size=image_size)):
                sample_id = f"{name}-{split}-{index:04d}"
                image = f"images/{sample_id}.png"
                example.image.save(folder / image, format="PNG", compress_level=1)
                if name == "mapdesc":
                    question, answer = "Describe this aerial image in one sentence.", _describe_map(example.facts)
                else:
                    question, answer = example.question, example.answer
                text = f"<image>\n{question}"
                if split == "train":
                    conversations = [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
                    records.append({"id": sample_id, "image": image, "conversations": conversations})
                else:
                    records.append({"question_id": sample_id, "image": image, "text": text, "answer": answer})
            (folder / f"{split}.json").write_text(json.dumps(records), encoding="utf-8")
        entries.append(
            {
                "name": name,
                "train": str(folder / "train.json"),
                "test": str(folder / "test.json"),
                "description": description,
                "scorer": scorer,
                "max_new_tokens": 12 if name == "mapdesc" else 4,
            }
        )
    return entries
