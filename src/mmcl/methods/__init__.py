"""Continual-learning methods, one per file, registered by name on import."""

from mmcl.methods import experts, joint, olora, replay, seq_full, seq_lora  # noqa: F401  (registration side effects)
from mmcl.methods.base import METHODS, LoraSettings, Method, register_method

__all__ = ["METHODS", "LoraSettings", "Method", "register_method"]
