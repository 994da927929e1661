"""MMT-Bench's published test answers, for scoring MLLM-CL's APP task offline.

MLLM-CL scored APP (the GUI-navigation questions of MMT-Bench's ALL split) on MMT-Bench's eval.ai server,
which closed on 2026-02-01 (MLLM-CL issue #10). The MMT-Bench authors then attached the annotated ALL split,
``MMT-Bench_ALL_MI_anno.tsv``, to OpenGVLab/MMT-Bench issue #12; it cannot be downloaded here, so the user
fetches it by hand and names it with ``stream.options.gui_answers``.

How an APP test record finds its answer. APP's ``test.json`` names each question ``ALL_<k>``. MLLM-CL's
``ETrain/Eval/LLaVA/CoIN/convert_result_to_submission.py`` strips ``ALL_``, reads MMT-Bench's ALL
submission TSV with pandas and writes the reply into the row whose position (``iterrows``' default index,
0-based over the data rows) is ``k``. So ``k`` is a **row position** of the ALL table (``match: row``, the
default). If a copy of the answers file is ordered differently, ``match: index`` looks ``k`` up in the
file's own ``index`` column instead.

The file is tab-separated with a header; only the ``answer`` column (an option letter) and, for ``match:
index``, the ``index`` column are read. Its ``image`` column holds base64 images, so fields can be large.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

from mmcl.errors import ConfigError, DataError

MATCH_CHOICES = ("row", "index")
_APP_ID = re.compile(r"(?:ALL_)?(\d+)")
_LETTER = re.compile(r"[A-Z]")


def read_answers(path: Path, match: str) -> dict[int, str]:
    """``k -> option letter`` from an MMT-Bench answers TSV, keyed by row position or by the ``index`` column."""
    if match not in MATCH_CHOICES:
        raise ConfigError(f"stream.options.gui_answers_match: expected one of {', '.join(MATCH_CHOICES)}, "
                          f"got {match!r}")
    if not path.is_file():
        raise DataError(f"{path}: MMT-Bench answers file not found (stream.options.gui_answers)")
    csv.field_size_limit(sys.maxsize)  # the image column holds whole base64 images
    answers: dict[int, str] = {}
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            needed = ["answer"] + (["index"] if match == "index" else [])
            absent = [column for column in needed if column not in (reader.fieldnames or [])]
            if absent:
                raise DataError(f"{path}: no {absent[0]!r} column in the header (an MMT-Bench answers TSV has "
                                "index, question, A..., answer, ...)")
            for position, row in enumerate(reader):
                line = position + 2  # the header is line 1
                letter = (row.get("answer") or "").strip().upper()
                if not _LETTER.fullmatch(letter):
                    raise DataError(f"{path}: line {line}: answer {row.get('answer')!r} is not an option letter")
                key = position
                if match == "index":
                    try:
                        key = int((row.get("index") or "").strip())
                    except ValueError:
                        raise DataError(f"{path}: line {line}: index {row.get('index')!r} is not an integer") from None
                    if key in answers:
                        raise DataError(f"{path}: line {line}: index {key} appears twice")
                answers[key] = letter
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: unreadable TSV ({exc})") from None
    if not answers:
        raise DataError(f"{path}: no answer rows")
    return answers


def answer_for(question_id: object, answers: dict[int, str], source: Path, where: str) -> str:
    """The gold letter of APP question ``ALL_<k>`` (or ``k``); DataError naming the record when absent."""
    found = _APP_ID.fullmatch(str(question_id).strip())
    if found is None:
        raise DataError(f"{where}: question_id {question_id!r} is not of MMT-Bench's form ALL_<number>")
    key = int(found.group(1))
    if key not in answers:
        raise DataError(f"{where}: question_id {question_id!r} has no row {key} in {source}")
    return answers[key]
