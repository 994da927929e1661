"""``sefe``: SEFE, the Superficial and Essential Forgetting Eliminator (Chen et al., ICML 2025).

The composition of its two halves, each also selectable alone for ablations:

* ASD (``mmcl.methods.asd``, method ``asd``): a share of every task's training samples rewritten
  into other answer styles, against superficial forgetting (answer-style drift);
* RegLoRA (``mmcl.methods.reglora``, method ``reglora``): each task's LoRA merged into the base
  after the task, the next LoRA penalised at the earlier tasks' key positions, against essential
  forgetting (lost knowledge).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmcl.methods.asd import AsdConfig, AsdTrainData
from mmcl.methods.base import register_method
from mmcl.methods.reglora import RegLora, RegLoraConfig


@dataclass
class SefeConfig(AsdConfig, RegLoraConfig):
    """ASD options (``share``, ``asd_files``) and RegLoRA options (``top_ratio``, ``reg_lambda``)."""

    def __post_init__(self) -> None:
        AsdConfig.__post_init__(self)
        RegLoraConfig.__post_init__(self)


@register_method
class Sefe(AsdTrainData, RegLora[SefeConfig]):
    name = "sefe"
    state_growth = "per-task"
    description = "SEFE: answer-style diversification of the data (ASD) + RegLoRA"
