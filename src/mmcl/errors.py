"""User-facing errors: each carries one line that names the file, record or key at fault.

The command line prints ``str(error)`` and exits non-zero without a traceback.
"""


class MmclError(Exception):
    """Base class for errors caused by the user's input, not by a bug in mmcl."""

    exit_code = 1


class ConfigError(MmclError):
    """Unknown key, wrong type or bad value in an experiment config."""

    exit_code = 2


class DataError(MmclError):
    """Malformed record, missing or unreadable image, missing data file."""

    exit_code = 3


class RunDirError(MmclError):
    """A run directory that belongs to a different config, or is unreadable."""

    exit_code = 4
