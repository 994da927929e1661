"""``asd``: Answer-Style Diversification, the data half of SEFE (Chen et al., ICML 2025, "SEFE:
Superficial and Essential Forgetting Eliminator for Multimodal Continual Instruction Tuning").

Superficial forgetting is the drift of a model's answers to the answer style of the latest task.
ASD counters it by rewriting a share X% (default 20) of every task's training samples into other
answer styles, so that no task teaches a single style. The styles are those of :mod:`mmcl.data.answer_styles` (yes/no, multiple choice, short answer, brief and
detailed explanation).

The rewritten samples are split evenly over the styles that fit each sample: never the style the
sample already has, ``mc`` only when three distractors exist, ``short`` only for multiple-choice
originals (for other originals it would repeat the original). The SEFE authors rewrite with an LLM;
this converter is rule based and needs none: distractors come from the task's own answer
vocabulary (answers of samples of the same ``qtype`` when the metadata records one), explanations
from templates filled with the sample's scene facts (``metadata["facts"]`` of the synthetic
generators) or generic sentences otherwise. Pre-generated ASD files in LLaVA JSON format (as the
authors publish them for CoIN) replace the rewrite per task through ``asd_files``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from mmcl.streams.stream import Task
from mmcl.data.answer_styles import STYLES, answer_vocabulary, fitting_styles, parse, question_group, rewrite
from mmcl.data.sample import Sample
from mmcl.config import setting
from mmcl.errors import ConfigError
from mmcl.methods.base import register_method
from mmcl.methods.seq_lora import SequentialLora


def diversify(
    samples: Sequence[Sample],
    share: float = 0.2,
    seed: int | str = 0,
    vocabulary: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
) -> list[Sample]:
    """Rewrite ``round(share * len(samples))`` samples (chosen deterministically from ``seed``) into
    other answer styles, evenly over the styles that fit; the others are returned unchanged, in order.

    ``vocabulary``: distractor candidates, either one list for all samples or a mapping from question
    type (``metadata["qtype"]``, ``""`` when absent) to a list; default: the content answers of
    ``samples`` per question type. A sample with no fitting style is left as it is."""
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"ASD share must be in [0, 1], got {share}")
    samples = list(samples)
    if vocabulary is None:
        vocabulary = answer_vocabulary(samples)
    rng = random.Random(f"asd/{seed}/{len(samples)}")
    chosen = sorted(rng.sample(range(len(samples)), round(share * len(samples))))
    counts = dict.fromkeys(STYLES, 0)
    out = list(samples)
    for index in chosen:
        sample = samples[index]
        parsed = parse(sample)
        words = vocabulary if not isinstance(vocabulary, Mapping) else vocabulary.get(question_group(sample), [])
        distractors = sorted({w for w in [*words, *parsed.options] if w.strip().lower() != parsed.content.lower()})
        styles = fitting_styles(parsed, distractors)
        if not styles:
            continue
        style = min(styles, key=lambda s: (counts[s], rng.random()))
        counts[style] += 1
        out[index] = rewrite(sample, style, parsed, distractors, rng)
    return out


# -- the method ------------------------------------------------------------------------------------
@dataclass
class AsdConfig:
    """ASD options (default share from the paper: X = 20%)."""

    share: float = setting(0.2, help="share of each task's training samples rewritten into other answer styles")
    asd_files: dict[str, str] = setting({}, help="task name -> pre-generated ASD file (LLaVA JSON) used instead of "
                                        "the rule-based rewrite")

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ConfigError(f"method.options.share: expected a share in [0, 1], got {self.share}")
        for task, path in self.asd_files.items():
            if not isinstance(path, str) or not path:
                raise ConfigError(f"method.options.asd_files.{task}: expected a file path")


def asd_train_data(config: AsdConfig, seed: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
    """The training samples of ``task`` after ASD: the pre-generated file when configured, else ``diversify``."""
    path = config.asd_files.get(task.name)
    if path is not None:
        from mmcl.data.readers import read_samples

        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"method.options.asd_files.{task.name}: file not found: {file}")
        return read_samples(file, task.name)
    return diversify(samples, config.share, seed=f"{seed}/{task.name}")


class AsdTrainData:
    """Mixin for a method whose options are (or extend) :class:`AsdConfig`: it trains on ASD data
    (:func:`asd_train_data`). Put it before the method's base class (``asd``, ``sefe``)."""

    config: AsdConfig
    seed: int

    def train_data(self, task_index: int, task: Task, samples: Sequence[Sample]) -> list[Sample]:
        return asd_train_data(self.config, self.seed, task, samples)


@register_method
class AnswerStyleDiversification(AsdTrainData, SequentialLora[AsdConfig]):
    name = "asd"
    description = "Sequential LoRA on ASD data: a share of each task rewritten into other answer styles (SEFE)"
