"""MAS: the importance on a hand-made linear model, the penalty, normalisation, sparsification and
accumulation on hand values, the online |grad| meter, the method on the tiny model (two tasks, both
importances) and a state round trip."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import set_up_on_tiny
from safetensors.torch import load_file, save_file

import mmcl.methods.mas  # noqa: F401  (registers "mas")
from mmcl.config import LoraSettings
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS
from mmcl.methods.mas import (
    AbsGradMeter,
    Mas,
    MasConfig,
    mas_penalty,
    merge_importance,
    normalise_importance,
    output_norm_importance,
    sparsify_importance,
    task_weight,
)

IGNORE = -100


# -- (1) the importance of a linear model f(x) = W x, by hand -----------------------------------------
class _Linear(torch.nn.Module):
    """logits[:, t] = W x_t: a 'causal LM' whose output at each position is a linear map of that position."""

    def __init__(self, weight: list[list[float]]):
        super().__init__()
        self.W = torch.nn.Parameter(torch.tensor(weight))

    def forward(self, x, attention_mask=None):
        return SimpleNamespace(logits=x @ self.W.T)


def _sample(rows: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    x = torch.tensor([rows])
    return {"x": x, "attention_mask": torch.ones(1, len(rows), dtype=torch.long), "labels": torch.tensor([labels])}


W = [[1.0, 2.0], [0.0, 1.0]]


def test_output_norm_importance_of_a_linear_model_by_hand():
    # d ||W x||^2 / dW = 2 (W x) x^T. Answer positions: the logits at t - 1 for a labelled token t, so with
    # labels [-100, 7, -100] only position 0 counts (x_0); position 1 (x_1 = [5, 5]) is ignored.
    # sample 1: x = [1, -1]: W x = [-1, -1] -> 2 [[-1], [-1]] [1, -1] = [[-2, 2], [-2, 2]] -> |.| all 2
    # sample 2: x = [2,  1]: W x = [4, 1]   -> 2 [[4], [1]] [2, 1]   = [[16, 8], [4, 2]]
    model = _Linear(W)
    batches = [_sample([[1.0, -1.0], [5.0, 5.0], [0.0, 0.0]], [IGNORE, 7, IGNORE]),
               _sample([[2.0, 1.0], [5.0, 5.0], [0.0, 0.0]], [IGNORE, 7, IGNORE])]
    omega = output_norm_importance(model, batches, dict(model.named_parameters()), outputs="answer")
    torch.testing.assert_close(omega["W"], torch.tensor([[9.0, 5.0], [3.0, 2.0]]))  # mean of [[2, 2], [2, 2]] and ^
    assert model.W.grad is None and model.training  # no gradient left behind, training mode restored


def test_output_norm_importance_takes_abs_of_the_per_sample_gradient_over_all_positions():
    # outputs=all: the sample's squared norm sums both positions, |.| is taken of the summed gradient:
    # x_0 = [1, -1]: [[-2, 2], [-2, 2]];  x_1 = [1, 1]: W x = [3, 1] -> 2 [[3], [1]] [1, 1] = [[6, 6], [2, 2]]
    # sum [[4, 8], [0, 4]] (not |x_0 term| + |x_1 term| = [[8, 8], [4, 4]])
    model = _Linear(W)
    batch = _sample([[1.0, -1.0], [1.0, 1.0]], [IGNORE, IGNORE])
    omega = output_norm_importance(model, [batch], dict(model.named_parameters()), outputs="all")
    torch.testing.assert_close(omega["W"], torch.tensor([[4.0, 8.0], [0.0, 4.0]]))
    # a padded position (mask 0) is not an output of the sample
    padded = dict(batch, attention_mask=torch.tensor([[1, 0]]))
    alone = output_norm_importance(model, [padded], dict(model.named_parameters()), outputs="all")
    torch.testing.assert_close(alone["W"], torch.tensor([[2.0, 2.0], [2.0, 2.0]]))
    # answer mode: a sample without an answer token is skipped
    with pytest.raises(Exception, match="no sample"):
        output_norm_importance(model, [batch], dict(model.named_parameters()), outputs="answer")


# -- (1) penalty, weight, normalise, sparsify, accumulate on hand values -------------------------------
def test_penalty_by_hand():
    omega = {"a": torch.tensor([2.0, 3.0]), "b": torch.tensor([4.0])}
    anchor = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    assert mas_penalty(anchor, omega, anchor, 5.0).item() == 0.0
    theta = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([0.0])}
    # 2 * 1^2 + 3 * 2^2 + 4 * (-0.5)^2 = 2 + 12 + 1 = 15, times lambda (no 1/2, as the paper)
    assert mas_penalty(theta, omega, anchor, 1.0).item() == pytest.approx(15.0)
    assert mas_penalty(theta, omega, anchor, 0.1).item() == pytest.approx(1.5)
    assert mas_penalty(theta, {}, {}, 1.0) is None
    w = torch.tensor([1.0, -3.0], requires_grad=True)  # gradient 2 lambda Omega (theta - theta*), the reference code's
    mas_penalty({"w": w}, {"w": torch.tensor([2.0, 1.0])}, {"w": torch.zeros(2)}, 0.5).backward()
    assert w.grad.tolist() == pytest.approx([2 * 0.5 * 2.0 * 1.0, 2 * 0.5 * 1.0 * -3.0])
    assert task_weight(2.0, "none", 4) == 2.0 and task_weight(2.0, "inverse-sqrt", 4) == pytest.approx(1.0)
    assert task_weight(5e-3, "inverse-sqrt", 1) == 5e-3


def test_normalise_and_sparsify_by_hand():
    omega = {"a": torch.tensor([1.0, 2.0, 3.0, 6.0]), "z": torch.zeros(3)}
    normal = normalise_importance(omega)  # mean |a| = 3
    torch.testing.assert_close(normal["a"], torch.tensor([1.0, 2.0, 3.0, 6.0]) / (3.0 + 1e-8))
    assert torch.equal(normal["z"], torch.zeros(3))
    # sparsity 0.5 on 4 entries: keep k = 2, the two largest
    assert sparsify_importance(omega, 0.5)["a"].tolist() == [0.0, 0.0, 3.0, 6.0]
    assert sparsify_importance(omega, 0.7)["a"].tolist() == [0.0, 0.0, 0.0, 6.0]  # k = floor(1.2) = 1
    assert sparsify_importance(omega, 0.9)["a"].tolist() == [1.0, 2.0, 3.0, 6.0]  # k = 0: dense, as MLLM-CTBench
    ties = {"t": torch.tensor([1.0, 2.0, 2.0, 0.5])}
    assert sparsify_importance(ties, 0.75)["t"].tolist() == [0.0, 2.0, 2.0, 0.0]  # k = 1, the tie is kept
    assert sparsify_importance(omega, 0.0)["a"].tolist() == [1.0, 2.0, 3.0, 6.0]


def test_merge_sum_and_running_mean_by_hand():
    first, second, third = ({"w": torch.tensor(v)} for v in ([1.0, 2.0], [4.0, 0.0], [1.0, 1.0]))
    summed = merge_importance(merge_importance(None, first, 0, "sum"), second, 1, "sum")
    assert summed["w"].tolist() == [5.0, 2.0]
    mean = merge_importance(None, first, 0, "mean")
    mean = merge_importance(mean, second, 1, "mean")
    assert mean["w"].tolist() == [2.5, 1.0]
    mean = merge_importance(mean, third, 2, "mean")
    assert mean["w"].tolist() == pytest.approx([2.0, 1.0])  # (1 + 4 + 1) / 3, (2 + 0 + 1) / 3
    assert first["w"].tolist() == [1.0, 2.0]  # inputs untouched


def test_abs_grad_meter_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    meter = AbsGradMeter({"w": w})
    (w * torch.tensor([2.0, -3.0])).sum().backward()  # grad [2, -3]
    w.grad = None
    (w * torch.tensor([-4.0, 1.0])).sum().backward()  # grad [-4, 1]
    meter.remove()
    (w * 100).sum().backward()  # after remove: not counted
    assert meter.passes["w"] == 2
    assert meter.mean()["w"].tolist() == [3.0, 2.0]  # (|2| + |-4|) / 2, (|-3| + |1|) / 2


def test_config_validation_and_presets():
    assert METHODS["mas"] is Mas
    config = MasConfig()
    assert config.importance == "output-norm" and config.value("lambda_") == 3.2e-3
    assert config.value("accumulate") == "sum" and config.value("normalise") is False and config.value("sparsity") == 0.0
    sft = MasConfig(importance="sft-loss")
    assert sft.value("lambda_") == 2.5e-3 and sft.value("sparsity") == 0.9 and sft.value("accumulate") == "mean"
    assert sft.value("lambda_decay") == "inverse-sqrt" and sft.value("normalise") is True
    assert MasConfig(importance="sft-loss", sparsity=0.0, lambda_=1.0).value("sparsity") == 0.0
    for bad in ({"importance": "fisher"}, {"outputs": "prompt"}, {"accumulate": "max"}, {"lambda_decay": "exp"},
                {"sparsity": 1.0}, {"lambda_": -1.0}, {"importance_samples": -1}):
        with pytest.raises(ConfigError):
            MasConfig(**bad)


# -- (2) the method on the tiny model ----------------------------------------------------------------
def _method(model_dir: Path, tasks, **options) -> Mas:
    return set_up_on_tiny(Mas(MasConfig(**options), LoraSettings(rank=4, alpha=8.0), seed=0), model_dir, tasks)


def _stage(method: Mas, index: int, tasks, work: Path) -> dict:
    from mmcl.training.sft import TrainingConfig

    config = TrainingConfig(max_steps=2, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, progress_bar=False)
    task = tasks[index]
    method.before_task(index, task)
    metrics = method.train(method.train_data(index, task, task.train_samples), config, work / f"t{index}", seed=index)
    method.after_task(index, task)
    return metrics


def _displaced(method: Mas) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {name: p.detach() + 0.01 * torch.randn(p.shape, generator=generator) for name, p in method.trainable().items()}


def _round_trip(method: Mas, model_dir: Path, tasks, tmp_path: Path) -> Mas:
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    fresh = _method(model_dir, tasks, **vars(method.config))
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(load_file(str(tmp_path / "state.safetensors")))
    return fresh


@pytest.fixture(scope="module")
def output_norm_run(tiny_model_dir, tasks, tmp_path_factory):
    method = _method(tiny_model_dir, tasks, importance_samples=3)
    assert method.extra_loss(None, {}, None) is None  # first task: no penalty
    work = tmp_path_factory.mktemp("mas")
    _stage(method, 0, tasks, work)
    first = {name: value.clone() for name, value in method.omega.items()}
    _stage(method, 1, tasks, work)
    return method, first


def test_output_norm_on_tiny_model_accumulates_by_sum(output_norm_run, tasks):
    method, first = output_norm_run
    trainable = set(method.trainable())
    assert set(method.omega) == trainable == set(method.anchor) and method.tasks_done == [0, 1] and method.merged == 2
    for kind in ("lora_A", "lora_B"):
        assert sum(float(v.sum()) for name, v in first.items() if kind in name) > 0, kind
    # Omega after task 2 = Omega_1 + Omega_2, Omega_2 estimated at the weights after task 2 (= the anchor now)
    second = method.compute_importance(1, tasks[1])
    for name, value in method.omega.items():
        torch.testing.assert_close(value, first[name] + second[name])
    params = method.trainable()
    assert all(torch.equal(params[name].float(), value) for name, value in method.anchor.items())
    assert method.extra_loss(None, {}, None).item() == 0.0  # at the anchor
    assert [entry["task"] for entry in method.penalty_log] == [1] and method.penalty_log[0]["calls"] == 2
    assert all(p.grad is None for p in method.backbone.model.parameters()) and method.backbone.model.training


def test_output_norm_of_one_sample_on_tiny_model(output_norm_run, tasks):
    """On the real model: Omega of one sample = |grad of the summed squared logits at the answer positions|."""
    method, _ = output_norm_run
    sample = tasks[0].train_samples[0]
    batch = next(method.single_batches([sample]))
    params = method.trainable()
    omega = output_norm_importance(method.backbone.model, [batch], params, "answer")
    model = method.backbone.model
    model.eval()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits.float()
    labels = batch["labels"][0]
    rows = [t - 1 for t in range(1, labels.shape[0]) if labels[t] != IGNORE]
    assert len(rows) >= 1
    grads = torch.autograd.grad(logits[0, rows].pow(2).sum(), list(params.values()))
    model.train()
    for (name, value), grad in zip(omega.items(), grads):
        torch.testing.assert_close(value, grad.abs(), rtol=1e-5, atol=1e-8)


def test_state_round_trip(output_norm_run, tiny_model_dir, tasks, tmp_path):
    method, _ = output_norm_run
    fresh = _round_trip(method, tiny_model_dir, tasks, tmp_path)
    assert fresh.tasks_done == method.tasks_done and fresh.penalty_log == method.penalty_log
    assert fresh.merged == method.merged and list(fresh.omega) == list(method.omega)
    new_params = fresh.trainable()
    assert all(torch.equal(p, new_params[name]) for name, p in method.trainable().items())
    displaced = _displaced(method)
    penalties = [mas_penalty(displaced, m.omega, m.anchor, 3.0) for m in (method, fresh)]
    assert torch.equal(*penalties) and penalties[0].item() > 0
    assert torch.equal(fresh.extra_loss(None, {}, None), method.extra_loss(None, {}, None))
    # a state saved with another importance, or tensors that do not fit, are refused
    with pytest.raises(RunDirError, match="importance"):
        _method(tiny_model_dir, tasks, importance="sft-loss").load_state_json(method.state_json())
    broken = dict(method.saved_tensors())
    broken.pop(next(key for key in broken if key.startswith("anchor::")))
    other = _method(tiny_model_dir, tasks, importance_samples=3)
    other.load_state_json(method.state_json())
    with pytest.raises(RunDirError, match="anchor"):
        other.restore_tensors(broken)


def test_sft_loss_importance_on_tiny_model(tiny_model_dir, tasks, tmp_path):
    """MLLM-CTBench's variant: mean |grad| of the training loss over the training passes, each tensor divided by
    its mean |value| and cut to its 10% largest entries, running mean over tasks, lambda / sqrt(t)."""
    from mmcl.training.sft import TrainingConfig

    method = _method(tiny_model_dir, tasks, importance="sft-loss")
    config = TrainingConfig(max_steps=2, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, progress_bar=False)
    method.before_task(0, tasks[0])
    method.train(tasks[0].train_samples, config, tmp_path / "t0", seed=0)
    raw = {name: value.clone() for name, value in method._online.items()}
    method.after_task(0, tasks[0])
    for kind in ("lora_A", "lora_B"):
        assert sum(float(v.sum()) for name, v in raw.items() if kind in name) > 0, kind
    expected = sparsify_importance(normalise_importance(raw), 0.9)
    assert all(torch.equal(method.omega[name], expected[name]) for name in raw)
    for name, value in method.omega.items():
        keep = int(0.1 * value.numel())
        assert int((value != 0).sum()) <= (keep if keep else value.numel()), name
    assert method._online is None and method.merged == 1 and method.tasks_done == [0]
    assert method.current_weight() == pytest.approx(2.5e-3 / 2**0.5)  # lambda_ of the second task
    first = {name: value.clone() for name, value in method.omega.items()}
    _stage(method, 1, tasks, tmp_path)
    assert method.merged == 2 and method.penalty_log[0]["weight"] == pytest.approx(2.5e-3 / 2**0.5)
    assert any(not torch.equal(method.omega[name], first[name]) for name in first)
