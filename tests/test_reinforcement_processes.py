"""GRPO and EvoLMM across processes: under torchrun the rollouts of each step are sharded, every completion is
drawn from its own random stream, and gradients are summed; the updates equal a single process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import first_tasks_stream, make_stream_config, process_failure, write_config
from test_runner import invoke, read_json

METHODS = {
    "grpo": {"steps": 2, "prompts_per_step": 5, "group_size": 2, "filter": True, "filter_rollouts": 2,
             "drop_all_correct": False, "sft_warmup_steps": 0, "learning_rate": 1e-2},  # 5 prompts: shards of 3 and 2
    "evolmm": {"steps_per_task": 2, "images_per_step": 3, "solver_samples": 2, "proposer_every": 1,
               "question_max_new_tokens": 6, "answer_max_new_tokens": 3},
}


# mmcl run, counting the prompts each process samples rollouts for (written to prompts_<RANK>.json)
COUNTING_LAUNCHER = """
import json, os, sys
import mmcl.methods.evolmm as evolmm
import mmcl.training.grpo as grpo
from mmcl.cli import main

counts = []
def counting(backbone, samples, *args, _sample=grpo.sample_rollouts, **kwargs):
    counts.append(len(samples))
    return _sample(backbone, samples, *args, **kwargs)
grpo.sample_rollouts = evolmm.sample_rollouts = counting
code = main(sys.argv[1:])
rank = os.environ["RANK"]
with open(os.path.join(os.environ["COUNTS_DIR"], "prompts_" + rank + ".json"), "w") as out:
    json.dump(counts, out)
sys.exit(code)
"""


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_process_updates_match_one_process(method: str, tiny_model_dir: Path, stream_cache_dir: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first two stages' adapters after a 2-process run equal a 1-process run's up to float rounding, and
    the per-step records (rewards of the gathered rollouts) are the same."""
    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "single",
                                method={"name": method, "options": METHODS[method]})
    config["stream"] = first_tasks_stream(stream_cache_dir, 2, train=6, test=2)
    config["evaluation"] = {"batch_size": 8, "forward_transfer": False, "evaluate_base": False, "general": "none",
                            "max_new_tokens": 4}
    import mmcl.methods.evolmm as evolmm_module
    import mmcl.training.grpo as grpo_module

    counts: list[int] = []

    def counting(backbone, samples, *args, _sample=grpo_module.sample_rollouts, **kwargs):
        counts.append(len(samples))
        return _sample(backbone, samples, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "sample_rollouts", counting)
    monkeypatch.setattr(evolmm_module, "sample_rollouts", counting)
    single = invoke(["run", str(write_config(tmp_path / "single.yaml", config))])
    assert single.code == 0, single.err
    launcher = tmp_path / "counting_mmcl.py"
    launcher.write_text(COUNTING_LAUNCHER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COUNTS_DIR": str(tmp_path)}
    ddp = write_config(tmp_path / "ddp.yaml", dict(config, output_dir=str(tmp_path / "ddp")))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(launcher), "run", str(ddp)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, process_failure(done.stderr)
    sampled = {"single": sum(counts), **{rank: sum(read_json(tmp_path / f"prompts_{rank}.json")) for rank in ("0", "1")}}
    assert 0 < sampled["0"] < sampled["single"] and sampled["0"] + sampled["1"] == sampled["single"]  # shared out
    for stage in ("1_rs", "2_med"):
        alone = load_file(str(tmp_path / "single" / "stages" / stage / "state.safetensors"))
        sharded = load_file(str(tmp_path / "ddp" / "stages" / stage / "state.safetensors"))
        assert alone.keys() == sharded.keys()
        assert any("lora_B" in k and alone[k].abs().sum() > 0 for k in alone)  # the adapters moved
        for key in alone:
            assert torch.allclose(alone[key], sharded[key], atol=1e-4, rtol=1e-4), (stage, key)  # a step is 1e-2
    records = [read_json(tmp_path / run / "stages" / "2_med" / "state.json")["stages" if method == "grpo" else "steps"]
               for run in ("single", "ddp")]
    reward = "reward_curve" if method == "grpo" else "solver_reward"
    assert [r[reward] for r in records[0]] == [r[reward] for r in records[1]]
    if method == "grpo":
        assert [r["filter_accuracy"] for r in records[0]] == [r["filter_accuracy"] for r in records[1]]


def test_seeded_sampling_draws_from_the_tempered_nucleus_with_one_stream_per_row() -> None:
    """argmax(logits / T + Gumbel) over 4000 seeds follows softmax(logits / T), cut to the top_p nucleus and
    renormalised; a row's draws depend on its own seed only."""
    from mmcl.training.rollouts import SeededSampling

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for top_p, kept in ((1.0, 4), (0.8, 2)):
        probabilities = torch.softmax(logits[0] / 0.7, dim=-1)
        expected = torch.zeros(4)
        expected[:kept] = probabilities[:kept] / probabilities[:kept].sum()  # 0.8 of the mass: tokens 0 and 1
        counts = torch.zeros(4)
        for seed in range(4000):
            counts[int(SeededSampling([seed], 0.7, top_p)(None, logits).argmax())] += 1
        assert torch.allclose(counts / 4000, expected, atol=0.025), (top_p, counts / 4000, expected)
    pair = SeededSampling([5, 9], 1.0, 1.0)(None, logits.repeat(2, 1))
    assert torch.equal(pair[1], SeededSampling([9], 1.0, 1.0)(None, logits)[0])
