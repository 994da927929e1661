"""GRPO: each loss term on hand-computed numbers, rollout log-probabilities against ``generate``'s own
scores, instance filtering, one update's direction on the tiny model, and a CLI run with resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import make_stream_config, set_up_on_tiny, write_config
from mmcl.config import LoraSettings
from mmcl.errors import ConfigError
from mmcl.methods.base import METHODS
from mmcl.methods.grpo import Grpo, GrpoOptions, is_short_answer, reward_curves, stage_table, summarise
from mmcl.training.grpo import (
    RewardParts,
    StepLog,
    clipped_objective,
    filter_instances,
    group_advantages,
    grpo_loss,
    keep_instances,
    per_token_kl,
    swapped_parameters,
    trainable_snapshot,
)
from mmcl.training.rollouts import Rollout, completion_logprobs, eos_token_ids, placeholder_token_ids, sample_rollouts


# -- (1) the loss, term by term on known numbers -----------------------------------------------------
def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    advantages = group_advantages(rewards, eps=1e-4)
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    assert advantages[0].tolist() == pytest.approx([a, -a, -a, a])
    assert advantages[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # a solved group carries no signal
    std3 = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)
    assert advantages[2].tolist() == pytest.approx([-0.75 / (std3 + 1e-4)] * 3 + [2.25 / (std3 + 1e-4)])
    assert group_advantages(rewards, scale=False)[2].tolist() == pytest.approx([-0.75, -0.75, -0.75, 2.25])


def test_k3_kl_estimator():
    logp = torch.tensor([math.log(0.5), math.log(0.2), -1.0])
    ref = torch.tensor([math.log(0.25), math.log(0.2), -3.0])
    kl = per_token_kl(logp, ref)
    # exp(d) - d - 1 with d = ref - logp
    assert kl.tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0, math.exp(-2) + 2 - 1], abs=1e-6)
    assert (per_token_kl(torch.randn(50), torch.randn(50)) >= 0).all()


def test_clipped_ratio_objective():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5]]))
    positive, negative = torch.tensor([1.0]), torch.tensor([-2.0])
    value, clipped = clipped_objective(logp, old, positive, epsilon=0.2)
    assert value[0].tolist() == pytest.approx([1.2, 0.5, 0.5, 1.2])  # min(rho A, clip(rho) A)
    assert clipped[0].tolist() == [True, False, False, True]
    value, clipped = clipped_objective(logp, old, negative, epsilon=0.2)
    assert value[0].tolist() == pytest.approx([-3.0, -1.6, -1.6, -3.0])
    assert clipped[0].tolist() == [False, True, True, False]


def test_grpo_loss_normalisation_kl_and_gradient():
    # two completions of 2 and 1 tokens (second row padded); ratio 1 (on-policy), advantages +1 / -1
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    ref = torch.tensor([[-1.0, -1.0], [-0.5, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(logp, logp.detach(), ref, advantages, mask, epsilon=0.2, beta=0.5, loss_type="grpo")
    kl_token = math.exp(1.0) - 1.0 - 1.0  # d = ref - logp = 1 on the second token of row 0
    # row 0: mean(-1 + 0, -1 + 0.5 * kl); row 1: -(-1) ; then mean over rows
    expected = ((-1.0 + (-1.0 + 0.5 * kl_token)) / 2 + 1.0) / 2
    assert loss.item() == pytest.approx(expected)
    assert stats["kl"] == pytest.approx(kl_token / 3) and stats["clip_fraction"] == 0.0
    loss.backward()
    # on-policy, d(-rho A)/dlogp = -A; the k3 gradient is 1 - exp(ref - logp); token means and row mean
    expected_grad = [-1.0 / 4, (-1.0 + 0.5 * (1 - math.exp(1.0))) / 4, 1.0 / 2, 0.0]
    assert logp.grad.flatten().tolist() == pytest.approx(expected_grad)
    bnpo, _ = grpo_loss(logp, logp.detach(), ref, advantages, mask, epsilon=0.2, beta=0.5, loss_type="bnpo")
    assert bnpo.item() == pytest.approx((-1.0 + (-1.0 + 0.5 * kl_token) + 1.0) / 3)
    no_ref, stats = grpo_loss(logp, logp.detach(), None, advantages, mask, epsilon=0.2, beta=0.5)
    assert no_ref.item() == pytest.approx(0.0) and stats["kl"] == 0.0


# -- (2) instance filtering -----------------------------------------------------------------------------
def test_keep_instances_drops_unsolved_and_optionally_solved():
    means = [0.0, 0.25, 1.0, 0.5, 0.0]
    assert keep_instances(means) == [False, True, True, True, False]
    assert keep_instances(means, drop_all_correct=True) == [False, True, False, True, False]
    assert keep_instances([]) == []


def test_config_validation():
    assert GrpoOptions().filter and GrpoOptions().sft_warmup_steps == 20 and GrpoOptions().steps == 25
    for bad in ({"group_size": 1}, {"lr_scheduler": "cosine"}, {"loss_type": "dr"}, {"filter_rollouts": 0},
                {"sft_warmup_steps": -1}, {"steps": 0}):  # fmt: skip
        with pytest.raises(ConfigError, match="method.options"):
            GrpoOptions(**bad)
    config = GrpoOptions(group_size=3, kl_coef=0.0).grpo_config(max_new_tokens=5, steps=7)
    assert (config.group_size, config.kl_coef, config.max_new_tokens, config.steps) == (3, 0.0, 5, 7)


def test_report_helpers():
    history = [StepLog(i, 0.1 * i, 0.1 * i, 1.0, 0.01, 0.0, 0.5, 1e-3) for i in range(1, 11)]
    summary = summarise(history, window=5)
    assert summary["reward_first"] == pytest.approx(0.3) and summary["reward_last"] == pytest.approx(0.8)
    assert summary["steps"] == 10 and len(summary["reward_curve"]) == 10
    assert summarise([]) == {"steps": 0}
    records = [
        {"tasks": ["a"], "train_samples": 4, "sft_warmup_steps": 0, "kept": 3, "kept_share": 0.75, **summary},
        {"tasks": ["b"], "train_samples": 4, "sft_warmup_steps": 2, "kl_reference": "after warm-up", "steps": 0},
        {"tasks": ["c"], "train_samples": 4, "sft_warmup_steps": 0, **summarise(history[:3])},
    ]
    table = stage_table(records)
    assert table["kind"] == "table" and len(table["rows"]) == 3 and len(table["columns"]) == len(table["rows"][0])
    assert table["rows"][0][3] == "3/4 (75%)" and table["rows"][0][5] == "0.300 → 0.800"
    assert table["rows"][1][2] == "SFT 2 steps (KL reference: model after warm-up)" and table["rows"][1][5] == "- → -"
    (curves,) = reward_curves(records)
    assert curves["kind"] == "curves" and curves["x"] == list(range(1, 14)) and curves["x_marks"] == [10.5]
    assert list(curves["series"]) == ["stage 1 (a)", "stage 3 (c)"]  # stage 2 ran no GRPO step: no curve
    first, last = curves["series"].values()
    assert first[:10] == summary["reward_curve"] and first[10:] == [None] * 3
    assert last == [None] * 10 + [round(0.1 * i, 4) for i in range(1, 4)]
    assert reward_curves(records[1:2]) == []


# -- (3) rollouts on the tiny model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_method(tiny_model_dir, tasks):
    method = Grpo(GrpoOptions(), LoraSettings(), seed=0)
    return set_up_on_tiny(method, tiny_model_dir, tasks)


def test_logprobs_match_generate_scores(lora_method, tasks):
    backbone = lora_method.backbone
    samples = [tasks[0].train_samples[0], tasks[3].train_samples[1], tasks[4].train_samples[2]]
    batch = backbone.prompt_batch(samples)
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) > 1  # prompts of different lengths: padding matters
    backbone.model.eval()
    torch.manual_seed(3)
    with torch.no_grad():
        out = backbone.model.generate(
            **batch, max_new_tokens=5, do_sample=True, top_k=0, output_scores=True, return_dict_in_generate=True,
            pad_token_id=backbone.tokenizer.pad_token_id, suppress_tokens=placeholder_token_ids(backbone),
        )  # fmt: skip
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    # the scores after the logits processors: the image placeholder is at -inf, the rest renormalised
    expected = torch.stack(out.scores, dim=1).log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    eos = eos_token_ids(backbone)
    rollouts = []
    for sample, row in zip(samples, new):
        ends = [i for i, t in enumerate(row.tolist()) if t in eos]
        rollouts.append(Rollout(sample, row[: ends[0] + 1] if ends else row, ""))
    with torch.no_grad():
        logprobs, mask = completion_logprobs(backbone, rollouts)
    assert mask.sum(dim=1).tolist() == [r.completion_ids.numel() for r in rollouts]
    assert torch.allclose(logprobs, expected[:, : logprobs.shape[1]] * mask, atol=1e-4)


def test_sample_rollouts_shape_seed_and_rng(lora_method, tasks):
    backbone = lora_method.backbone
    image_id = backbone.tokenizer.convert_tokens_to_ids("<image>")
    assert placeholder_token_ids(backbone) == [image_id]
    samples = tasks[1].train_samples[:3]
    backbone.model.train()
    torch.manual_seed(11)
    expected_next = torch.rand(1)
    torch.manual_seed(11)
    first = sample_rollouts(backbone, samples, per_sample=3, max_new_tokens=4, batch_size=4, seed=5)
    assert torch.rand(1) == expected_next  # the global random state is not consumed
    assert backbone.model.training  # mode restored
    second = sample_rollouts(backbone, samples, per_sample=3, max_new_tokens=4, batch_size=4, seed=5)
    assert [len(group) for group in first] == [3, 3, 3]
    assert all(r.sample is s for group, s in zip(first, samples) for r in group)
    eos = eos_token_ids(backbone)
    for group in first:
        for rollout in group:
            ids = rollout.completion_ids.tolist()
            assert 1 <= len(ids) <= 4 and not any(t in eos for t in ids[:-1]) and image_id not in ids
            assert rollout.text == backbone.tokenizer.decode(ids, skip_special_tokens=True).strip()
    ids_of = lambda groups: [r.completion_ids.tolist() for g in groups for r in g]  # noqa: E731
    assert ids_of(first) == ids_of(second)


def test_filter_instances_keeps_what_some_rollout_solved(lora_method, tasks):
    samples = tasks[0].train_samples[:4]
    solvable = {samples[1].id, samples[3].id}

    def reward(rollout: Rollout) -> RewardParts:
        return RewardParts(accuracy=1.0 if rollout.sample.id in solvable else 0.0, format=0.0)

    result = filter_instances(lora_method.backbone, samples, reward, 2, 3, 1.0, drop_all_correct=False, seed=0)
    assert [s.id for s in result.kept] == [samples[1].id, samples[3].id]
    assert result.mean_accuracy == [0.0, 1.0, 0.0, 1.0] and result.kept_share == 0.5
    result = filter_instances(lora_method.backbone, samples, reward, 2, 3, 1.0, drop_all_correct=True, seed=0)
    assert result.kept == [] and result.kept_share == 0.0


def test_format_reward():
    sample = None
    ids = torch.tensor([7, 2])
    assert is_short_answer(Rollout(sample, ids, "two"), {2}, 3)
    assert not is_short_answer(Rollout(sample, torch.tensor([7, 8]), "two"), {2}, 3)  # cut off, no EOS
    assert not is_short_answer(Rollout(sample, ids, ""), {2}, 3)
    assert not is_short_answer(Rollout(sample, ids, "a b c d"), {2}, 3)
    assert not is_short_answer(Rollout(sample, ids, "yes\nno"), {2}, 3)


def test_one_update_moves_logprobs_along_the_advantage(lora_method, tasks):
    backbone = lora_method.backbone
    model = backbone.model
    sample = tasks[2].train_samples[0]
    tokenizer = backbone.tokenizer
    good = torch.tensor(tokenizer.encode("yes", add_special_tokens=False) + [tokenizer.eos_token_id])
    bad = torch.tensor(tokenizer.encode("no", add_special_tokens=False) + [tokenizer.eos_token_id])
    rollouts = [Rollout(sample, good, "yes"), Rollout(sample, bad, "no")]
    before = trainable_snapshot(model)
    model.eval()
    with torch.no_grad():
        start = completion_logprobs(backbone, rollouts)[0].sum(dim=1)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.05)
    logprobs, mask = completion_logprobs(backbone, rollouts)
    loss, _ = grpo_loss(logprobs, logprobs.detach(), None, torch.tensor([1.0, -1.0]), mask, 0.2, 0.0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = completion_logprobs(backbone, rollouts)[0].sum(dim=1)
        # the reference (weights before the update) is recovered exactly by swapping them in, then restored
        moved = trainable_snapshot(model)
        with swapped_parameters(model, before):
            assert torch.allclose(completion_logprobs(backbone, rollouts)[0].sum(dim=1), start, atol=1e-6)
        assert all(torch.equal(moved[k], v) for k, v in trainable_snapshot(model).items())
    assert after[0] > start[0] and after[1] < start[1]
    with torch.no_grad():  # leave the shared fixture as it was
        for name, p in model.named_parameters():
            if name in before:
                p.copy_(before[name])


# -- (4) the method through the command line ----------------------------------------------------------------
def test_cli_run_with_grpo_records_stages_and_resumes_exactly(tiny_model_dir, stream_cache_dir, tmp_path):
    from mmcl.cli import main

    assert "grpo" in METHODS
    run_dir = tmp_path / "run"
    options = {"steps": 2, "prompts_per_step": 2, "group_size": 2, "filter_rollouts": 2, "sft_warmup_steps": 2,
               "drop_all_correct": False}  # fmt: skip
    config = make_stream_config(
        tiny_model_dir, stream_cache_dir, run_dir,
        method={"name": "grpo", "options": options},
        evaluation={"batch_size": 8, "forward_transfer": False, "limit": 2},
    )  # fmt: skip
    path = write_config(tmp_path / "grpo.yaml", config)
    assert main(["run", str(path)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "grpo" and results["complete"]
    stages = sorted((run_dir / "stages").iterdir())
    state = json.loads((stages[-1] / "state.json").read_text())
    records = state["stages"]
    assert [r["tasks"] for r in records] == [[s.name.split("_", 1)[1]] for s in stages]
    for record in records:
        assert record["sft_warmup_steps"] == 2 and record["filter_rollouts"] == 2
        assert record["kept"] == round(record["kept_share"] * record["train_samples"])
        assert record["steps"] == (2 if record["kept"] else 0)
        if record["kept"]:
            assert len(record["reward_curve"]) == 2
    info = json.loads((stages[-1] / "stage.json").read_text())
    assert info["train_metrics"]["sft_warmup_steps"] == 2
    summary = json.loads((run_dir / "method_summary.json").read_text())
    assert summary["summary"]["stages"] == records
    assert "GRPO (RFT) training" in (run_dir / "report.html").read_text()
    tensorboard_files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(tensorboard_files) == sum(1 for record in records if record["steps"])  # one writer per trained stage

    # crash in the last stage: the rerun must rebuild exactly the same stage (seeded sampling everywhere)
    from safetensors.torch import load_file

    first = load_file(str(stages[-1] / "state.safetensors"))
    shutil.rmtree(stages[-1])
    shutil.rmtree(run_dir / "predictions" / stages[-1].name)
    (run_dir / "results.json").unlink()
    assert main(["run", str(path)]) == 0
    assert json.loads((stages[-1] / "state.json").read_text()) == state
    second = load_file(str(stages[-1] / "state.safetensors"))
    assert all(torch.equal(second[k], first[k]) for k in first)


@pytest.mark.parametrize("after_warmup", [False, True])
def test_grpo_trains_the_adapter_against_the_right_reference(tiny_model_dir, tasks, tmp_path, monkeypatch, after_warmup):
    import mmcl.methods.grpo as grpo_module
    from mmcl.config import TrainingConfig

    options = GrpoOptions(steps=2, prompts_per_step=2, group_size=3, filter=False, kl_coef=0.1, learning_rate=1e-2,
                          sft_warmup_steps=1, reference_after_warmup=after_warmup)  # fmt: skip
    method = set_up_on_tiny(Grpo(options, LoraSettings(), seed=0), tiny_model_dir, tasks)
    # a reward that varies within groups whatever the tiny model says: odd-length answers are "right"
    method.reward = lambda rollout, task, eos: RewardParts(accuracy=float(len(rollout.text) % 2), format=0.0)
    seen, original = {}, grpo_module.train_grpo

    def spy(backbone, prompts, reward, config, seed, reference, log):
        seen["reference"] = {k: v.clone() for k, v in reference.items()}
        seen["at_grpo_start"] = trainable_snapshot(backbone.model)
        return original(backbone, prompts, reward, config, seed=seed, reference=reference, log=log)

    monkeypatch.setattr(grpo_module, "train_grpo", spy)
    before_task = trainable_snapshot(method.backbone.model)
    method.before_task(0, tasks[0])
    metrics = method.train(tasks[0].train_samples[:4], TrainingConfig(batch_size=4), tmp_path, seed=1)
    expected = seen["at_grpo_start"] if after_warmup else before_task
    assert all(torch.equal(seen["reference"][k], expected[k]) for k in expected)
    assert any(not torch.equal(seen["at_grpo_start"][k], before_task[k]) for k in before_task)  # warm-up trained
    assert metrics["grpo_steps"] == 2 and math.isfinite(metrics["train_loss"])
    record = method.records[0]
    assert record["tasks"] == [tasks[0].name] and "kept" not in record and record["steps"] == 2
    assert 0.0 <= record["accuracy_last"] <= 1.0 and record["sft_warmup_steps"] == 1
    assert record["kl_reference"] == ("after warm-up" if after_warmup else "before task")
    after = trainable_snapshot(method.backbone.model)
    assert any(not torch.equal(after[k], seen["at_grpo_start"][k]) for k in after)  # GRPO moved the adapter
    assert method.reference is None  # released after the stage
    table, curves = method.report_sections()
    assert table["kind"] == "table" and len(table["rows"]) == 1  # one stage
    assert curves["kind"] == "curves" and len(curves["x"]) == 2 and curves["x_marks"] == []
