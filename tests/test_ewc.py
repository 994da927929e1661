"""EWC: the penalty formula on hand-made tensors, the Fisher on the tiny model, the state round trip
and an end-to-end run through the command line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmcl.methods.ewc  # noqa: F401  (registers "ewc")
from conftest import make_stream_config, write_config
from mmcl.streams.stream import StreamConfig, build_stream
from mmcl.config import LoraSettings
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS
from mmcl.methods.ewc import Ewc, EwcConfig, diagonal_fisher, ewc_penalty, online_fisher

STREAM_OPTIONS = {"train_per_task": 8, "test_per_task": 4}  # as in make_stream_config: the cache is shared


# -- (1) the pure penalty -------------------------------------------------------------------------
def _pair(fisher: dict[str, list[float]], anchor: dict[str, list[float]]):
    return ({k: torch.tensor(v) for k, v in fisher.items()}, {k: torch.tensor(v) for k, v in anchor.items()})


def test_penalty_zero_at_anchor_and_hand_computed():
    anchor = {"a": [1.0, -2.0], "b": [0.5]}
    pair = _pair({"a": [2.0, 3.0], "b": [4.0]}, anchor)
    at_anchor = {k: torch.tensor(v) for k, v in anchor.items()}
    assert ewc_penalty(at_anchor, [pair], 7.0).item() == 0.0
    theta = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([0.0])}
    # 2*(1)^2 + 3*(2)^2 + 4*(-0.5)^2 = 2 + 12 + 1 = 15, times lambda (no 1/2 factor)
    assert ewc_penalty(theta, [pair], 1.0).item() == pytest.approx(15.0)
    assert ewc_penalty(theta, [pair], 0.1).item() == pytest.approx(1.5)
    assert ewc_penalty(theta, [], 1.0) is None


def test_penalty_quadratic_in_displacement_linear_in_lambda():
    torch.manual_seed(0)
    fisher, anchor = {"w": torch.rand(5, 3)}, {"w": torch.randn(5, 3)}
    direction = torch.randn(5, 3)
    base = ewc_penalty({"w": anchor["w"] + direction}, [(fisher, anchor)], 1.0).item()
    for scale in (0.5, 2.0, 3.0):
        moved = ewc_penalty({"w": anchor["w"] + scale * direction}, [(fisher, anchor)], 1.0).item()
        assert moved == pytest.approx(scale**2 * base, rel=1e-5)
    weighted = ewc_penalty({"w": anchor["w"] + direction}, [(fisher, anchor)], 250.0).item()
    assert weighted == pytest.approx(250 * base, rel=1e-5)


def test_penalty_is_differentiable_and_pulls_towards_anchor():
    fisher, anchor = {"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([0.0, 0.0])}
    w = torch.tensor([1.0, -3.0], requires_grad=True)
    ewc_penalty({"w": w}, [(fisher, anchor)], 0.5).backward()
    assert w.grad.tolist() == pytest.approx([2 * 0.5 * 2.0 * 1.0, 2 * 0.5 * 1.0 * -3.0])


def test_per_task_penalty_sums_over_tasks():
    first = _pair({"w": [1.0, 2.0]}, {"w": [0.0, 0.0]})
    second = _pair({"w": [3.0, 0.5]}, {"w": [1.0, 1.0]})
    theta = {"w": torch.tensor([2.0, -1.0])}
    # first: 1*4 + 2*1 = 6; second: 3*1 + 0.5*4 = 5
    assert ewc_penalty(theta, [first], 1.0).item() == pytest.approx(6.0)
    assert ewc_penalty(theta, [second], 1.0).item() == pytest.approx(5.0)
    assert ewc_penalty(theta, [first, second], 2.0).item() == pytest.approx(22.0)


def test_online_fisher_accumulates_with_gamma():
    f1, f2, f3 = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}
    assert online_fisher(None, f1, 0.5)["w"].tolist() == [1.0, 2.0]
    acc = online_fisher(online_fisher(None, f1, 0.5), f2, 0.5)
    assert acc["w"].tolist() == [4.5, 1.0]
    acc = online_fisher(acc, f3, 0.5)
    assert acc["w"].tolist() == [3.25, 1.5]  # 0.25*f1 + 0.5*f2 + f3
    assert f1["w"].tolist() == [1.0, 2.0]  # inputs untouched
    summed = online_fisher(online_fisher(None, f1, 1.0), f2, 1.0)
    assert summed["w"].tolist() == [5.0, 2.0]


def test_config_validation():
    assert EwcConfig().mode == "per_task" and EwcConfig().lambda_ > 0
    with pytest.raises(ConfigError, match="mode"):
        EwcConfig(mode="separate")
    with pytest.raises(ConfigError, match="gamma"):
        EwcConfig(gamma=1.5)
    with pytest.raises(ConfigError, match="fisher_samples"):
        EwcConfig(fisher_samples=0)
    assert EwcConfig().fisher == "true"
    with pytest.raises(ConfigError, match="fisher"):
        EwcConfig(fisher="exact")
    assert METHODS["ewc"] is Ewc


# -- (1b) the Fisher estimate on toy modules ---------------------------------------------------------
class _Toy(torch.nn.Module):
    """A causal-LM stand-in: each position's logits from its own token (embedding, tanh, linear head)."""

    def __init__(self, vocab: int = 7, width: int = 5):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Parameter(torch.randn(vocab, width, generator=generator))
        self.head = torch.nn.Parameter(torch.randn(width, vocab, generator=generator))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.tanh(self.embed[input_ids]) @ self.head)


