"""Shared fixtures: a very small LLaVA built from scratch (no download) and an experiment config that
runs the synthetic stream on it in seconds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The models here are tiny: one thread is faster than two and does not stall when the cores are busy.
torch.set_num_threads(1)

TINY_IMAGE_SIZE = 48


def _tokenizer_corpus() -> list[str]:
    """Questions and answers of every synthetic generator, plus digits, letters and chat markers."""
    from mmcl.streams.synth import SYNTH_DOMAIN_TASKS, domain_examples
    from mmcl.synthetic.pretrain_mix import pretrain_examples

    corpus: list[str] = []
    for spec in SYNTH_DOMAIN_TASKS:
        for example in domain_examples(spec.name, 12, seed=0, split="train", image_size=32):
            corpus += [example.question, example.answer]
    for example in pretrain_examples(24, seed=0, split="train", image_size=32):
        corpus += [example.question, example.answer]
    corpus += list("0123456789") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    corpus += ["yes", "no", "left", "right", "<|user|>\n", "<|assistant|>\n", "<|end|>\n"]
    return corpus


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA (CLIP tower + Llama) built from scratch and saved with ``save_pretrained``.

    It gets a two-second warm-up (full fine-tuning on synth-domain data of another seed than the test
    streams) so that it answers with words instead of blank lines: the accuracy matrices of the runs
    below then hold non-zero, stage-dependent numbers, which makes equality checks meaningful."""
    from mmcl.backbones.backbone import Backbone
    from mmcl.backbones.tiny import TinyLlavaSpec, build_model, build_processor, train_tokenizer
    from mmcl.streams.synth import SYNTH_DOMAIN_TASKS, write_synth_domain
    from mmcl.data.readers import read_samples
    from mmcl.training.sft import TrainingConfig, train_on_samples

    spec = TinyLlavaSpec(
        image_size=TINY_IMAGE_SIZE,
        patch_size=8,
        vision_hidden=32,
        vision_layers=1,
        vision_heads=2,
        text_hidden=32,
        text_layers=1,
        text_heads=2,
        text_intermediate=64,
        vocab_size=512,
        max_positions=256,
    )
    tokenizer = train_tokenizer(_tokenizer_corpus(), spec.vocab_size)
    processor = build_processor(tokenizer, spec)
    model = build_model(tokenizer, spec, seed=0)

    work = tmp_path_factory.mktemp("tiny_warmup")
    root = write_synth_domain(work / "data", seed=7, train_per_task=16, test_per_task=1, image_size=TINY_IMAGE_SIZE)
    samples = [s for task in SYNTH_DOMAIN_TASKS for s in read_samples(root / task.name / "train.json", task.name)]
    warmup = TrainingConfig(
        epochs=6, batch_size=16, learning_rate=5e-2, warmup_ratio=0.0, progress_bar=False, logging_steps=1000
    )
    backbone = Backbone(name="tiny-test", model=model, processor=processor, lora_targets="")
    train_on_samples(backbone, samples, warmup, work / "trainer", seed=0)

    out = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def stream_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for generated synthetic streams, shared by every test of the session."""
    return tmp_path_factory.mktemp("stream_cache")


def make_stream_config(model_dir: Path, cache_dir: Path, output_dir: Path, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "tiny-test",
        "seed": 0,
        "backbone": {"name": str(model_dir)},
        "stream": {
            "name": "synth-domain",
            "options": {"train_per_task": 8, "test_per_task": 4},
            "cache_dir": str(cache_dir),
        },
        "training": {"epochs": 1, "batch_size": 8, "progress_bar": False},
        "evaluation": {"batch_size": 8},
        "output_dir": str(output_dir),
    }
    config.update(extra)
    return config


def first_tasks_stream(cache_dir: Path, count: int, train: int, test: int) -> dict[str, Any]:
    """A ``stream`` config section of the first ``count`` synth-domain tasks as task files (fewer stages)."""
    from mmcl.streams.stream import StreamConfig, build_stream

    options = {"train_per_task": train, "test_per_task": test}
    tasks = build_stream(StreamConfig(options=options, cache_dir=str(cache_dir)), cache_dir)[:count]
    return {"name": "synth-first", "tasks": [
        {"name": t.name, "train": str(t.train_file), "test": str(t.test_file), "scorer": t.scorer,
         "max_new_tokens": t.max_new_tokens} for t in tasks]}


@pytest.fixture
def tiny_stream_config(tiny_model_dir: Path, stream_cache_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """An experiment config (as a dict for YAML) running synth-domain on the tiny model; fresh output dir."""
    return make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / "run")


def process_failure(stderr: str) -> str:
    """The start and the end of a multi-process run's stderr: the first failing rank speaks first, the
    launcher's summary comes last (a tail alone loses the cause)."""
    return stderr if len(stderr) <= 5000 else f"{stderr[:2500]}\n[...]\n{stderr[-2500:]}"


def write_config(path: Path, config: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tasks(stream_cache_dir: Path):
    """The synth-domain tasks of ``make_stream_config`` (same sizes, so the generated cache is shared)."""
    from mmcl.streams.stream import StreamConfig, build_stream

    options = {"train_per_task": 8, "test_per_task": 4}
    config = StreamConfig(name="synth-domain", options=options, cache_dir=str(stream_cache_dir))
    return build_stream(config, Path.cwd())


def set_up_on_tiny(method, model_dir: Path, tasks):
    """``method`` set up on a freshly loaded copy of the tiny model (CPU), shown all of ``tasks``."""
    from mmcl.backbones.registry import load_backbone

    method.setup(load_backbone(str(model_dir), device="cpu"))
    method.see_tasks(tasks, len(tasks))
    return method


def eval_logits(backbone, samples):
    """Logits of the model in eval mode on the training encodings of ``samples`` (labels dropped)."""
    import torch

    batch = backbone.collate([backbone.encode_for_training(s) for s in samples])
    batch.pop("labels")
    backbone.model.eval()
    with torch.no_grad():
        return backbone.model(**batch).logits


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move everything imported so far (torch, transformers, PEFT, the test modules) out of the garbage
    collector's sight: every ``Trainer.train()`` asks for a full ``gc.collect()`` (accelerate's
    ``free_memory``), which otherwise walks those million objects each time (a quarter of a second)."""
    import gc

    gc.freeze()
