"""O-LoRA: the orthogonality penalty by hand, the PEFT multi-adapter set-up on the tiny model,
state round trip, and one end-to-end run through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import eval_logits, set_up_on_tiny
import mmcl.methods.olora  # noqa: F401  (registers "olora")
from mmcl.methods.base import LoraSettings
from mmcl.methods.lora_utils import adapter_tensors
from mmcl.methods.olora import OLora, OLoraConfig, l2_penalty, lora_layers, orthogonality_penalty


# -- the penalty as a pure function --------------------------------------------------------------
def test_penalty_by_hand():
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    new = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert orthogonality_penalty([old], new).item() == pytest.approx(10.0)
    # A_old A_new^T = [[1, -1]] [[1, 2], [-3, 4]]^T = [[-1, -7]] -> 8
    old2 = torch.tensor([[1.0, -1.0]])
    new2 = torch.tensor([[1.0, 2.0], [-3.0, 4.0]])
    assert orthogonality_penalty([old2], new2).item() == pytest.approx(8.0)
    # several old adapters add up (the authors' concatenation of old As along the rank)
    assert orthogonality_penalty([old, old2], new2).item() == pytest.approx(
        orthogonality_penalty([torch.cat([old, old2])], new2).item()
    )
    assert orthogonality_penalty([], new).item() == 0.0


def test_penalty_zero_for_orthogonal_row_spaces():
    old = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    new = torch.tensor([[0.0, 0.0, 2.0, -1.0], [0.0, 0.0, 0.5, 3.0]])
    assert orthogonality_penalty([old], new).item() == 0.0
    rotation = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))[0]
    assert orthogonality_penalty([rotation[:3]], rotation[3:] * 5).item() == pytest.approx(0.0, abs=1e-5)


def test_penalty_gradient_reaches_new_A_only():
    old = torch.randn(2, 5, requires_grad=True)
    new = torch.randn(3, 5, requires_grad=True)
    orthogonality_penalty([old], new).backward()
    assert old.grad is None
    expected = (old.detach() @ new.detach().T).sign().T @ old.detach()  # d/dnew sum|old new^T|
    torch.testing.assert_close(new.grad, expected)


def test_l2_penalty_is_sum_of_frobenius_norms():
    a, b = torch.tensor([[3.0, 4.0]]), torch.zeros(2, 2, requires_grad=True)
    assert l2_penalty([a, b]).item() == pytest.approx(5.0)
    l2_penalty([b]).backward()
    assert torch.isfinite(b.grad).all()  # B starts at zero: the norm's gradient must not be NaN


def test_config_rejects_negative_weights():
    from mmcl.errors import ConfigError

    assert OLoraConfig().lambda1 == 0.5 and OLoraConfig().lambda2 == 0.0
    with pytest.raises(ConfigError, match="lambda1"):
        OLoraConfig(lambda1=-1.0)


# -- on the tiny model ---------------------------------------------------------------------------
def new_method(model_dir: Path, tasks, **options) -> OLora:
    return set_up_on_tiny(OLora(OLoraConfig(**options), LoraSettings(rank=4, alpha=8.0), seed=0), model_dir, tasks)


def fit(method: OLora, index: int, tasks, work: Path) -> None:
    """Stage ``index`` training proper (between ``before_task`` and ``after_task``), as the runner does it."""
    from mmcl.training.sft import TrainingConfig, train_on_samples

    settings = TrainingConfig(max_steps=3, batch_size=4, learning_rate=3e-2, warmup_ratio=0.0, progress_bar=False)
    samples = method.train_data(index, tasks[index], tasks[index].train_samples)
    trainer_dir = work / f"trainer{index}"
    train_on_samples(method.backbone, samples, settings, trainer_dir, seed=index, extra_loss=method.extra_loss)


def logits(method: OLora, tasks) -> torch.Tensor:
    return eval_logits(method.backbone, tasks[0].test_samples[:2])


def trainable_names(method: OLora) -> list[str]:
    return [n for n, p in method.backbone.model.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def two_tasks(tiny_model_dir: Path, tasks, tmp_path_factory):
    """A method trained on tasks 0 and 1, with what the tests below need recorded along the way."""
    work = tmp_path_factory.mktemp("olora")
    method = new_method(tiny_model_dir, tasks)
    model = method.backbone.model
    method.before_task(0, tasks[0])
    record = {"extra_1": method.extra_loss(model, {}, None), "trainable_1": trainable_names(method)}
    fit(method, 0, tasks, work)
    method.after_task(0, tasks[0])
    record["old_after_1"] = adapter_tensors(method.backbone, "olora_0")

    method.before_task(1, tasks[1])
    record["trainable_2"] = trainable_names(method)
    record["penalty_start_2"] = method.penalty(model).item()
    fit(method, 1, tasks, work)
    record["penalty_end_2"] = method.penalty(model).item()
    method.after_task(1, tasks[1])
    return method, record


def test_two_tasks_adapters_active_and_frozen(two_tasks, tasks):
    method, record = two_tasks
    model = method.backbone.model
    assert method.adapters == ["olora_0", "olora_1"]
    layers = lora_layers(model)
    assert layers and all(layer.active_adapters == ["olora_0", "olora_1"] for layer in layers)

    # during stage 2 only the new adapter trains, and the penalty is on (it is None in stage 1: no old adapter)
    assert record["extra_1"] is None
    assert record["trainable_1"] and all(".olora_0." in name for name in record["trainable_1"])
    assert record["trainable_2"] and all(".olora_1." in name for name in record["trainable_2"])
    assert any(".lora_A.olora_1." in name for name in record["trainable_2"])
    assert record["penalty_start_2"] > 0

    # the old adapter is untouched by stage 2
    after = adapter_tensors(method.backbone, "olora_0")
    assert after.keys() == record["old_after_1"].keys()
    for key, value in record["old_after_1"].items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)

    # the new adapter did train, and both adapters shape the output
    assert any(v.abs().sum() > 0 for k, v in adapter_tensors(method.backbone, "olora_1").items() if "lora_B" in k)
    both = logits(method, tasks)
    model.base_model.set_adapter(["olora_1"], inference_mode=True)
    only_new = logits(method, tasks)
    model.base_model.set_adapter(["olora_0", "olora_1"], inference_mode=True)
    assert not torch.allclose(both, only_new, atol=1e-5)
    torch.testing.assert_close(logits(method, tasks), both)

    # the count in stage.json is the newest adapter alone
    newest = sum(p.numel() for n, p in model.named_parameters() if ".olora_1." in n)
    assert method.trainable_parameters() == newest
    assert newest == sum(p.numel() for n, p in model.named_parameters() if ".olora_0." in n)


def test_penalty_pulls_new_A_towards_orthogonality(two_tasks):
    _, record = two_tasks
    assert record["penalty_end_2"] < record["penalty_start_2"]


def test_state_round_trip(two_tasks, tiny_model_dir: Path, tasks, tmp_path: Path):
    import json

    method, _ = two_tasks
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    assert all(k.split("::")[0] in ("olora_0", "olora_1") for k in load_file(str(tmp_path / "state.safetensors")))

    fresh = new_method(tiny_model_dir, tasks)
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(load_file(str(tmp_path / "state.safetensors")))
    assert fresh.adapters == ["olora_0", "olora_1"]
    assert all(layer.active_adapters == ["olora_0", "olora_1"] for layer in lora_layers(fresh.backbone.model))
    torch.testing.assert_close(logits(fresh, tasks), logits(method, tasks))
    samples = tasks[1].test_samples
    assert fresh.generate(samples, tasks[1], 6) == method.generate(samples, tasks[1], 6)

    # resuming at task 3 adds a third adapter: all active, only it trainable
    fresh.before_task(2, tasks[2])
    layers = lora_layers(fresh.backbone.model)
    assert all(layer.active_adapters == ["olora_0", "olora_1", "olora_2"] for layer in layers)
    names = trainable_names(fresh)
    assert names and all(".olora_2." in name for name in names)
    assert fresh.penalty(fresh.backbone.model).item() > 0


def test_cli_run_olora(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path):
    import json

    from conftest import make_stream_config, write_config
    from mmcl.cli import main

    method = {"name": "olora", "options": {"lambda1": 1.0}}
    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "run", method=method)
    config["stream"]["options"] = {"train_per_task": 4, "test_per_task": 2}
    config["training"] = {"max_steps": 1, "batch_size": 4, "progress_bar": False}
    config["evaluation"] = {"batch_size": 8, "forward_transfer": False, "evaluate_base": False, "max_new_tokens": 4}
    path = write_config(tmp_path / "olora.yaml", config)
    assert main(["run", str(path), "--method", "olora"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "olora" and results["complete"]
    stages = sorted((tmp_path / "run" / "stages").iterdir())
    assert len(stages) == 5
    assert json.loads((stages[-1] / "state.json").read_text())["adapters"] == [f"olora_{i}" for i in range(5)]
    per_stage = {json.loads((stage / "stage.json").read_text())["trainable_parameters"] for stage in stages}
    assert len(per_stage) == 1  # one adapter's worth each stage, not a growing sum


@pytest.mark.parametrize(("modules", "names"), [
    ("attention-qv", {"q_proj", "v_proj"}),
    ("backbone", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "linear_1", "linear_2"}),
])  # fmt: skip
def test_adapted_modules(modules: str, names: set[str], tiny_model_dir: Path, tasks) -> None:
    """By default the adapters sit on the language model's query and value projections, as in the
    authors' LLaMA set-up; ``modules: backbone`` uses the backbone's default LoRA targets."""
    method = set_up_on_tiny(OLora(OLoraConfig(modules=modules), LoraSettings(rank=4), seed=0), tiny_model_dir, tasks)
    adapted = {name for name, module in method.backbone.model.named_modules() if hasattr(module, "lora_A")}
    assert {name.rsplit(".", 1)[-1] for name in adapted} == names
    assert all("vision" not in name for name in adapted)
