"""``mmcl pretrain-tiny``: the reproducible recipe behind the shipped ``tiny-llava`` weights.

A randomly initialised tiny LLaVA (see :mod:`mmcl.backbones.tiny`) is trained end to end (vision tower,
projector and language model) on the synthetic pretraining mix ``synth-pretrain``: plain scenes of
coloured shapes with questions about colour, shape, count, position, captions and question proposals.
The mix shares visual primitives with the continual streams but none of their domains or questions,
so the base model "sees" without already knowing the continual tasks.

Two stages, in the spirit of LLaVA's frozen pretrained vision encoder:
1. vision: the CLIP tower alone learns dense per-patch labels (the colour and the shape under each
   patch, from the generator's scene facts) and the object count from its pooled output;
2. language: the tower is frozen; projector and language model learn the mix's conversations.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mmcl.backbones.backbone import Backbone
from mmcl.backbones.tiny import TinyLlavaSpec, build_model, build_processor, train_tokenizer
from mmcl.data.readers import read_samples
from mmcl.data.sample import Sample
from mmcl.config import TrainingConfig
from mmcl.log import info
from mmcl.training.sft import train_on_samples


@dataclass
class PretrainConfig:
    """The recipe; every field is recorded next to the weights in ``pretrain.json``."""

    seed: int = 0
    n_train: int = 20000
    n_test: int = 500
    steps: int | None = None  # default: `epochs` passes over n_train
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 1e-3
    image_size: int = 48
    vision_epochs: float = 3.0  # stage 1: dense patch supervision of the CLIP tower
    vision_batch_size: int = 128
    vision_learning_rate: float = 2e-3


def _read_mix(root: Path, split: str) -> list[Sample]:
    samples: list[Sample] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        samples.extend(read_samples(folder / f"{split}.json", folder.name, split=split))
    return samples


def _patch_labels(sample: Sample, spec: TinyLlavaSpec) -> tuple[list[int], list[int], int]:
    """Per patch: colour id and shape id (0 = none) of the object covering most of it (at least a
    quarter), else the background colour and no shape; and the object count."""
    import numpy as np

    from mmcl.synthetic.pretrain_mix import COLORS, PRETRAIN_SHAPES, object_index_mask

    facts = sample.metadata["facts"]
    grid, patch = spec.image_size // spec.patch_size, spec.patch_size
    mask = np.asarray(object_index_mask(facts, spec.image_size))[: grid * patch, : grid * patch]
    blocks = mask.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    color_names, objects = list(COLORS), facts["objects"]
    colors, shapes = [], []
    for block in blocks:
        counts = np.bincount(block, minlength=len(objects) + 1)
        counts[0] = 0
        winner = int(counts.argmax())
        if counts[winner] * 4 >= patch * patch:
            colors.append(color_names.index(objects[winner - 1]["color"]))
            shapes.append(1 + PRETRAIN_SHAPES.index(objects[winner - 1]["shape"]))
        else:
            colors.append(color_names.index(facts["background"]))
            shapes.append(0)
    return colors, shapes, len(objects) - 1


def pretrain_vision_tower(model, processor, samples: list[Sample], spec: TinyLlavaSpec, config: PretrainConfig) -> float:
    """Stage 1: train ``model``'s CLIP tower with linear heads on dense patch labels; returns the final
    patch-colour accuracy on the last epoch's batches (a sanity number recorded in pretrain.json)."""
    import math

    import torch

    from mmcl.synthetic.pretrain_mix import COLORS, PRETRAIN_SHAPES
    from mmcl.data.images import sample_images

    tower = model.model.vision_tower
    hidden = tower.config.hidden_size
    heads = torch.nn.ModuleDict({
        "color": torch.nn.Linear(hidden, len(COLORS)),
        "shape": torch.nn.Linear(hidden, len(PRETRAIN_SHAPES) + 1),
        "count": torch.nn.Linear(hidden, 4),
    })
    unique = list({sample.images[0]: sample for sample in samples}.values())
    pixels = torch.cat([
        processor.image_processor(images=sample_images(s), return_tensors="pt")["pixel_values"] for s in unique
    ])
    labels = [_patch_labels(s, spec) for s in unique]
    colors = torch.tensor([c for c, _, _ in labels])
    shapes = torch.tensor([h for _, h, _ in labels])
    counts = torch.tensor([n for _, _, n in labels])
    parameters = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.vision_learning_rate, weight_decay=0.01)
    steps = math.ceil(len(unique) / config.vision_batch_size * config.vision_epochs)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.vision_learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(config.seed)
    tower.train()
    order, hits, seen = torch.empty(0, dtype=torch.long), 0, 0
    for step in range(steps):
        if len(order) < config.vision_batch_size:
            order = torch.cat([order, torch.randperm(len(unique), generator=generator)])
            hits = seen = 0
        batch, order = order[: config.vision_batch_size], order[config.vision_batch_size :]
        states = tower(pixel_values=pixels[batch]).last_hidden_state
        patches, pooled = states[:, 1:], states[:, 0]
        color_logits, shape_logits = heads["color"](patches), heads["shape"](patches)
        loss = (
            torch.nn.functional.cross_entropy(color_logits.flatten(0, 1), colors[batch].flatten())
            + torch.nn.functional.cross_entropy(shape_logits.flatten(0, 1), shapes[batch].flatten())
            + torch.nn.functional.cross_entropy(heads["count"](pooled), counts[batch])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        hits += int((color_logits.argmax(-1) == colors[batch]).sum())
        seen += colors[batch].numel()
        if step % 50 == 0 or step == steps - 1:
            info(f"vision step {step + 1}/{steps}: loss {loss.item():.3f}, patch colour accuracy {100 * hits / seen:.1f}%")
    for parameter in tower.parameters():
        parameter.requires_grad = False
    return 100.0 * hits / max(1, seen)


def held_out_accuracy(backbone: Backbone, samples: list[Sample], batch_size: int = 64) -> dict[str, float]:
    """Exact-match accuracy (percent) of greedy answers per question type of the mix, and overall."""
    from mmcl.evaluation.scorers import exact_match

    hits: dict[str, list[float]] = {}
    for begin in range(0, len(samples), batch_size):
        batch = samples[begin : begin + batch_size]
        for sample, answer in zip(batch, backbone.generate(batch, max_new_tokens=32)):
            qtype = str(sample.metadata.get("qtype", "all"))
            hits.setdefault(qtype, []).append(exact_match(answer, sample.answer))
    table = {qtype: 100.0 * sum(v) / len(v) for qtype, v in sorted(hits.items())}
    every = [x for v in hits.values() for x in v]
    table["overall"] = 100.0 * sum(every) / max(1, len(every))
    return table


def pretrain_tiny(config: PretrainConfig, out_dir: Path | None = None, data_dir: Path | None = None) -> Path:
    """Generate the mix, train tokenizer and model, save model + processor with ``save_pretrained``."""
    from mmcl.backbones.registry import TINY_LLAVA_DIR
    from mmcl.synthetic.pretrain_mix import write_synth_pretrain

    out_dir = Path(out_dir or TINY_LLAVA_DIR)
    spec = TinyLlavaSpec(image_size=config.image_size)
    data_root = write_synth_pretrain(
        Path(data_dir or Path.home() / ".cache" / "mmcl" / "synth-pretrain" / f"seed{config.seed}-n{config.n_train}"),
        seed=config.seed,
        n_train=config.n_train,
        n_test=config.n_test,
        image_size=config.image_size,
    )
    train = _read_mix(data_root, "train")
    corpus = [text for sample in train for turn in sample.turns() for text in turn]
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    processor = build_processor(tokenizer, spec)
    model = build_model(tokenizer, spec, seed=config.seed)
    vision_accuracy = pretrain_vision_tower(model, processor, train, spec, config)
    backbone = Backbone(name="tiny-llava", model=model, processor=processor, lora_targets="")
    training = TrainingConfig(
        epochs=config.epochs,
        max_steps=config.steps or -1,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler="cosine",
        warmup_ratio=0.02,
        weight_decay=0.01,
        logging_steps=50,
    )
    with tempfile.TemporaryDirectory() as work:
        metrics = train_on_samples(backbone, train, training, Path(work), seed=config.seed)
    held_out = held_out_accuracy(backbone, _read_mix(data_root, "test"))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    record = {"recipe": asdict(config), "spec": asdict(spec), "train_metrics": metrics,
              "vision_patch_colour_accuracy": vision_accuracy, "held_out_accuracy": held_out}
    (out_dir / "pretrain.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return out_dir
