"""EWC: the penalty formula on hand-made tensors, the Fisher on the tiny model, the state round trip
and an end-to-end run through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmcl.methods.ewc  # noqa: F401  (registers "ewc")
from conftest import make_stream_config, write_config
from mmcl.benchmarks.stream import StreamConfig, build_stream
from mmcl.config import LoraSettings
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS
from mmcl.methods.ewc import Ewc, EwcConfig, ewc_penalty, online_fisher

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
    assert METHODS["ewc"] is Ewc


# -- (2, 3) the method on the tiny model ----------------------------------------------------------
def _tasks(cache_dir: Path):
    return build_stream(StreamConfig(name="synth-domain", options=STREAM_OPTIONS, cache_dir=str(cache_dir)), Path("."))


def _method(model_dir: Path, tasks, **options) -> Ewc:
    from mmcl.backbones.registry import load_backbone

    method = Ewc(EwcConfig(**options), LoraSettings(rank=4, alpha=8.0), seed=0)
    method.setup(load_backbone(str(model_dir), device="cpu"), tasks)
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


def _displaced(method: Ewc) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        name: p.detach() + 0.01 * torch.randn(p.shape, generator=generator)
        for name, p in method.backbone.model.named_parameters()
        if p.requires_grad
    }


def _round_trip(method: Ewc, model_dir: Path, tasks, tmp_path: Path) -> Ewc:
    save_file(method.state_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    fresh = _method(model_dir, tasks, **vars(method.config))
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.load_state_tensors(load_file(str(tmp_path / "state.safetensors")))
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
