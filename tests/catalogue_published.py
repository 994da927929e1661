"""Bad-input catalogue: published streams' own inputs. MLLM-CL's APP task scored against MMT-Bench's answers
file (``stream.options.gui_answers``): a file that is missing, lacks the answer column, holds a non-letter
answer, lacks a question's row, or a question id of another form; an unknown match rule; and the file
accepted. Each runs ``mmcl data check mllm-cl-ability`` (exit 3 for data, 2 for options)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from catalogue import Case, Fixtures, Invocation
from test_published_streams import app_layout, dump, write_mmt_bench_answers


def app_check(fx: Fixtures, answers: Callable[[Path], Path | None], **extra: str) -> Invocation:
    root = app_layout(fx.tmp_path / "ability")
    argv = ["data", "check", "mllm-cl-ability", "--set", f"stream.options.root={root}",
            "--set", "stream.options.tasks=[APP]", "--set", f"stream.cache_dir={fx.tmp_path / 'cache'}"]
    path = answers(fx.tmp_path)
    if path is not None:
        argv += ["--set", f"stream.options.gui_answers={path}"]
    for key, value in extra.items():
        argv += ["--set", f"stream.options.{key}={value}"]
    return Invocation(argv)


def five_rows(folder: Path) -> Path:
    return write_mmt_bench_answers(folder / "answers.tsv", ["A", "B", "C", "D", "B"])


def without_answer_column(folder: Path) -> Path:
    path = five_rows(folder)
    path.write_text(path.read_text().replace("\tanswer\t", "\tgold\t", 1))
    return path


def with_bad_id(fx: Fixtures) -> Invocation:
    invocation = app_check(fx, five_rows)
    test = fx.tmp_path / "ability" / "APP_test" / "test.json"
    records = json.loads(test.read_text())
    records[2]["question_id"] = "MMT-7"
    dump(test, records)
    return invocation


def case(name: str, build: Callable[[Fixtures], Invocation], code: int, message: str) -> Case:
    return Case(f"published-{name}", build, code, message)


CASES = [
    case("app-without-answers", lambda fx: app_check(fx, lambda _: None), 3,
         r"APP_test/test\.json: record 0: missing or non-string field 'answer' .*stream\.options\.gui_answers"),
    case("gui-answers-file-missing", lambda fx: app_check(fx, lambda folder: folder / "nope.tsv"), 3,
         r"nope\.tsv: MMT-Bench answers file not found \(stream\.options\.gui_answers\)"),
    case("gui-answers-no-answer-column", lambda fx: app_check(fx, without_answer_column), 3,
         r"answers\.tsv: no 'answer' column in the header"),
    case("gui-answers-not-a-letter",
         lambda fx: app_check(fx, lambda folder: write_mmt_bench_answers(folder / "answers.tsv", ["A", "tap"])), 3,
         r"answers\.tsv: line 3: answer 'tap' is not an option letter"),
    case("gui-answers-row-absent",
         lambda fx: app_check(fx, lambda folder: write_mmt_bench_answers(folder / "answers.tsv", ["A", "B", "C"])), 3,
         r"APP_test/test\.json: record 1: question_id 'ALL_3' has no row 3 in .*answers\.tsv"),
    case("gui-answers-question-id-form", with_bad_id, 3,
         r"APP_test/test\.json: record 2: question_id 'MMT-7' is not of MMT-Bench's form ALL_<number>"),
    case("gui-answers-match-unknown", lambda fx: app_check(fx, five_rows, gui_answers_match="position"), 2,
         r"stream\.options\.gui_answers_match: expected one of row, index, got 'position'"),
    case("accepted-gui-answers", lambda fx: app_check(fx, five_rows), 0, ""),
]
