"""SEFE: RegLoRA's key positions and penalty on known matrices, ASD's rewrites (correct answers kept,
share, determinism), and end-to-end ``sefe`` runs with a resume round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mmcl.methods.asd  # noqa: F401  (registers "asd")
import mmcl.methods.reglora  # noqa: F401  (registers "reglora")
import mmcl.methods.sefe  # noqa: F401  (registers "sefe")
from mmcl.data.sample import Sample
from mmcl.data.answer_styles import LETTERS, parse
from mmcl.methods.asd import AsdConfig, diversify
from mmcl.methods.reglora import RegLoraConfig, key_index, key_positions, reglora_penalty, stacked_penalty
from mmcl.methods.sefe import SefeConfig
from tests.conftest import make_stream_config, write_config


# -- RegLoRA pure functions ------------------------------------------------------------------------
def test_key_positions_top_k_of_abs_BA():
    B = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]])  # (out=3, r=2)
    A = torch.tensor([[1.0, -3.0, 0.5, 0.0], [0.0, 1.0, 0.0, -4.0]])  # (r=2, in=4)
    # B A = [[1, -3, .5, 0], [0, 2, 0, -8], [1, -4, .5, 4]] -> |.| flat: 1 3 .5 0 0 2 0 8 1 4 .5 4
    assert torch.equal(key_positions(B, A, 3 / 12), torch.tensor([7, 9, 11]))  # 8, 4, 4
    assert torch.equal(key_positions(B, A, 1 / 12), torch.tensor([7]))
    assert torch.equal(key_positions(B, A, 4 / 12), torch.tensor([1, 7, 9, 11]))  # + 3
    assert key_positions(B, A, 0.0).numel() == 0
    assert key_positions(B, A, 0.001).numel() == 1  # at least one position when the ratio is positive
    # on random matrices: the chosen entries are exactly the largest ones of the materialised product
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(16, 4, generator=g), torch.randn(4, 24, generator=g)
    chosen = key_positions(B, A, 0.02)
    flat = (B @ A).abs().flatten()
    assert chosen.numel() == round(0.02 * 16 * 24)
    assert flat[chosen].min() >= flat[torch.ones_like(flat, dtype=torch.bool).index_fill(0, chosen, False)].max()


def test_penalty_on_known_matrices():
    B = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
    A = torch.tensor([[1.0, -3.0, 0.5, 0.0], [0.0, 1.0, 0.0, -4.0]])
    # positions 1 (-3), 7 (-8), 8 (1): mean |.| = 12 / 3
    assert reglora_penalty(B, A, torch.tensor([1, 7, 8])).item() == pytest.approx(4.0)
    assert reglora_penalty(B, A, torch.tensor([], dtype=torch.long)).item() == 0.0
    g = torch.Generator().manual_seed(1)
    B = torch.randn(20, 8, generator=g, requires_grad=True)
    A = torch.randn(8, 30, generator=g, requires_grad=True)
    positions = torch.randperm(600, generator=g)[:37]
    gathered = reglora_penalty(B, A, positions)
    materialised = (B @ A).flatten()[positions].abs().mean()
    torch.testing.assert_close(gathered, materialised)
    grads = torch.autograd.grad(gathered, (B, A))
    expected = torch.autograd.grad(materialised, (B, A))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("block", [7, 1 << 19])  # many blocks of key positions, or one
def test_stacked_penalty_is_the_mean_over_modules(block: int, monkeypatch: pytest.MonkeyPatch):
    import mmcl.methods.reglora as reglora

    monkeypatch.setattr(reglora, "PENALTY_BLOCK", block)
    g = torch.Generator().manual_seed(2)
    shapes = {"q": (20, 30), "up": (40, 20), "none": (10, 10), "down": (20, 40)}
    Bs = {n: torch.randn(o, 4, generator=g, requires_grad=True) for n, (o, i) in shapes.items()}
    As = {n: torch.randn(4, i, generator=g, requires_grad=True) for n, (o, i) in shapes.items()}
    positions = {n: torch.randperm(o * i, generator=g)[: (o * i) // 7] for n, (o, i) in shapes.items()}
    positions["none"] = torch.zeros(0, dtype=torch.long)  # modules without key positions do not count
    index = key_index(positions, shapes)
    assert index.names == ("q", "up", "down")
    stacked = stacked_penalty([Bs[n] for n in index.names], [As[n] for n in index.names], index)
    per_module = torch.stack([reglora_penalty(Bs[n], As[n], positions[n]) for n in index.names]).mean()
    torch.testing.assert_close(stacked, per_module)
    for got, want in zip(torch.autograd.grad(stacked, [Bs["up"], As["down"]]), torch.autograd.grad(per_module, [Bs["up"], As["down"]])):
        torch.testing.assert_close(got, want)


def test_configs_validate():
    from mmcl.errors import ConfigError

    assert RegLoraConfig().top_ratio == 0.02 and RegLoraConfig().reg_lambda == 2.5e3
    assert AsdConfig().share == 0.2 and SefeConfig().share == 0.2
    with pytest.raises(ConfigError, match="top_ratio"):
        SefeConfig(top_ratio=2.0)
    with pytest.raises(ConfigError, match="share"):
        SefeConfig(share=-0.1)


# -- ASD ---------------------------------------------------------------------------------------------
def synth_samples(task: str, n: int = 60) -> list[Sample]:
    from mmcl.streams.synth import domain_examples

    return [
        Sample(f"{task}-{i}", task, (), f"<image>\n{e.question}", e.answer, metadata={"qtype": e.qtype, "facts": e.facts})
        for i, e in enumerate(domain_examples(task, n, seed=3, image_size=16))
    ]


def true_content(sample: Sample) -> str:
    return parse(sample).content


@pytest.mark.parametrize("task", ["rs", "med", "ad", "sci", "fin"])
def test_asd_keeps_the_correct_answer(task):
    samples = synth_samples(task)
    out = diversify(samples, 0.5, seed=0)
    assert len(out) == len(samples)
    for before, after in zip(samples, out):
        assert after.id == before.id and after.images == before.images
        style = after.metadata.get("asd_style")
        if style is None:
            assert after == before
            continue
        content = true_content(before)
        assert after.metadata["asd_content"] == content
        assert after.prompt.startswith("<image>\n")
        if style == "yesno":
            asked = after.prompt.split("Is the answer ")[1].split("?")[0]
            assert after.answer == ("yes" if asked == content else "no")
        elif style == "mc":
            options = dict(line.split(". ", 1) for line in after.prompt.split("\n") if line[:2] in ("A.", "B.", "C.", "D."))
            assert sorted(options) == list(LETTERS) and len(set(options.values())) == 4
            assert options[after.answer] == content
        elif style == "short":
            assert after.answer == content and "A." not in after.prompt
        else:
            assert after.answer.startswith(f"The answer is {content}.")
            words = len(after.answer.split())
            assert (12 <= words <= 30) if style == "brief" else (35 <= words <= 75)
        assert style != parse(before).style


def test_asd_styles_cover_the_fitting_ones_evenly():
    from collections import Counter

    out = diversify(synth_samples("rs", 100), 0.4, seed=0)
    counts = Counter(s.metadata["asd_style"] for s in out if "asd_style" in s.metadata)
    assert set(counts) == {"yesno", "mc", "brief", "detailed"}  # count questions fit mc, yes/no questions don't
    sci = Counter(s.metadata["asd_style"] for s in diversify(synth_samples("sci", 100), 0.4, 0) if "asd_style" in s.metadata)
    assert set(sci) == {"yesno", "short", "brief", "detailed"} and max(sci.values()) - min(sci.values()) <= 1


def test_asd_share_and_determinism():
    samples = synth_samples("ad", 50)
    first = diversify(samples, 0.2, seed=5)
    assert sum("asd_style" in s.metadata for s in first) == 10
    assert first == diversify(samples, 0.2, seed=5)
    assert first != diversify(samples, 0.2, seed=6)
    assert diversify(samples, 0.0, seed=5) == samples
    assert sum("asd_style" in s.metadata for s in diversify(samples, 1.0, seed=5)) == 50


def test_asd_generic_sample_without_metadata():
    samples = [Sample(f"g{i}", "t", (), f"What is item {i}?", answer) for i, answer in enumerate("cat dog fox owl".split())]
    out = diversify(samples, 1.0, seed=0)
    for before, after in zip(samples, out):
        assert before.answer in after.answer or after.answer in ("yes", "no", *LETTERS)


def test_asd_files_replace_the_rewrite(tmp_path):
    from mmcl.methods.asd import asd_train_data

    record = {"id": "x1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]}
    path = tmp_path / "train_x20.json"
    path.write_text(json.dumps([record]), encoding="utf-8")

    class FakeTask:
        name = "rs"

    samples = asd_train_data(AsdConfig(asd_files={"rs": str(path)}), 0, FakeTask(), synth_samples("rs", 5))
    assert [s.id for s in samples] == ["x1"] and samples[0].answer == "A"


# -- on the tiny model -----------------------------------------------------------------------------
def test_reglora_merges_and_resets(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path):
    """after_task merges the LoRA into the base (the model's outputs do not change), re-draws the LoRA
    with B = 0, records key positions; the state rebuilds the merged model exactly on a fresh backbone."""
    from mmcl.backbones.registry import load_backbone
    from mmcl.streams.stream import StreamConfig, build_stream
    from mmcl.methods.base import LoraSettings
    from mmcl.methods.reglora import RegLora

    tasks = build_stream(
        StreamConfig(name="synth-domain", options={"train_per_task": 8, "test_per_task": 4}, cache_dir=str(stream_cache_dir)),
        Path.cwd(),
    )
    method = RegLora(RegLoraConfig(), LoraSettings(rank=4, alpha=8.0), seed=0)
    method.setup(load_backbone(str(tiny_model_dir), device="cpu"))
    method.see_tasks(tasks, len(tasks))
    model = method.backbone.model
    assert method.extra_loss(model, {}, None) is None  # first task: no penalty
    with torch.no_grad():  # pretend training moved the LoRA
        for layer in method._layers.values():
            layer.lora_B["default"].weight.normal_(0, 0.05)

    def logits(m):
        backbone = m.backbone
        batch = backbone.collate([backbone.encode_for_training(s) for s in tasks[0].test_samples[:2]])
        batch.pop("labels")
        backbone.model.eval()
        with torch.no_grad():
            return backbone.model(**batch).logits

    before = logits(method)
    method.after_task(0, tasks[0])
    torch.testing.assert_close(logits(method), before, atol=1e-5, rtol=1e-4)
    assert all(float(layer.lora_B["default"].weight.detach().abs().sum()) == 0 for layer in method._layers.values())
    penalty = method.extra_loss(model, {}, None)
    assert penalty is not None and penalty.item() == 0.0  # B = 0
    assert all(p.numel() == round(0.02 * l.get_base_layer().weight.numel()) for p, l in
               ((method.positions[n], method._layers[n]) for n in method._layers))  # fmt: skip
    with torch.no_grad():  # a moved new LoRA is penalised at the key positions: lambda * mean_modules mean |BA|
        for layer in method._layers.values():
            layer.lora_B["default"].weight.normal_(0, 0.05)
    expected = torch.stack([
        (l.lora_B["default"].weight @ l.lora_A["default"].weight).flatten()[method.positions[n]].abs().mean()
        for n, l in method._layers.items()
    ]).mean() * 2.5e3  # fmt: skip
    torch.testing.assert_close(method.extra_loss(model, {}, None), expected)
    method._fresh_lora()
    state = method.saved_tensors()  # flat, as saved: "positions::<module>", "task0::<module>::A", ...
    positions = [v for k, v in state.items() if k.startswith("positions::")]
    assert len(positions) == len(method._layers) and all(v.dtype == torch.int32 for v in positions)

    fresh = RegLora(RegLoraConfig(), LoraSettings(rank=4, alpha=8.0), seed=0)
    fresh.setup(load_backbone(str(tiny_model_dir), device="cpu"))
    fresh.see_tasks(tasks, len(tasks))
    fresh.load_state_json(method.state_json())
    fresh.restore_tensors(state)
    assert torch.equal(logits(fresh), logits(method))
    for (name, a), b in zip(method.backbone.model.state_dict().items(), fresh.backbone.model.state_dict().values()):
        assert torch.equal(a, b), name
    fresh.restore_tensors({})  # back to the base model (undo the merge)
    fresh.restore_tensors(state)
    torch.testing.assert_close(logits(fresh), logits(method))


def run_cli(config_path: Path, method: str, run_dir: Path) -> int:
    from mmcl.cli import main

    return main(["run", str(config_path), "--method", method, "--out", str(run_dir)])


def test_sefe_end_to_end_and_resume(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path):
    """Five stages of sefe on the tiny fixture; then the last stage (weights and its evaluations) is
    deleted and re-run from the merged model rebuilt out of stage 4's state: identical results."""
    from safetensors.torch import load_file

    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "runs", method={"name": "sefe", "options": {"share": 0.5}})
    path = write_config(tmp_path / "sefe.yaml", config)
    run_dir = tmp_path / "run"
    assert run_cli(path, "sefe", run_dir) == 0
    results = json.loads((run_dir / "results.json").read_text())
    last = sorted((run_dir / "stages").iterdir())[-1]
    state = load_file(str(last / "state.safetensors"))
    assert sum(key.startswith("positions::") for key in state) > 0
    assert {key.split("::")[0] for key in state if key.startswith("task")} == {f"task{i}" for i in range(5)}
    shutil.rmtree(last)
    shutil.rmtree(run_dir / "predictions" / last.name)
    assert run_cli(path, "sefe", run_dir) == 0
    again = json.loads((run_dir / "results.json").read_text())
    assert again["matrix"] == results["matrix"]
    redone = load_file(str(last / "state.safetensors"))
    assert redone.keys() == state.keys() and all(torch.equal(redone[k], state[k]) for k in state)


@pytest.mark.parametrize("method", ["asd", "reglora"])
def test_ablations_run(method: str, tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path):
    """The two halves alone; three steps a stage so RegLoRA's penalty acts on a moved LoRA."""
    training = {"max_steps": 3, "batch_size": 4, "progress_bar": False}
    config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "runs", training=training)
    path = write_config(tmp_path / f"{method}.yaml", config)
    assert run_cli(path, method, tmp_path / "run") == 0
    matrix = json.loads((tmp_path / "run" / "results.json").read_text())["matrix"]
    assert len(matrix) == 6 and all(len(row) == 5 for row in matrix)
