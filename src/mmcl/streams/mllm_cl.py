"""``mllm-cl-domain`` and ``mllm-cl-ability``: the two streams of MLLM-CL (Zhao et al., 2025, "MLLM-CL:
Continual Learning for Multimodal Large Language Models", arXiv:2506.05453) from its published layout.

Domain stream (remote sensing, medical, autonomous driving, science, finance; train and test IID)::

    <root>/{RS,Med,AD,Sci,Fin}/train.json, test.json, images/   image paths relative to the task folder
    <root>/task5replay20_train.json, task5Router_train20.json, num5sample_images20/   (optional)

Ability stream (OCR, math & logic, visual perception, GUI agent; test sets are separate, non-IID)::

    <root>/{OCR,Math,VP,APP}/train.json, images/
    <root>/{OCR,Math,VP,APP}_test/test.json, images/
    <root>/replay20.json, Router_train20.json, sample_images20/   (optional)

The replay and router sample files, when present, are handed to methods on every task as
``Task.extra_files`` (names ``replay``, ``router_train``, ``sample_images``); their image paths are
relative to the root. No built-in method reads them yet (``replay`` and ``mrlora`` draw their own
samples from the training sets).

Scorers, each reproducing MLLM-CL's evaluation script (``ETrain/Eval/LLaVA/CoIN/``); the rules and every
remaining difference are in :mod:`mmcl.evaluation.published_scorers`:

| task | scorer          | script                                                                            |
|------|-----------------|-----------------------------------------------------------------------------------|
| RS   | mllm_cl_ai2d    | eval_ai2d.py: lower-cased containment with word-edge variants                     |
| Med  | mllm_cl_pvqa    | eval_pvqa.py: lower-cased answer is a substring of the reply                      |
| AD   | mllm_cl_ai2d    | eval_ai2d.py (as RS)                                                              |
| Sci  | mllm_cl_sci     | eval_sci.py: equality (AI2D/TQA/VQA/SciVerse), containment (MapQA), partial credit ("Which states") |
| Fin  | mllm_cl_finvis  | eval_finvis.py: reply without spaces and periods == answer (lower-cased)          |
| OCR  | mllm_cl_ocr     | eval_ocr.py (OCRBench): any accepted answer is a substring of the reply           |
| Math | mllm_cl_math    | eval_math.py: GPT judge (VLMEvalKit MathVista); rule-based stand-in               |
| VP   | mllm_cl_sat     | eval_sat.py: answer in reply after removing spaces, dots, newlines and case       |
| APP  | mllm_cl_app     | eval.ai server (closed); the submitted option letter against MMT-Bench's published answers |

The Sci rule depends on the item's image name and question, and the OCR rule on its category, which a
scorer does not see: the test file is converted once into the stream cache and each such reference is
tagged with its rule (``answers: [tag, answer...]``, tags from :func:`~mmcl.evaluation.published_scorers.sci_rule_tag`
and :data:`~mmcl.evaluation.published_scorers.OCR_HME`). Other test files are read in place when each
record has one string ``answer``; files with lists of accepted answers (OCR) or MathVista fields (Math:
``answer_option`` for multiple choice) are converted too.

APP's test file carries no answers (MLLM-CL scored it on MMT-Bench's server, now closed).
``stream.options.gui_answers`` names MMT-Bench's published answers TSV (downloaded by hand) and
``gui_answers_match`` how a question id finds its row (:mod:`mmcl.streams.mmt_bench_answers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcl.streams.published import (
    Record,
    cached_conversion,
    image_folder_missing,
    missing_files,
    parse_options,
    raise_if_missing,
)
from mmcl.streams.stream import StreamSpec, Task, register_stream
from mmcl.data.readers import as_text, load_records
from mmcl.errors import ConfigError, DataError
from mmcl.evaluation.published_scorers import OCR_HME, OCR_HME_CATEGORY, sci_rule_tag
from mmcl.streams.mmt_bench_answers import MATCH_CHOICES, answer_for, read_answers


APP_HINT = (" (MLLM-CL scored APP on MMT-Bench's closed eval.ai server: name MMT-Bench's published answers "
            "TSV with stream.options.gui_answers, or leave APP out with stream.options.tasks)")


@dataclass(frozen=True)
class MllmClTask:
    name: str
    description: str
    scorer: str
    max_new_tokens: int


@dataclass(frozen=True)
class MllmClStream:
    name: str
    tasks: tuple[MllmClTask, ...]
    separate_test_folders: bool  # ability: <Task>_test/test.json
    side_files: tuple[tuple[str, str], ...]  # (name, path relative to root) of replay / router samples
    description: str
    extra_options: tuple[tuple[str, Any], ...] = ()  # the stream's own option keys and defaults

    @property
    def layout(self) -> str:
        if self.separate_test_folders:
            return "<Task>/train.json and <Task>_test/test.json for " + ", ".join(t.name for t in self.tasks)
        return "<Task>/{train,test}.json for " + ", ".join(t.name for t in self.tasks)


DOMAIN = MllmClStream(
    name="mllm-cl-domain",
    tasks=(
        MllmClTask("RS", "Remote sensing: questions about aerial and satellite images", "mllm_cl_ai2d", 32),
        MllmClTask("Med", "Medical: questions about pathology and radiology images", "mllm_cl_pvqa", 32),
        MllmClTask("AD", "Autonomous driving: questions about road scenes", "mllm_cl_ai2d", 64),
        MllmClTask("Sci", "Science: diagrams, maps and textbook figures", "mllm_cl_sci", 32),
        MllmClTask("Fin", "Finance: stock and financial charts", "mllm_cl_finvis", 16),
    ),
    separate_test_folders=False,
    side_files=(
        ("replay", "task5replay20_train.json"),
        ("router_train", "task5Router_train20.json"),
        ("sample_images", "num5sample_images20"),
    ),
    description="MLLM-CL domain continual learning (RS, Med, AD, Sci, Fin) from its published layout",
)

ABILITY = MllmClStream(
    name="mllm-cl-ability",
    tasks=(
        MllmClTask("OCR", "OCR: reading text in images", "mllm_cl_ocr", 32),
        MllmClTask("Math", "Math & logic: visual math problems", "mllm_cl_math", 64),
        MllmClTask("VP", "Visual perception: counting, spatial relations, depth", "mllm_cl_sat", 16),
        MllmClTask("APP", "GUI agent: understanding app screenshots", "mllm_cl_app", 32),
    ),
    separate_test_folders=True,
    side_files=(
        ("replay", "replay20.json"),
        ("router_train", "Router_train20.json"),
        ("sample_images", "sample_images20"),
    ),
    description="MLLM-CL ability continual learning (OCR, Math, VP, APP; separate *_test sets), published layout",
    extra_options=(("gui_answers", None), ("gui_answers_match", "row")),
)


def _test_folder(stream: MllmClStream, task: str) -> str:
    return f"{task}_test" if stream.separate_test_folders else task


def _rule_tag(task: str, record: Record) -> str | None:
    """The scoring-rule tag a Sci or OCR reference needs (see the module doc), else ``None``."""
    if task == "Sci":
        image = record.get("image")
        image = image if isinstance(image, str) else (image[0] if isinstance(image, list) and image else "")
        question = record.get("text") if isinstance(record.get("text"), str) else ""
        return sci_rule_tag(str(image), question)
    if task == "OCR" and record.get("answer_type") == OCR_HME_CATEGORY:
        return OCR_HME
    return None


def _normalized_test(task: str, records: list[Any], path: Path,
                     gui_answers: tuple[Path, dict[int, str]] | None = None) -> list[Record] | None:
    """Records in the ``{question_id, image, text, answer[, answers]}`` form, or ``None`` if they already are.

    ``gui_answers`` (APP only): the answers file and its letters; each record's answer is taken from it.

    Converted records name their images by absolute path (the converted file lives in the cache, and
    the task's training file resolves its own images against its own folder)."""
    converted: list[Record] = []
    changed = False
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object, found {type(record).__name__}")
        out = dict(record)
        if "question_id" not in out and "id" not in out:
            raise DataError(f"{where}: missing field 'question_id'")
        if "text" not in out and "conversations" not in out and isinstance(out.get("question"), str):
            out["text"], changed = out["question"], True
        if task == "APP" and gui_answers is not None:
            source, letters = gui_answers
            out["answer"] = answer_for(out.get("question_id", out.get("id")), letters, source, where)
            changed = True
        raw = out.get("answer")
        if task == "Math" and out.get("question_type") == "multi_choice" and as_text(out.get("answer_option")):
            out["answer_text"], out["answer"], changed = raw, as_text(out["answer_option"]), True
        elif isinstance(raw, list):
            accepted = [str(a) for a in raw]
            if not accepted:
                raise DataError(f"{where}: empty 'answer' list")
            out["answer"], out["answers"], changed = accepted[0], accepted, True
        elif "conversations" not in out and as_text(raw) is None:
            hint = APP_HINT if task == "APP" else ""
            raise DataError(f"{where}: missing or non-string field 'answer'{hint}")
        elif not isinstance(raw, str) and raw is not None:
            out["answer"], changed = as_text(raw), True
        tag = _rule_tag(task, out)
        if tag is not None and isinstance(out.get("answer"), str):
            accepted = out.get("answers") if isinstance(out.get("answers"), list) else [out["answer"]]
            out["answers"], changed = [tag, *(a for a in accepted if a != tag)], True
        for key in ("image", "images"):
            if isinstance(out.get(key), str):
                out[key] = str(path.parent / out[key])
            elif isinstance(out.get(key), list):
                out[key] = [str(path.parent / name) if isinstance(name, str) else name for name in out[key]]
        converted.append(out)
    return converted if changed else None


def _builder(stream: MllmClStream):
    def build(options: dict[str, Any], cache: Path) -> list[Task]:
        names = [t.name for t in stream.tasks]
        root, selected, extras = parse_options(stream.name, options, names, dict(stream.extra_options), stream.layout)
        gui_answers = None
        if extras.get("gui_answers_match", "row") not in MATCH_CHOICES:
            raise ConfigError(f"stream.options.gui_answers_match: expected one of {', '.join(MATCH_CHOICES)}, "
                              f"got {extras['gui_answers_match']!r}")
        if extras.get("gui_answers") is not None and "APP" in selected:
            raw = extras["gui_answers"]
            if not isinstance(raw, str) or not raw:
                raise ConfigError(f"stream.options.gui_answers: expected a file path, got {raw!r}")
            answers_path = Path(raw).expanduser().absolute()
            gui_answers = (answers_path, read_answers(answers_path, str(extras["gui_answers_match"])))
        missing = missing_files(root, [f"{name}/train.json" for name in selected])
        missing += missing_files(root, [f"{_test_folder(stream, name)}/test.json" for name in selected])
        tests: dict[str, list[Any]] = {}
        for name in selected:
            folder = _test_folder(stream, name)
            path = root / folder / "test.json"
            if path.is_file():
                tests[name] = load_records(path)
                missing += image_folder_missing(tests[name], root / folder, root, f"{folder}/test.json")
        raise_if_missing(stream.name, root, missing)

        extra_files = tuple((key, root / rel) for key, rel in stream.side_files if (root / rel).exists())
        specs = {t.name: t for t in stream.tasks}
        tasks = []
        for name in selected:
            folder = _test_folder(stream, name)
            test_path = root / folder / "test.json"
            answers = gui_answers if name == "APP" else None
            sources = [test_path] + ([answers[0]] if answers else [])
            converted = cached_conversion(
                cache, stream.name, name, sources,
                lambda name=name, test_path=test_path, answers=answers: _normalized_test(
                    name, tests[name], test_path, answers),
                salt=f"match={extras.get('gui_answers_match')}" if answers else "",
            )
            tasks.append(
                Task(
                    name=name,
                    description=specs[name].description,
                    train_file=root / name / "train.json",
                    test_file=converted or test_path,
                    image_root=None,  # each file's images are relative to its own folder
                    scorer=specs[name].scorer,
                    max_new_tokens=specs[name].max_new_tokens,
                    extra_files=extra_files,
                )
            )
        return tasks

    return build


for _stream in (DOMAIN, ABILITY):
    register_stream(StreamSpec(name=_stream.name, description=_stream.description, build=_builder(_stream)))
