"""Bad-input catalogue: experiment configs and task data.

Config cases run ``mmcl run`` on a bad config and must be refused at load (exit 2), before the run dir
is touched. Data cases come in pairs built from one bad task folder: ``mmcl data check FOLDER`` and
``mmcl run`` on the same files must both refuse it (exit 3) with the same problem named, before any
training (``DATA_CASES`` lists them; ``tests/test_data.py`` checks that every one has both halves).
A pre-existing run dir with a result in it must come out unchanged."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from catalogue import Case, Fixtures, Invocation
from conftest import make_stream_config, write_config

# -- helpers ------------------------------------------------------------------------------------

KEEP = "kept.json"  # a result already computed in the run dir: it must survive every refusal
KEEP_TEXT = json.dumps({"matrix": [[12.5]]})


def write_png(path: Path, seed: int = 0, size: int = 32) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(path, format="PNG")
    return path


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


def conv(index: int, image: str | None = "images/ok.png", question: str = "<image>\nIs there a river?",
         answer: Any = "yes") -> dict[str, Any]:  # fmt: skip
    record: dict[str, Any] = {
        "id": f"t{index}",
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }
    if image:
        record["image"] = image
    return record


def qa(index: int, image: str | None = "images/ok.png", text: str = "<image>\nIs there a river?", answer: Any = "no") -> dict:
    record: dict[str, Any] = {"question_id": f"q{index}", "text": text, "answer": answer}
    if image:
        record["image"] = image
    return record


def good_task(folder: Path, n: int = 2) -> Path:
    write_png(folder / "images" / "ok.png")
    write_json(folder / "train.json", [conv(i) for i in range(n)])
    write_json(folder / "test.json", [qa(i) for i in range(n)])
    return folder


def run_dir(fx: Fixtures) -> Path:
    return fx.tmp_path / "run"


def prefilled_run_dir(fx: Fixtures) -> Path:
    out = run_dir(fx)
    out.mkdir(parents=True, exist_ok=True)
    (out / KEEP).write_text(KEEP_TEXT, encoding="utf-8")
    return out


def run_dir_untouched(fx: Fixtures) -> None:
    out = run_dir(fx)
    assert sorted(p.name for p in out.iterdir()) == [KEEP], list(out.iterdir())
    assert (out / KEEP).read_text(encoding="utf-8") == KEEP_TEXT


def nothing_written(fx: Fixtures) -> None:
    assert not run_dir(fx).exists()


def base_config(fx: Fixtures, **extra: Any) -> dict[str, Any]:
    """The tiny synth-domain experiment of the test suite (fails before training in every case here)."""
    config = make_stream_config(fx.tiny_model_dir, fx.stream_cache_dir, run_dir(fx))
    config["evaluation"] = {"batch_size": 8, "general": "none"}
    for dotted, value in extra.items():
        node = config
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


# -- config cases: refused at load, exit 2, the run dir untouched --------------------------------


def config_case(case_name: str, message: str, extra_argv: tuple[str, ...] = (), /, **settings: Any) -> Case:
    def build(fx: Fixtures) -> Invocation:
        prefilled_run_dir(fx)
        path = write_config(fx.tmp_path / "exp.yaml", base_config(fx, **settings))
        return Invocation(["run", str(path), *extra_argv])

    return Case(f"config-{case_name}", build, 2, message, run_dir_untouched)


def yaml_text_case(name: str, text: str, message: str) -> Case:
    def build(fx: Fixtures) -> Invocation:
        prefilled_run_dir(fx)
        path = fx.tmp_path / "exp.yaml"
        path.write_text(text, encoding="utf-8")
        return Invocation(["run", str(path), "--out", str(run_dir(fx))])

    return Case(f"config-{name}", build, 2, message, run_dir_untouched)


def _tasks(*names: str) -> list[dict[str, Any]]:
    return [{"name": name, "train": "data/t/train.json", "test": "data/t/test.json"} for name in names]


CONFIG_CASES = [
    config_case("epochs-zero", r"training\.epochs: must be > 0 when training\.max_steps <= 0", training__epochs=0),
    config_case("epochs-negative", r"training\.epochs: must be in \[0, inf\), got -1", training__epochs=-1),
    config_case("training-batch-size-negative", r"training\.batch_size: must be in \[1, inf\), got -4", training__batch_size=-4),
    config_case("lora-rank-zero", r"lora\.rank: must be in \[1, inf\), got 0", lora__rank=0),
    config_case("text-encoder-missing", r"method\.options\.text_encoder: no/such/encoder is not a directory",
                method={"name": "disco", "options": {"text_encoder": "no/such/encoder"}}),
    config_case("dora-on-a-method-that-merges-factors", r"lora\.use_dora: method olora builds, reads or merges its LoRA",
                method={"name": "olora"}, lora__use_dora=True),
    config_case("limit-selection-unknown", r"evaluation\.limit_selection: expected 'random' or 'first', got 'last'",
                evaluation={"batch_size": 8, "general": "none", "limit": 2, "limit_selection": "last"}),
    config_case("method-option-range", r"method\.options\.top_p: must be in \(0, 1\], got 0",
                method={"name": "grpo", "options": {"top_p": 0}}),
    config_case("method-option-negative", r"method\.options\.per_task: must be in \[0, inf\), got -5",
                method={"name": "replay", "options": {"per_task": -5}}),
    config_case("evaluation-batch-size-zero", r"evaluation\.batch_size: must be in \[1, inf\), got 0", evaluation__batch_size=0),
    config_case("learning-rate-negative", r"training\.learning_rate: must be in \(0, inf\), got -0\.001", training__learning_rate=-1e-3),
    config_case("learning-rate-inf", r"training\.learning_rate: must be in \(0, inf\), got inf", training__learning_rate=float("inf")),
    config_case("learning-rate-nan", r"training\.learning_rate: must be in \(0, inf\), got nan", training__learning_rate=float("nan")),
    config_case("learning-rate-word", r"training\.learning_rate: expected float, got str 'abc'", training__learning_rate="abc"),
    config_case("learning-rate-bool", r"training\.learning_rate: expected float, got bool True", training__learning_rate=True),
    config_case("warmup-ratio-above-one", r"training\.warmup_ratio: must be in \[0, 1\], got 1\.5", training__warmup_ratio=1.5),
    config_case("lora-dropout-one", r"lora\.dropout: must be in \[0, 1\), got 1", lora__dropout=1.0),
    config_case("max-length-zero", r"backbone\.max_length: must be in \[1, inf\), got 0", backbone__max_length=0),
    config_case("max-new-tokens-zero", r"evaluation\.max_new_tokens: must be in \[1, inf\), got 0", evaluation__max_new_tokens=0),
    config_case("limit-zero", r"evaluation\.limit: must be in \[1, inf\), got 0", evaluation__limit=0),
    config_case("low-shot-negative", r"evaluation\.low_shot\.shots: must be in \[0, inf\), got -1", evaluation__low_shot=-1),
    config_case("low-shot-section-negative", r"evaluation\.low_shot\.shots: must be in \[0, inf\), got -2",
                evaluation={"batch_size": 8, "general": "none", "low_shot": {"shots": -2}}),
    config_case("stop-after-stage-zero", r"--stop-after-stage: must be >= 1, got 0", ("--stop-after-stage", "0")),
    config_case("low-shot-extra-without-shots",
                r"evaluation\.low_shot\.extra_tasks: needs evaluation\.low_shot\.shots > 0",
                evaluation={"batch_size": 8, "general": "none", "low_shot": {"extra_tasks": {"name": "synth-unimodal"}}}),
    config_case("low-shot-extra-clashes-with-stream",
                r"evaluation\.low_shot\.extra_tasks: task 'a' is also a task of the stream",
                stream={"tasks": _tasks("a")},
                evaluation={"batch_size": 8, "general": "none", "low_shot": {"shots": 2, "extra_tasks": {"tasks": _tasks("a")}}}),
    config_case("superficial-section-word", r"evaluation\.superficial\.enabled: expected bool, got str 'yes'",
                evaluation={"batch_size": 8, "general": {"set": "none"}, "superficial": {"enabled": "yes"}}),
    config_case("protocol-unknown", r"evaluation\.protocols\.short_answer: unknown evaluation protocol 'short_answer'",
                evaluation={"batch_size": 8, "general": "none", "protocols": {"short_answer": {}}}),
    config_case("protocol-builtin-as-plugin", r"evaluation\.protocols\.general: a built-in protocol; set evaluation\.general",
                evaluation={"batch_size": 8, "general": "none", "protocols": {"general": {}}}),
    config_case("seed-too-large", r"seed: must be in \[0, 2147483647\], got 1099511627776", seed=2**40),
    config_case("task-max-new-tokens-zero", r"stream\.tasks\[0\]\.max_new_tokens: must be in \[1, inf\), got 0",
                stream={"tasks": [{**_tasks("a")[0], "max_new_tokens": 0}]}),
    config_case("task-chance-above-100", r"stream\.tasks\[0\]\.chance: must be in \[0, 100\], got 150",
                stream={"tasks": [{**_tasks("a")[0], "chance": 150}]}),
    config_case("task-name-escapes-run-dir", r"stream\.tasks\[0\]\.name: '\.\./\.\./\.\./x' is not a safe name",
                stream={"tasks": _tasks("../../../x")}),
    config_case("task-name-nested", r"stream\.tasks\[1\]\.name: 'a/b' is not a safe name", stream={"tasks": _tasks("ok", "a/b")}),
    config_case("task-name-dotdot", r"stream\.tasks\[0\]\.name: '\.\.' is not a safe name", stream={"tasks": _tasks("..")}),
    config_case("task-name-empty", r"stream\.tasks\[0\]\.name: '' is not a safe name", stream={"tasks": _tasks("")}),
    config_case("task-missing-train", r"stream\.tasks\[0\]: missing required key\(s\) train",
                stream={"tasks": [{"name": "a", "test": "t.json"}]}),
    config_case("task-duplicate-names", r"stream\.tasks: duplicate task name\(s\) \['a'\]", stream={"tasks": _tasks("a", "a")}),
    config_case("experiment-name-escapes", r"^error: .*name: '\.\./evil' is not a safe name", name="../evil"),
    config_case("experiment-name-flag", r"name: 'x/y' is not a safe name", ("--name", "x/y")),
    config_case("set-batch-size-negative", r"training\.batch_size: must be in \[1, inf\), got -4", ("--set", "training.batch_size=-4")),
    config_case("set-learning-rate-word", r"training\.learning_rate: expected float", ("--set", "training.learning_rate=fast")),
    config_case("set-through-a-value", r"--set training\.batch_size\.x: 'training\.batch_size' is not a mapping",
                ("--set", "training.batch_size.x=1")),
    config_case("set-without-equals", r"--set 'nokey': expected KEY=VALUE", ("--set", "nokey")),
    # migrated from tests/test_config.py
    config_case("unknown-key", r"unknown config key 'training\.lrr' \(known: .*learning_rate", training__lrr=0.1),
    config_case("unknown-top-level-key", r"unknown config key 'epochs'", epochs=2),
    config_case("unknown-task-key", r"unknown config key 'stream\.tasks\[0\]\.scorrer'",
                stream={"tasks": [{**_tasks("a")[0], "scorrer": "x"}]}),
    config_case("wrong-type-epochs", r"training\.epochs: expected float, got str 'two'", training__epochs="two"),
    config_case("wrong-type-seed-float", r"seed: expected int, got float 1\.5", seed=1.5),
    config_case("wrong-type-seed-bool", r"seed: expected int, got bool True", seed=True),
    config_case("wrong-type-batch-size-float", r"training\.batch_size: expected int, got float 8\.0", training__batch_size=8.0),
    config_case("wrong-type-section", r"training: expected a mapping, got str", training="fast"),
    config_case("wrong-type-name", r"name: expected str, got int 7", name=7),
    config_case("wrong-type-tasks", r"stream\.tasks: expected a list, got dict", stream={"tasks": {"name": "a"}}),
    config_case("unknown-method", r"method\.name: unknown method 'ewc-typo'", method={"name": "ewc-typo"}),
    config_case("unknown-method-option", r"unknown config key 'method\.options\.rank'", method={"name": "seq-lora", "options": {"rank": 4}}),
    config_case("unknown-stream-option", r"train_per_tsk", stream__options={"train_per_tsk": 8}),
    config_case("unknown-stream", r"stream\.name: unknown stream 'nope'", stream={"name": "nope"}),
    config_case("stream-flag-not-0-or-1", r"stream\.options\.shifted_test: expected 0 or 1, got 2",
                stream={"name": "synth-ability", "options": {"shifted_test": 2}}),
    config_case("registered-stream-name-with-tasks", r"stream\.name: 'synth-domain' is a registered stream, but stream\.tasks",
                stream={"name": "synth-domain", "tasks": _tasks("a")}),
    yaml_text_case("invalid-yaml", "name: x\ntraining: {epochs: 1\n", r"exp\.yaml: line \d+ invalid YAML"),
    yaml_text_case("not-a-mapping", "- a\n- b\n", r"exp\.yaml: the config must be a mapping"),
    Case("config-file-missing", lambda fx: Invocation(["run", str(fx.tmp_path / "nope.yaml")]), 2,
         r"nope\.yaml: config file not found", nothing_written),
]


# -- data cases: data check and run refuse the same problem, exit 3 ------------------------------


def _set(folder: Path, split: str, records: Any) -> None:
    write_json(folder / f"{split}.json", records)


def _text(folder: Path, name: str, text: str | bytes) -> None:
    (folder / "train.json").unlink()
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


LONG_QUESTION = "<image>\n" + " ".join(["river"] * 700)

# name -> (what to do to a good task folder "t", the problem as a regex naming file and record)
DATA_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty-test-set": (lambda f: _set(f, "test", []), r"t/test\.json: no records \(the test set of task t is empty\)"),
    "empty-train-set": (lambda f: _set(f, "train", []), r"t/train\.json: no records \(the train set of task t is empty\)"),
    "empty-train-jsonl": (lambda f: _text(f, "train.jsonl", "\n\n"), r"t/train\.jsonl: no records"),
    "malformed-json": (lambda f: _text(f, "train.json", '[\n {"id": "x",,}\n]'), r"t/train\.json: malformed JSON at line 2"),
    "malformed-jsonl-line": (lambda f: _text(f, "train.jsonl", json.dumps(conv(0)) + "\n{oops\n"),
                             r"t/train\.jsonl: line 2: malformed JSON"),
    "not-a-list": (lambda f: _set(f, "train", {"records": []}), r"t/train\.json: expected a JSON list of records, found dict"),
    "not-utf8": (lambda f: _text(f, "train.json", b"[\xff\xfe]"), r"t/train\.json: not UTF-8 text"),
    "missing-test-file": (lambda f: (f / "test.json").unlink(), r"t/test\.json: file not found"),
    "record-not-an-object": (lambda f: _set(f, "train", [conv(0), "text"]), r"t/train\.json: record 1: expected an object"),
    "missing-conversations": (lambda f: _set(f, "train", [conv(0), {"id": "x"}]),
                              r"t/train\.json: record 1: missing or empty 'conversations'"),
    "broken-alternation": (lambda f: _set(f, "train", [{"conversations": [{"from": "gpt", "value": "a"}]}]),
                           r"t/train\.json: record 0: conversations\[0\] from 'gpt' breaks the human/gpt alternation"),
    "unknown-role": (lambda f: _set(f, "train", [{"conversations": [{"from": "bot", "value": "a"}]}]),
                     r"t/train\.json: record 0: conversations\[0\] from 'bot': expected 'human' or 'gpt'"),
    "answer-not-text": (lambda f: _set(f, "train", [conv(0, answer=["yes"])]),
                        r"t/train\.json: record 0: conversations\[1\] needs a string 'value'"),
    "ends-with-question": (lambda f: _set(f, "train", [{"conversations": [{"from": "human", "value": "q"}]}]),
                           r"t/train\.json: record 0: conversation ends with a human turn"),
    "image-not-a-path": (lambda f: _set(f, "train", [conv(0, image=None) | {"image": 5}]),
                         r"t/train\.json: record 0: 'image' must be a path"),
    "missing-image": (lambda f: _set(f, "test", [qa(0), qa(1, image="images/gone.png")]),
                      r"t/test\.json: record 1: image not found: .*gone\.png"),
    "corrupt-image": (lambda f: ((f / "images" / "ok.png").write_bytes((f / "images" / "ok.png").read_bytes()[:200])),
                      r"t/train\.json: record 0: unreadable image .*ok\.png"),
    "not-an-image": (lambda f: ((f / "images" / "ok.png").write_text("hello", encoding="utf-8")),
                     r"t/train\.json: record 0: unreadable image .*ok\.png"),
    "fewer-placeholders-than-images": (
        lambda f: _set(f, "train", [conv(0, image=None) | {"image": ["images/ok.png", "images/ok.png"]}]),
        r"t/train\.json: record 0: 1 '<image>' placeholder\(s\) for 2 image\(s\)"),
    "placeholders-without-images": (lambda f: _set(f, "test", [qa(0, image=None, text="<image> q")]),
                                    r"t/test\.json: record 0: 1 '<image>' placeholder\(s\) for 0 image\(s\)"),
    "missing-question-id": (lambda f: _set(f, "test", [{"image": "images/ok.png", "text": "q", "answer": "a"}]),
                            r"t/test\.json: record 0: missing field 'question_id'"),
    "answer-bool": (lambda f: _set(f, "test", [qa(0, answer=True)]), r"t/test\.json: record 0: missing or non-string field 'answer'"),
    "duplicate-test-id": (lambda f: _set(f, "test", [qa(0), qa(1), qa(0)]),
                          r"t/test\.json: record 2: duplicate id 'q0' \(first at record 0\)"),
    "over-long-sample": (lambda f: _set(f, "train", [conv(0), conv(1, question=LONG_QUESTION)]),
                         r"t/train\.json: record 1: \d+ tokens exceed backbone\.max_length 512"),
}


def bad_folder(fx: Fixtures, spoil: Callable[[Path], None]) -> Path:
    root = fx.tmp_path / "data"
    good_task(root / "t")
    spoil(root / "t")
    return root


def data_check_case(name: str, spoil: Callable[[Path], None], message: str) -> Case:
    def build(fx: Fixtures) -> Invocation:
        return Invocation(["data", "check", str(bad_folder(fx, spoil))])

    return Case(f"data-check-{name}", build, 3, message)


def data_run_case(name: str, spoil: Callable[[Path], None], message: str) -> Case:
    """``mmcl run`` on the same folder (the default tiny-llava backbone, as data check uses for a folder)."""
    def build(fx: Fixtures) -> Invocation:
        prefilled_run_dir(fx)
        folder = bad_folder(fx, spoil)
        settings = [f"stream.cache_dir={fx.stream_cache_dir}", "evaluation.general=none", "training.max_steps=1"]
        return Invocation(["run", str(folder), "--out", str(run_dir(fx)), *[a for s in settings for a in ("--set", s)]])

    return Case(f"data-run-{name}", build, 3, message, run_dir_untouched)


DATA_PAIRS = [
    case
    for name, (spoil, message) in DATA_CASES.items()
    for case in (data_check_case(name, spoil, message), data_run_case(name, spoil, message))
]


def _unsafe_folder(fx: Fixtures) -> Path:
    root = fx.tmp_path / "data"
    good_task(root / "two words")
    return root


OTHER_CASES = [
    Case("data-check-folder-with-unsafe-task-name", lambda fx: Invocation(["data", "check", str(_unsafe_folder(fx))]), 2,
         r"two words: task folder name: 'two words' is not a safe name"),
    Case("data-run-folder-with-unsafe-task-name",
         lambda fx: Invocation(["run", str(_unsafe_folder(fx)), "--out", str(run_dir(fx))]), 2,
         r"two words: task folder name: 'two words' is not a safe name", nothing_written),
    Case("data-check-folder-without-tasks", lambda fx: Invocation(["data", "check", str(fx.tmp_path)]), 2,
         r"no task folders \(expected <task>/train\.json and <task>/test\.json\)"),
    Case("data-run-folder-without-tasks", lambda fx: Invocation(["run", str(fx.tmp_path), "--out", str(run_dir(fx))]), 2,
         r"no task folders", nothing_written),
]

def _low_shot_frozen_method(fx: Fixtures) -> Invocation:
    config = base_config(fx, method={"name": "olora"}, training__max_steps=1)
    config["evaluation"] = {"batch_size": 8, "general": "none", "low_shot": 2, "evaluate_base": False,
                            "forward_transfer": True}  # fmt: skip
    return Invocation(["run", str(write_config(fx.tmp_path / "exp.yaml", config))])


def _first_stage_kept(fx: Fixtures) -> None:
    assert (run_dir(fx) / "stages" / "1_rs" / "state.safetensors").is_file()
    assert len(list((run_dir(fx) / "predictions" / "1_rs").glob("*.jsonl"))) == 5


MID_RUN_CASES = [
    # O-LoRA freezes the finished task's adapter: low-shot fine-tuning after stage 1 has nothing to train
    Case("config-low-shot-nothing-trainable", _low_shot_frozen_method, 2,
         r"evaluation\.low_shot: method olora leaves nothing trainable between tasks \(after stage 1_rs\)",
         _first_stage_kept),
]

CASES = [*CONFIG_CASES, *DATA_PAIRS, *OTHER_CASES, *MID_RUN_CASES]
