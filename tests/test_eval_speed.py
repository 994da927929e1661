"""Evaluation speed options: the run's cache of processed test batches (never changes an answer) and
generation in order of prompt length (answers stay in file order; part of the fingerprint)."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import first_tasks_stream, make_stream_config, write_config
from mmcl.evaluation.input_cache import InputCache, tensor_bytes
from test_runner import TRAINING, invoke, prediction_records


def test_input_cache_is_bounded_least_recently_used_and_hands_out_copies() -> None:
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "pixel_values": torch.zeros(2, 3, 2, 2)}
    size = tensor_bytes(batch)  # 64 + 96 bytes
    cache = InputCache(max_bytes=2 * size)
    cache.put("a", batch)
    cache.put("b", batch)
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", batch)  # evicts "b", the least recently used
    assert cache.get("b") is None and cache.get("c") is not None and cache.used == 2 * size
    copy = cache.get("a")
    copy["input_ids"].add_(5)  # a caller changing its batch never changes the cache
    assert torch.equal(cache.get("a")["input_ids"], batch["input_ids"])
    cache.put("huge", {"x": torch.zeros(1000)})  # larger than the whole cache: not kept
    assert cache.get("huge") is None and (cache.hits, cache.misses) == (4, 2)


def test_cached_and_sorted_evaluation_give_the_answers_of_a_plain_run(tiny_model_dir: Path, stream_cache_dir: Path,
                                                                     tmp_path: Path, monkeypatch) -> None:
    """The same stream evaluated with the cache (hits from the second row on) and without it, and generated in
    length order: every predictions file holds the same answers in the same (file) order."""
    import mmcl.runner as runner

    caches: list[InputCache] = []
    monkeypatch.setattr(runner, "InputCache", lambda size: caches.append(InputCache(size)) or caches[-1])
    runs = {"cached": {"input_cache_mb": 512}, "uncached": {}, "sorted": {"sort_by_length": True, "batch_size": 3}}
    for name, options in runs.items():
        evaluation = {"batch_size": 3, "forward_transfer": False, "general": "none", **options}
        config = make_stream_config(tiny_model_dir, stream_cache_dir, tmp_path / name, training=dict(TRAINING),
                                    evaluation=evaluation, stream=first_tasks_stream(stream_cache_dir, 2, 8, 5))
        assert invoke(["run", str(write_config(tmp_path / f"{name}.yaml", config))]).code == 0
    assert caches[0].hits > 0 and caches[0].misses > 0  # rows 2.. reuse the batches row 1 processed
    for stage in ("0_base", "1_rs", "2_med"):
        for task in ("rs", "med"):
            file = Path("predictions") / stage / f"{task}.jsonl"
            if not (tmp_path / "uncached" / file).exists():
                continue
            answers = {name: [(r["id"], r["prediction"]) for r in prediction_records(tmp_path / name / file)[1]]
                       for name in runs}
            assert answers["cached"] == answers["uncached"]
            assert [i for i, _ in answers["sorted"]] == [i for i, _ in answers["uncached"]]  # file order kept


def test_sorting_is_part_of_the_fingerprint_and_orders_by_prompt_length(tiny_model_dir: Path) -> None:
    from mmcl.backbones.registry import load_backbone
    from mmcl.config import ExperimentConfig, from_dict
    from mmcl.data.sample import Sample

    plain = from_dict(ExperimentConfig, {})
    assert from_dict(ExperimentConfig, {"evaluation": {"sort_by_length": True}}).fingerprint() != plain.fingerprint()
    assert from_dict(ExperimentConfig, {"evaluation": {"input_cache_mb": 512}}).fingerprint() == plain.fingerprint()
    backbone = load_backbone(str(tiny_model_dir), device="cpu")
    short, long = (Sample(id=i, task="t", images=(), prompt=p, answer="x") for i, p in (("s", "Red?"), ("l", "Is it red or blue or green?")))
    assert backbone.prompt_length(short)[1] < backbone.prompt_length(long)[1]
