"""``joint``: one LoRA adapter trained once on the union of all tasks' training data.

The multitask upper-bound reference: no sequence, hence no forgetting; evaluated once at the end.
"""

from __future__ import annotations

from mmcl.methods.base import NoOptions, register_method
from mmcl.methods.seq_lora import SequentialLora


@register_method
class JointLora(SequentialLora[NoOptions]):
    name = "joint"
    description = "One LoRA adapter trained on all tasks at once (multitask upper bound, a reference row)"
    trains_jointly = True
    reference = True
