"""Per-step training scalars as TensorBoard event files (reward-learning methods log rewards, KL,
KL coefficients and baselines there; the same numbers also go to the report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def write_scalars(log_dir: Path | None, prefix: str, records: Sequence[Mapping[str, Any]], first_step: int) -> None:
    """Every numeric field of ``records[i]`` as ``<prefix>/<field>`` at step ``first_step + i``
    (no-op when ``log_dir`` is None, e.g. on processes other than 0)."""
    if log_dir is None or not records:
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for offset, record in enumerate(records):
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    writer.add_scalar(f"{prefix}/{key}", float(value), first_step + offset)
    finally:
        writer.close()
