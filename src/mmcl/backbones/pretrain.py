"""``mmcl pretrain-tiny``: the reproducible recipe behind the shipped ``tiny-llava`` weights.

A randomly initialised tiny LLaVA (see :mod:`mmcl.backbones.tiny`) is trained end to end (vision tower,
projector and language model) on the synthetic pretraining mix ``synth-pretrain``: plain scenes of
coloured shapes with questions about colour, shape, count, position, captions and question proposals.
The mix shares visual primitives with the continual streams but none of their domains or questions,
so the base model "sees" without already knowing the continual tasks.
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


def _read_mix(root: Path, split: str) -> list[Sample]:
    samples: list[Sample] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        samples.extend(read_samples(folder / f"{split}.json", folder.name, split=split))
    return samples


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
    from mmcl.benchmarks.synth import write_synth_pretrain

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
    record = {"recipe": asdict(config), "spec": asdict(spec), "train_metrics": metrics, "held_out_accuracy": held_out}
    (out_dir / "pretrain.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return out_dir
