"""Continual-learning methods, one per file, registered by name on import (a method's larger pieces live in
helper modules beside it: ``mrlora_router``, ``mrlora_stats``, ``evolmm_parts``, ``evolmm_update``, ``lora_utils``)."""

from mmcl.methods import (  # noqa: F401  (registration side effects)
    asd,
    clmoe,
    der,
    disco,
    evolmm,
    ewc,
    experts,
    freeze,
    grpo,
    hide,
    joint,
    keeplora,
    llaca,
    lwf,
    mas,
    merge,
    modalprompt,
    moelora,
    mrlora,
    olora,
    pclr,
    proglora,
    reglora,
    replay,
    sefe,
    sft_grpo,
    seq_full,
    seq_lora,
    smolora,
)
from mmcl.config import LoraSettings
from mmcl.methods.base import METHODS, Method, register_method

__all__ = ["METHODS", "LoraSettings", "Method", "register_method"]
