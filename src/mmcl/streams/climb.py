"""``climb``: the upstream tasks of CLiMB (Srinivasan et al., 2022, "CLiMB: A Continual Learning
Benchmark for Vision-and-Language Tasks", NeurIPS Datasets & Benchmarks) framed as generative
question answering, read from the layout of CLiMB's data loaders (``src/data/``)::

    <root>/vqav2/v2_OpenEnded_mscoco_{train,val}2014_questions.json
    <root>/vqav2/v2_mscoco_{train,val}2014_annotations.json
    <root>/ms-coco/images/<image_id:012d>.jpg
    <root>/nlvr2/data/{train,dev}.json                   JSON lines: identifier, sentence, label
    <root>/nlvr2/images/{train,dev}/<identifier minus last part>-img{0,1}.png
    <root>/snli-ve/snli_ve_{train,dev}.jsonl             Flickr30K_ID, sentence2, gold_label
    <root>/flickr30k/flickr30k_images/<Flickr30K_ID>.jpg
    <root>/vcr/annotation/{train,val}.jsonl              annot_id, question, answer_choices, answer_label, objects
    <root>/vcr/drawn_images/bbox/{train,val}/answer/<annot_id>.jpg   (boxes drawn, as CLiMB uses them)

CLiMB's order is VQAv2 -> NLVR2 -> SNLI-VE -> VCR; CLiMB evaluates on the validation/dev splits.
All four are converted once into LLaVA-format files under the stream cache (image paths absolute).

CLiMB trains classification heads and has no generative evaluation script; the generative framing
replaces each head by an answer to generate and scores it by CLiMB's label definitions (details and
differences in :mod:`mmcl.evaluation.published_scorers`):

| task    | target                           | scorer        | CLiMB metric                                 |
|---------|----------------------------------|---------------|----------------------------------------------|
| vqa     | most common answer; all 10 kept  | climb_vqa     | get_score(#raw annotator answers == normalize_word(reply)) |
| nlvr2   | "no" iff label is "False", else "yes" | yes_no   | accuracy of the True/False label             |
| snli-ve | entailment/neutral/contradiction | exact_match   | 3-way accuracy                               |
| vcr     | option letter A-D (Q->A)         | option_letter | 4-way multiple-choice accuracy               |

:data:`CLIMB_RANDOM_SCORES` are the per-task chance scores CLiMB's knowledge transfer and forgetting
are normalised by; ``mmcl compare`` reports both (T_K against an ``experts`` run among the compared
ones). CLiMB's low-shot transfer after every upstream stage is ``evaluation.low_shot``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcl.streams.published import (
    Record,
    cached_conversion,
    missing_files,
    parse_options,
    raise_if_missing,
    require_field,
)
from mmcl.streams.stream import StreamSpec, Task, register_stream
from mmcl.data.readers import read_json_document, read_json_lines
from mmcl.errors import DataError

STREAM = "climb"
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")
# Chance level of each task's CLiMB score, in percent (VQA: 3129-way classification, about 0).
CLIMB_RANDOM_SCORES: dict[str, float] = {"vqa": 0.0, "nlvr2": 50.0, "snli-ve": 100.0 / 3.0, "vcr": 25.0}
# CLiMB's VCR text replaces person boxes by gender-neutral names and other boxes by "the gray <object>".
VCR_NAMES = (
    "Casey Riley Jessie Jackie Avery Jaime Peyton Kerry Jody Kendall Skyler Frankie Pat Quinn Morgan Finley Harley "
    "Robbie Sidney Tommie Ashley Carter Adrian Clarke Logan Mickey Nicky Parker Tyler Reese Charlie Austin Denver "
    "Emerson Tatum Dallas Haven Jordan Robin Rory Bellamy Salem Sutton Gray Shae Kyle Alex Ryan Cameron Dakota"
).split()


@dataclass(frozen=True)
class ClimbTask:
    name: str
    description: str
    scorer: str
    max_new_tokens: int
    files: Callable[[str], list[str]]  # split -> annotation files relative to root
    image_folder: Callable[[str], str]  # split -> image folder relative to root (ends with /)
    convert: Callable[[Path, str], list[Record]]  # (root, split) -> LLaVA test-style records


def _vqa_files(split: str) -> list[str]:
    return [f"vqav2/v2_OpenEnded_mscoco_{split}2014_questions.json", f"vqav2/v2_mscoco_{split}2014_annotations.json"]


def _convert_vqa(root: Path, split: str) -> list[Record]:
    questions_path, annotations_path = (root / rel for rel in _vqa_files(split))
    question_list = require_field(read_json_document(questions_path), "questions", str(questions_path))
    questions = {q["question_id"]: q for q in question_list}
    annotation_list = require_field(read_json_document(annotations_path), "annotations", str(annotations_path))
    records = []
    for index, annotation in enumerate(annotation_list):
        where = f"{annotations_path}: annotation {index}"
        question_id = require_field(annotation, "question_id", where)
        if question_id not in questions:
            raise DataError(f"{where}: question_id {question_id} not in {questions_path}")
        answers = [str(a["answer"]) for a in require_field(annotation, "answers", where)]
        target = annotation.get("multiple_choice_answer") or Counter(answers).most_common(1)[0][0]
        records.append({
            "question_id": str(question_id),
            "image": str(root / "ms-coco" / "images" / f"{int(annotation['image_id']):012d}.jpg"),
            "text": f"<image>\n{questions[question_id]['question']}\n{SHORT_ANSWER}",
            "answer": str(target),
            "answers": answers,
        })
    return records


_NLVR2_SPLIT = {"train": "train", "val": "dev"}


def _convert_nlvr2(root: Path, split: str) -> list[Record]:
    split = _NLVR2_SPLIT[split]
    path = root / "nlvr2" / "data" / f"{split}.json"
    records = []
    for index, line in enumerate(read_json_lines(path)):
        where = f"{path}: line {index + 1}"
        identifier = str(require_field(line, "identifier", where))
        stem = "-".join(identifier.split("-")[:-1])
        images = [str(root / "nlvr2" / "images" / split / f"{stem}-img{k}.png") for k in (0, 1)]
        label = str(require_field(line, "label", where)) != "False"  # nlvr2_dataset.py: 0 iff "False"
        records.append({
            "question_id": identifier,
            "images": images,
            "text": f"<image>\n<image>\nLeft image and right image. Is this statement true? {line['sentence']}\n"
                    "Answer yes or no.",
            "answer": "yes" if label else "no",
        })
    return records


_SNLI_VE_SPLIT = {"train": "train", "val": "dev"}


def _convert_snli_ve(root: Path, split: str) -> list[Record]:
    path = root / "snli-ve" / f"snli_ve_{_SNLI_VE_SPLIT[split]}.jsonl"
    records = []
    for index, line in enumerate(read_json_lines(path)):
        where = f"{path}: line {index + 1}"
        label = str(require_field(line, "gold_label", where))
        if label not in SNLI_VE_LABELS:
            raise DataError(f"{where}: gold_label {label!r} is not one of {', '.join(SNLI_VE_LABELS)}")
        image_id = require_field(line, "Flickr30K_ID", where)
        records.append({
            "question_id": str(line.get("pairID", f"{split}-{index}")),
            "image": str(root / "flickr30k" / "flickr30k_images" / f"{image_id}.jpg"),
            "text": f"<image>\nHypothesis: {require_field(line, 'sentence2', where)}\n"
                    "Does the image entail the hypothesis, contradict it, or neither? "
                    "Answer with one word: entailment, neutral or contradiction.",
            "answer": label,
        })
    return records


def _vcr_text(tokens: Sequence[Any], objects: Sequence[str]) -> str:
    words = []
    for token in tokens:
        if isinstance(token, list):
            names = [
                VCR_NAMES[int(i) % len(VCR_NAMES)] if objects[int(i)] == "person" else f"the gray {objects[int(i)]}"
                for i in token
            ]
            words.append(" and ".join(names))
        else:
            words.append(str(token))
    return " ".join(words).replace(" ?", "?").replace(" .", ".").replace(" ,", ",")


def _convert_vcr(root: Path, split: str) -> list[Record]:
    path = root / "vcr" / "annotation" / f"{split}.jsonl"
    records = []
    for index, line in enumerate(read_json_lines(path)):
        where = f"{path}: line {index + 1}"
        objects = require_field(line, "objects", where)
        choices = require_field(line, "answer_choices", where)
        options = "\n".join(f"{'ABCD'[k]}. {_vcr_text(choice, objects)}" for k, choice in enumerate(choices))
        annot_id = str(require_field(line, "annot_id", where))
        question = _vcr_text(require_field(line, "question", where), objects)
        records.append({
            "question_id": annot_id,
            "image": str(root / "vcr" / "drawn_images" / "bbox" / split / "answer" / f"{annot_id}.jpg"),
            "text": f"<image>\n{question}\n{options}\n{OPTION_INSTRUCTION}",
            "answer": "ABCD"[int(require_field(line, "answer_label", where))],
        })
    return records


CLIMB_TASKS: tuple[ClimbTask, ...] = (
    ClimbTask("vqa", "VQAv2: open questions about COCO images", "climb_vqa", 16,
              _vqa_files, lambda split: "ms-coco/images/", _convert_vqa),
    ClimbTask("nlvr2", "NLVR2: is a statement true of a pair of images", "yes_no", 4,
              lambda split: [f"nlvr2/data/{_NLVR2_SPLIT[split]}.json"],
              lambda split: f"nlvr2/images/{_NLVR2_SPLIT[split]}/", _convert_nlvr2),
    ClimbTask("snli-ve", "SNLI-VE: visual entailment of a hypothesis", "exact_match", 4,
              lambda split: [f"snli-ve/snli_ve_{_SNLI_VE_SPLIT[split]}.jsonl"],
              lambda split: "flickr30k/flickr30k_images/", _convert_snli_ve),
    ClimbTask("vcr", "VCR: commonsense multiple-choice questions (Q->A)", "option_letter", 4,
              lambda split: [f"vcr/annotation/{split}.jsonl"],
              lambda split: f"vcr/drawn_images/bbox/{split}/answer/", _convert_vcr),
)
LAYOUT = "vqav2/, ms-coco/images/, nlvr2/, snli-ve/, flickr30k/flickr30k_images/ and vcr/ as CLiMB's loaders read them"


def _as_training(records: list[Record]) -> list[Record]:
    return [
        {"id": r["question_id"], **{k: r[k] for k in ("image", "images") if k in r},
         "conversations": [{"from": "human", "value": r["text"]}, {"from": "gpt", "value": r["answer"]}]}
        for r in records
    ]


def build_climb(options: dict[str, Any], cache: Path) -> list[Task]:
    specs = {t.name: t for t in CLIMB_TASKS}
    root, selected, _ = parse_options(STREAM, options, list(specs), {}, LAYOUT)
    needed = [rel for name in selected for split in ("train", "val") for rel in specs[name].files(split)]
    needed += [specs[name].image_folder(split) for name in selected for split in ("train", "val")]
    raise_if_missing(STREAM, root, missing_files(root, needed))
    tasks = []
    for name in selected:
        spec = specs[name]
        files: dict[str, Path] = {}
        for split, shape in (("train", _as_training), ("val", lambda records: records)):
            sources = [root / rel for rel in spec.files(split)]
            converted = cached_conversion(
                cache, STREAM, f"{name}_{split}", sources,
                lambda spec=spec, split=split, shape=shape: shape(spec.convert(root, split)),
            )
            assert converted is not None  # raw annotations are always converted
            files[split] = converted
        tasks.append(
            Task(
                name=name,
                description=spec.description,
                train_file=files["train"],
                test_file=files["val"],
                image_root=None,  # converted records carry absolute image paths
                scorer=spec.scorer,
                max_new_tokens=spec.max_new_tokens,
                chance=CLIMB_RANDOM_SCORES[name],
            )
        )
    return tasks


register_stream(
    StreamSpec(
        name=STREAM,
        description="CLiMB's upstream tasks (VQAv2, NLVR2, SNLI-VE, VCR) as generative QA from CLiMB's data layout",
        build=build_climb,
    )
)
