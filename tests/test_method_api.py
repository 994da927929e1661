"""The method API: options class from the generic parameter, init_state, nested state (flattened to the
same keys as before: old stage files load), the tasks a method is shown, and extra_loss without DDP's wrapper."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_stream_config, set_up_on_tiny, write_config
from test_runner import TRAINING, invoke

from mmcl.config import LoraSettings
from mmcl.errors import RunDirError
from mmcl.methods.base import METHODS, Method, NoOptions, flatten_state, unflatten_state, register_method
from mmcl.methods.ewc import Ewc, EwcConfig
from mmcl.methods.lora_utils import adapter_tensors
from mmcl.methods.seq_lora import SequentialLora


def test_flatten_and_unflatten_are_inverse_and_refuse_ambiguous_keys() -> None:
    a, b, c = torch.zeros(1), torch.ones(2), torch.arange(3)
    nested = {"w.lora_A": a, "fisher": {"0": {"w.lora_A": b}, "1": {"w.lora_A": c}}}
    flat = flatten_state(nested)
    assert list(flat) == ["w.lora_A", "fisher::0::w.lora_A", "fisher::1::w.lora_A"]
    assert unflatten_state(flat) == nested and unflatten_state(nested) == nested
    for bad in ({"a:b": a}, {"": a}, {"g": {"x::y": a}}, {"g": {"n": 3}}):
        with pytest.raises(RunDirError):
            flatten_state(bad)
    for bad in ({"a": a, "a::b": b}, {"a::b": b, "a": a}, {"a:::b": a}, {"a::": a}):
        with pytest.raises(RunDirError):
            unflatten_state(bad)


def test_options_class_comes_from_the_generic_parameter_and_init_state_runs() -> None:
    @dataclass
    class Options:
        strength: float = 1.0

    class Plain(Method[Options]):
        name, description = "api-plain", "test"

        def init_state(self) -> None:
            self.seen = [self.config.strength]

    class Explicit(SequentialLora[Options]):
        name, description = "api-explicit", "test"
        config_class = NoOptions

    class Child(Plain):
        name = "api-child"

    assert Plain.config_class is Options and Child.config_class is Options and Explicit.config_class is NoOptions
    assert Plain(Options(2.0), LoraSettings(), 0).seen == [2.0]
    assert METHODS["ewc"].config_class is EwcConfig and METHODS["seq-lora"].config_class is NoOptions
    assert METHODS["sefe"].config_class.__name__ == "SefeConfig" and METHODS["reglora"].config_class.__name__ == "RegLoraConfig"


def test_ewc_loads_a_stage_state_written_in_the_old_flat_format(tiny_model_dir: Path, tasks, tmp_path: Path) -> None:
    """A stage file as mmcl wrote it before nested state (keys ``fisher::<slot>::<name>`` written by hand)."""
    method = set_up_on_tiny(Ewc(EwcConfig(), LoraSettings(rank=4), seed=0), tiny_model_dir, tasks)
    params = {name: p for name, p in method.backbone.model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(3)
    old = {key: value + 0.5 for key, value in adapter_tensors(method.backbone).items()}
    for slot in (0, 1):
        for name, p in params.items():
            old[f"fisher::{slot}::{name}"] = torch.rand(p.shape, generator=generator)
            old[f"anchor::{slot}::{name}"] = torch.randn(p.shape, generator=generator)
    save_file(old, str(tmp_path / "state.safetensors"))
    state = {"mode": "per_task", "fisher": "true", "fisher_nll": "sum", "tasks_done": [0, 1], "penalty": []}

    fresh = set_up_on_tiny(Ewc(EwcConfig(), LoraSettings(rank=4), seed=0), tiny_model_dir, tasks)
    fresh.load_state_json(state)
    fresh.restore_tensors(load_file(str(tmp_path / "state.safetensors")))
    assert len(fresh.consolidated) == 2
    for slot, (fisher, anchor) in enumerate(fresh.consolidated):
        assert list(fisher) == list(params)  # in the model's order
        for name in params:
            assert torch.equal(fisher[name], old[f"fisher::{slot}::{name}"])
            assert torch.equal(anchor[name], old[f"anchor::{slot}::{name}"])
    saved = fresh.saved_tensors()
    assert set(saved) == set(old) and all(torch.equal(saved[key], old[key]) for key in old)


def test_a_method_sees_the_learned_tasks_and_the_current_one(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, int, int, str]] = []

    @register_method
    class Watcher(SequentialLora[NoOptions]):
        name = "api-watcher"
        description = "records what it is shown"

        def before_task(self, task_index, task) -> None:
            calls.append(("train", len(self.tasks), self.n_tasks, task.name))
            assert self.tasks[-1] is task and task_index == len(self.tasks) - 1

        def generate(self, samples, task, max_new_tokens):
            calls.append(("eval", len(self.tasks), self.n_tasks, task.name))
            return super().generate(samples, task, max_new_tokens)

    try:
        config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "run", training=dict(TRAINING, max_steps=1),
                                     evaluation={"batch_size": 8})  # fmt: skip
        done = invoke(["run", str(write_config(tmp_path / "w.yaml", config)), "--method", "api-watcher"])
        assert done.code == 0, done.err
    finally:
        METHODS.unregister("api-watcher")
    assert [c for c in calls if c[0] == "train"] == [("train", k, 5, name) for k, name in
                                                    enumerate(["rs", "med", "ad", "sci", "fin"], start=1)]  # fmt: skip
    evaluations = [c for c in calls if c[0] == "eval"]
    assert evaluations and all(1 <= seen <= 5 and n == 5 for _, seen, n, _ in evaluations)
    assert any(task not in ["rs", "med", "ad", "sci", "fin"][:seen] for _, seen, _, task in evaluations)  # forward transfer


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x, labels=None):
        out = self.linear(x).squeeze(-1)
        return {"loss": ((out - labels) ** 2).mean(), "logits": out}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_extra_loss_gets_the_model_without_the_ddp_wrapper(tmp_path: Path) -> None:
    import torch.distributed as dist
    from transformers import TrainingArguments

    from mmcl.training.sft import ContinualTrainer

    seen: list[torch.nn.Module] = []

    def extra_loss(model, inputs, outputs):
        seen.append(model)
        return sum(p.sum() for name, p in model.named_parameters() if name == "linear.weight") * 0.0

    model = _Linear()
    arguments = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    trainer = ContinualTrainer(model=model, args=arguments, extra_loss=extra_loss)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        assert all(name.startswith("module.") for name, _ in wrapped.named_parameters())
        inputs = {"x": torch.ones(3, 2), "labels": torch.zeros(3)}
        loss = trainer.compute_loss(wrapped, inputs)
    finally:
        dist.destroy_process_group()
    assert seen == [model] and torch.isfinite(loss)
