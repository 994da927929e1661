"""MR-LoRA: the pure routing parts by hand, the router training and two-stage inference on the tiny
model, the routing report, a state round trip, and one end-to-end run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import set_up_on_tiny
import mmcl.methods.mrlora  # noqa: F401  (registers "mrlora")
from mmcl.data.sample import Sample
from mmcl.methods.base import LoraSettings
from mmcl.methods.lora_utils import adapter_tensors
from mmcl.methods.mrlora import MrLora
from mmcl.methods.mrlora_router import (
    MrLoraConfig,
    choose_experts,
    common_prefix_length,
    fallback_expert,
    generate_grouped,
    group_by_expert,
    letter_token_ids,
    read_router_answer,
    router_prompt,
)
from mmcl.methods.mrlora_stats import new_entry, raw_stage, routing_sections, summarize_stage


def sample(index: int, task: str = "t", prompt: str = "<image>\nHow many bars?") -> Sample:
    return Sample(id=f"s{index}", task=task, images=(Path(f"img{index}.png"),), prompt=prompt, answer=str(index))


# -- pure parts ----------------------------------------------------------------------------------
def test_choose_experts_is_the_argmax_of_letter_scores():
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.9, 0.0], [-3.0, -2.0, -1.0], [1.0, 1.0, 0.5]])
    assert choose_experts(logits).tolist() == [1, 0, 2, 0]  # a tie goes to the first letter
    assert choose_experts(torch.tensor([[7.0]])).tolist() == [0]
    with pytest.raises(ValueError):
        choose_experts(torch.zeros(3))


def test_grouping_gives_the_same_answers_as_routing_sample_by_sample():
    samples = [sample(i) for i in range(7)]
    choices = torch.tensor([2, 0, 2, 1, 0, 2, 1])
    calls: list[tuple[int, list[str]]] = []

    def run_expert(expert: int, group: list[Sample]) -> list[str]:
        calls.append((expert, [s.id for s in group]))
        return [f"expert{expert}:{s.id}" for s in group]

    grouped = generate_grouped(samples, choices, run_expert)
    one_by_one = [run_expert(int(c), [s])[0] for s, c in zip(samples, choices)]
    assert grouped == one_by_one
    batch_calls = calls[:3]
    assert sorted(expert for expert, _ in batch_calls) == [0, 1, 2]  # each chosen expert runs once per batch
    assert dict(batch_calls) == {0: ["s1", "s4"], 1: ["s3", "s6"], 2: ["s0", "s2", "s5"]}
    assert group_by_expert([1, 1, 0]) == {0: [2], 1: [0, 1]}
    assert group_by_expert(torch.tensor([3])) == {3: [0]}


def test_router_prompt_lists_letters_and_descriptions_and_keeps_the_image():
    original = sample(0, task="fin", prompt="<image>\nHow many bars are in the chart?")
    original = Sample(**{**original.__dict__, "history": (("hi", "hello"),)})
    routed = router_prompt(original, ["Remote sensing maps", "Medical scans", "Finance charts"], answer="C")
    assert "A. Remote sensing maps" in routed.prompt
    assert "B. Medical scans" in routed.prompt and "C. Finance charts" in routed.prompt
    assert routed.prompt.count("<image>") == 1 and "How many bars are in the chart?" in routed.prompt
    assert routed.prompt.index("C. Finance") < routed.prompt.index("How many bars")
    assert "letter" in routed.prompt.splitlines()[0]
    assert routed.prompt.endswith("How many bars are in the chart?")  # the question right before the answer
    assert routed.images == original.images and routed.id == original.id and routed.task == "fin"
    assert routed.answer == "C" and routed.history == ()
    assert router_prompt(original, ["x"]).answer == ""


def test_common_prefix_of_a_left_padded_batch():
    pad, image = 0, 9
    ids = torch.tensor([[5, 6, 7, 9, 9, 3, 4], [pad, pad, 5, 6, 7, 9, 2], [pad, 5, 6, 7, 8, 1, 1]])
    mask = (ids != pad).long()
    assert common_prefix_length(ids, mask, image) == 3  # 5 6 7, then the rows differ
    assert common_prefix_length(ids[:2], mask[:2], image) == 3  # cut before the image token
    assert common_prefix_length(ids[:2], mask[:2], None) == 4
    same = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert common_prefix_length(same, torch.ones_like(same), None) == 2  # every row keeps a token


def test_config_defaults_and_checks():
    from mmcl.errors import ConfigError

    config = MrLoraConfig()
    assert config.router_samples_per_task == 20 and config.router_rank is None
    with pytest.raises(ConfigError, match="router_samples_per_task"):
        MrLoraConfig(router_samples_per_task=0)
    with pytest.raises(ConfigError, match="router_learning_rate"):
        MrLoraConfig(router_learning_rate=0.0)
    assert config.router_protocol == "per-stage" and config.router_max_new_tokens == 16
    with pytest.raises(ConfigError, match="router_protocol"):
        MrLoraConfig(router_protocol="once")
    with pytest.raises(ConfigError, match="router_max_rounds"):
        MrLoraConfig(router_max_rounds=0)


def test_reading_a_generated_router_answer_like_the_paper_repo():
    assert read_router_answer("B", 3) == 1 and read_router_answer(" C\n", 3) == 2
    assert read_router_answer("B.", 3) == 1  # one character that is not a letter is tolerated
    assert read_router_answer("B A", 3) == 0  # two letters: the first in letter order wins
    assert read_router_answer("D", 3) is None  # not an expert's letter
    assert read_router_answer("The answer is B", 3) is None  # illegal: many other characters
    assert read_router_answer("", 3) is None
    draws = {fallback_expert(0, f"s{i}", 3) for i in range(30)}
    assert draws == {0, 1, 2} and fallback_expert(0, "s1", 3) == fallback_expert(0, "s1", 3)


def test_summary_of_hand_made_counts():
    raw = {
        "experts": ["a", "b"],
        "tasks": {
            "a": {"n": 4, "routed": {"a": 3, "b": 1}, "score_sum": 2.0, "score_n": 4, "oracle_sum": 3.0, "oracle_n": 4, "fallback": 0},
            "b": {"n": 2, "routed": {"b": 2}, "score_sum": 1.0, "score_n": 2, "oracle_sum": 1.0, "oracle_n": 2, "fallback": 0},
            "c": {"n": 2, "routed": {"a": 2}, "score_sum": 0.0, "score_n": 2, "oracle_sum": 0.0, "oracle_n": 0, "fallback": 0},
        },
    }
    summary = summarize_stage(raw)
    assert summary["router_accuracy"] == pytest.approx(100.0 * 5 / 6)  # unseen task c does not count
    assert summary["tasks"]["a"]["router_accuracy"] == 75.0 and summary["tasks"]["c"]["router_accuracy"] is None
    assert summary["tasks"]["a"]["score"] == 50.0 and summary["tasks"]["a"]["oracle_score"] == 75.0
    assert summary["tasks"]["c"]["oracle_score"] is None
    assert summary["confusion"] == {"rows": ["a", "b", "c"], "columns": ["a", "b"], "counts": [[3, 1], [0, 2], [2, 0]]}
    back = raw_stage(summary)
    assert back["tasks"]["a"] == raw["tasks"]["a"] and back["tasks"]["c"]["routed"] == {"a": 2, "b": 0}
    assert summarize_stage(back) == summary
    skipped = summarize_stage({"experts": ["a"], "evaluated": False, "tasks": {"a": {**raw["tasks"]["c"], "routed": {"not-evaluated": 2}}}})
    assert skipped["evaluated"] is False and skipped["router_accuracy"] is None
    assert skipped["confusion"]["columns"] == ["not-evaluated"] and skipped["tasks"]["a"]["router_accuracy"] is None


# -- on the tiny model ---------------------------------------------------------------------------
ROUTER_OPTIONS = {
    "router_samples_per_task": 6,
    "router_epochs": 4.0,
    "router_learning_rate": 1e-2,
    "router_batch_size": 6,
}


def new_method(model_dir: Path, tasks) -> MrLora:
    return set_up_on_tiny(MrLora(MrLoraConfig(**ROUTER_OPTIONS), LoraSettings(rank=4, alpha=8.0), seed=0), model_dir, tasks)


def fit(method: MrLora, index: int, tasks, work: Path) -> None:
    from mmcl.training.sft import TrainingConfig, train_on_samples

    settings = TrainingConfig(max_steps=2, batch_size=4, learning_rate=3e-2, warmup_ratio=0.0, progress_bar=False)
    method.before_task(index, tasks[index])
    samples = method.train_data(index, tasks[index], tasks[index].train_samples)
    train_on_samples(method.backbone, samples, settings, work / f"trainer{index}", seed=index)


@pytest.fixture(scope="module")
def two_tasks(tiny_model_dir: Path, tasks, tmp_path_factory):
    work = tmp_path_factory.mktemp("mrlora")
    method = new_method(tiny_model_dir, tasks)
    record = {"base": method.generate(tasks[1].test_samples, tasks[1], 4)}
    with method.backbone.model.disable_adapter():
        record["plain_base"] = method.backbone.generate(tasks[1].test_samples, 4)
    fit(method, 0, tasks, work)
    method.after_task(0, tasks[0])
    record["router_after_1"] = "router" in method.backbone.model.peft_config
    record["one_expert"] = method.generate(tasks[0].test_samples, tasks[0], 4)
    record["one_expert_routes"] = list(method.last_routes)
    fit(method, 1, tasks, work)
    record["expert0_before_router"] = adapter_tensors(method.backbone, "expert_rs")
    record["expert1_before_router"] = adapter_tensors(method.backbone, "expert_med")
    method.after_task(1, tasks[1])
    return method, record


def test_router_trains_on_base_plus_router_only(two_tasks, tasks):
    method, record = two_tasks
    model = method.backbone.model
    assert not record["router_after_1"]  # no router with a single expert
    assert method.trained == ["expert_rs", "expert_med"] and method.router_experts == 2
    assert "router" in model.peft_config
    for name, key in (("expert_rs", "expert0_before_router"), ("expert_med", "expert1_before_router")):
        for tensor_name, value in record[key].items():
            torch.testing.assert_close(adapter_tensors(method.backbone, name)[tensor_name], value, rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in adapter_tensors(method.backbone, "router").items() if "lora_B" in k)
    # the routing set: seed-determined ids of each task's training set, at most k per task
    assert list(method.routing_set) == ["rs", "med"]
    for task in tasks[:2]:
        ids = method.routing_set[task.name]
        assert len(ids) == 6 and len(set(ids)) == 6
        assert set(ids) <= {s.id for s in task.train_samples}
        assert ids == method.pick_routing_ids(task)
    prompts = method.router_training_samples()
    assert [p.answer for p in prompts] == ["A"] * 6 + ["B"] * 6
    assert "A. Remote sensing" in prompts[0].prompt and "B. Medical" in prompts[0].prompt
    ids = letter_token_ids(method.backbone, 5)
    assert len(set(ids)) == 5
    assert method.trainable_parameters() > sum(p.numel() for n, p in model.named_parameters() if ".expert_med." in n)


def test_inference_before_and_with_one_expert(two_tasks, tasks):
    _, record = two_tasks
    assert record["base"] == record["plain_base"]  # no expert yet: the base model answers
    assert record["one_expert_routes"] == ["rs"] * len(tasks[0].test_samples)
    assert len(record["one_expert"]) == len(tasks[0].test_samples)


def test_two_stage_inference_ignores_the_task_argument(two_tasks, tasks):
    method, _ = two_tasks
    mixed = [tasks[0].test_samples[0], tasks[1].test_samples[0], tasks[0].test_samples[1], tasks[1].test_samples[1]]
    choices = method.route(mixed).tolist()
    answers = method.generate(mixed, tasks[0], 4)
    routes = list(method.last_routes)
    assert routes == [["rs", "med"][c] for c in choices]
    assert method.generate(mixed, tasks[1], 4) == answers  # the task identity plays no part
    assert method.last_routes == routes
    # each answer is the chosen expert's own answer
    for item, choice, answer in zip(mixed, choices, answers):
        method.backbone.model.set_adapter(method.trained[choice])
        assert method.backbone.generate([item], 4) == [answer]


def test_shared_prefix_routing_pass_equals_the_plain_one(two_tasks, tasks):
    method, _ = two_tasks
    descriptions = method.descriptions()
    prompts = [router_prompt(s, descriptions) for t in tasks for s in t.test_samples[:2]]  # of different lengths
    method.backbone.model.set_adapter("router", inference_mode=True)
    method.backbone.model.eval()
    shared = method.next_token_logits(prompts)
    plain = method.next_token_logits(prompts, share_prefix=False)
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-4)
    method.route(prompts[:3])
    assert method._prefix_sharing is True  # the one-off check on this backbone passed


def test_routing_report(two_tasks, tasks):
    method, _ = two_tasks
    method.routing.pop("2_med", None)
    for task in tasks[:3]:  # two seen tasks and one forward-transfer evaluation
        method.generate(task.test_samples, task, 4)
    report = method.routing_report()
    json.dumps(report)
    stage = report["stages"]["2_med"]
    assert stage["experts"] == ["rs", "med"]
    confusion = stage["confusion"]
    assert confusion["rows"] == ["rs", "med", "ad"] and confusion["columns"] == ["rs", "med"]
    assert [sum(row) for row in confusion["counts"]] == [4, 4, 4]
    correct = confusion["counts"][0][0] + confusion["counts"][1][1]
    assert stage["router_accuracy"] == pytest.approx(100.0 * correct / 8)
    assert stage["tasks"]["ad"]["router_accuracy"] is None and stage["tasks"]["ad"]["oracle_score"] is None
    for name in ("rs", "med"):
        entry = stage["tasks"][name]
        assert entry["n"] == 4 and 0.0 <= entry["score"] <= 100.0 and 0.0 <= entry["oracle_score"] <= 100.0
    assert [r["experts"] for r in report["router_training"]] == [2] and report["router_training"][0]["samples"] == 12
    assert report["stages"]["1_rs"]["experts"] == ["rs"]
    assert report["stages"]["1_rs"]["router_accuracy"] == 100.0
    assert "0_base" in report["stages"]

    overview, *details = method.report_sections()  # data only: tables
    assert overview["title"] == "MR-LoRA routing" and overview["kind"] == "table"
    assert [row[0] for row in overview["rows"]] == list(report["stages"]) and overview["note"] == report["protocol_note"]
    after_two = next(section for section in details if "after stage 2_med" in section["title"])
    assert after_two["kind"] == "table" and f"router accuracy {stage['router_accuracy']:.1f}%" in after_two["title"]
    assert after_two["columns"] == ["true task \\ expert", "rs", "med", "router acc.", "score", "oracle score"]
    assert [row[0] for row in after_two["rows"]] == ["rs", "med", "ad"]
    assert after_two["rows"][0][1:3] == [str(n) for n in confusion["counts"][0]] and after_two["rows"][2][3:] == [
        "-", f"{stage['tasks']['ad']['score']:.1f}", "-"]  # fmt: skip
    assert all(len(row) == len(section["columns"]) for section in details for row in section["rows"])


def test_routing_sections_mark_the_stages_a_protocol_does_not_evaluate():
    skipped = new_entry()
    skipped.update(n=2, routed={"not-evaluated": 2})
    last = new_entry()
    last.update(n=2, routed={"a": 1, "b": 1}, score_sum=1.0, score_n=2, fallback=1)
    stages = {
        "1_a": summarize_stage({"experts": ["a"], "evaluated": False, "tasks": {"a": skipped}}),
        "2_b": summarize_stage({"experts": ["a", "b"], "evaluated": True, "tasks": {"a": last}}),
    }
    report = {"protocol": "paper", "protocol_note": "Paper protocol.", "stages": stages}
    overview, final = routing_sections(report)
    assert overview["rows"] == [["1_a", "not evaluated", "-"], ["2_b", "50.0", "1"]]
    assert "not evaluated" in overview["note"] and "'paper'" in overview["note"]
    assert final["title"] == "MR-LoRA routing after stage 2_b: router accuracy 50.0%"
    assert final["rows"] == [["a", "1", "1", "50.0", "50.0", "-"]] and "1 illegal router answers" in final["note"]
    assert routing_sections({**report, "stages": {}}) == []


def test_state_round_trip(two_tasks, tiny_model_dir: Path, tasks, tmp_path: Path):
    method, _ = two_tasks
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    keys = load_file(str(tmp_path / "state.safetensors"))
    assert {k.split("::")[0] for k in keys} == {"expert_rs", "expert_med", "router"}

    fresh = new_method(tiny_model_dir, tasks)
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(load_file(str(tmp_path / "state.safetensors")))
    assert fresh.trained == method.trained and fresh.routing_set == method.routing_set
    assert fresh.router_experts == 2 and fresh.routing_report() == method.routing_report()
    mixed = [*tasks[0].test_samples[:2], *tasks[1].test_samples[:2]]
    assert fresh.route(mixed).tolist() == method.route(mixed).tolist()
    assert fresh.generate(mixed, tasks[0], 4) == method.generate(mixed, tasks[0], 4)
    assert fresh.router_training_samples() == method.router_training_samples()

    # a resumed run takes back the routing counts of evaluations stored before the crash
    fresh.routing = {}
    fresh.generate(tasks[2].test_samples, tasks[2], 4)
    fresh.load_evaluation_summary(method.evaluation_summary())
    stage = fresh.routing_report()["stages"]["2_med"]
    assert set(stage["tasks"]) == {"rs", "med", "ad"}
    assert stage["tasks"]["rs"] == method.routing_report()["stages"]["2_med"]["tasks"]["rs"]


def test_cli_run_mrlora(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path):
    from conftest import make_stream_config, write_config
    from mmcl.cli import main

    method = {"name": "mrlora", "options": {"router_samples_per_task": 2, "router_epochs": 1.0, "router_batch_size": 4}}
    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "run", method=method)
    config["stream"]["options"] = {"train_per_task": 4, "test_per_task": 2}
    config["training"] = {"max_steps": 1, "batch_size": 4, "progress_bar": False}
    config["evaluation"] = {"batch_size": 8, "forward_transfer": False, "evaluate_base": False, "max_new_tokens": 4}
    path = write_config(tmp_path / "mrlora.yaml", config)
    assert main(["run", str(path), "--method", "mrlora"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "mrlora" and results["complete"]
    stages = sorted((tmp_path / "run" / "stages").iterdir())
    assert len(stages) == 5
    state = json.loads((stages[-1] / "state.json").read_text())
    assert state["router_experts"] == 5 and len(state["routing_set"]) == 5
    # the state of stage k holds the routing report of the evaluations of stages before k
    assert sorted(state["routing_report"]["stages"]) == ["1_rs", "2_med", "3_ad", "4_sci"]
    # the runner stores the routing report of every evaluated stage and the report shows it
    routing = results["method_summary"]["stages"]
    assert sorted(routing) == ["1_rs", "2_med", "3_ad", "4_sci", "5_fin"]
    assert sum(map(sum, routing["5_fin"]["confusion"]["counts"])) == 5 * 2
    assert "MR-LoRA routing" in (tmp_path / "run" / "report.html").read_text()
    assert main(["run", str(path), "--method", "mrlora"]) == 0  # resumes: everything is done


# -- tasks that share their images ---------------------------------------------------------------
def test_router_tells_apart_tasks_on_the_same_images(tiny_model_dir: Path, tmp_path: Path):
    """maps and mapdesc show the same aerial maps and differ only in the question (as CoIN's VQAv2 and
    Grounding share COCO). The router alone is trained (it never looks at the experts, so they are left
    untrained here); at every stage it must send >= 95% of each seen task's test samples to its expert."""
    from shared_images import write_shared_image_stream
    from mmcl.streams.stream import StreamConfig, TaskFiles, build_stream

    entries = write_shared_image_stream(tmp_path / "data", train=8, test=8)
    stream = build_stream(StreamConfig(tasks=[TaskFiles(**entry) for entry in entries]), tmp_path)
    assert stream[0].test_samples[0].images[0].name.split("-")[-1] == stream[2].test_samples[0].images[0].name.split("-")[-1]
    options = {"router_samples_per_task": 8, "router_epochs": 10.0, "router_learning_rate": 5e-3, "router_batch_size": 8}
    method = set_up_on_tiny(MrLora(MrLoraConfig(**options), LoraSettings(rank=8, alpha=16.0), seed=0), tiny_model_dir, stream)
    accuracy = {}
    for index, task in enumerate(stream):
        method.before_task(index, task)
        method.after_task(index, task)
        if index == 0:
            continue
        for seen, own in zip(stream[: index + 1], range(index + 1)):
            choices = method.route(seen.test_samples)
            accuracy[(index + 1, seen.name)] = 100.0 * float((choices == own).float().mean())
    assert min(accuracy.values()) >= 95.0, accuracy
    record = method.router_training[-1]
    assert record["rounds"] == len(record["round_losses"]) == len(record["routing_set_accuracy"]) >= 1
    assert min(record["routing_set_accuracy"][-1].values()) == 100.0


