"""``coin``: CoIN (Chen et al., 2024, "CoIN: A Benchmark of Continual Instruction tuNing for Multimodel
Large Language Models", arXiv:2403.08350) from its published annotation layout, as SEFE arranges it::

    <root>/annotations/<Task>/train.json      LLaVA conversations (CoIN-ASD: train_x<X>.json)
    <root>/annotations/<Task>/test.json       {question_id, image, text[, answer, answer_bbox, size]}
    <root>/<image folders>                    image paths in both files are relative to <root>
    <root>/TextVQA/TextVQA_0.5.1_val.json     the ten human answers per TextVQA question
    <root>/GQA/testdev_balanced_questions.json   GQA answers (only if test.json lacks them)
    <root>/ScienceQA/problems.json            ScienceQA answers (only if test.json lacks them)

Task order is CoIN's: ScienceQA, TextVQA, ImageNet, GQA, VizWiz, Grounding, VQAv2, OCRVQA. Training
files are read in place. Test files are read in place where they already carry one string ``answer``
(ImageNet, VizWiz, VQAv2, OCRVQA); the others are converted once into the stream cache.

Scorers, each reproducing the task's evaluation script in CoIN (``ETrain/Eval/LLaVA/CoIN/``); the rules,
known flaws and every remaining difference are in :mod:`mmcl.evaluation.published_scorers`:

| task      | scorer           | official script and rule                                                      |
|-----------|------------------|-------------------------------------------------------------------------------|
| ScienceQA | coin_scienceqa   | eval_science_qa.py: letter = reply, "X. ..." or first one-character word       |
| TextVQA   | textvqa_accuracy | eval_textvqa.py: m4c TextVQAAccuracyEvaluator, 10 answers of the 0.5.1 val file |
| ImageNet  | coin_imagenet    | eval_ImagetNet.py: (label in reply) or (reply in label), case-sensitive; warns  |
| GQA       | coin_gqa         | convert_gqa_for_eval + eval_gqa.py: reply.rstrip('.').lower() == gold          |
| VizWiz    | coin_vizwiz      | eval_vizwiz.py: reply.upper() == answer.upper()                               |
| Grounding | coin_grounding   | eval_grounding.py: IoU > 0.5, reply box read after cutting its first/last character; warns |
| VQAv2     | coin_vqav2       | eval_vqav2.py: reply.upper() == answer.upper() (one answer per question)      |
| OCRVQA    | coin_ocrvqa      | eval_ocrvqa.py: "Unanswerable" is wrong, else reply.lower() == answer.lower() |

Stricter mmcl variants stay available by name (``option_letter``, ``contains``, ``exact_match``,
``box_iou``). ScienceQA's test prompt gets the instruction ``model_science_qa.py
--single-pred-prompt`` appends ("Answer with the option's letter from the given choices directly.").

``stream.options``: ``root`` (required), ``tasks`` (subset and order), ``asd`` (train on CoIN-ASD
files ``train_x<X>.json``: ``true`` = X 20, or the integer X).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmcl.streams.published import (
    Record,
    cached_conversion,
    require_field,
    image_folder_missing,
    missing_files,
    parse_options,
    raise_if_missing,
)
from mmcl.streams.stream import StreamSpec, Task, register_stream
from mmcl.data.readers import as_text, load_records, read_json_document
from mmcl.errors import ConfigError, DataError

STREAM = "coin"
SQA_INSTRUCTION = "Answer with the option's letter from the given choices directly."
ASD_DEFAULT_X = 20  # SEFE's README example: train_x20.json
OPTION_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class CoinTask:
    name: str
    description: str
    scorer: str
    max_new_tokens: int
    answer_file: str | None = None  # relative to root; read only when test.json lacks the answers
    convert: bool = False  # the test file needs conversion (answers elsewhere, or another answer field)


COIN_TASKS: tuple[CoinTask, ...] = (
    CoinTask("ScienceQA", "ScienceQA: multiple-choice science questions", "coin_scienceqa", 8,
             "ScienceQA/problems.json", convert=True),
    CoinTask("TextVQA", "TextVQA: reading text in images", "textvqa_accuracy", 16,
             "TextVQA/TextVQA_0.5.1_val.json", convert=True),
    CoinTask("ImageNet", "ImageNet: image classification as a question", "coin_imagenet", 16),
    CoinTask("GQA", "GQA: compositional questions about scenes", "coin_gqa", 16,
             "GQA/testdev_balanced_questions.json", convert=True),
    CoinTask("VizWiz", "VizWiz: questions from blind users", "coin_vizwiz", 16),
    CoinTask("Grounding", "Grounding: RefCOCO/+/g referring expressions to boxes", "coin_grounding", 32, convert=True),
    CoinTask("VQAv2", "VQAv2: open questions about COCO images", "coin_vqav2", 16),
    CoinTask("OCRVQA", "OCR-VQA: questions about book covers", "coin_ocrvqa", 32),
)
TASKS_BY_NAME = {task.name: task for task in COIN_TASKS}
LAYOUT = "annotations/<Task>/{train,test}.json and the image folders"


def _train_name(asd: Any) -> str:
    if asd is False or asd is None:
        return "train.json"
    if asd is True:
        return f"train_x{ASD_DEFAULT_X}.json"
    if isinstance(asd, int) and asd > 0:
        return f"train_x{asd}.json"
    raise ConfigError(f"stream.options.asd: expected true/false or the CoIN-ASD X (e.g. 20), got {asd!r}")


def _needs_answer_file(spec: CoinTask, records: list[Any]) -> bool:
    if spec.answer_file is None:
        return False
    def has_answer(record: Any) -> bool:
        if not isinstance(record, dict):
            return False
        if spec.name == "TextVQA":
            return isinstance(record.get("answers"), list)
        return as_text(record.get("answer")) is not None

    return not all(has_answer(record) for record in records)


def _answer_lookup(spec: CoinTask, path: Path) -> Callable[[str, str], Any]:
    """``(question_id, where) -> answer(s)`` from the task's separate answer file."""
    document = read_json_document(path)
    if spec.name == "TextVQA":
        table = {str(item["question_id"]): item["answers"] for item in require_field(document, "data", str(path))}
    elif spec.name == "GQA":
        table = {str(qid): item.get("answer") for qid, item in document.items()}
    else:  # ScienceQA problems.json: {pid: {"answer": index into choices, ...}}
        table = {str(pid): OPTION_LETTERS[item["answer"]] for pid, item in document.items() if "answer" in item}

    def lookup(question_id: str, where: str) -> Any:
        if question_id not in table:
            raise DataError(f"{where}: question_id {question_id!r} not found in {path}")
        return table[question_id]

    return lookup