class _BiasOnly(torch.nn.Module):
    """Logits = one bias vector at every position, whatever the input."""

    def __init__(self, bias: list[float]):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(bias))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def _batch(tokens: list[int], answer_from: int) -> dict[str, torch.Tensor]:
    """One sample: the tokens from position ``answer_from`` on are the answer (labelled), the rest prompt."""
    ids = torch.tensor([tokens])
    labels = ids.clone()
    labels[:, :answer_from] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_fisher_is_squared_gradient_of_summed_answer_nll():
    model = _Toy()
    batches = [_batch([1, 2, 3, 4, 5, 6], 3), _batch([6, 0, 2, 2], 1)]
    params = dict(model.named_parameters())
    fisher = diagonal_fisher(model, batches, params, kind="empirical")
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    for batch in batches:  # by hand: -sum over answer positions t of log softmax(logits[t - 1])[token t]
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        logits = torch.tanh(model.embed[ids]) @ model.head
        nll = -sum(torch.log_softmax(logits[t - 1], -1)[ids[t]] for t in range(len(ids)) if labels[t] != -100)
        for name, grad in zip(params, torch.autograd.grad(nll, list(params.values()))):
            expected[name] += grad**2 / len(batches)
    for name in params:
        assert torch.allclose(fisher[name], expected[name], rtol=1e-5, atol=1e-7), name
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_fisher_no_longer_shrinks_with_answer_length():
    """Same token, same gradient at every answer position: the summed NLL's gradient doubles with the answer
    length, so F quadruples (with the old token mean it stayed the same, i.e. F/4 relative to the sum)."""
    model = _BiasOnly([0.3, -0.2, 0.5, 0.0])
    params = dict(model.named_parameters())
    short = diagonal_fisher(model, [_batch([1, 2, 2, 2], 1)], params, kind="empirical")["bias"]
    long = diagonal_fisher(model, [_batch([1, 2, 2, 2, 2, 2, 2], 1)], params, kind="empirical")["bias"]
    assert torch.allclose(long, 4 * short, rtol=1e-5)
    probs = torch.softmax(model.bias.detach(), -1)
    one_token = (probs - torch.nn.functional.one_hot(torch.tensor(2), 4)) ** 2
    assert torch.allclose(short, 9 * one_token, rtol=1e-5)  # three answer tokens: (3 g)^2


def test_true_fisher_matches_the_model_distribution_and_is_seeded():
    """One answer position under a fixed softmax p: the Fisher information of the bias is p (1 - p)
    (E_y[(p - e_y)^2]); the Monte-Carlo estimate of ``kind="true"`` converges to it, whatever the data's
    label, while the empirical one is (p - e_label)^2."""
    model = _BiasOnly([1.0, 0.0, -0.5, 0.2])
    params = dict(model.named_parameters())
    batches = [_batch([0, 3], 1)] * 3000
    true = diagonal_fisher(model, batches, params, kind="true", generator=torch.Generator().manual_seed(4))["bias"]
    probs = torch.softmax(model.bias.detach(), -1)
    assert torch.allclose(true, probs * (1 - probs), atol=0.02)
    empirical = diagonal_fisher(model, batches[:1], params, kind="empirical")["bias"]
    assert torch.allclose(empirical, (probs - torch.nn.functional.one_hot(torch.tensor(3), 4)) ** 2)
    few = batches[:20]
    again = [diagonal_fisher(model, few, params, kind="true", generator=torch.Generator().manual_seed(s)) for s in (4, 4, 5)]
    assert torch.equal(again[0]["bias"], again[1]["bias"]) and not torch.equal(again[0]["bias"], again[2]["bias"])


# -- (2, 3) the method on the tiny model ----------------------------------------------------------
def _tasks(cache_dir: Path):
    return build_stream(StreamConfig(name="synth-domain", options=STREAM_OPTIONS, cache_dir=str(cache_dir)), Path("."))