# -- the paper's protocol ------------------------------------------------------------------------
def test_cli_run_mrlora_paper_protocol(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path):
    from conftest import make_stream_config, write_config
    from mmcl.cli import main

    options = {"router_protocol": "paper", "router_samples_per_task": 2, "router_epochs": 1.0, "router_batch_size": 4,
               "router_max_new_tokens": 3}  # fmt: skip
    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "run", method={"name": "mrlora", "options": options})
    config["stream"]["options"] = {"train_per_task": 4, "test_per_task": 2}
    config["training"] = {"max_steps": 1, "batch_size": 4, "progress_bar": False}
    config["evaluation"] = {"batch_size": 8, "forward_transfer": False, "evaluate_base": False, "max_new_tokens": 4}
    path = write_config(tmp_path / "mrlora.yaml", config)
    assert main(["run", str(path), "--method", "mrlora"]) == 0
    run = tmp_path / "run"
    stages = sorted((run / "stages").iterdir())
    assert [json.loads((s / "state.json").read_text())["router_experts"] for s in stages] == [0, 0, 0, 0, 5]
    results = json.loads((run / "results.json").read_text())
    report = results["method_summary"]
    assert report["protocol"] == "paper" and "NOT evaluated" in report["protocol_note"]
    assert [r["experts"] for r in report["router_training"]] == [5] and report["router_training"][0]["rounds"] == 1
    # no router before the last stage: those rows are not evaluated at all and stay empty in the matrix
    assert set(report["stages"]) == {"5_fin"} and not (run / "predictions" / "2_med").exists()
    assert [row for row in results["matrix"][1:4]] == [[None] * 5] * 3 and None not in results["matrix"][5]
    assert results["complete"] is True and results["metrics"]["BWT"] is None
    final = report["stages"]["5_fin"]
    assert final["evaluated"] is True and sum(map(sum, final["confusion"]["counts"])) == 5 * 2
    assert sum(entry["fallback"] for entry in final["tasks"].values()) <= 5 * 2
    assert "NOT evaluated" in (run / "report.html").read_text()
    assert main(["run", str(path), "--method", "mrlora"]) == 0  # resumes: everything is done
