"""Batched evaluation of one task: predictions stored as JSONL, scores recomputable from that file alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from mmcl.data.sample import Sample
from mmcl.evaluation.scorers import get_scorer, score_one
from mmcl.utils import atomic_write_text

Generate = Callable[[Sequence[Sample], int], list[str]]


def generate_answers(generate: Generate, samples: Sequence[Sample], max_new_tokens: int, batch_size: int) -> list[str]:
    """Answers for ``samples``, generated in batches of ``batch_size``."""
    answers: list[str] = []
    for begin in range(0, len(samples), batch_size):
        answers.extend(generate(samples[begin : begin + batch_size], max_new_tokens))
    return answers


def write_predictions(
    out_file: Path, samples: Sequence[Sample], answers: Sequence[str], scorer_name: str, seconds: float
) -> float:
    """Write ``out_file`` atomically (a header naming the scorer, then one record a sample); return the score."""
    get_scorer(scorer_name)  # unknown names fail before anything is written
    lines, scores = [], []
    for sample, prediction in zip(samples, answers, strict=True):
        scores.append(score_one(scorer_name, prediction, sample.reference))
        record = {"id": sample.id, "prediction": prediction, "answer": sample.reference, "score": scores[-1]}
        lines.append(json.dumps(record, ensure_ascii=False))
    header = {"scorer": scorer_name, "n": len(lines), "seconds": round(seconds, 3)}
    atomic_write_text(out_file, json.dumps({"meta": header}) + "\n" + "\n".join(lines) + ("\n" if lines else ""))
    return 100.0 * sum(scores) / len(scores) if scores else 0.0


def sample_scores(path: Path) -> list[tuple[str, float]]:
    """(sample id, score in [0, 1]) of every record of a predictions file, in file order, recomputed from its
    predictions and answers with the scorer its header names (the stored ``score`` may come from an older
    scorer). Soft scorers (VQA soft accuracy, ANLS, IoU, partial credit) give a fraction, and a
    multi-reference answer is already one score: every sample is one number in [0, 1]."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    scorer = records[0]["meta"]["scorer"]
    return [(item["id"], score_one(scorer, item["prediction"], item["answer"])) for item in records[1:]]


def mean_percent(scores: Sequence[tuple[str, float]]) -> float:
    """Mean of :func:`sample_scores`' scores, in percent (0 for no sample)."""
    return 100.0 * sum(score for _, score in scores) / len(scores) if scores else 0.0


def score_prediction_file(path: Path) -> float:
    """Mean score (percent) of a predictions file, recomputed from its predictions and answers."""
    return mean_percent(sample_scores(path))


def read_records(path: Path) -> dict[str, dict]:
    """Sample id -> record (prediction, answer, score) of a predictions file."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return {record["id"]: record for record in map(json.loads, filter(str.strip, lines))}


def read_predictions(path: Path) -> dict[str, str]:
    """Sample id -> prediction of a predictions file."""
    return {sample_id: record["prediction"] for sample_id, record in read_records(path).items()}


def prediction_seconds(path: Path) -> float:
    first_line = path.read_text(encoding="utf-8").split("\n", 1)[0]
    return float(json.loads(first_line)["meta"].get("seconds", 0.0))
