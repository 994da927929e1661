"""Evaluation protocols: the accuracy matrix, the general-ability set, the superficial-forgetting probes
and low-shot transfer, each one file; a plugin adds one with ``@register_protocol``."""

from mmcl.evaluation.protocols.base import (
    PROTOCOLS,
    EvaluationProtocol,
    Row,
    RunContext,
    RunView,
    register_protocol,
)
from mmcl.evaluation.protocols import general, low_shot, matrix, superficial  # noqa: E402,F401  (registration)

__all__ = ["PROTOCOLS", "EvaluationProtocol", "Row", "RunContext", "RunView", "register_protocol"]
