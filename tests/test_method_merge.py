"""merge (task arithmetic / TIES / MagMax): the three merges and the global trim threshold on hand-made task
vectors, two tasks per strategy on the tiny model (the merged weights rebuilt independently, where each
task's LoRA starts), a state round trip and generation without the task identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import eval_logits, set_up_on_tiny
import mmcl.methods.merge  # noqa: F401  (registers "merge")
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS, LoraSettings
from mmcl.methods.merge import (
    Merge,
    MergeConfig,
    keep_count,
    kth_largest_magnitude,
    magmax_merge,
    merge_layers,
    task_arithmetic,
    ties_merge,
    trim,
)

T = torch.tensor


# -- the merges by hand ----------------------------------------------------------------------------
def test_task_arithmetic_by_hand():
    tau1, tau2 = T([[1.0, -2.0], [0.0, 3.0]]), T([[2.0, 1.0], [-1.0, -1.0]])
    # theta - theta_0 = lambda (tau1 + tau2) = 0.5 [[3, -1], [-1, 2]]
    torch.testing.assert_close(task_arithmetic([tau1, tau2], 0.5), T([[1.5, -0.5], [-0.5, 1.0]]), rtol=0, atol=0)
    torch.testing.assert_close(task_arithmetic([tau1], 1.0), tau1, rtol=0, atol=0)
    assert torch.equal(tau1, T([[1.0, -2.0], [0.0, 3.0]]))  # inputs untouched


def test_ties_trims_elects_and_takes_the_disjoint_mean_by_hand():
    tau1 = T([4.0, -1.0, 2.0, -3.0, 0.5])
    tau2 = T([-2.0, 3.0, 1.0, -1.0, -0.2])
    tau3 = T([1.0, -5.0, -0.5, 2.0, 0.1])
    k = keep_count(5, 0.6)
    assert k == 3
    # trim: the 3rd largest magnitude of each vector; entries tied with it are kept (tau2 keeps four)
    thresholds = [kth_largest_magnitude(lambda t=t: [t], k) for t in (tau1, tau2, tau3)]
    assert thresholds == [2.0, 1.0, 1.0]
    torch.testing.assert_close(trim(tau1, 2.0), T([4.0, 0.0, 2.0, -3.0, 0.0]))
    torch.testing.assert_close(trim(tau2, 1.0), T([-2.0, 3.0, 1.0, -1.0, 0.0]))
    torch.testing.assert_close(trim(tau3, 1.0), T([1.0, -5.0, 0.0, 2.0, 0.0]))
    # elect: sign of the sums [3, -2, 3, -2, 0]; disjoint mean over the agreeing non-zero values:
    # p0 (4 + 1) / 2 (tau2's -2 left out), p1 -5 (tau2's 3 left out), p2 (2 + 1) / 2, p3 (-3 - 1) / 2
    # (tau3's 2 left out), p4 nothing survives the trim -> 0
    merged = ties_merge([tau1, tau2, tau3], thresholds, 1.0)
    torch.testing.assert_close(merged, T([2.5, -5.0, 1.5, -2.0, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(ties_merge([tau1, tau2, tau3], thresholds, 0.5), T([1.25, -2.5, 0.75, -1.0, 0.0]))
    # an exact tie of the sum (elected sign 0) merges to 0; plain disagreement without trim (density 1)
    torch.testing.assert_close(ties_merge([T([1.0, 2.0]), T([-1.0, -1.0])], [0.0, 0.0], 1.0), T([0.0, 2.0]))


def test_ties_trim_is_global_over_the_layers():
    layer1, layer2 = T([[5.0, -4.0]]), T([[0.5, 3.0], [-2.0, 0.0]])
    # 6 entries, density 0.5 -> keep 3 over both layers: 5, 4, 3 (a per-layer trim would also keep -2)
    k = keep_count(6, 0.5)
    threshold = kth_largest_magnitude(lambda: iter([layer1, layer2]), k)
    assert (k, threshold) == (3, 3.0)
    torch.testing.assert_close(trim(layer2, threshold), T([[0.0, 3.0], [0.0, 0.0]]))


def test_magmax_keeps_the_largest_magnitude_ties_to_the_later_task():
    tau1 = T([1.0, -2.0, 3.0, 0.0])
    tau2 = T([-1.0, 2.0, 0.5, -4.0])
    tau3 = T([0.5, 1.0, -3.5, 4.0])
    # p0 |1| = |-1|: the later (tau2) wins; p1 |-2| = |2|: tau2; p2 -3.5 (tau3); p3 |-4| = |4|: tau3
    torch.testing.assert_close(magmax_merge([tau1, tau2, tau3], 1.0), T([-1.0, 2.0, -3.5, 4.0]), rtol=0, atol=0)
    torch.testing.assert_close(magmax_merge([tau1, tau2, tau3], 0.5), T([-0.5, 1.0, -1.75, 2.0]), rtol=0, atol=0)
    torch.testing.assert_close(magmax_merge([tau1], 0.5), tau1 * 0.5)


def test_kth_largest_magnitude_matches_a_sort():
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(7, 5, generator=generator), torch.randn(13, generator=generator) * 1e-3,
              torch.tensor([0.0, -0.0, 2.5, -2.5, 2.5, 1e-30, -7.0])]  # fmt: skip
    magnitudes = torch.cat([c.flatten().abs() for c in chunks]).sort(descending=True).values
    for k in (1, 2, 3, 4, 10, 35, 50, 54, 55):
        assert kth_largest_magnitude(lambda: chunks, k) == float(magnitudes[k - 1]), k
    assert kth_largest_magnitude(lambda: chunks, 56) == 0.0  # fewer entries than k: keep everything
    assert [keep_count(10, d) for d in (0.2, 0.25, 0.01, 1.0)] == [2, 3, 1, 10]


def test_config_defaults_and_refusals():
    assert MergeConfig().strategy == "magmax" and MergeConfig().density == 0.2
    assert [MergeConfig(strategy=s).lam for s in ("task-arithmetic", "ties", "magmax")] == [0.4, 1.0, 0.5]
    assert MergeConfig(strategy="ties", scaling=0.7).lam == 0.7
    with pytest.raises(ConfigError, match="strategy"):
        MergeConfig(strategy="dare")
    with pytest.raises(ConfigError, match="density"):
        MergeConfig(density=0.0)
    with pytest.raises(ConfigError, match="scaling"):
        MergeConfig(scaling=-1.0)
    with pytest.raises(ConfigError, match="use_dora"):
        Merge(MergeConfig(), LoraSettings(use_dora=True), seed=0)
    assert METHODS["merge"] is Merge and Merge.supports_dora is False


# -- on the tiny model -----------------------------------------------------------------------------
def new_method(model_dir: Path, tasks, **options) -> Merge:
    return set_up_on_tiny(Merge(MergeConfig(**options), LoraSettings(rank=4, alpha=8.0), seed=0), model_dir, tasks)


def fit(method: Merge, index: int, tasks, work: Path) -> None:
    from mmcl.training.sft import TrainingConfig, train_on_samples

    settings = TrainingConfig(max_steps=2, batch_size=4, learning_rate=5e-2, warmup_ratio=0.0, progress_bar=False)
    samples = method.train_data(index, tasks[index], tasks[index].train_samples)
    train_on_samples(method.backbone, samples, settings, work / f"trainer{index}", seed=index)


def weights(method: Merge) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach().clone() for name, layer in merge_layers(method.backbone.model).items()}


def factors(method: Merge) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
            for name, layer in merge_layers(method.backbone.model).items()}  # fmt: skip


def logits(method: Merge, tasks) -> torch.Tensor:
    return eval_logits(method.backbone, tasks[0].test_samples[:2])


@pytest.fixture(scope="module", params=["task-arithmetic", "ties", "magmax"])
def two_tasks(request, tiny_model_dir: Path, tasks, tmp_path_factory):
    """A method of each strategy trained on tasks 0 and 1, with what the tests check recorded on the way."""
    work = tmp_path_factory.mktemp(f"merge-{request.param}")
    options = {"strategy": request.param, **({"density": 0.3} if request.param == "ties" else {})}
    method = new_method(tiny_model_dir, tasks, **options)
    record = {"theta0": weights(method)}
    for index in (0, 1):
        method.before_task(index, tasks[index])
        record[f"start{index}"] = factors(method)
        record[f"weights_training{index}"] = weights(method)
        fit(method, index, tasks, work)
        record[f"end{index}"] = factors(method)
        method.after_task(index, tasks[index])
    return method, record


def test_training_starts_and_merged_weights(two_tasks):
    method, record = two_tasks
    strategy, lam = method.config.strategy, method.config.lam
    layers = merge_layers(method.backbone.model)
    assert list(layers) == list(method.vectors[0]) and len(method.vectors) == 2
    assert method.vector_tasks == [[0], [1]]
    assert method.trainable_parameters() == sum(4 * (l.in_features + l.out_features) for l in layers.values())

    # every task trains on theta_0 (the merged weights are taken off first)
    for index in (0, 1):
        for name, weight in record[f"weights_training{index}"].items():
            assert torch.equal(weight, record["theta0"][name])
    # where task 2's LoRA starts: from scratch (B = 0, its own init) or from task 1's LoRA (magmax)
    for name, (a, b) in record["start1"].items():
        a1, b1 = record["end0"][name]
        if strategy == "magmax":
            assert torch.equal(a, a1) and torch.equal(b, b1)
        else:
            assert float(b.abs().sum()) == 0 and not torch.equal(a, record["start0"][name][0])
    # the stored factors are the trained ones, and training changed them
    for index in (0, 1):
        for name, (a, b) in method.vectors[index].items():
            assert torch.equal(a, record[f"end{index}"][name][0]) and torch.equal(b, record[f"end{index}"][name][1])
    assert any(float(b.abs().sum()) > 0 for _, b in method.vectors[1].values())

    # the merged weights, rebuilt here from the stored factors: tau_i = s B_i A_i (for magmax the
    # sequential model's difference to theta_0, theta_i - theta_0, is exactly that)
    taus = [{name: layers[name].scaling * b @ a for name, (a, b) in vector.items()} for vector in method.vectors]
    if strategy == "ties":
        flat = [torch.cat([tau[name].flatten() for name in layers]) for tau in taus]
        k = keep_count(flat[0].numel(), 0.3)
        thresholds = [float(f.abs().sort(descending=True).values[k - 1]) for f in flat]
        assert method.thresholds == thresholds
        kept = [float((f.abs() >= t).float().mean()) for f, t in zip(flat, thresholds)]
        assert all(0.29 < share < 0.31 for share in kept)
    for name, layer in layers.items():
        first, second = taus[0][name], taus[1][name]
        if strategy == "task-arithmetic":
            expected = lam * (first + second)
        elif strategy == "ties":
            expected = lam * ties_merge([first, second], thresholds, 1.0)
        else:
            expected = lam * torch.where(second.abs() >= first.abs(), second, first)
        torch.testing.assert_close(layer.weight, record["theta0"][name] + expected, rtol=0, atol=1e-6)
        assert not layer.active  # evaluation: the merged weights alone, LoRA off
    assert any(not torch.equal(layer.weight, record["theta0"][name]) for name, layer in layers.items())


def test_generate_ignores_the_task_and_batches(two_tasks, tasks):
    method, _ = two_tasks
    samples = tasks[1].test_samples[:3]
    batched = method.generate(samples, tasks[1], 4)
    assert batched == method.generate(samples, tasks[0], 4)
    assert batched == [method.generate([sample], tasks[1], 4)[0] for sample in samples]


def test_state_round_trip(two_tasks, tiny_model_dir: Path, tasks, tmp_path: Path):
    method, record = two_tasks
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    saved = load_file(str(tmp_path / "state.safetensors"))
    assert {key.split("::")[0] for key in saved} == {"task0", "task1"}
    assert {key.rsplit("::", 1)[1] for key in saved} == {"A", "B"}

    fresh = new_method(tiny_model_dir, tasks, strategy=method.config.strategy, density=method.config.density)
    before = logits(fresh, tasks)
    fresh.load_state_json(json.loads((tmp_path / "state.json").read_text()))
    fresh.restore_tensors(saved)
    after = logits(fresh, tasks)
    assert not torch.allclose(before, after, atol=1e-5)
    torch.testing.assert_close(after, logits(method, tasks), rtol=0, atol=0)  # merged weights rebuilt bit for bit
    assert fresh.vector_tasks == [[0], [1]] and fresh.thresholds == method.thresholds

    # both continue identically: same starting LoRA, weights back at theta_0
    method.before_task(2, tasks[2])
    fresh.before_task(2, tasks[2])
    start, fresh_start = factors(method), factors(fresh)
    for name, (a, b) in start.items():
        assert torch.equal(a, fresh_start[name][0]) and torch.equal(b, fresh_start[name][1])
    assert all(torch.equal(w, record["theta0"][n]) for n, w in weights(fresh).items())
    # loading the state again (a model holding the merged weights, a live LoRA) gives the same model
    fresh.restore_tensors(saved)
    method.restore_tensors(saved)
    torch.testing.assert_close(logits(fresh, tasks), after, rtol=0, atol=0)
    torch.testing.assert_close(logits(method, tasks), after, rtol=0, atol=0)

    with pytest.raises(RunDirError, match="task vectors saved"):
        fresh.restore_tensors({k: v for k, v in saved.items() if not k.startswith("task1::")})
    with pytest.raises(RunDirError, match="missing layers"):
        fresh.restore_tensors({k: v for k, v in saved.items() if "q_proj" not in k})
    with pytest.raises(RunDirError, match="strategy"):
        other = "ties" if method.config.strategy != "ties" else "magmax"
        fresh.load_state_json({**json.loads((tmp_path / "state.json").read_text()), "strategy": other})
