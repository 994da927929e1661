"""LLaCA: the adaptive EMA weight and the EMA update on hand values, the EMA over a few steps by hand, the
optimiser step hook, theta <- theta* at the end of a stage on the tiny model, and a state round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import eval_logits, set_up_on_tiny
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import mmcl.methods.llaca  # registers "llaca" (and the fixture patches it)
from mmcl.config import LoraSettings
from mmcl.errors import ConfigError
from mmcl.methods.base import METHODS
from mmcl.methods.llaca import (
    AdaptiveEma,
    Llaca,
    LlacaConfig,
    ema_update,
    ema_weight,
    optimizer_step_hook,
)

T = torch.tensor


# -- (1) alpha and the update on hand values -----------------------------------------------------------
def test_ema_weight_by_hand():
    # |theta - theta*|_1 = |1| + |2| = 3, |g|_1 = 2, |g - g_prev|_1 = |1 - 0| + |-1 - 1| = 3
    # alpha = 2 (1 + 2) / (3 * 3) = 2/3
    alpha = ema_weight(T([1.0, 2.0]), T([0.0, 0.0]), T([1.0, -1.0]), T([0.0, 1.0]))
    assert alpha.dtype == torch.float32 and alpha.item() == pytest.approx(2 / 3)
    # the constant scales it: c = 0.5 -> 1/6
    assert ema_weight(T([1.0, 2.0]), T([0.0, 0.0]), T([1.0, -1.0]), T([0.0, 1.0]), scale=0.5).item() == pytest.approx(1 / 6)
    # outside (0, 1) -> 0.01: theta close to theta* gives alpha = 2 * 3 / (0.3 * 3) = 6.67
    assert ema_weight(T([0.1, 0.2]), T([0.0, 0.0]), T([1.0, -1.0]), T([0.0, 1.0])).item() == pytest.approx(0.01)
    # alpha = 1 exactly is outside the open interval: |d|_1 = 2, |g|_1 = 2, |dg|_1 = 3 -> 2 * 3 / 6 = 1
    assert ema_weight(T([2.0, 0.0]), T([0.0, 0.0]), T([1.0, -1.0]), T([0.0, 1.0])).item() == pytest.approx(0.01)
    # zero denominators (theta = theta*, or an unchanged gradient) give inf -> 0.01; NaN -> 0.01
    assert ema_weight(T([1.0]), T([1.0]), T([1.0]), T([0.0])).item() == pytest.approx(0.01)
    assert ema_weight(T([1.0]), T([0.0]), T([1.0]), T([1.0])).item() == pytest.approx(0.01)
    assert ema_weight(T([1.0]), T([0.0]), T([float("nan")]), T([1.0])).item() == pytest.approx(0.01)
    assert ema_weight(T([0.1, 0.2]), T([0.0, 0.0]), T([1.0, -1.0]), T([0.0, 1.0]), fallback=0.001).item() == pytest.approx(0.001)


def test_ema_update_by_hand():
    anchor = T([0.0, 4.0])
    result = ema_update(anchor, T([1.0, 2.0]), 0.25)  # 0.75 [0, 4] + 0.25 [1, 2] = [0.25, 3.5]
    assert result is anchor and anchor.tolist() == [0.25, 3.5]
    ema_update(anchor, T([1.0, 2.0]), T(1.0))
    assert anchor.tolist() == [1.0, 2.0]


def test_adaptive_ema_over_three_steps_by_hand():
    p = torch.nn.Parameter(T([1.0, 2.0]))
    ema = AdaptiveEma({"p": p})
    assert ema.anchor["p"].tolist() == [1.0, 2.0]  # theta* starts as the parameters the stage starts from
    with torch.no_grad():
        # step 1: no previous gradient -> alpha = 0.01
        p.copy_(T([1.5, 1.0]))
        p.grad = T([1.0, -2.0])
        ema.step()
        anchor = [0.99 * 1 + 0.01 * 1.5, 0.99 * 2 + 0.01 * 1.0]  # [1.005, 1.99]
        assert ema.anchor["p"].tolist() == pytest.approx(anchor)
        # step 2: |theta - theta*| = 0.995 + 1.99 = 2.985, |g| = 1.5, |g - g_prev| = 0.5 + 3 = 3.5
        p.copy_(T([2.0, 0.0]))
        p.grad = T([0.5, 1.0])
        ema.step()
        alpha = 2 * (1 + 1.5) / (2.985 * 3.5)
        assert 0 < alpha < 1
        anchor = [(1 - alpha) * anchor[0] + alpha * 2.0, (1 - alpha) * anchor[1] + alpha * 0.0]
        assert ema.anchor["p"].tolist() == pytest.approx(anchor, rel=1e-6)
        # step 3: the same gradient again -> |g - g_prev| = 0 -> alpha = inf -> 0.01
        p.copy_(T([3.0, -1.0]))
        p.grad = T([0.5, 1.0])
        ema.step()
        anchor = [0.99 * anchor[0] + 0.01 * 3.0, 0.99 * anchor[1] + 0.01 * -1.0]
        assert ema.anchor["p"].tolist() == pytest.approx(anchor, rel=1e-6)
    stats = ema.statistics()
    assert stats["ema_steps"] == 3 and stats["ema_fallback_share"] == pytest.approx(2 / 3)
    assert stats["ema_mean_alpha"] == pytest.approx((0.01 + alpha + 0.01) / 3, rel=1e-6)
    assert p.tolist() == [3.0, -1.0]  # the parameters themselves follow the optimiser ...
    ema.apply()
    assert p.tolist() == pytest.approx(anchor, rel=1e-6)  # ... until theta <- theta*


def test_optimizer_hook_steps_the_ema_of_its_own_parameters_only():
    ours, other = torch.nn.Parameter(T([1.0, 1.0])), torch.nn.Parameter(T([0.0]))
    ema = AdaptiveEma({"w": ours})
    optimiser, unrelated = torch.optim.SGD([ours], lr=0.5), torch.optim.SGD([other], lr=0.5)
    handle = register_optimizer_step_post_hook(optimizer_step_hook(ema))
    try:
        ours.grad, other.grad = T([2.0, -2.0]), T([1.0])
        optimiser.step()  # theta = [0, 2]; the hook runs after the step, with the gradient still there
        unrelated.step()
    finally:
        handle.remove()
    optimiser.step()  # after remove: not seen
    assert ema.steps == 1 and ema.previous_grad["w"].tolist() == [2.0, -2.0]
    assert ema.anchor["w"].tolist() == pytest.approx([0.99 * 1 + 0.01 * 0, 0.99 * 1 + 0.01 * 2])


def test_config_validation():
    assert METHODS["llaca"] is Llaca
    config = LlacaConfig()
    assert (config.scale, config.fallback, config.first_stage) == (2.0, 0.01, False)
    for bad in ({"scale": 0.0}, {"fallback": 0.0}, {"fallback": 1.5}):
        with pytest.raises(ConfigError):
            LlacaConfig(**bad)


# -- (2) the method on the tiny model ----------------------------------------------------------------
def _method(model_dir: Path, tasks, **options) -> Llaca:
    return set_up_on_tiny(Llaca(LlacaConfig(**options), LoraSettings(rank=4, alpha=8.0), seed=0), model_dir, tasks)


def _stage(method: Llaca, index: int, tasks, work: Path) -> dict:
    from mmcl.training.sft import TrainingConfig

    config = TrainingConfig(max_steps=3, batch_size=4, learning_rate=2e-2, warmup_ratio=0.0, progress_bar=False)
    task = tasks[index]
    method.before_task(index, task)
    metrics = method.train(method.train_data(index, task, task.train_samples), config, work / f"t{index}", seed=index)
    method.after_task(index, task)
    return metrics


@pytest.fixture(scope="module")
def two_stages(tiny_model_dir, tasks, tmp_path_factory, request):
    """Two stages; the EMA object of the second one is kept with the weights training reached before theta <- theta*."""
    seen: list[tuple[AdaptiveEma, dict[str, torch.Tensor]]] = []

    class Recording(AdaptiveEma):
        def apply(self) -> None:
            seen.append((self, {name: p.detach().clone() for name, p in self.params.items()}))
            super().apply()

    patch = pytest.MonkeyPatch()
    patch.setattr(mmcl.methods.llaca, "AdaptiveEma", Recording)
    request.addfinalizer(patch.undo)
    method = _method(tiny_model_dir, tasks)
    work = tmp_path_factory.mktemp("llaca")
    first_metrics = _stage(method, 0, tasks, work)
    assert not seen and "ema_steps" not in first_metrics  # no EMA on the first stage (released scripts)
    second_metrics = _stage(method, 1, tasks, work)
    return method, seen, second_metrics


def test_theta_becomes_the_ema_at_the_end_of_the_stage(two_stages):
    method, seen, metrics = two_stages
    assert len(seen) == 1
    ema, trained = seen[0]
    params = method.trainable()
    assert set(ema.params) == set(params) and ema.steps == 3 and metrics["ema_steps"] == 3
    for name, p in params.items():
        assert torch.equal(p.detach(), ema.anchor[name].to(p.dtype)), name  # theta <- theta*
    assert any(not torch.equal(trained[name], p.detach()) for name, p in params.items())  # not where SGD ended
    assert [entry["ema"] for entry in method.ema_log] == [False, True] and method.ema_log[1]["tasks"] == [1]
    assert 0 < method.ema_log[1]["ema_mean_alpha"] < 1
    assert method.stage_tasks == []


def test_first_stage_option_runs_the_ema_from_the_start(tiny_model_dir, tasks, tmp_path):
    method = _method(tiny_model_dir, tasks, first_stage=True)
    metrics = _stage(method, 0, tasks, tmp_path)
    assert metrics["ema_steps"] == 3 and method.ema_log == [{"tasks": [0], "ema": True, **{
        key: metrics[key] for key in ("ema_steps", "ema_mean_alpha", "ema_fallback_share")}}]


def test_state_round_trip(two_stages, tiny_model_dir, tasks, tmp_path):
    method, _, _ = two_stages
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    fresh = _method(tiny_model_dir, tasks)
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(load_file(str(tmp_path / "state.safetensors")))
    assert fresh.ema_log == method.ema_log
    new_params = fresh.trainable()
    assert all(torch.equal(p, new_params[name]) for name, p in method.trainable().items())
    samples = tasks[0].test_samples[:2]
    assert torch.equal(eval_logits(method.backbone, samples), eval_logits(fresh.backbone, samples))
    method.backbone.model.train()
    fresh.backbone.model.train()
