"""PCLR's LoRA rank pool: all ranks selected == a plain LoRA scaled by alpha/k, the selection and scores by
hand, the key-matching loss, two tasks on the tiny model, per-sample selection (batched == one by one,
``task`` ignored) and the state round trip (stage 2 retrained from the saved stage-1 state)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import set_up_on_tiny
from safetensors.torch import load_file, save_file
from torch import nn

import mmcl.methods.pclr  # noqa: F401  (registers "pclr")
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS, LoraSettings
from mmcl.methods.pclr import (
    Pclr,
    PclrConfig,
    RankPoolLinear,
    Selection,
    key_loss,
    pool_layers,
    scores,
    select,
    training_selection,
)


# -- the layer and the selection on hand-made tensors ------------------------------------------------
def random_pool(sizes=(3, 2), alpha=4.0, k=5) -> tuple[RankPoolLinear, Selection]:
    torch.manual_seed(0)
    selection = Selection()
    layer = RankPoolLinear(nn.Linear(6, 4).double(), alpha / k, selection)
    for n in sizes:
        layer.add_chunk(torch.randn(n, 6), torch.randn(4, n))
    return layer, selection


def test_all_ranks_selected_equals_plain_lora_scaled_alpha_over_k():
    layer, selection = random_pool(sizes=(3, 2), alpha=4.0, k=5)
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    selection.mask = torch.ones(2, 5, dtype=torch.float64)
    a, b = layer.pool()
    plain = layer.base(x) + (4.0 / 5) * (x @ a.T) @ b.T  # a rank-5 LoRA with alpha 4: scaling alpha / k
    torch.testing.assert_close(layer(x), plain, rtol=0, atol=1e-12)


def test_selected_components_by_hand():
    selection = Selection()
    base = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    layer = RankPoolLinear(base, 2.0 / 2, selection)  # alpha 2, k 2: scaling 1
    layer.add_chunk(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 10.0]]))
    layer.add_chunk(torch.tensor([[1.0, 1.0]]), torch.tensor([[100.0]]))
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]])  # components: 1*1 = 1, 10*2 = 20, 100*3 = 300
    selection.mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert layer(x).flatten().tolist() == [21.0, 301.0]
    selection.mask = None
    assert layer(x).flatten().tolist() == [0.0, 0.0]
    selection.mask = torch.ones(3, 3)
    with pytest.raises(RuntimeError, match="selection of shape"):
        layer(x)


def test_scores_and_top_k_by_hand():
    text_keys = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])  # unit: (1,0), (0,1), (.707,.707)
    vision_keys = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 0.0]])  # unit: (0,1), (0,1), (1,0)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vision = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # the second sample has no image
    s = scores(text, vision, text_keys, vision_keys, vision_weight=0.5)
    r = 2 ** -0.5
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.0, r + 0.5], [0.0, 1.0, r]]))
    assert select(s, 2).tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    assert select(s, 1).tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert select(torch.zeros(1, 3), 2).tolist() == [[1.0, 1.0, 0.0]]  # ties: the lower index
    assert select(s, 9).tolist() == [[1.0, 1.0, 1.0]] * 2  # k above the pool: everything
    # training: the current task's components (the last one here) always, topped up with the best old
    current = torch.tensor([False, False, True])
    assert training_selection(s, 2, current).tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    current = torch.tensor([False, True, True])  # k <= n: top-k among the current ones only
    assert training_selection(s, 1, current).tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    # a row's selection does not depend on its batch
    assert torch.equal(select(s[1:], 2), select(s, 2)[1:])


def test_key_loss_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vision = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    text_keys = torch.tensor([[1.0, 0.0]])
    vision_keys = torch.tensor([[0.0, 1.0]])
    # text: mean(1 - 1, 1 - 0) = 0.5; vision over the sample with an image only: 1 - 1 = 0
    assert key_loss(text, vision, text_keys, vision_keys).item() == pytest.approx(0.5)
    assert key_loss(text, torch.zeros(2, 2), text_keys, vision_keys).item() == pytest.approx(0.5)


def test_config_checks():
    assert METHODS["pclr"] is Pclr and Pclr.supports_dora is False
    assert PclrConfig().key_loss_weight == 1.0 and PclrConfig().init_from_pool is True
    with pytest.raises(ConfigError, match="top_k"):
        PclrConfig(top_k=0)
    with pytest.raises(ConfigError, match="key_loss_weight"):
        PclrConfig(key_loss_weight=-1.0)
    dora = SimpleNamespace(rank=8, alpha=16.0, dropout=0.0, targets=None, use_dora=True)
    with pytest.raises(ConfigError, match="use_dora"):
        Pclr(PclrConfig(), dora, seed=0)


# -- on the tiny model -------------------------------------------------------------------------------
def new_method(model_dir: Path, tasks, **options) -> Pclr:
    method = Pclr(PclrConfig(**options), LoraSettings(rank=4, alpha=8.0), seed=0)
    return set_up_on_tiny(method, model_dir, tasks)


def fit(method: Pclr, index: int, tasks, work: Path) -> list[str]:
    from mmcl.training.sft import TrainingConfig

    settings = TrainingConfig(max_steps=2, batch_size=4, learning_rate=3e-2, warmup_ratio=0.0, progress_bar=False)
    method.before_task(index, tasks[index])
    samples = method.train_data(index, tasks[index], tasks[index].train_samples)
    trainable = [n for n, p in method.backbone.model.named_parameters() if p.requires_grad]
    method.train(samples, settings, work / f"stage{index}", seed=index)
    method.after_task(index, tasks[index])
    return trainable


def logits(method: Pclr, samples, mask: torch.Tensor) -> torch.Tensor:
    backbone = method.backbone
    batch = backbone.collate([backbone.encode_for_training(s) for s in samples])
    batch.pop("labels")
    backbone.model.eval()
    with torch.no_grad(), method.selecting(mask):
        return backbone.model(**batch).logits


@pytest.fixture(scope="module")
def two_tasks(tiny_model_dir: Path, tasks, tmp_path_factory):
    work = tmp_path_factory.mktemp("pclr")
    method = new_method(tiny_model_dir, tasks, top_k=6)  # 4 new components + the 2 best old ones in stage 2
    fit(method, 0, tasks, work)
    record = {"stage0": {k: v.clone() for k, v in method.saved_tensors().items()},
              "json0": json.loads(json.dumps(method.state_json()))}
    resumed = new_method(tiny_model_dir, tasks, top_k=6)
    resumed.load_state_json(record["json0"])
    resumed.restore_tensors(record["stage0"])
    fit(resumed, 1, tasks, work / "resumed")
    record["trainable_1"] = fit(method, 1, tasks, work)
    return method, resumed, record


def test_pool_grows_and_old_components_stay(two_tasks):
    method, _, record = two_tasks
    assert record["trainable_1"] and all(n.endswith((".1",)) for n in record["trainable_1"])
    after = method.saved_tensors()
    for key, value in record["stage0"].items():
        assert torch.equal(after[key], value), key
    layers = pool_layers(method.backbone.model)
    assert layers and all(".language_model." in n and layer.size == 8 for n, layer in layers.items())
    assert not any(p.requires_grad for p in method.backbone.model.parameters())
    assert method.chunk_sizes == [4, 4]


def test_selection_on_the_model_by_formula(two_tasks, tasks):
    method, _, _ = two_tasks
    samples = tasks[0].test_samples[:2] + tasks[1].test_samples[:2]
    text, vision = method.queries(samples)
    text_keys, vision_keys = method.keys.stacked()
    c = method.vision_width / method.text_width
    expected = (text @ nn.functional.normalize(text_keys.detach(), dim=-1).T
                + c * vision @ nn.functional.normalize(vision_keys.detach(), dim=-1).T)
    mask = method.selection_mask(samples)
    assert mask.shape == (4, 8) and torch.equal(mask.sum(1), torch.full((4,), 6.0))
    for row in range(4):  # every selected component scores at least as high as every unselected one
        chosen, other = expected[row][mask[row] == 1], expected[row][mask[row] == 0]
        assert chosen.min() >= other.max() - 1e-6


def test_generate_is_per_sample_and_ignores_task(two_tasks, tasks):
    method, _, _ = two_tasks
    samples = tasks[0].test_samples[:3] + tasks[1].test_samples[:3]
    batched = method.generate(samples, tasks[0], 6)
    assert batched == [method.generate([s], tasks[0], 6)[0] for s in samples]
    assert method.generate(samples, tasks[2], 6) == batched
    assert torch.equal(torch.cat([method.selection_mask([s]) for s in samples]), method.selection_mask(samples))


def test_stage_two_from_saved_state_equals_in_memory(two_tasks, tasks):
    method, resumed, _ = two_tasks
    ours, theirs = method.saved_tensors(), resumed.saved_tensors()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    samples = tasks[1].test_samples[:3]
    assert method.generate(samples, tasks[1], 6) == resumed.generate(samples, tasks[1], 6)


def test_state_round_trip(two_tasks, tiny_model_dir: Path, tasks, tmp_path: Path):
    method, _, _ = two_tasks
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    saved = load_file(str(tmp_path / "state.safetensors"))
    fresh = new_method(tiny_model_dir, tasks, top_k=6)
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(saved)
    samples = tasks[0].test_samples[:2] + tasks[1].test_samples[:2]
    mask = method.selection_mask(samples)
    assert torch.equal(fresh.selection_mask(samples), mask)
    assert torch.equal(logits(fresh, samples, mask), logits(method, samples, mask))
    assert fresh.generate(samples, tasks[1], 6) == method.generate(samples, tasks[1], 6)

    other = new_method(tiny_model_dir, tasks, top_k=6)
    other.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    with pytest.raises(RunDirError, match="chunk 0"):
        other.restore_tensors({k: v for k, v in saved.items() if not k.endswith("q_proj.lora_B")})
    with pytest.raises(RunDirError, match="keys"):
        other.restore_tensors({**saved, "keys::text::1": saved["keys::text::1"][:1]})
    with pytest.raises(RunDirError, match="top_k"):
        new_method(tiny_model_dir, tasks).load_state_json(method.state_json())
