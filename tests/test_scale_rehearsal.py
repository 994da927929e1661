"""The scale rehearsal's published sizes and a smoke run of the script (benchmarks/scale_rehearsal.py)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmcl.backbones.tiny_archs import family_parts

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "scale_rehearsal.py"


def _rehearsal():
    spec = importlib.util.spec_from_file_location("scale_rehearsal", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# parameter counts the hub pages show for the checkpoints (rounded as shown there)
@pytest.mark.parametrize(
    "size, published, shown_digits",
    [("smolvlm-256m", 256e6, 1e6), ("qwen2-vl-2b", 2.21e9, 0.01e9), ("llava-1.5-7b", 7.06e9, 0.01e9)],
)
def test_real_size_architectures_have_the_published_parameter_count(size: str, published: float, shown_digits: float):
    family, spec = _rehearsal().SIZES[size]
    tokenizer, _, build, _ = family_parts(family, ["a b c"], spec)
    with torch.device("meta"):
        model = build(tokenizer, spec)
    count = sum(parameter.numel() for parameter in model.parameters())
    assert abs(count - published) <= shown_digits / 2


def test_rehearsal_script_runs_a_method_and_the_throughput_comparison(tmp_path: Path):
    out = tmp_path / "rehearsal"
    command = [sys.executable, str(SCRIPT), "--size", "tiny-llava", "--methods", "seq-lora", "--steps", "1",
               "--test", "2", "--throughput-samples", "2", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **_env()})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "rehearsal.json").read_text())
    (row,) = report["methods"]
    assert row["method"] == "seq-lora" and len(row["peak_mib"]) == 3 and all(peak > 0 for peak in row["peak_mib"])
    assert report["throughput"]["samples"] == 6 and report["throughput"]["samples_per_second_batch1"] > 0


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
