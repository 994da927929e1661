"""mmcl's terminal output: one ``mmcl`` logger (stdlib :mod:`logging`), configured once by the command line.

Progress lines (``stage 2/5 [med]: training on 8 samples``, ``  eval [1_rs] med: 50.0``, training steps)
go through ``logging.getLogger("mmcl")`` (or a child, ``mmcl.<part>``) at INFO level and are printed as
they are, without prefixes, on standard output; under ``torchrun`` process 0 alone prints. Dependencies
are kept out of the user's way unless ``-v`` / ``MMCL_DEBUG=1`` asks for everything: their FutureWarning
and DeprecationWarning are filtered, transformers logs errors only, and its weight-loading bars are
hidden when standard error is not a terminal. Library users who do not go through the command line
call :func:`setup_logging` themselves (or attach their own handlers to the ``mmcl`` logger).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGER_NAME = "mmcl"
# Packages whose FutureWarning / DeprecationWarning are about their own internals, not the user's input.
QUIET_PACKAGES = ("transformers", "peft", "torch", "accelerate", "huggingface_hub", "safetensors", "tokenizers", "trl")


def get_logger(part: str | None = None) -> logging.Logger:
    """The ``mmcl`` logger, or its child ``mmcl.<part>``."""
    return logging.getLogger(LOGGER_NAME if not part else f"{LOGGER_NAME}.{part}")


def info(message: str) -> None:
    """One progress line through the ``mmcl`` logger (the runner's default ``log``)."""
    logging.getLogger(LOGGER_NAME).info(message)


def debug_requested() -> bool:
    """``MMCL_DEBUG`` set to anything but empty or 0."""
    return os.environ.get("MMCL_DEBUG", "").strip() not in ("", "0")


def is_main_process() -> bool:
    """Process 0 of a ``torchrun`` launch, or the only process (read from the environment: no torch import)."""
    return os.environ.get("RANK", "0") == "0"


class _StdoutHandler(logging.StreamHandler):
    """Writes each record to whatever ``sys.stdout`` is when it is emitted (so redirections and captures
    made after the setup see it)."""

    _mmcl_handler = True

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False, is_main: bool | None = None) -> logging.Logger:
    """Configure the ``mmcl`` logger (idempotent): plain messages on stdout, INFO (DEBUG if ``verbose``) on
    the main process, silent on the others; quiet dependencies unless ``verbose``."""
    verbose = verbose or debug_requested()
    is_main = is_main_process() if is_main is None else is_main
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if getattr(h, "_mmcl_handler", False)]:
        logger.removeHandler(handler)
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel((logging.DEBUG if verbose else logging.INFO) if is_main else logging.CRITICAL + 1)
    logger.propagate = False
    if not verbose:
        quiet_dependencies(show_bars=_is_terminal(sys.stderr))
    return logger


def quiet_dependencies(show_bars: bool) -> None:
    """Filter the dependencies' FutureWarning / DeprecationWarning, set transformers to log errors only,
    and (``show_bars`` False) hide its progress bars. Applies to an already imported transformers too."""
    for package in QUIET_PACKAGES:
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=rf"{package}(\.|$)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    if not show_bars:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        if not show_bars:
            transformers_logging.disable_progress_bar()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
