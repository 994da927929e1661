"""EvoLMM: both reward formulas, the EMA baseline and the adaptive KL coefficient by hand; label
blindness of training; one training stage on the tiny model; and one end-to-end run through the CLI
with a resume. The reference protocol: the exact KL by hand, one optimizer step per completion with
the baseline and beta updated in between (on a stub), tag parsing, the length penalty counting the
words before the answer tag, the protocol presets, and an end-to-end run that resumes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_stream_config, set_up_on_tiny, write_config
from mmcl.cli import main
from mmcl.config import TrainingConfig
from mmcl.errors import ConfigError
from mmcl.methods.base import LoraSettings
from mmcl.methods import evolmm_update
from mmcl.methods.evolmm import PROPOSER, SOLVER, Evolmm, EvolmmConfig, exact_kl, k3_kl, role_update
from mmcl.training.evolmm_rewards import (
    adaptive_kl_coefficient,
    answer_entropy,
    ema_baseline,
    empirical_distribution,
    parse_answer,
    parse_question,
    pre_answer_word_count,
    proposer_reward,
    reference_normalize,
    solver_rewards,
    tag_content,
)
from mmcl.training.rollouts import Rollout


# -- rewards by hand ------------------------------------------------------------------------------
def test_empirical_distribution_groups_normalized_answers():
    distribution = empirical_distribution(["Yes", "yes.", "no", " YES ", "The blue"])
    assert distribution == pytest.approx({"yes": 0.6, "no": 0.2, "blue": 0.2})
    with pytest.raises(ValueError):
        empirical_distribution([])


def test_solver_reward_is_soft_agreement():
    # p(yes) = 0.6, p(no) = p(blue) = 0.2; one word each, so no length penalty
    # 0.6^0.7 = exp(0.7 ln 0.6) = 0.69937, 0.2^0.7 = exp(0.7 ln 0.2) = 0.32413
    got = solver_rewards(["Yes", "yes.", "no", "yes", "blue"])
    assert got == pytest.approx([0.69937, 0.69937, 0.32413, 0.69937, 0.32413], abs=1e-5)
    assert solver_rewards(["4"] * 5) == pytest.approx([1.0] * 5)
    assert solver_rewards(["1", "2", "3", "4", "5"]) == pytest.approx([0.2**0.7] * 5)
    assert solver_rewards(["yes", "no"], gamma=1.0) == pytest.approx([0.5, 0.5])


def test_solver_reward_penalises_long_answers():
    nine = "a red circle on the left side of it"  # 9 words; normalizes with the 8-word one below
    eight = "red circle on the left side of it"
    # p = 2/3 for both, (2/3)^0.7 = 0.75290; penalties 1 - 0.1 * (9-6)/6 = 0.95 and 1 - 0.1 * (8-6)/6 = 0.96667
    # "blue": p = 1/3, (1/3)^0.7 = 0.46346, one word
    got = solver_rewards([nine, eight, "blue"])
    assert got == pytest.approx([0.71525, 0.72781, 0.46346], abs=1e-5)
    six = "one two three four five six"  # tau words: no penalty yet
    assert solver_rewards([six]) == pytest.approx([1.0])
    twenty = " ".join(["word"] * 20)  # beyond 2 tau the penalty saturates at lambda_len
    assert solver_rewards([twenty]) == pytest.approx([0.9])
    assert solver_rewards([twenty], length_penalty=0.5, tau_words=10) == pytest.approx([0.5])


def test_answer_entropy_in_nats():
    # H(0.6, 0.2, 0.2) = 0.6 * 0.510826 + 0.4 * 1.609438 = 0.950271
    assert answer_entropy({"yes": 0.6, "no": 0.2, "blue": 0.2}) == pytest.approx(0.950271, abs=1e-6)
    assert answer_entropy({"4": 1.0}) == 0.0
    assert answer_entropy(empirical_distribution(["1", "2", "3", "4", "5"])) == pytest.approx(math.log(5))


def test_proposer_reward_peaks_at_medium_entropy():
    assert proposer_reward(0.9) == pytest.approx(1.0)
    # exp(-(0.950271 - 0.9)^2 / (2 * 0.35^2)) = exp(-0.0025272 / 0.245) = 0.98974
    assert proposer_reward(0.950271) == pytest.approx(0.98974, abs=1e-5)
    # all five answers agree: H = 0, exp(-0.81 / 0.245) = 0.036658
    assert proposer_reward(answer_entropy(empirical_distribution(["no"] * 5))) == pytest.approx(0.036658, abs=1e-6)
    # all five differ: H = ln 5, exp(-(1.609438 - 0.9)^2 / 0.245) = 0.12818
    assert proposer_reward(math.log(5)) == pytest.approx(0.12818, abs=1e-5)
    assert proposer_reward(0.5, mu=0.5, sigma=1.0) == pytest.approx(1.0)


def test_ema_baseline():
    assert ema_baseline(None, 0.5) == 0.5  # the first reward starts the average
    assert ema_baseline(0.5, 1.0) == pytest.approx(0.55)
    assert ema_baseline(0.55, 0.0) == pytest.approx(0.495)
    assert ema_baseline(0.2, 1.0, decay=0.5) == pytest.approx(0.6)


def test_adaptive_kl_coefficient_and_its_clipping():
    assert adaptive_kl_coefficient(1e-3, 0.02) == pytest.approx(1e-3)  # on target: unchanged
    assert adaptive_kl_coefficient(1e-3, 0.04) == pytest.approx(1e-3 * 1.1051709, rel=1e-6)  # exp(0.1)
    assert adaptive_kl_coefficient(1e-3, 0.0) == pytest.approx(1e-3 * 0.9048374, rel=1e-6)  # exp(-0.1)
    assert adaptive_kl_coefficient(2.0, 0.06, target=0.03, rate=0.5) == pytest.approx(2.0 * math.exp(0.5))
    assert adaptive_kl_coefficient(99.0, 2.02) == 100.0  # e^10 * 99, clipped
    assert adaptive_kl_coefficient(1e-8, 0.0) == 1e-8  # 0.905e-8, clipped


def test_options_are_checked():
    with pytest.raises(ConfigError, match="solver_samples"):
        EvolmmConfig(solver_samples=0)
    with pytest.raises(ConfigError, match="temperature"):
        EvolmmConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="baseline_decay"):
        EvolmmConfig(baseline_decay=1.0)


# -- training on the tiny model -------------------------------------------------------------------
FORBIDDEN = ("answer", "prompt", "reference", "history", "metadata", "turns")


class LabelBlindSample:
    """Stands for a training sample; reading anything but its id, task name or images fails the test."""

    def __init__(self, sample):
        self.__dict__["_sample"] = sample
        self.__dict__["read"] = set()

    def __getattr__(self, name: str) -> Any:
        self.__dict__["read"].add(name)
        if name in FORBIDDEN:
            raise AssertionError(f"evolmm read sample.{name} of {self._sample.id}")
        return getattr(self._sample, name)


def _small_options(**extra) -> EvolmmConfig:
    options = dict(steps_per_task=5, images_per_step=2, solver_samples=3, proposer_every=2,
                   question_max_new_tokens=8, answer_max_new_tokens=4, learning_rate=5e-3)  # fmt: skip
    options.update(extra)
    return EvolmmConfig(**options)


def test_one_stage_trains_both_roles_without_reading_a_label(tiny_model_dir: Path, tasks, tmp_path: Path):
    method = set_up_on_tiny(Evolmm(_small_options(), LoraSettings(rank=4), seed=0), tiny_model_dir, tasks)
    model = method.backbone.model
    initial = method.saved_tensors()
    before = {role: {k: v.clone() for k, v in initial.items() if k.startswith(role)} for role in (PROPOSER, SOLVER)}
    blind = [LabelBlindSample(s) for s in tasks[0].train_samples]
    method.before_task(0, tasks[0])
    metrics = method.train(blind, TrainingConfig(), tmp_path / "trainer", seed=1)

    read = set().union(*(s.read for s in blind))
    assert read and read <= {"id", "task", "images"}
    assert model.active_adapter == SOLVER  # evaluation answers with the solver

    log = method.step_log
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and {r["task"] for r in log} == {tasks[0].name}
    assert metrics["steps"] == 5 and math.isfinite(metrics["train_loss"])
    # the proposer is updated every 2nd step only, on the 4 questions asked since its last update
    assert [r["proposer_kl"] is not None for r in log] == [False, True, False, True, False]
    for record in log:
        assert 0 < record["solver_reward"] <= 1 and 0 <= record["proposer_reward"] <= 1
        assert record["solver_kl"] >= 0 and 0 <= record["answer_entropy"] <= math.log(3) + 1e-9
    assert log[0]["solver_kl"] == pytest.approx(0.0, abs=1e-6)  # fresh LoRA: the solver is the reference
    assert any(r["solver_kl"] > 0 for r in log[1:])  # ... and no longer once it has been updated

    # the controllers followed their formulas from the logged values, step after step
    solver_baseline = None
    solver_beta = 1e-3
    for record in log:
        assert record["solver_beta"] == pytest.approx(solver_beta)
        solver_baseline = ema_baseline(solver_baseline, record["solver_reward"])
        assert record["solver_baseline"] == pytest.approx(solver_baseline)
        solver_beta = adaptive_kl_coefficient(solver_beta, record["solver_kl"])
    assert method.roles[SOLVER].beta == pytest.approx(solver_beta)
    proposer_steps = [r for r in log if r["proposer_kl"] is not None]
    assert method.roles[PROPOSER].beta == pytest.approx(
        adaptive_kl_coefficient(proposer_steps[-1]["proposer_beta"], proposer_steps[-1]["proposer_kl"])
    )

    after = method.saved_tensors()
    for role in (PROPOSER, SOLVER):
        changed = [k for k in before[role] if not torch.equal(before[role][k], after[k])]
        assert changed, f"{role} adapter did not change"
    assert method.trainable_parameters() == sum(v.numel() for v in after.values())

    # state round trip: a fresh method given the saved state generates the same answers
    copy = set_up_on_tiny(Evolmm(_small_options(), LoraSettings(rank=4), seed=5), tiny_model_dir, tasks)
    copy.load_state_json(json.loads(json.dumps(method.state_json())))
    copy.restore_tensors(after)
    assert copy.roles == method.roles and copy.step_log == method.step_log
    test = tasks[0].test_samples[:4]
    assert copy.generate(test, tasks[0], 6) == method.generate(test, tasks[0], 6)
    sections = method.report_sections()
    assert [s["kind"] for s in sections] == ["curves", "curves", "curves", "table", "table"]
    rewards_panel, _, beta_panel, stage_table, examples = sections
    assert rewards_panel["title"] == "EvoLMM self-evolution: rewards" and not rewards_panel["y_log"]
    assert beta_panel["y_log"] and rewards_panel["x"] == [r["step"] for r in method.step_log]
    assert all(len(values) == len(rewards_panel["x"]) for values in rewards_panel["series"].values())
    assert len(stage_table["rows"]) == method.stage and len(stage_table["rows"][0]) == len(stage_table["columns"])
    assert len(examples["rows"]) == sum(len(e["pairs"]) for e in method.examples)


def evolmm_run_config(model_dir: Path, cache_dir: Path, path: Path, out: Path, options: dict) -> Path:
    """A tiny synth-domain experiment with evolmm and ``options``, written to ``path``."""
    config = make_stream_config(
        model_dir, cache_dir, out,
        evaluation={"batch_size": 8, "forward_transfer": False, "limit": 2},
        method={"name": "evolmm", "options": options},
        lora={"rank": 4},
    )  # fmt: skip
    return write_config(path, config)


def test_cli_run_trains_label_free_reports_curves_and_resumes(
    tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path
):
    out = tmp_path / "run"
    options = {"steps_per_task": 2, "images_per_step": 2, "solver_samples": 2, "proposer_every": 2,
               "question_max_new_tokens": 6, "answer_max_new_tokens": 3}  # fmt: skip
    path = evolmm_run_config(tiny_model_dir, stream_cache_dir, tmp_path / "evolmm.yaml", out, options)
    assert main(["run", str(path)]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["method"] == "evolmm" and results["complete"]
    assert all(value is not None for value in results["matrix"][-1])
    stages = sorted((out / "stages").iterdir())
    info = json.loads((stages[-1] / "stage.json").read_text(encoding="utf-8"))
    assert info["train_metrics"]["steps"] == 2 and info["train_metrics"]["solver_beta_final"] > 0
    summary = json.loads((out / "method_summary.json").read_text(encoding="utf-8"))
    assert len(summary["summary"]["steps"]) == 2 * len(stages)
    assert [r["stage"] for r in summary["summary"]["steps"]] == [k for k in range(1, len(stages) + 1) for _ in (0, 1)]
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "EvoLMM self-evolution" in report and "solver beta (last)" in report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"evolmm/solver_reward", "evolmm/solver_kl", "evolmm/solver_beta", "evolmm/solver_baseline"} <= set(
        events.Tags()["scalars"]
    )
    logged = [event.value for event in events.Scalars("evolmm/solver_beta")]
    assert logged == pytest.approx([r["solver_beta"] for r in summary["summary"]["steps"]])
    last = load_file(str(stages[-1] / "state.safetensors"))
    assert {key.split("::")[0] for key in last} == {PROPOSER, SOLVER}

    # crash before the last stage finished: the rerun trains it again from stage 4's state, identically
    shutil.rmtree(stages[-1])
    shutil.rmtree(out / "predictions" / stages[-1].name)
    assert main(["run", str(path)]) == 0
    again = load_file(str(stages[-1] / "state.safetensors"))
    assert all(torch.allclose(again[key], last[key], atol=1e-6) for key in last)


# -- the reference protocol -----------------------------------------------------------------------
def test_protocol_presets_and_overrides():
    tiny = EvolmmConfig()
    assert (tiny.protocol, tiny.steps_per_task, tiny.images_per_step, tiny.learning_rate, tiny.weight_decay) == (
        "tiny-calibrated", 40, 8, 1e-3, 0.0)  # fmt: skip
    assert (tiny.kl_estimator, tiny.update, tiny.proposer_questions, tiny.baseline_start, tiny.prompt_format) == (
        "k3", "batch", "since-last", "first-reward", "plain")  # fmt: skip
    assert tiny.initial_role_state().baseline is None
    reference = EvolmmConfig(protocol="reference")
    assert (reference.steps_per_task, reference.images_per_step, reference.learning_rate) == (None, 1, 1e-6)
    assert (reference.weight_decay, reference.kl_estimator, reference.update) == (0.01, "full", "per-completion")
    assert (reference.proposer_questions, reference.prompt_format, reference.answer_normalization) == (
        "current-step", "tags", "reference")  # fmt: skip
    assert (reference.question_max_new_tokens, reference.answer_max_new_tokens) == (128, 128)
    assert (tiny.length_cap, reference.length_cap) == ("released", "paper")
    assert "<question>" in reference.proposer_prompt and "<answer>" in reference.solver_prompt
    assert reference.initial_role_state().baseline == 0.0 and reference.initial_role_state().beta == 1e-3
    mixed = EvolmmConfig(protocol="reference", learning_rate=1e-4, kl_estimator="k3")  # explicit options win
    assert (mixed.learning_rate, mixed.kl_estimator, mixed.update) == (1e-4, "k3", "per-completion")
    with pytest.raises(ConfigError, match="protocol"):
        EvolmmConfig(protocol="paper")
    with pytest.raises(ConfigError, match="kl_estimator"):
        EvolmmConfig(kl_estimator="k2")
    with pytest.raises(ConfigError, match="solver_prompt"):
        EvolmmConfig(solver_prompt="no placeholder")


def test_exact_kl_matches_a_hand_computation():
    # pi = softmax(0, ln 2, 0) = (1/4, 1/2, 1/4), ref = softmax(0, 0, 0) = (1/3, 1/3, 1/3):
    # KL = 1/4 ln(3/4) + 1/2 ln(3/2) + 1/4 ln(3/4) = 1/2 ln(9/8) = 0.0588915
    policy = torch.log_softmax(torch.tensor([[0.0, math.log(2.0), 0.0]]), dim=-1)
    reference = torch.log_softmax(torch.zeros(1, 3), dim=-1)
    assert exact_kl(policy, reference).item() == pytest.approx(0.5 * math.log(9 / 8), abs=1e-7)
    assert exact_kl(reference, policy).item() == pytest.approx(  # the other direction: 2/3 ln(4/3) + 1/3 ln(2/3)
        2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3), abs=1e-7)  # fmt: skip
    assert exact_kl(policy, policy).item() == pytest.approx(0.0, abs=1e-7)
    # per position over a [B, L, V] batch: (1/2 ln(9/8), 0)
    both = exact_kl(torch.stack([policy[0], reference[0]])[None], torch.stack([reference[0], reference[0]])[None])
    assert both.shape == (1, 2) and both[0].tolist() == pytest.approx([0.5 * math.log(9 / 8), 0.0], abs=1e-7)
    # the sampled-token estimator at token 1: delta = ln(1/3) - ln(1/2) = ln(2/3); e^delta - delta - 1
    assert k3_kl(policy[:, 1], reference[:, 1]).item() == pytest.approx(2 / 3 - math.log(2 / 3) - 1, abs=1e-7)


class _StubModel:
    """What policy_update touches of a PEFT model: the adapter switch and the disabling context."""

    def __init__(self):
        self.active, self.disabled = None, False

    def set_adapter(self, name: str) -> None:
        self.active = name

    def disable_adapter(self):
        model = self

        class _Off:
            def __enter__(self):
                model.disabled = True

            def __exit__(self, *exc):
                model.disabled = False

        return _Off()


def _stub_scores(theta: torch.Tensor, model: _StubModel):
    """completion_scores of a 'policy' whose next-token logits are ``theta`` at every position (the
    reference, adapters disabled: all zeros)."""

    def scores(backbone, rollouts, temperature, full):
        logits = torch.zeros_like(theta) if model.disabled else theta
        width = max(r.completion_ids.numel() for r in rollouts)
        rows = torch.log_softmax(logits, dim=-1).expand(len(rollouts), width, -1)
        ids = torch.zeros(len(rollouts), width, dtype=torch.long)
        mask = torch.zeros(len(rollouts), width, dtype=torch.long)
        for row, rollout in enumerate(rollouts):
            ids[row, : rollout.completion_ids.numel()] = rollout.completion_ids
            mask[row, : rollout.completion_ids.numel()] = 1
        logprobs = rows.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
        return logprobs, mask, (rows if full else None)

    return scores


def test_reference_update_steps_once_per_completion_with_baseline_and_beta_in_between(monkeypatch):
    model = _StubModel()
    backbone = type("StubBackbone", (), {"model": model, "device": torch.device("cpu")})()
    theta = torch.tensor([0.0, math.log(2.0), 0.0], requires_grad=True)  # pi = (1/4, 1/2, 1/4)
    monkeypatch.setattr(evolmm_update, "completion_scores", _stub_scores(theta, model))
    options = EvolmmConfig(protocol="reference")
    state = options.initial_role_state()
    seen = []  # (baseline, beta) when each optimizer step happens

    class CountingSGD(torch.optim.SGD):
        def step(self, closure=None):
            seen.append((state.baseline, state.beta))
            return super().step(closure)

    optimizer = CountingSGD([theta], lr=0.0)  # lr 0: the policy (and so the KL) stays put
    rollouts = [Rollout(sample=None, completion_ids=torch.tensor([0, 1]), text=f"c{i}") for i in range(3)]
    completion_rewards = [0.2, 0.8, 0.5]
    result = role_update(backbone, SOLVER, rollouts, completion_rewards, state, optimizer, options)

    kl = 0.5 * math.log(9 / 8)  # every token: KL((1/4, 1/2, 1/4) || uniform)
    mean_logp = (math.log(0.25) + math.log(0.5)) / 2  # tokens 0 and 1 of every completion
    baselines, betas = [0.0], [1e-3]  # the reference starts its baseline at 0 (train.py L676)
    for reward in completion_rewards:
        baselines.append(0.9 * baselines[-1] + 0.1 * reward)
        betas.append(adaptive_kl_coefficient(betas[-1], kl))
    assert len(seen) == 3 and result["updates"] == 3
    assert [b for b, _ in seen] == pytest.approx(baselines[:3])  # 0, 0.02, 0.098
    assert [b for _, b in seen] == pytest.approx(betas[:3])
    assert (state.baseline, state.beta) == (pytest.approx(baselines[3]), pytest.approx(betas[3]))  # 0.1382
    assert result["baseline"] == pytest.approx(0.1382) and result["beta"] == pytest.approx(1e-3)
    for k, update in enumerate(result["each"]):
        assert update["kl"] == pytest.approx(kl, abs=1e-6)
        expected = -(completion_rewards[k] - baselines[k]) * mean_logp + betas[k] * kl
        assert update["loss"] == pytest.approx(expected, rel=1e-5)
    assert model.active == SOLVER

    # the tiny-calibrated protocol: one step for all three, the baseline started by the mean reward
    seen.clear()
    tiny = EvolmmConfig()
    state = tiny.initial_role_state()
    result = role_update(backbone, SOLVER, rollouts, completion_rewards, state, optimizer, tiny)
    assert len(seen) == 1 and result["updates"] == 1 and state.baseline == pytest.approx(0.5)


def test_tag_parsing():
    assert tag_content("x <answer> 42 </answer> y <answer>7</answer>", "answer") == "42"
    assert tag_content("<answer>42", "answer") is None and tag_content("42</answer>", "answer") is None
    assert tag_content("</answer>42<answer>", "answer") is None
    assert tag_content("<ANSWER>42</ANSWER>", "answer") is None  # tags are case-sensitive, as released
    proposed = "<question>How many\nbars are red?</question>\n<rationale>counting with a twist</rationale>"
    assert parse_question(proposed) == "How many bars are red?"
    assert parse_question("  What colour is the sky?\n") == "What colour is the sky?"  # untagged: all of it
    assert parse_answer("The tallest bar is B.\n<answer>B</answer>") == "B"
    assert parse_answer("thinking...\nso it is\n  12 \n\n") == "12"  # untagged: the last non-empty line
    assert parse_answer("  \n ") == "unknown"
    # the released normalization: commas dropped everywhere, no article dropping
    assert reference_normalize("  The  1,000 Apples. ") == "the 1000 apples"
    assert empirical_distribution(["1,000", "1000.", "the 1000"], reference_normalize) == pytest.approx(
        {"1000": 2 / 3, "the 1000": 1 / 3})  # fmt: skip


def test_length_penalty_counts_only_the_words_before_the_answer_tag():
    assert pre_answer_word_count("one two three <answer>a b c d e f g h</answer>") == 3
    assert pre_answer_word_count("one two <ANSWER>x</ANSWER> three") == 2  # the count's tag match ignores case
    assert pre_answer_word_count("no tag here at all") == 5  # no tag: the whole output
    outputs = [
        "one two three four five six seven eight nine <answer>4</answer>",  # 9 words: 1 - 0.1 * 3/6
        "<answer>4</answer>",
        "4",
        "why <answer>4 apples in a row on the table by the old red barn</answer>",  # 1 word before the tag
    ]
    answers = [parse_answer(output) for output in outputs]
    counts = [pre_answer_word_count(output) for output in outputs]
    assert counts == [9, 0, 1, 1]
    # p(4) = 3/4 for the first three, 1/4 for the long answer, which is not penalised for its length
    got = solver_rewards(answers, word_counts=counts, normalize=reference_normalize)
    assert got == pytest.approx([0.75**0.7 * 0.95, 0.75**0.7, 0.75**0.7, 0.25**0.7])
    # counting the answer's own words instead (the default) would penalise the long one fully
    assert solver_rewards(answers, normalize=reference_normalize)[3] == pytest.approx(0.25**0.7 * 0.9)
    with pytest.raises(ValueError):
        solver_rewards(answers, word_counts=[1])
    # past 2 tau words the released code caps the penalty at lambda_len, the paper's formula does not:
    # 30 words, (30 - 6) / 6 = 4: 1 - 0.1 = 0.9 capped, 1 - 0.4 = 0.6 uncapped
    assert solver_rewards(["4"], word_counts=[30]) == pytest.approx([0.9])
    assert solver_rewards(["4"], word_counts=[30], capped=False) == pytest.approx([0.6])
    assert solver_rewards(["4"], word_counts=[9], capped=False) == pytest.approx([0.95])


def test_cli_run_with_the_reference_protocol_resumes(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    options = {"protocol": "reference", "steps_per_task": 2, "solver_samples": 2, "proposer_every": 1,
               "question_max_new_tokens": 6, "answer_max_new_tokens": 4}  # fmt: skip
    path = evolmm_run_config(tiny_model_dir, stream_cache_dir, tmp_path / "evolmm-reference.yaml", out, options)
    assert main(["run", str(path)]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["method"] == "evolmm" and results["complete"]
    stages = sorted((out / "stages").iterdir())
    summary = json.loads((out / "method_summary.json").read_text(encoding="utf-8"))["summary"]
    steps = summary["steps"]
    assert len(steps) == 2 * len(stages)
    # one image a step, one solver update per answer, the proposer updated on every step's question
    assert all(r["solver_updates"] == 2 and r["proposer_kl"] is not None for r in steps)
    assert steps[0]["solver_beta"] == pytest.approx(1e-3) and steps[0]["proposer_baseline"] is not None
    assert all(r["solver_kl"] > -1e-6 and r["proposer_kl"] > -1e-6 for r in steps)  # exact up to rounding
    # the baseline started at 0: after step 1 it is 0.9 * 0.1 r_1 + 0.1 r_2 <= 0.19 * max reward
    assert 0 <= steps[0]["solver_baseline"] <= 0.19 * 1.0 + 1e-9
    assert {role: state["baseline"] is not None for role, state in summary["roles"].items()} == {
        PROPOSER: True, SOLVER: True}  # fmt: skip
    last = load_file(str(stages[-1] / "state.safetensors"))

    shutil.rmtree(stages[-1])
    shutil.rmtree(out / "predictions" / stages[-1].name)
    assert main(["run", str(path)]) == 0
    again = load_file(str(stages[-1] / "state.safetensors"))
    assert set(again) == set(last) and all(torch.allclose(again[key], last[key], atol=1e-6) for key in last)
    rerun = json.loads((out / "method_summary.json").read_text(encoding="utf-8"))["summary"]["steps"]
    assert [r["solver_baseline"] for r in rerun] == pytest.approx([r["solver_baseline"] for r in steps])
