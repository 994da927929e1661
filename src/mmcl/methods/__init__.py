"""Continual-learning methods, one per file, registered by name on import (a method's larger pieces live in
helper modules beside it: ``mrlora_router``, ``mrlora_stats``, ``evolmm_parts``, ``evolmm_update``, ``lora_utils``)."""

from mmcl.methods import (  # noqa: F401  (registration side effects)
    asd,
    clmoe,
    disco,
    evolmm,
    ewc,
    experts,
    grpo,
    hide,
    joint,
    keeplora,
    lwf,
    modalprompt,
    moelora,
    mrlora,
    olora,
    reglora,
    replay,
    sefe,
    seq_full,
    seq_lora,
    smolora,
)
from mmcl.config import LoraSettings
from mmcl.methods.base import METHODS, Method, register_method

__all__ = ["METHODS", "LoraSettings", "Method", "register_method"]
