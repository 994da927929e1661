"""A 2-process CPU run under torchrun (DDP over gloo): sharded training and evaluation, one run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import first_tasks_stream, make_stream_config, process_failure, write_config
from test_runner import TRAINING, invoke, prediction_records, read_json


def test_two_process_run_matches_single_process_layout(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path) -> None:
    mmcl = Path(sys.executable).parent / "mmcl"
    evaluation = {"batch_size": 3, "forward_transfer": False}  # small batches: every shard spans several
    single_config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "single", training=dict(TRAINING), evaluation=evaluation)
    single = invoke(["run", str(write_config(tmp_path / "single.yaml", single_config))])
    assert single.code == 0, single.err

    config = dict(single_config, output_dir=str(tmp_path / "ddp"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(mmcl), "run", str(write_config(tmp_path / "ddp.yaml", config))]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, process_failure(done.stderr)
    assert done.stdout.count("stage 1/5 [rs]: training on 8 samples") == 1  # process 0 alone reports

    run_dir = tmp_path / "ddp"
    results = read_json(run_dir / "results.json")
    assert results["complete"] and len(results["matrix"]) == 6
    assert not list((run_dir / "stages").glob(".tmp_*"))
    # the base model's answers, gathered from two shards, are exactly the single-process file, in order
    for task in ("rs", "sci"):
        _, gathered = prediction_records(run_dir / "predictions" / "0_base" / f"{task}.jsonl")
        _, alone = prediction_records(tmp_path / "single" / "predictions" / "0_base" / f"{task}.jsonl")
        assert [(r["id"], r["prediction"]) for r in gathered] == [(r["id"], r["prediction"]) for r in alone]
    for stage, task in (("1_rs", "rs"), ("5_fin", "fin")):
        meta, records = prediction_records(run_dir / "predictions" / stage / f"{task}.jsonl")
        assert meta["n"] == len(records) == 4
    info = json.loads((run_dir / "stages" / "1_rs" / "stage.json").read_text(encoding="utf-8"))
    assert info["train_samples"] == 8


def test_mrlora_routing_statistics_cover_every_process_shard(tiny_model_dir: Path, stream_cache_dir: Path,
                                                             tmp_path: Path) -> None:
    """Under torchrun each process routes its own shard of a task's test samples; the stored routing report
    counts all of them (before, process 0's half alone): per task and stage, n and the routes add up to the
    test set, and the scores with the router equal the predictions files' scores."""
    mmcl = Path(sys.executable).parent / "mmcl"
    method = {"name": "mrlora", "options": {"router_samples_per_task": 2, "router_epochs": 1.0, "router_batch_size": 4}}
    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "ddp", method=method)
    config["stream"] = first_tasks_stream(stream_cache_dir, 3, train=4, test=3)  # 3 test samples: shards of 2 and 1
    config["training"] = {"max_steps": 1, "batch_size": 4, "progress_bar": False}
    config["evaluation"] = {"batch_size": 8, "forward_transfer": False, "evaluate_base": False, "max_new_tokens": 4,
                            "general": "none"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(mmcl), "run", str(write_config(tmp_path / "ddp.yaml", config))]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, process_failure(done.stderr)
    run_dir = tmp_path / "ddp"
    stages = read_json(run_dir / "method_summary.json")["summary"]["stages"]
    assert sorted(stages) == ["1_rs", "2_med", "3_ad"]
    for stage, report in stages.items():
        for task, entry in report["tasks"].items():
            assert entry["n"] == 3 and sum(entry["routed"].values()) == 3, (stage, task, entry)
            _, records = prediction_records(run_dir / "predictions" / stage / f"{task}.jsonl")
            assert entry["score"] == pytest.approx(100 * sum(r["score"] for r in records) / 3)


def test_shutdown_leaves_the_process_group_and_is_a_no_op_without_one(tmp_path: Path) -> None:
    """A process must leave its gloo group before the interpreter exits: a finished rank that exited with the
    group alive aborted in the C++ teardown ("terminate called without an active exception") while process 0
    still wrote the report. ``shutdown`` destroys the group, and does nothing when there is none."""
    import torch

    from mmcl import distributed

    distributed.shutdown()  # no group: nothing to do, no error
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    distributed.shutdown(wait=True)
    assert not torch.distributed.is_initialized()
