"""``--deterministic``: the same seed gives the same matrix on every x86-64 machine.

What made the default run differ between machines is the CPU kernels each library picks from the
instruction set it finds (measured in docs/reproducibility.md): ATen's vectorised kernels
(``ATEN_CPU_CAPABILITY``), MKL's GEMM (``MKL_CBWR``) and oneDNN's convolutions and element-wise ops
(``ONEDNN_MAX_CPU_ISA``). Each sums in a different order on AVX2 and AVX-512, so the weights part after
the first steps and the answers after a few epochs. The thread count did not change a prediction (1, 2
and 4 threads give byte-identical runs), so it is not pinned.

All three libraries read these variables once, when torch is loaded: :func:`pin_environment` must run
before ``import torch`` (``mmcl run`` does it first thing); :func:`check_pinned` refuses a process in
which torch came first with other values. Levels:

- ``avx2``: every library on its AVX2 kernels (any x86-64 CPU since 2013-2015). No cost on an AVX2 CPU;
  on an AVX-512 CPU, the cost of not using AVX-512.
- ``baseline``: the kernels every x86-64 CPU has (ATen's default, MKL's compatible branch, oneDNN on
  SSE4.1): for a CPU without AVX2, at a measured cost in speed.

Other architectures (ARM) have other kernels altogether: identical predictions hold between x86-64
machines. On a GPU this also sets ``torch.use_deterministic_algorithms`` and cuBLAS's workspace, which
makes runs repeat on the same GPU model, not across GPU models."""

from __future__ import annotations

import os
import sys

from mmcl.errors import ConfigError

LEVELS: dict[str, dict[str, str]] = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX2,STRICT",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "DNNL_MAX_CPU_ISA": "AVX2",  # oneDNN's older name, read by older torch builds
    },
    "baseline": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_CBWR": "COMPATIBLE,STRICT",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "DNNL_MAX_CPU_ISA": "SSE41",
    },
}
CAPABILITY = {"avx2": "AVX2", "baseline": "DEFAULT"}  # what torch.backends.cpu.get_cpu_capability() then reports
GPU_ENVIRONMENT = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# Variables that choose kernels or threads: recorded with every stage (mmcl.environment).
KERNEL_VARIABLES = (*LEVELS["avx2"], "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS")


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ConfigError(f"deterministic_isa: expected one of {', '.join(LEVELS)}, got {level!r}")
    return level


def pin_environment(level: str) -> None:
    """Set the kernel-selection variables of ``level`` for this process and its children; before torch
    is imported (afterwards it is too late: :func:`check_pinned` then says so)."""
    for key, value in {**LEVELS[check_level(level)], **GPU_ENVIRONMENT}.items():
        if "torch" not in sys.modules:
            os.environ[key] = value


def check_pinned(level: str) -> None:
    """Refuse to train unless the kernels of ``level`` are the ones in use; then make torch's own
    algorithms deterministic. Called by the runner, after torch is imported."""
    import torch

    wrong = [f"{key}={os.environ.get(key)!r}" for key, value in LEVELS[check_level(level)].items()
             if os.environ.get(key) != value]  # fmt: skip
    if wrong:
        wanted = " ".join(f"{key}={value}" for key, value in LEVELS[level].items())
        raise ConfigError(
            f"deterministic: torch was imported before the kernels were pinned ({', '.join(wrong)}); "
            f"run through `mmcl run --deterministic`, or set {wanted} before Python starts"
        )
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != CAPABILITY[level]:
        raise ConfigError(
            f"deterministic_isa {level}: this CPU runs ATen's {capability} kernels, not {CAPABILITY[level]} "
            "(no AVX2, or not x86-64); use --set deterministic_isa=baseline on x86-64"
        )
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def requested_level(stored_or_file: dict | None, overrides: dict) -> str | None:
    """The level a command asks for, read before anything imports torch: ``deterministic`` and
    ``deterministic_isa`` from the overrides (``--deterministic``, ``--set``) or else the config file's
    top level; None when determinism is off. Types are checked later, with the rest of the config."""
    data = stored_or_file if isinstance(stored_or_file, dict) else {}
    enabled = overrides.get("deterministic", data.get("deterministic", False))
    if enabled is not True:
        return None
    level = overrides.get("deterministic_isa", data.get("deterministic_isa", "avx2"))
    return level if isinstance(level, str) and level in LEVELS else None