def _method(model_dir: Path, tasks, **options) -> Ewc:
    from mmcl.backbones.registry import load_backbone

    method = Ewc(EwcConfig(**options), LoraSettings(rank=4, alpha=8.0), seed=0)
    method.setup(load_backbone(str(model_dir), device="cpu"))
    method.see_tasks(tasks, len(tasks))
    return method


def _train(method: Ewc, index: int, tasks, work: Path) -> None:
    from mmcl.training.sft import TrainingConfig, train_on_samples

    config = TrainingConfig(max_steps=3, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, progress_bar=False)
    task = tasks[index]
    method.before_task(index, task)
    backbone = method.backbone
    train_on_samples(backbone, task.train_samples, config, work / f"t{index}", seed=index, extra_loss=method.extra_loss)
    method.after_task(index, task)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, stream_cache_dir, tmp_path_factory):
    """Per-task EWC after two short stages (the second one penalised)."""
    tasks = _tasks(stream_cache_dir)
    method = _method(tiny_model_dir, tasks, lambda_=100.0, fisher_samples=6)
    assert method.extra_loss(None, {}, None) is None  # first task: no penalty
    work = tmp_path_factory.mktemp("ewc_train")
    _train(method, 0, tasks, work)
    _train(method, 1, tasks, work)
    return method, tasks


def test_fisher_on_tiny_model(trained):
    method, _ = trained
    model = method.backbone.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(method.consolidated) == 2 and method.tasks_done == [0, 1]
    for fisher, anchor in method.consolidated:
        assert set(fisher) == trainable == set(anchor)
        assert all(bool((f >= 0).all()) and f.dtype == torch.float32 for f in fisher.values())
        for kind in ("lora_A", "lora_B"):
            assert sum(float(f.sum()) for name, f in fisher.items() if kind in name) > 0, kind
    assert all(p.grad is None for p in model.parameters())  # gradients cleared
    assert model.training  # training mode restored after the eval-mode Fisher pass
    # the second stage was penalised and it recorded the penalty it saw
    assert [entry["task"] for entry in method.penalty_log] == [1]
    assert method.penalty_log[0]["calls"] == 3 and method.penalty_log[0]["mean"] >= 0
    # the anchors are the weights at the end of each stage: the second one is where the model is now
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name].float(), value) for name, value in method.consolidated[1][1].items())
    assert ewc_penalty(params, method.consolidated[1:], 1.0).item() == 0.0
    assert ewc_penalty(params, method.consolidated, 1.0).item() > 0.0


def test_fisher_of_one_sample_on_tiny_model(trained):
    """On the real model: F of one sample = (grad of the summed answer NLL)^2 = L^2 (grad of the model's own
    token-mean loss)^2, with L the number of answer tokens (the model's loss computed by transformers)."""
    method, tasks = trained
    params = method.trainable()
    sample = tasks[0].train_samples[0]
    batch = next(method.single_batches([sample]))
    answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert answer_tokens >= 2
    fisher = diagonal_fisher(method.backbone.model, [batch], params, kind="empirical")
    method.backbone.model.eval()
    mean_loss = method.backbone.model(**batch).loss
    grads = torch.autograd.grad(mean_loss, list(params.values()))
    method.backbone.model.train()
    for (name, value), grad in zip(fisher.items(), grads):
        expected = (answer_tokens * grad.float()) ** 2
        assert torch.allclose(value, expected, rtol=1e-4, atol=1e-12 + 1e-4 * float(expected.max())), name


def test_true_fisher_on_tiny_model_is_seeded_and_differs_from_empirical(trained):
    method, tasks = trained
    true_first, true_again = method.compute_fisher(0, tasks[0]), method.compute_fisher(0, tasks[0])
    assert method.config.fisher == "true"
    assert all(torch.equal(true_first[name], true_again[name]) for name in true_first)  # seeded by run seed and task
    other_task = method.compute_fisher(5, tasks[0])  # other draw of samples and labels
    assert any(not torch.equal(true_first[name], other_task[name]) for name in true_first)
    method.config.fisher = "empirical"
    try:
        empirical = method.compute_fisher(0, tasks[0])
    finally:
        method.config.fisher = "true"
    assert set(empirical) == set(true_first)
    assert any(not torch.allclose(true_first[name], empirical[name]) for name in true_first)
    assert all(bool((empirical[name] >= 0).all()) for name in empirical)


def test_old_and_mismatched_states_are_refused(trained, tiny_model_dir):
    method, tasks = trained
    state = method.state_json()
    assert state["fisher"] == "true" and state["fisher_nll"] == "sum"
    old = {"mode": "per_task", "tasks_done": [0], "penalty": []}  # written before the summed NLL
    with pytest.raises(RunDirError, match="token-mean"):
        method.load_state_json(old)
    other = _method(tiny_model_dir, tasks, fisher="empirical")
    with pytest.raises(RunDirError, match="Fisher"):
        other.load_state_json(state)
    other.load_state_json({"mode": "per_task", "tasks_done": [], "penalty": []})  # nothing consolidated: fine