def _convert_test(
    spec: CoinTask, records: list[Any], test_path: Path, answers: Callable[[str, str], Any] | None
) -> list[Record]:
    converted = []
    for index, record in enumerate(records):
        where = f"{test_path}: record {index}"
        question_id = str(require_field(record, "question_id", where))
        out: Record = {k: v for k, v in record.items() if k not in ("answer", "answers")}
        out["question_id"] = question_id
        if spec.name == "TextVQA":
            raw = record.get("answers") if isinstance(record.get("answers"), list) else answers(question_id, where)
            accepted = [str(a) for a in raw]
            if not accepted:
                raise DataError(f"{where}: no answers for question_id {question_id!r}")
            out["answers"] = accepted
            out["answer"] = as_text(record.get("answer")) or Counter(accepted).most_common(1)[0][0]
        elif spec.name == "Grounding":
            box = as_text(record.get("answer")) or as_text(require_field(record, "answer_bbox", where))
            if box is None:
                raise DataError(f"{where}: 'answer_bbox' must be a string like '[0.1, 0.2, 0.5, 0.6]'")
            out["answer"] = box
        else:
            answer = as_text(record.get("answer"))
            out["answer"] = answer if answer is not None else as_text(answers(question_id, where))
            if out["answer"] is None:
                raise DataError(f"{where}: no string answer for question_id {question_id!r}")
        if spec.name == "ScienceQA":
            text = str(require_field(record, "text", where)).replace("<image>", "").strip()
            out["text"] = text if text.endswith(SQA_INSTRUCTION) else f"{text}\n{SQA_INSTRUCTION}"
        converted.append(out)
    return converted


def build_coin(options: dict[str, Any], cache: Path) -> list[Task]:
    root, selected, extras = parse_options(STREAM, options, [t.name for t in COIN_TASKS], {"asd": False}, LAYOUT)
    train_name = _train_name(extras["asd"])
    annotation_files = [f"annotations/{name}/{split}" for name in selected for split in (train_name, "test.json")]
    missing = missing_files(root, annotation_files)
    tests: dict[str, list[Any]] = {}
    for name in selected:
        test_path = root / "annotations" / name / "test.json"
        if not test_path.is_file():
            continue
        tests[name] = load_records(test_path)
        missing += image_folder_missing(tests[name], root, root, f"annotations/{name}/test.json")
        spec = TASKS_BY_NAME[name]
        if _needs_answer_file(spec, tests[name]) and spec.answer_file is not None:
            missing += missing_files(root, [spec.answer_file])
    raise_if_missing(STREAM, root, missing)

    tasks = []
    for name in selected:
        spec = TASKS_BY_NAME[name]
        test_path = root / "annotations" / name / "test.json"
        test_file = test_path
        if spec.convert:
            records = tests[name]
            answer_path = root / spec.answer_file if spec.answer_file and _needs_answer_file(spec, records) else None
            sources = [test_path] + ([answer_path] if answer_path else [])

            def build(spec=spec, records=records, test_path=test_path, answer_path=answer_path) -> list[Record]:
                lookup = _answer_lookup(spec, answer_path) if answer_path else None
                return _convert_test(spec, records, test_path, lookup)

            test_file = cached_conversion(cache, STREAM, name, sources, build) or test_path
        tasks.append(
            Task(
                name=name,
                description=spec.description,
                train_file=root / "annotations" / name / train_name,
                test_file=test_file,
                image_root=root,
                scorer=spec.scorer,
                max_new_tokens=spec.max_new_tokens,
            )
        )
    return tasks


register_stream(
    StreamSpec(
        name=STREAM,
        description="CoIN's eight tasks (ScienceQA ... OCR-VQA) from its annotations/ layout; option asd: CoIN-ASD",
        build=build_coin,
    )
)
