"""Learning without Forgetting: the distillation term on hand-made logits, the frozen teacher adapter
on the tiny model, and a whole run through the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import make_stream_config, write_config
from mmcl.methods.base import LoraSettings
from mmcl.methods.lwf import TEACHER, LearningWithoutForgetting, LwfConfig, distillation_loss

IGNORE = -100


# -- the pure distillation term --------------------------------------------------------------


def _kl_by_hand(teacher: list[float], student: list[float], temperature: float) -> float:
    def softmax(values: list[float]) -> list[float]:
        exps = [math.exp(v / temperature) for v in values]
        return [e / sum(exps) for e in exps]

    p, q = softmax(teacher), softmax(student)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_distillation_is_zero_when_student_equals_teacher():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, 2, 2, 6]])
    assert distillation_loss(logits, logits.clone(), labels, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_matches_hand_computed_value():
    # 3 positions, 3 classes; labels at positions 1 and 2 are answers, so the logits at positions 0 and 1
    # (which predict them) are compared; position 2 predicts nothing.
    teacher = torch.tensor([[[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [9.0, 9.0, -9.0]]])
    student = torch.tensor([[[3.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE, 2, 0]])
    expected = (
        _kl_by_hand([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], 2.0) + _kl_by_hand([0.5, -1.0, 2.0], [0.0, 0.0, 0.0], 2.0)
    ) / 2
    assert expected == pytest.approx(0.24222, abs=1e-4)  # (0.3202 + 0.1643) / 2, worked out on paper
    # Li & Hoiem's loss (the default) has no T^2 factor; Hinton et al.'s scaling is the option
    assert distillation_loss(student, teacher, labels, 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(student, teacher, labels, 2.0, t_squared=True).item() == pytest.approx(4 * expected, rel=1e-6)


def test_distillation_ignores_positions_without_answer_token():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2, IGNORE, IGNORE], [IGNORE, 4, IGNORE, IGNORE, IGNORE, 0]])
    reference = distillation_loss(student, teacher, labels, 2.0)
    # compared positions (next label != -100): (0, 1), (0, 2), (1, 0), (1, 4); change everything else
    keep = torch.zeros(2, 6, dtype=torch.bool)
    keep[0, 1] = keep[0, 2] = keep[1, 0] = keep[1, 4] = True
    noisy_student = torch.where(keep[..., None], student, torch.randn(2, 6, 5) * 10)
    noisy_teacher = torch.where(keep[..., None], teacher, torch.randn(2, 6, 5) * 10)
    assert distillation_loss(noisy_student, noisy_teacher, labels, 2.0).item() == pytest.approx(reference.item(), rel=1e-6)
    none = torch.full((2, 6), IGNORE)
    assert distillation_loss(student, teacher, none, 2.0).item() == 0.0


def test_distillation_gradient_reaches_the_student_only():
    student = torch.randn(1, 4, 6, requires_grad=True)
    teacher = torch.randn(1, 4, 6, requires_grad=True)
    labels = torch.tensor([[IGNORE, 2, 3, IGNORE]])
    distillation_loss(student, teacher, labels, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad[0, :2].abs().sum() > 0
    assert student.grad[0, 2:].abs().sum() == 0  # position 2 predicts an ignored token, 3 predicts nothing


def test_config_rejects_bad_values():
    from mmcl.errors import ConfigError

    with pytest.raises(ConfigError):
        LwfConfig(temperature=0.0)
    with pytest.raises(ConfigError):
        LwfConfig(alpha=-1.0)
    assert (LwfConfig().alpha, LwfConfig().temperature, LwfConfig().t_squared) == (1.0, 2.0, False)  # Li & Hoiem


# -- the teacher adapter on the tiny model ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tasks(stream_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from mmcl.streams.stream import StreamConfig, build_stream

    config = StreamConfig(options={"train_per_task": 8, "test_per_task": 4}, cache_dir=str(stream_cache_dir))
    return build_stream(config, tmp_path_factory.mktemp("lwf_stream"))


def _method(tiny_model_dir: Path, tasks, **options) -> LearningWithoutForgetting:
    from mmcl.backbones.registry import load_backbone

    backbone = load_backbone(str(tiny_model_dir), device="cpu")
    method = LearningWithoutForgetting(LwfConfig(**options), LoraSettings(rank=4), seed=0)
    method.setup(backbone)
    method.see_tasks(tasks, len(tasks))
    return method


def _batch(method: LearningWithoutForgetting, task) -> dict[str, torch.Tensor]:
    backbone = method.backbone
    return backbone.collate([backbone.encode_for_training(sample) for sample in task.train_samples[:4]])


def _perturb_student(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for a stage of training: the LoRA B matrices are zero at init, so give them values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B.default" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train()
    return logits


def _grad_flags(model: torch.nn.Module) -> dict[str, set[bool]]:
    flags: dict[str, set[bool]] = {"student": set(), "teacher": set(), "base": set()}
    for name, parameter in model.named_parameters():
        kind = "teacher" if f".{TEACHER}." in name else "student" if ".default." in name else "base"
        flags[kind].add(parameter.requires_grad)
    return flags


def test_teacher_is_the_model_before_the_task(tiny_model_dir: Path, tiny_tasks):
    method = _method(tiny_model_dir, tiny_tasks)
    model = method.backbone.model
    method.before_task(0, tiny_tasks[0])
    batch = _batch(method, tiny_tasks[1])
    model.train()
    assert method.extra_loss(model, batch, model(**batch)) is None  # no teacher on the first task
    _perturb_student(model, seed=1)  # "after task 0"
    method.after_task(0, tiny_tasks[0])
    before = _logits(model, batch)
    saved = {key: value.clone() for key, value in method.state_tensors().items()}  # CPU views alias the weights
    assert saved and not any(TEACHER in key for key in saved)

    method.before_task(1, tiny_tasks[1])
    assert _grad_flags(model) == {"student": {True}, "teacher": {False}, "base": {False}}
    assert model.active_adapter == "default"

    model.train()
    outputs = model(**batch)
    teacher = method.teacher_logits(model, batch)
    assert torch.allclose(teacher, before, atol=1e-5)
    loss = method.extra_loss(model, batch, outputs)
    assert loss is not None and abs(loss.item()) < 1e-6  # step 0: the student is still the teacher
    # switching adapters for the teacher's forward leaves the student trainable, the teacher frozen
    assert _grad_flags(model) == {"student": {True}, "teacher": {False}, "base": {False}}
    assert model.active_adapter == "default" and model.training

    # once the student moves, the term is positive and its gradient reaches the student adapter only
    _perturb_student(model, seed=2)
    outputs = model(**batch)
    loss = method.extra_loss(model, batch, outputs)
    assert loss.item() > 1e-4
    loss.backward()
    student_grads = [p.grad for n, p in model.named_parameters() if "lora_A.default" in n]
    assert student_grads and all(g is not None and g.abs().sum() > 0 for g in student_grads)
    assert all(p.grad is None for n, p in model.named_parameters() if f".{TEACHER}." in n or "lora" not in n)
    assert torch.allclose(method.teacher_logits(model, batch), before, atol=1e-5)  # the teacher did not move

    method.after_task(1, tiny_tasks[1])
    assert TEACHER not in model.peft_config
    assert set(method.state_tensors()) == set(saved)

    # resume: a fresh process loads the saved stage-0 state, and before_task re-derives the same teacher
    resumed = _method(tiny_model_dir, tiny_tasks)
    resumed.load_state_tensors(saved)
    resumed.before_task(1, tiny_tasks[1])
    assert torch.allclose(resumed.teacher_logits(resumed.backbone.model, batch), before, atol=1e-5)


def test_distill_from_base_on_first_task(tiny_model_dir: Path, tiny_tasks):
    method = _method(tiny_model_dir, tiny_tasks, distill_from_base=True)
    model = method.backbone.model
    batch = _batch(method, tiny_tasks[0])
    base = _logits(model, batch)  # the LoRA B matrices start at zero: this is the base model
    method.before_task(0, tiny_tasks[0])
    _perturb_student(model, seed=3)
    model.train()
    assert torch.allclose(method.teacher_logits(model, batch), base, atol=1e-5)
    assert method.extra_loss(model, batch, model(**batch)).item() > 1e-4
    assert _grad_flags(model)["student"] == {True}


# -- a whole run ---------------------------------------------------------------------------


def test_lwf_run_through_the_cli_and_resume(
    tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import shutil

    from safetensors.torch import load_file

    import mmcl.methods.lwf as lwf  # registers "lwf" until methods/__init__ imports it
    from mmcl.cli import main

    values: list[float] = []

    def counting(*args, **kwargs):
        value = distillation_loss(*args, **kwargs)
        values.append(value.item())
        return value

    monkeypatch.setattr(lwf, "distillation_loss", counting)
    out = tmp_path / "run"
    config = make_stream_config(
        tiny_model_dir,
        stream_cache_dir,
        out,
        training={"epochs": 1, "batch_size": 4, "warmup_ratio": 0.0, "progress_bar": False},  # 2 steps; student == teacher at the 1st
        evaluation={"batch_size": 8, "forward_transfer": False, "limit": 2},
        method={"name": "seq-lora", "options": {"temperature": 2.0, "alpha": 0.5}},
    )
    path = write_config(tmp_path / "lwf.yaml", config)
    assert main(["run", str(path), "--method", "lwf"]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["method"] == "lwf" and results["complete"]
    assert all(value is not None for value in results["matrix"][-1])
    stages = sorted((out / "stages").iterdir())
    assert len(values) == 2 * (len(stages) - 1)  # two batches per stage; no teacher on the first
    assert all(math.isfinite(value) and value >= 0 for value in values)
    assert all(abs(value) < 1e-5 for value in values[::2])  # first step of a task: the student is the teacher
    assert all(value > 1e-6 for value in values[1::2])
    last = load_file(str(stages[-1] / "state.safetensors"))
    assert last and not any(TEACHER in key for key in last)

    # crash before the last stage finished: the rerun loads stage 4 and re-derives the same teacher from it
    shutil.rmtree(stages[-1])
    shutil.rmtree(out / "predictions" / stages[-1].name)
    values.clear()
    assert main(["run", str(path), "--method", "lwf"]) == 0
    assert len(values) == 2 and values[1] > 1e-6
    again = load_file(str(stages[-1] / "state.safetensors"))
    assert all(torch.allclose(again[key], last[key], atol=1e-6) for key in last)
