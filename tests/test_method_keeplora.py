"""KeepLoRA: the subspace algebra on hand-made tensors, the layer, two tasks on the tiny model, and a
state round trip."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import eval_logits, set_up_on_tiny
import mmcl.methods.keeplora  # noqa: F401  (registers "keeplora")
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS, LoraSettings
from mmcl.methods.keeplora import (
    KeepLora,
    KeepLoraConfig,
    KeepLoraLinear,
    extend_basis,
    frozen_a,
    keeplora_layers,
    project_out,
    sample_indices,
    weight_basis,
)


def same_span(basis: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether two orthonormal bases (columns) span the same subspace."""
    if basis.shape != expected.shape:
        return False
    return torch.allclose(basis @ basis.T, expected @ expected.T, atol=1e-6)


E = torch.eye(4)


# -- the algebra by hand -------------------------------------------------------------------------
def test_weight_basis_is_the_input_space_with_the_reference_count():
    # W (out 3 x in 4) = sum_i s_i p_i v_i^T with s = 3, 2, 1 along the inputs e2, e3, e1:
    # energy shares 9/14, 4/14, 1/14 -> cumulative 0.643, 0.929, 1
    W = torch.tensor([[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert same_span(weight_basis(W, 0.6), E[:, [1]])  # no share < 0.6, at least one direction
    assert same_span(weight_basis(W, 0.7), E[:, [1]])  # one share (0.643) < 0.7: stops below 70%
    assert same_span(weight_basis(W, 0.95), E[:, [1, 2]])  # 0.643 and 0.929 < 0.95
    assert weight_basis(W, 0.0).shape == (4, 0)
    assert weight_basis(W, 0.6).shape == (4, 1)  # input space (in = 4), not the output space (out = 3)


def test_extend_basis_by_hand():
    # features 2 e1, 3 e2, 1 e3: M M^T = diag(4, 9, 1), total 14; U = e1 captures 4/14 = 0.286
    gram = torch.diag(torch.tensor([4.0, 9.0, 1.0]))
    e = torch.eye(3)
    U = e[:, [0]]
    assert same_span(extend_basis(U, gram, 0.2), U)  # 0.286 >= 0.2: nothing added
    assert same_span(extend_basis(U, gram, 0.5), e[:, [0, 1]])  # + e2 (9/14) -> 0.929
    assert same_span(extend_basis(U, gram, 0.95), e)  # + e2 + e3 -> 1
    assert same_span(extend_basis(torch.zeros(3, 0), gram, 0.5), e[:, [1]])  # 9/14 = 0.643 >= 0.5
    assert same_span(extend_basis(torch.zeros(3, 0), gram, 0.9), e[:, [0, 1]])  # 13/14 = 0.929
    grown = extend_basis(U, gram, 0.5)
    torch.testing.assert_close(grown[:, :1], U)  # the old directions are kept as they are
    torch.testing.assert_close(grown.T @ grown, torch.eye(2))
    # directions without energy are never added, even if the threshold asks for them
    assert same_span(extend_basis(torch.zeros(3, 0), torch.diag(torch.tensor([4.0, 0.0, 0.0])), 1.0), e[:, [0]])


def test_frozen_a_by_hand():
    G = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])  # out 3 x in 4
    U = E[:, [0]]
    torch.testing.assert_close(project_out(G, U), torch.tensor([[0.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0]]))
    A = frozen_a(G, U, 2)  # G' = G (I - e1 e1^T): singular directions e2 (2), e3 (1)
    torch.testing.assert_close(A.abs(), E[[1, 2]])
    A3 = frozen_a(G, U, 3)  # G' has rank 2: the third row stays zero
    torch.testing.assert_close(A3.abs(), torch.cat([E[[1, 2]], torch.zeros(1, 4)]))
    # unprojected: e1 (3), e2 (2)
    torch.testing.assert_close(frozen_a(G, torch.zeros(4, 0), 2).abs(), E[[0, 1]])
    assert frozen_a(G, torch.eye(4), 2).abs().sum() == 0  # the basis fills the space: A = 0


def test_update_vanishes_on_the_protected_subspace():
    generator = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(6, 3, generator=generator))[0]  # orthonormal basis of 3 of 6 inputs
    G = torch.randn(5, 6, generator=generator)
    A = frozen_a(G, U, 2)
    torch.testing.assert_close(A @ A.T, torch.eye(2), atol=1e-6, rtol=0)
    # A's rows are the top right singular vectors of the projected gradient
    _, _, vh = torch.linalg.svd(G - G @ U @ U.T)
    torch.testing.assert_close((A @ vh[:2].T).abs(), torch.eye(2), atol=1e-5, rtol=0)
    B = torch.randn(5, 2, generator=generator) * 10
    x = U @ torch.randn(3, 7, generator=generator)  # 7 inputs in span(U)
    torch.testing.assert_close(B @ A @ x, torch.zeros(5, 7), atol=1e-5, rtol=0)

    # the layer: with this A and a random B, outputs on span(U) are the base layer's, before and after merging
    base = torch.nn.Linear(6, 5)
    layer = KeepLoraLinear(base, rank=2, alpha=4.0)
    assert layer.scaling == 2.0 and not base.weight.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_B"]
    layer.set_a(A)
    with torch.no_grad():
        layer.lora_B.copy_(B)
    inputs = x.T
    before = base(inputs).detach()
    torch.testing.assert_close(layer(inputs).detach(), before, atol=1e-5, rtol=0)
    off = torch.randn(4, 6, generator=generator)
    expected = layer(off).detach()
    assert not torch.allclose(expected, base(off), atol=1e-3)  # elsewhere the update acts
    layer.merge(layer.lora_A, layer.lora_B.detach())
    layer.set_a(torch.zeros(2, 6))
    torch.testing.assert_close(layer(off).detach(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(inputs).detach(), before, atol=1e-5, rtol=0)


def test_sample_indices_follow_the_reference_linspace():
    assert sample_indices(10, 0.2) == [0, 9]
    assert sample_indices(20, 0.2) == [0, 6, 12, 19]  # linspace(0, 19, 4) = 0, 6.33, 12.67, 19, rounded down
    assert sample_indices(8, 0.2) == [0]  # int(1.6) = 1
    assert sample_indices(3, 0.2) == [0]  # at least one
    assert sample_indices(0, 0.2) == []


def test_options_and_dora_are_checked():
    defaults = KeepLoraConfig()
    assert (defaults.gradient_fraction, defaults.energy_initial, defaults.energy_after_task) == (0.2, 0.6, 0.99)
    assert defaults.subspace_source == "features" and defaults.batch_size == 1
    for bad in ({"gradient_fraction": 0.0}, {"energy_initial": 1.5}, {"energy_after_task": -0.1},
                {"subspace_source": "weights"}, {"batch_size": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            KeepLoraConfig(**bad)
    dora = types.SimpleNamespace(rank=4, alpha=8.0, dropout=0.0, targets=None, use_dora=True)
    with pytest.raises(ConfigError, match="lora.use_dora: method keeplora"):
        KeepLora(KeepLoraConfig(), dora, seed=0)
    assert METHODS.get("keeplora") is KeepLora


# -- on the tiny model ---------------------------------------------------------------------------
def new_method(model_dir: Path, tasks, **options) -> KeepLora:
    method = KeepLora(KeepLoraConfig(**options), LoraSettings(rank=4, alpha=8.0), seed=0)
    return set_up_on_tiny(method, model_dir, tasks)


def fit(method: KeepLora, index: int, tasks, work: Path) -> None:
    from mmcl.training.sft import TrainingConfig, train_on_samples

    settings = TrainingConfig(max_steps=3, batch_size=4, learning_rate=3e-2, warmup_ratio=0.0, progress_bar=False)
    train_on_samples(method.backbone, tasks[index].train_samples, settings, work / f"trainer{index}", seed=index)


def logits(method: KeepLora, tasks) -> torch.Tensor:
    return eval_logits(method.backbone, tasks[0].test_samples[:2])


def weights(method: KeepLora) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach().clone() for name, layer in keeplora_layers(method.backbone.model).items()}


@pytest.fixture(scope="module")
def two_tasks(tiny_model_dir: Path, tasks, tmp_path_factory):
    work = tmp_path_factory.mktemp("keeplora")
    method = new_method(tiny_model_dir, tasks)
    record = {"logits_base": logits(method, tasks), "weights_0": weights(method)}
    method.before_task(0, tasks[0])
    record["initial"] = {name: basis.clone() for name, basis in method.bases.items()}
    record["logits_b0"] = logits(method, tasks)
    record["trainable"] = [n for n, p in method.backbone.model.named_parameters() if p.requires_grad]
    record["A_0"] = {name: layer.lora_A.clone() for name, layer in keeplora_layers(method.backbone.model).items()}
    fit(method, 0, tasks, work)
    method.after_task(0, tasks[0])
    record["bases_1"] = {name: basis.clone() for name, basis in method.bases.items()}
    record["weights_1"] = weights(method)
    method.before_task(1, tasks[1])
    fit(method, 1, tasks, work)
    method.after_task(1, tasks[1])
    return method, record


def test_two_tasks_protect_the_subspace(two_tasks, tiny_model_dir: Path, tasks):
    method, record = two_tasks
    layers = keeplora_layers(method.backbone.model)
    assert layers and {name.rsplit(".", 1)[-1] for name in layers} >= {"q_proj", "v_proj", "down_proj"}
    assert set(record["trainable"]) == {f"{name}.lora_B" for name in layers}
    assert method.trainable_parameters() == sum(layer.lora_B.numel() for layer in layers.values())

    # the initial bases are the pretrained weights' principal input subspaces (energy 0.6)
    for name, layer in layers.items():
        torch.testing.assert_close(record["initial"][name], weight_basis(record["weights_0"][name], 0.6))
        A = record["A_0"][name]
        assert A.shape == (4, layer.in_features)
        torch.testing.assert_close(A @ record["initial"][name], torch.zeros(4, record["initial"][name].shape[1]),
                                   atol=1e-5, rtol=0)
    # B = 0 before training: the model is the base model
    torch.testing.assert_close(record["logits_b0"], record["logits_base"], rtol=0, atol=0)

    # both tasks were merged; each merged update vanishes on the subspace protected when it was trained
    assert method.tasks_done == [0, 1] and len(method.merged) == 2
    for index, bases in enumerate((record["initial"], record["bases_1"])):
        for name, (A, B) in method.merged[index].items():
            assert B.abs().sum() > 0 or A.abs().sum() == 0  # B trained wherever A is not zero
            update = layers[name].scaling * B @ A
            torch.testing.assert_close(update @ bases[name], torch.zeros(update.shape[0], bases[name].shape[1]),
                                       atol=1e-6, rtol=0)
    for name, layer in layers.items():  # the weights moved by the second merge only along the residual space
        delta = layer.weight.detach() - record["weights_1"][name]
        assert float((delta @ record["bases_1"][name]).abs().max()) <= 1e-5 + 1e-3 * float(delta.abs().max())
        # reset after merging
        assert float(layer.lora_B.detach().abs().sum()) == 0 and float(layer.lora_A.abs().sum()) == 0
    assert any(not torch.equal(w, record["weights_0"][n]) for n, w in weights(method).items())

    # the protected subspace only grows, keeping its earlier directions
    for name, basis in method.bases.items():
        old = record["bases_1"][name]
        assert record["initial"][name].shape[1] <= old.shape[1] <= basis.shape[1] <= basis.shape[0]
        torch.testing.assert_close(basis[:, : old.shape[1]], old)
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-4, rtol=0)
    assert [entry["after"] for entry in method.state_json()["subspace"]] == ["pretrained", 0, 1]

    # no task identity at test time
    samples = tasks[2].test_samples[:2]
    assert method.generate(samples, tasks[2], 4) == method.generate(samples, tasks[0], 4)


def test_state_round_trip(two_tasks, tiny_model_dir: Path, tasks, tmp_path: Path):
    method, _ = two_tasks
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    saved = load_file(str(tmp_path / "state.safetensors"))
    assert {key.split("::")[0] for key in saved} == {"basis", "task0", "task1"}

    fresh = new_method(tiny_model_dir, tasks)  # as on resume: fresh setup, then the state
    before = logits(fresh, tasks)
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(saved)
    after = logits(fresh, tasks)
    assert not torch.allclose(before, after, atol=1e-5)
    torch.testing.assert_close(after, logits(method, tasks), rtol=0, atol=0)  # the merges rebuilt bit for bit
    for name, basis in method.bases.items():
        assert torch.equal(fresh.bases[name], basis)
    assert fresh.tasks_done == [0, 1]

    # both continue identically: the next task's A comes from the same weights and bases
    method.before_task(2, tasks[2])
    fresh.before_task(2, tasks[2])
    for (name, layer), other in zip(keeplora_layers(method.backbone.model).items(),
                                    keeplora_layers(fresh.backbone.model).values()):
        torch.testing.assert_close(layer.lora_A, other.lora_A, rtol=0, atol=0)
        assert float((layer.lora_A @ method.bases[name]).abs().max()) < 1e-5

    # reloading the same state onto a model holding it changes nothing; a broken state is refused
    fresh.restore_tensors(saved)
    torch.testing.assert_close(logits(fresh, tasks), after, rtol=0, atol=0)
    with pytest.raises(RunDirError, match="missing layers"):
        fresh.restore_tensors({k: v for k, v in saved.items() if not k.startswith("basis::") or k.endswith("q_proj")})
    with pytest.raises(RunDirError, match="merged tasks"):
        fresh.restore_tensors({k: v for k, v in saved.items() if not k.startswith("task1::")})


def test_gradient_source_extends_from_the_merged_gradient(tiny_model_dir: Path, tasks):
    method = new_method(tiny_model_dir, tasks, subspace_source="gradients", energy_initial=0.0)
    method.before_task(0, tasks[0])
    assert all(basis.shape[1] == 0 for basis in method.bases.values())
    A = {name: layer.lora_A.clone() for name, layer in keeplora_layers(method.backbone.model).items()}
    gradients = method.gradients(method.selected_samples(tasks[0]))
    method.after_task(0, tasks[0])  # B = 0: the merged model is the base model, same gradient
    for name, basis in method.bases.items():
        expected = extend_basis(torch.zeros(basis.shape[0], 0), gradients[name].T @ gradients[name], 0.99)
        assert basis.shape == expected.shape and basis.shape[1] >= 1
        assert same_span(basis, expected)
        # the first row of A is the top right singular vector of the (unprojected) gradient, inside the new basis
        top = A[name][0]
        assert float((top - basis @ (basis.T @ top)).norm()) < 1e-4
