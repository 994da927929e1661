"""ModalPrompt: the 0.5/0.5 cosine selection, the prompt order, the prototypes and their alignment loss on
hand-made tensors; on the tiny model the virtual tokens (looked up in the method's rows, the original weights
and the output head untouched by training), the per-sample prompts (batched == one by one, ``task`` unused),
the state round trip, and the same path on a tiny Qwen2-VL (M-RoPE)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import set_up_on_tiny
import mmcl.methods.modalprompt  # noqa: F401  (registers "modalprompt")
from mmcl.backbones.backbone import _hf_model
from mmcl.errors import ConfigError, RunDirError
from mmcl.methods.base import METHODS, LoraSettings
from mmcl.methods.modalprompt import (
    BANK_NAME,
    ModalPrompt,
    ModalPromptConfig,
    Projection,
    alignment_loss,
    guide_scores,
    mean_unit,
    token_names,
    top_tasks,
    training_tasks,
)

LENGTH = 3  # prompt tokens per task in the tiny-model tests


# -- the mechanism on hand-made tensors ----------------------------------------------------------
IMAGE_PROTOTYPES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
TEXT_PROTOTYPES = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def test_guide_scores_are_half_image_half_text_cosine():
    image, text = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0, 4.0])
    # cos(image, prototypes) = [1, 0, 1/sqrt 2]; cos(text, prototypes) = [0, 3/5, 4/5]
    expected = [0.5 * 1 + 0.5 * 0, 0.5 * 0 + 0.5 * 0.6, 0.5 / math.sqrt(2) + 0.5 * 0.8]
    scores = guide_scores(image, text, IMAGE_PROTOTYPES, TEXT_PROTOTYPES)
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=0, atol=1e-6)
    # top-k in ascending order of score: the most similar task last (nearest the instruction)
    assert top_tasks(scores, [0, 1, 2], 1) == [2]
    assert top_tasks(scores, [0, 1, 2], 2) == [0, 2]
    assert top_tasks(scores, [0, 1, 2], 3) == [1, 0, 2]
    assert top_tasks(scores, [0, 1, 2], 5) == [1, 0, 2]  # k is capped by the tasks learned
    assert top_tasks(scores, [4, 7, 9], 2) == [4, 9]  # entries of ``tasks``, not positions
    # lambda = 1: image alone -> [1, 0, 0.707]; lambda = 0: text alone -> [0, 0.6, 0.8]
    assert top_tasks(guide_scores(image, text, IMAGE_PROTOTYPES, TEXT_PROTOTYPES, 1.0), [0, 1, 2], 2) == [2, 0]
    assert top_tasks(guide_scores(image, text, IMAGE_PROTOTYPES, TEXT_PROTOTYPES, 0.0), [0, 1, 2], 2) == [1, 2]
    # a sample without an image (zero feature) is chosen by its instruction alone, at half weight
    no_image = guide_scores(torch.zeros(2), text, IMAGE_PROTOTYPES, TEXT_PROTOTYPES)
    torch.testing.assert_close(no_image, torch.tensor([0.0, 0.3, 0.4]), rtol=0, atol=1e-6)
    # scale does not matter (cosine)
    torch.testing.assert_close(guide_scores(image * 7, text / 3, IMAGE_PROTOTYPES * 2, TEXT_PROTOTYPES), scores)


def test_ties_and_training_order():
    assert top_tasks(torch.tensor([0.5, 0.5, 0.1]), [0, 1, 2], 2) == [1, 0]  # equal: the earlier task ranks higher
    assert top_tasks(torch.tensor([0.3]), [0], 0) == []
    scores = torch.tensor([0.9, 0.1, 0.5])
    # fewer than k-1 earlier tasks: all of them in task order, then the current one
    assert training_tasks(torch.tensor([0.2]), [0], 1, k=3) == [0, 1]
    assert training_tasks(scores, [0, 1, 2], 3, k=5) == [0, 1, 2, 3]
    assert training_tasks(torch.zeros(0), [], 0, k=3) == [0]
    # otherwise the k-1 most similar earlier tasks in ascending order, the current one last
    assert training_tasks(scores, [0, 1, 2], 3, k=3) == [2, 0, 3]
    assert training_tasks(torch.tensor([0.1, 0.9]), [0, 1], 2, k=3) == [0, 1, 2]
    assert training_tasks(torch.tensor([0.9, 0.1]), [0, 1], 2, k=3) == [1, 0, 2]
    assert training_tasks(scores, [0, 1, 2], 3, k=1) == [3]


def test_prototypes_and_alignment_loss_by_hand():
    projection = Projection(hidden=2, image_width=2, text_width=1)
    with torch.no_grad():
        projection.trunk.weight.copy_(torch.eye(2))
        projection.trunk.bias.zero_()
        projection.image_head.weight.copy_(torch.eye(2))
        projection.image_head.bias.zero_()
        projection.text_head.weight.copy_(torch.tensor([[1.0, 1.0]]))
        projection.text_head.bias.copy_(torch.tensor([0.5]))
    rows = torch.tensor([[1.0, -1.0], [2.0, 0.0]])

    def silu(x: float) -> float:
        return x / (1 + math.exp(-x))

    image_prototype, text_prototype = projection.prototypes(rows)
    # p = mean over the prompt tokens of head(SiLU(trunk(row)))
    expected_image = [(silu(1) + silu(2)) / 2, (silu(-1) + silu(0)) / 2]
    expected_text = [((silu(1) + silu(-1) + 0.5) + (silu(2) + silu(0) + 0.5)) / 2]
    torch.testing.assert_close(image_prototype, torch.tensor(expected_image), rtol=0, atol=1e-6)
    torch.testing.assert_close(text_prototype, torch.tensor(expected_text), rtol=0, atol=1e-6)

    # 1 - mean_x cos(f(x), p), with the mean of unit features: features [1, 0] and [0, 2] -> m = [0.5, 0.5]
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(mean_unit(features), torch.tensor([0.5, 0.5]))
    norm = math.hypot(*expected_image)
    by_hand = 1 - 0.5 * (expected_image[0] / norm + expected_image[1] / norm)
    loss = alignment_loss(mean_unit(features), image_prototype)
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    per_sample = 1 - torch.nn.functional.cosine_similarity(features, image_prototype.expand(2, 2), dim=-1).mean()
    torch.testing.assert_close(loss, per_sample)
    # a sample without the feature (zero row) counts as cosine 0
    with_blank = torch.cat([features, torch.zeros(1, 2)])
    torch.testing.assert_close(alignment_loss(mean_unit(with_blank), image_prototype), 1 - (1 - per_sample) * 2 / 3)
    # the gradient reaches the prompt rows and the projection
    rows.requires_grad_(True)
    alignment_loss(mean_unit(features), projection.prototypes(rows)[0]).backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0 and projection.trunk.weight.grad.abs().sum() > 0


def test_options_are_checked():
    assert METHODS["modalprompt"] is ModalPrompt
    defaults = ModalPromptConfig()
    assert (defaults.prompt_length, defaults.top_k, defaults.image_weight, defaults.alignment_weight) == (10, 3, 0.5, 1.0)
    assert defaults.text_encoder is None
    for options, key in (({"prompt_length": 0}, "prompt_length"), ({"top_k": 0}, "top_k"),
                         ({"image_weight": 1.5}, "image_weight"), ({"alignment_weight": -1.0}, "alignment_weight"),
                         ({"text_encoder": " "}, "text_encoder")):
        with pytest.raises(ConfigError, match=key):
            ModalPromptConfig(**options)
    assert token_names(2, 3) == ["<mp_t2_0>", "<mp_t2_1>", "<mp_t2_2>"]
    with pytest.raises(ConfigError, match="use_dora"):  # no LoRA is trained: DoRA is refused, not ignored
        ModalPrompt(ModalPromptConfig(), LoraSettings(use_dora=True), seed=0)


# -- on the tiny model ---------------------------------------------------------------------------
def new_method(model_dir: Path, tasks, **options) -> ModalPrompt:
    config = ModalPromptConfig(**{"prompt_length": LENGTH, "top_k": 2, **options})
    return set_up_on_tiny(ModalPrompt(config, LoraSettings(), seed=0), model_dir, tasks)


def base_weights(method: ModalPrompt) -> dict[str, torch.Tensor]:
    model = _hf_model(method.backbone.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(BANK_NAME + ".")}


def fit(method: ModalPrompt, index: int, tasks, work: Path, record: dict | None = None) -> list:
    """One task as the runner does it (before_task, train_data, training, after_task), weight decay on;
    ``record`` gets the task's initial values and what the loss needs, just before training."""
    from mmcl.training.sft import TrainingConfig, train_on_samples

    method.before_task(index, tasks[index])
    samples = method.train_data(index, tasks[index], tasks[index].train_samples)
    if record is not None:
        key = str(index)
        record["init"] = bank_values(method, key)
        images, texts = method.features(tasks[index].train_samples)
        prototypes = [p.detach() for p in method.bank.projections[key].prototypes(method.bank.prompts[key])]
        record["extra"] = (method.extra_loss(method.backbone.model, {}, None).item(), images, texts, *prototypes)
    settings = TrainingConfig(max_steps=2, batch_size=4, learning_rate=5e-2, warmup_ratio=0.0, weight_decay=0.1,
                              progress_bar=False)
    train_on_samples(method.backbone, samples, settings, work / f"trainer{index}", seed=index, extra_loss=method.extra_loss)
    method.after_task(index, tasks[index])
    return samples


