"""Every registered method runs end to end through ``mmcl run``, is killed after its second stage has
trained (before that stage is saved), and resumes: the second invocation skips stage 1, loads its saved
state, trains stage 2 again and finishes. Two checks make a state that does not restore the method exactly
fail here: stage 2 trained again from the saved stage-1 state must end in the same stage-2 state, tensor for
tensor, as the first process reached from memory; and a row-1 prediction file removed before the resume is
recomputed from the saved stage-1 state alone and must equal the answers the first process gave.

Two tasks of synth-domain (4 training samples each, 4 optimiser steps per stage at a high learning rate, so
stage 1 changes the answers) keep it at a few seconds per method; method options that scale a method's own loops (router epochs, rollouts, Fisher samples) are
turned down to their smallest sensible values in ``FAST_OPTIONS``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_config
from mmcl.methods import METHODS
from mmcl.streams.synth import SYNTH_DOMAIN_TASKS, write_synth_domain
from test_runner import invoke, prediction_records

TASKS = SYNTH_DOMAIN_TASKS[:2]
# the smallest settings of each method's own loops (names as `mmcl list --method X` prints them)
FAST_OPTIONS: dict[str, dict[str, Any]] = {
    "mrlora": {"router_samples_per_task": 2, "router_epochs": 1.0, "router_max_rounds": 1},
    "grpo": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "filter": False, "sft_warmup_steps": 0,
             "max_new_tokens": 4},
    "sft-grpo": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "iterations": 1},
    "evolmm": {"steps_per_task": 1, "images_per_step": 1, "solver_samples": 2},
    "ewc": {"fisher_samples": 2},
    "mas": {"importance_samples": 2},
    "der": {"per_task": 2, "variant": "der++"},  # 4 samples x ratio 0.1 would leave the buffer empty
}


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = write_synth_domain(tmp_path_factory.mktemp("two_tasks"), seed=3, train_per_task=4, test_per_task=4, image_size=32)
    return [
        {"name": spec.name, "train": str(root / spec.name / "train.json"), "test": str(root / spec.name / "test.json"),
         "scorer": spec.scorer, "max_new_tokens": spec.max_new_tokens}
        for spec in TASKS
    ]  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_is_killed_after_stage_2_trains_and_resumes(
    method: str, two_tasks: list[dict[str, Any]], tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmcl.runner import ContinualRun

    config = {
        "name": f"resume-{method}",
        "seed": 0,
        "backbone": {"name": str(tiny_model_dir)},
        "stream": {"tasks": two_tasks},
        "method": {"name": method, "options": FAST_OPTIONS.get(method, {})},
        "training": {"epochs": 2, "batch_size": 2, "progress_bar": False, "learning_rate": 0.05, "warmup_ratio": 0.0},
        "evaluation": {"batch_size": 2, "general": {"set": "none"}},
    }
    config_path = write_config(tmp_path / "config.yaml", config)
    run_dir = tmp_path / "run"
    argv = ["run", str(config_path), "--out", str(run_dir)]

    real_save = ContinualRun.save_stage
    reached_from_memory: dict[str, torch.Tensor] = {}

    def killed_before_saving_stage_2(self: ContinualRun, index: int, *args: Any, **kwargs: Any) -> None:
        if index == 2:
            reached_from_memory.update({key: t.detach().clone() for key, t in self.method.saved_tensors().items()})
            raise KeyboardInterrupt
        real_save(self, index, *args, **kwargs)

    monkeypatch.setattr(ContinualRun, "save_stage", killed_before_saving_stage_2)
    first = invoke(argv)
    n_stages = 1 if METHODS[method].trains_jointly else 2
    if n_stages == 1:  # joint: one stage on the union of the tasks, nothing to kill between stages
        assert first.code == 0, first.err
        return
    assert first.code == 130, first.err
    assert "Traceback" not in first.out + first.err
    stage_1 = run_dir / "stages" / f"1_{TASKS[0].name}"
    assert (stage_1 / "state.safetensors").is_file()
    row_1_file = run_dir / "predictions" / f"1_{TASKS[0].name}" / f"{TASKS[0].name}.jsonl"
    answered_from_memory = prediction_records(row_1_file)[1]
    row_1_file.unlink()
    monkeypatch.setattr(ContinualRun, "save_stage", real_save)

    second = invoke(argv)
    assert second.code == 0, second.err
    assert f"stage 1/2 [{TASKS[0].name}]: done earlier, skipped" in second.out
    assert f"stage 2/2 [{TASKS[1].name}]: training on" in second.out
    assert prediction_records(row_1_file)[1] == answered_from_memory
    resumed = load_file(str(run_dir / "stages" / f"2_{TASKS[1].name}" / "state.safetensors"))
    assert resumed.keys() == reached_from_memory.keys()
    assert [key for key in resumed if not torch.equal(resumed[key], reached_from_memory[key])] == []
    assert (run_dir / "results.json").is_file()


def test_dora_trains_resumes_and_is_saved_with_its_magnitudes(
    two_tasks: list[dict[str, Any]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``lora.use_dora`` reaches PEFT: the saved adapter holds DoRA's magnitude vectors, and a rerun of the
    finished run skips both stages."""
    config = {
        "name": "dora", "seed": 0, "backbone": {"name": str(tiny_model_dir)}, "stream": {"tasks": two_tasks},
        "lora": {"use_dora": True},
        "training": {"epochs": 1, "batch_size": 2, "progress_bar": False},
        "evaluation": {"batch_size": 2, "general": {"set": "none"}},
    }  # fmt: skip
    argv = ["run", str(write_config(tmp_path / "config.yaml", config)), "--out", str(tmp_path / "run")]
    assert invoke(argv).code == 0
    saved = load_file(str(tmp_path / "run" / "stages" / f"2_{TASKS[1].name}" / "state.safetensors"))
    assert any("lora_magnitude_vector" in key for key in saved)
    rerun = invoke(argv)
    assert rerun.code == 0 and "stage 2/2" in rerun.out and "done earlier, skipped" in rerun.out
