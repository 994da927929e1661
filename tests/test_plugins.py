"""Outside code through ``mmcl run --plugin``: the README's example method (examples/plugins/l2_anchor.py)
trains, resumes, runs under torchrun; bad plugins are one error line; ``mmcl list`` shows options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from catalogue import Outcome, assert_contract
from conftest import make_stream_config, process_failure, write_config
from test_runner import TRAINING, invoke, read_json

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "l2_anchor.py"
EVALUATION = {"batch_size": 8, "forward_transfer": False}


def _config(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path, name: str) -> Path:
    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / name, training=dict(TRAINING),
                                evaluation=dict(EVALUATION))  # fmt: skip
    return write_config(tmp_path / f"{name}.yaml", config)


def _refused(argv: list[str], exit_code: int, message: str) -> None:
    done = invoke(argv)
    assert_contract(Outcome(done.code, done.out, done.err), exit_code, message)


def test_readme_shows_the_example_plugin_verbatim() -> None:
    readme = (EXAMPLE.parents[2] / "README.md").read_text(encoding="utf-8")
    assert EXAMPLE.read_text(encoding="utf-8") in readme
    assert "mmcl run --plugin my_method.py --method my-l2" in readme


def test_plugin_method_trains_then_resumes(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path) -> None:
    path = _config(tiny_model_dir, stream_cache_dir, tmp_path, "l2")
    first = invoke(["run", str(path), "--plugin", str(EXAMPLE), "--method", "my-l2"])
    assert first.code == 0, first.err
    run_dir = tmp_path / "l2"
    results = read_json(run_dir / "results.json")
    assert results["complete"] and results["method"] == "my-l2"
    stages = sorted(p for p in (run_dir / "stages").iterdir() if not p.name.startswith("."))
    assert len(stages) == 5 and first.out.count(": training on ") == 5
    adapter = [key for key in load_file(str(stages[0] / "state.safetensors")) if "::" not in key]
    for stage in stages:  # the anchor is saved nested: anchor::<parameter name>, one per trainable tensor
        anchors = [key for key in load_file(str(stage / "state.safetensors")) if key.startswith("anchor::")]
        assert len(anchors) == len(adapter) > 0

    again = invoke(["run", str(path), "--plugin", str(EXAMPLE), "--method", "my-l2"])
    assert again.code == 0, again.err
    assert again.out.count("done earlier, skipped") == 5 and ": training on " not in again.out


def test_second_definition_of_a_plugin_name_is_refused(tmp_path: Path) -> None:
    assert invoke(["list", "--plugin", str(EXAMPLE)]).code == 0  # my-l2 registered by the example
    other = tmp_path / "other_l2.py"
    other.write_text(EXAMPLE.read_text(encoding="utf-8").replace("self.config.weight *", "2 * self.config.weight *"))
    _refused(["list", "--plugin", str(other)], 2, r"other_l2\.py: method 'my-l2' is already registered by mmcl_plugin_")
    copy = tmp_path / "same_l2.py"  # the same content elsewhere is the same module: nothing registered twice
    copy.write_text(EXAMPLE.read_text(encoding="utf-8"))
    assert invoke(["list", "--plugin", str(EXAMPLE), "--plugin", str(copy)]).code == 0


def test_a_run_records_the_plugins_it_loads_not_those_of_earlier_calls(tmp_path: Path) -> None:
    """In one process (tests, a notebook), a plugin loaded by an earlier ``mmcl`` call stays loaded but is not
    in a later run's ``config.plugins``, so it does not change that run's fingerprint."""
    from mmcl.plugins import load_plugins, loaded_plugins

    copy = tmp_path / "same_l2.py"
    copy.write_text(EXAMPLE.read_text(encoding="utf-8"))
    assert [record["path"] for record in load_plugins([EXAMPLE, copy])][-2:] == [str(EXAMPLE), str(copy.resolve())]
    assert {str(EXAMPLE), str(copy.resolve())} <= {record["path"] for record in loaded_plugins()}
    assert not {str(EXAMPLE), str(copy.resolve())} & {record["path"] for record in load_plugins([])}


def test_plugin_with_a_syntax_error_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("from mmcl.methods.base import Method\n\nclass Half(Method:\n    pass\n")
    _refused(["run", "--plugin", str(broken), "--out", str(tmp_path / "run")], 2, r"broken\.py: line 3: invalid Python")
    assert not (tmp_path / "run").exists()


def test_list_method_prints_options_with_help() -> None:
    done = invoke(["list", "--method", "ewc"])
    assert done.code == 0, done.err
    assert "ewc: Sequential LoRA + Elastic Weight Consolidation" in done.out
    lines = done.out.splitlines()
    option = lines.index("  lambda_: float = 700.0")
    assert lines[option + 1].strip().startswith("weight of the penalty")
    assert "  mode: str = \"per_task\"" in lines and "  fisher_samples: int = 200" in lines

    plugin = invoke(["list", "--plugin", str(EXAMPLE), "--method", "my-l2"])
    assert plugin.code == 0, plugin.err
    assert "  weight: float = 0.01, range [0, inf)" in plugin.out
    assert "strength of the pull towards the previous stage's adapter" in plugin.out
    assert "my-l2" in invoke(["list", "--plugin", str(EXAMPLE)]).out

    _refused(["list", "--method", "ewk"], 2, r"--method: unknown method 'ewk'; did you mean 'ewc'\?")
    stream = invoke(["list", "--stream", "synth-domain"])
    assert stream.code == 0 and stream.out.startswith("synth-domain: ")


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="torch without distributed")
def test_plugin_method_under_torchrun(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path) -> None:
    """Every process loads the plugin; ``extra_loss`` gets the model without the DDP wrapper (the example
    looks its parameters up by their single-process names)."""
    mmcl = Path(sys.executable).parent / "mmcl"
    path = _config(tiny_model_dir, stream_cache_dir, tmp_path, "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(mmcl), "run", str(path), "--plugin", str(EXAMPLE), "--method", "my-l2"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, process_failure(done.stderr)
    results = read_json(tmp_path / "ddp" / "results.json")
    assert results["complete"] and results["method"] == "my-l2"
    assert load_file(str(tmp_path / "ddp" / "stages" / "2_med" / "state.safetensors"))