def bank_values(method: ModalPrompt, key: str) -> dict[str, torch.Tensor]:
    values = {"rows": method.bank.prompts[key].detach().clone()}
    values.update({n: p.detach().clone() for n, p in method.bank.projections[key].named_parameters()})
    return values


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_virtual_tokens_read_the_method_rows(tiny_model_dir: Path, tasks):
    method = new_method(tiny_model_dir, tasks)
    model = _hf_model(method.backbone.model)
    embedding = model.get_input_embeddings()
    weight, head = embedding.weight, model.get_output_embeddings().weight
    vocabulary = len(method.backbone.tokenizer)
    assert not any(p.requires_grad for p in model.parameters())  # the backbone is frozen

    method.before_task(0, tasks[0])
    tokenizer = method.backbone.tokenizer
    ids = tokenizer.convert_tokens_to_ids(token_names(0, LENGTH))
    assert ids == list(range(vocabulary, vocabulary + LENGTH))
    # the embedding module, its weight and the output head are the same objects, of the same size
    assert model.get_input_embeddings() is embedding and embedding.weight is weight
    assert model.get_output_embeddings().weight is head and tuple(head.shape) == (weight.shape[0], weight.shape[1])
    rows = method.bank.prompts["0"]
    assert tuple(rows.shape) == (LENGTH, weight.shape[1]) and rows.requires_grad
    assert all(any(torch.equal(row, w) for w in weight) for row in rows)  # copies of vocabulary rows
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{BANK_NAME}.prompts.0", *(f"{BANK_NAME}.projections.0.{n}" for n, _ in
                                                     method.bank.projections["0"].named_parameters())}

    text = "<mp_t0_2>yes<mp_t0_0>"
    encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert encoded[0, 0].item() == ids[2] and encoded[0, -1].item() == ids[0]
    with torch.no_grad():
        out = embedding(encoded)[0]
        initial = rows.detach().clone()
        rows.add_(1.0)  # the lookup reads the rows as they are now
        moved = embedding(encoded)[0]
    torch.testing.assert_close(out[0], initial[2], rtol=0, atol=0)
    torch.testing.assert_close(moved[-1], rows[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1:-1], weight[encoded[0, 1:-1]], rtol=0, atol=0)
    # ids that are not virtual go through the embedding untouched
    plain = tokenizer("yes no", add_special_tokens=False, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(embedding(plain), torch.nn.functional.embedding(plain, weight), rtol=0, atol=0)


@pytest.fixture(scope="module")
def three_tasks(tiny_model_dir: Path, tasks, tmp_path_factory):
    """A method (L = 3, k = 2) trained on tasks 0, 1, 2 with weight decay; snapshots taken along the way."""
    work = tmp_path_factory.mktemp("modalprompt")
    method = new_method(tiny_model_dir, tasks)
    head = _hf_model(method.backbone.model).get_output_embeddings().weight
    record = {"base": base_weights(method), "head": head.detach().clone(), "samples": {}}
    record["samples"][0] = fit(method, 0, tasks, work)
    record["task0"] = bank_values(method, "0")
    record["samples"][1] = fit(method, 1, tasks, work, record)
    record["task0_after_1"] = bank_values(method, "0")
    record["task1"] = bank_values(method, "1")
    record["samples"][2] = fit(method, 2, tasks, work)
    return method, record


def test_extra_loss_is_the_mean_of_one_minus_cosine(three_tasks):
    _, record = three_tasks
    value, images, texts, image_prototype, text_prototype = record["extra"]

    def mean_cos(features: torch.Tensor, prototype: torch.Tensor) -> float:
        return torch.nn.functional.cosine_similarity(features, prototype.expand_as(features), dim=-1).mean().item()

    expected = (1 - mean_cos(images, image_prototype)) + (1 - mean_cos(texts, text_prototype))
    assert value == pytest.approx(expected, abs=1e-5)


def test_training_changes_only_the_new_rows(three_tasks):
    method, record = three_tasks
    model = _hf_model(method.backbone.model)
    # every original weight (the output head, tied to the embedding here, included) is bit-identical
    assert_same(base_weights(method), record["base"])
    assert torch.equal(model.get_output_embeddings().weight, record["head"])  # same rows, same size
    # task 0's rows and projection are untouched by the later stages; task 1's did train
    assert_same(record["task0_after_1"], record["task0"])
    assert_same(bank_values(method, "0"), record["task0"])
    assert_same(bank_values(method, "1"), record["task1"])
    changed = [k for k in record["task1"] if not torch.equal(record["task1"][k], record["init"][k])]
    assert "rows" in changed and any(k.startswith("trunk") for k in changed)
    assert not any(p.requires_grad for p in model.parameters())  # all frozen between tasks
    assert method.trained == [0, 1, 2]
    per_task = LENGTH * model.get_input_embeddings().weight.shape[1] + sum(
        p.numel() for p in method.bank.projections["2"].parameters())
    assert method.trainable_parameters() == per_task


def test_training_prompts(three_tasks, tasks):
    method, record = three_tasks
    names = {t: "".join(token_names(t, LENGTH)) for t in range(3)}
    assert [s.prompt for s in record["samples"][0]] == [names[0] + s.prompt for s in tasks[0].train_samples]
    assert [s.prompt for s in record["samples"][1]] == [names[0] + names[1] + s.prompt for s in tasks[1].train_samples]
    # k = 2 at task 2: the most similar of tasks 0 and 1 (frozen by then) per sample, then task 2's own
    images, texts = method.features(tasks[2].train_samples)
    prototypes = method.prototypes([0, 1])
    for sample, original, image, text in zip(record["samples"][2], tasks[2].train_samples, images, texts):
        best = int(torch.argmax(guide_scores(image, text, *prototypes)))
        assert sample.prompt == names[best] + names[2] + original.prompt
        assert replace(sample, prompt=original.prompt) == original


def test_generate_chooses_per_sample(three_tasks, tasks):
    method, _ = three_tasks
    samples = [s for task in tasks[:3] for s in task.test_samples[:2]]
    chosen = method.select(samples)
    assert all(len(c) == 2 and len(set(c)) == 2 and set(c) <= {0, 1, 2} for c in chosen)
    assert len({tuple(c) for c in chosen}) > 1  # the samples do not all get the same prompts
    images, texts = method.features(samples)
    prototypes = method.prototypes([0, 1, 2])
    for c, image, text in zip(chosen, images, texts):
        assert c == top_tasks(guide_scores(image, text, *prototypes), [0, 1, 2], 2)

    batched = method.generate(samples, tasks[0], 6)
    assert batched == [method.generate([s], tasks[0], 6)[0] for s in samples]
    assert method.generate(samples, tasks[2], 6) == batched  # the task identity is not used
    prompted = [method.with_prompts(s, c) for s, c in zip(samples, chosen)]
    assert batched == method.backbone.generate(prompted, 6)


def test_state_round_trip(three_tasks, tiny_model_dir: Path, tasks, tmp_path: Path):
    method, _ = three_tasks
    save_file(method.saved_tensors(), str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(method.state_json()))
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["tasks"] == [0, 1, 2] and state["tokens"] == [token_names(t, LENGTH) for t in range(3)]
    saved = load_file(str(tmp_path / "state.safetensors"))
    assert {k.split("::")[0] for k in saved} == {"prompts", "projections"}

    fresh = new_method(tiny_model_dir, tasks)
    fresh.load_state_json(state)
    fresh.restore_tensors(saved)
    for t in range(3):
        assert_same(bank_values(fresh, str(t)), bank_values(method, str(t)))
        names = token_names(t, LENGTH)
        assert fresh.backbone.tokenizer.convert_tokens_to_ids(names) == method.backbone.tokenizer.convert_tokens_to_ids(names)
    samples = [s for task in tasks[:3] for s in task.test_samples[:2]]
    assert fresh.select(samples) == method.select(samples)
    assert fresh.generate(samples, tasks[1], 6) == method.generate(samples, tasks[1], 6)
    assert_same(base_weights(fresh), base_weights(method))

    # resuming: the next task gets the next tokens and is the only trainable part
    fresh.before_task(3, tasks[3])
    assert fresh.backbone.tokenizer.convert_tokens_to_ids(token_names(3, LENGTH))[0] == \
        fresh.backbone.tokenizer.convert_tokens_to_ids(token_names(2, LENGTH))[-1] + 1
    trainable = {n.split(".")[2] for n, p in fresh.backbone.model.named_parameters() if p.requires_grad}
    assert trainable == {"3"}

    # loading an earlier stage on the same instance drops the later tasks
    earlier = {**state, "tasks": [0], "tokens": [token_names(0, LENGTH)]}
    fresh.load_state_json(earlier)
    fresh.restore_tensors({k: v for k, v in saved.items() if k.split("::")[1] == "0"})
    assert fresh.trained == [0] and set(fresh.bank.prompts) == {"0"}
    assert all(c == [0] for c in fresh.select(samples))


def test_bad_state_is_a_run_dir_error(three_tasks, tiny_model_dir: Path, tasks):
    method, _ = three_tasks
    state, tensors = method.state_json(), method.saved_tensors()
    fresh = new_method(tiny_model_dir, tasks)
    with pytest.raises(RunDirError, match="prompt_length"):
        fresh.load_state_json({**state, "prompt_length": LENGTH + 1})
    with pytest.raises(RunDirError, match="tokens"):
        fresh.load_state_json({**state, "tokens": [token_names(1, LENGTH)] * 3})
    with pytest.raises(RunDirError, match="tasks"):
        fresh.load_state_json({**state, "tasks": [0, 0, 1]})
    with pytest.raises(RunDirError, match="widths"):
        fresh.load_state_json({**state, "widths": {"hidden": 1, "image": 2, "text": 3}})
    fresh.load_state_json(state)
    with pytest.raises(RunDirError, match="tensors for tasks"):
        fresh.restore_tensors({k: v for k, v in tensors.items() if not k.startswith("prompts::2")})
    with pytest.raises(RunDirError, match="shape"):
        fresh.restore_tensors({**tensors, "prompts::1": torch.zeros(LENGTH + 1, 4)})


# -- a tiny Qwen2-VL: M-RoPE positions and the image-token mask come from the model itself ---------
def test_tiny_qwen2_vl(tasks, tmp_path: Path):
    from mmcl.backbones.registry import load_backbone
    from mmcl.backbones.tiny_archs import TinyArchSpec, build_tiny_arch

    model_dir = build_tiny_arch("qwen2-vl", tmp_path / "qwen", spec=TinyArchSpec(text_layers=1, vision_layers=1))
    method = ModalPrompt(ModalPromptConfig(prompt_length=2, top_k=2), LoraSettings(), seed=0)
    method.setup(load_backbone(str(model_dir), device="cpu"))
    method.see_tasks(tasks, len(tasks))
    before = base_weights(method)
    for index in range(2):
        fit(method, index, tasks, tmp_path)
    assert_same(base_weights(method), before)
    text_only = replace(tasks[0].test_samples[0], images=(), prompt="Is there a river?")
    samples = [tasks[0].test_samples[0], text_only, tasks[1].test_samples[0]]
    batched = method.generate(samples, tasks[0], 4)
    assert batched == [method.generate([s], tasks[1], 4)[0] for s in samples]