def _displaced(method: Ewc) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        name: p.detach() + 0.01 * torch.randn(p.shape, generator=generator)
        for name, p in method.backbone.model.named_parameters()
        if p.requires_grad
    }


def _round_trip(method: Ewc, model_dir: Path, tasks, tmp_path: Path) -> Ewc:
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    fresh = _method(model_dir, tasks, **vars(method.config))
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(load_file(str(tmp_path / "state.safetensors")))
    return fresh


def test_state_round_trip_per_task(trained, tiny_model_dir, tmp_path):
    method, tasks = trained
    fresh = _round_trip(method, tiny_model_dir, tasks, tmp_path)
    assert fresh.tasks_done == method.tasks_done and fresh.penalty_log == method.penalty_log
    old_params = dict(method.backbone.model.named_parameters())
    new_params = dict(fresh.backbone.model.named_parameters())
    for name, p in old_params.items():
        if p.requires_grad:
            assert torch.equal(p, new_params[name]), name
    displaced = _displaced(method)
    penalties = [ewc_penalty(displaced, m.consolidated, 3.0) for m in (method, fresh)]
    assert torch.equal(*penalties)
    assert torch.equal(fresh.extra_loss(None, {}, None), method.extra_loss(None, {}, None))


def test_online_mode_and_its_round_trip(tiny_model_dir, stream_cache_dir, tmp_path):
    tasks = _tasks(stream_cache_dir)
    method = _method(tiny_model_dir, tasks, mode="online", gamma=0.5, fisher_samples=3)
    fisher_first = method.compute_fisher(0, tasks[0])
    method.after_task(0, tasks[0])
    method.after_task(1, tasks[1])
    assert len(method.consolidated) == 1 and method.tasks_done == [0, 1]
    fisher_second = method.compute_fisher(1, tasks[1])  # same draw of samples, same weights: same Fisher
    accumulated = method.consolidated[0][0]
    for name, value in accumulated.items():
        assert torch.allclose(value, 0.5 * fisher_first[name] + fisher_second[name])
    fresh = _round_trip(method, tiny_model_dir, tasks, tmp_path)
    displaced = _displaced(method)
    penalties = [ewc_penalty(displaced, m.consolidated, 2.0) for m in (method, fresh)]
    assert torch.equal(*penalties)
    with pytest.raises(RunDirError, match="mode"):
        _method(tiny_model_dir, tasks, mode="per_task").load_state_json(method.state_json())


# -- (4) end to end ----------------------------------------------------------------------------------
def test_cli_run_with_ewc_and_exact_resume(tiny_model_dir, stream_cache_dir, tmp_path):
    import shutil

    from mmcl.cli import main

    run_dir = tmp_path / "run"
    config = make_stream_config(
        tiny_model_dir,
        stream_cache_dir,
        run_dir,
        method={"name": "seq-lora", "options": {"fisher_samples": 4, "lambda_": 100.0}},
        evaluation={"batch_size": 8, "forward_transfer": False},
    )
    path = write_config(tmp_path / "ewc.yaml", config)
    assert main(["run", str(path), "--method", "ewc"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "ewc" and results["complete"]
    assert results["metrics"] and all(value is not None for value in results["matrix"][-1])
    stages = sorted((run_dir / "stages").iterdir())
    state = json.loads((stages[-1] / "state.json").read_text())
    assert state["tasks_done"] == list(range(len(stages)))
    assert [entry["task"] for entry in state["penalty"]] == list(range(1, len(stages)))
    keys = load_file(str(stages[-1] / "state.safetensors")).keys()
    assert sum(key.startswith("fisher::") for key in keys) == sum(key.startswith("anchor::") for key in keys) > 0

    # a crash during the last stage: the rerun reloads stage T-1 (Fisher, anchors, adapter) from disk and
    # must produce exactly the same last stage as the uninterrupted run
    first_state = load_file(str(stages[-1] / "state.safetensors"))
    shutil.rmtree(stages[-1])
    shutil.rmtree(run_dir / "predictions" / stages[-1].name)
    (run_dir / "results.json").unlink()
    assert main(["run", str(path), "--method", "ewc"]) == 0
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["matrix"] == results["matrix"]
    assert json.loads((stages[-1] / "state.json").read_text()) == state
    second_state = load_file(str(stages[-1] / "state.safetensors"))
    assert second_state.keys() == first_state.keys()
    assert all(torch.equal(second_state[key], first_state[key]) for key in first_state)
