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
    """A run directory that belongs to a different config or other data, is in use by another run, or is unreadable."""

    exit_code = 4


class OutputError(MmclError):
    """Cannot write the run directory or another output: read-only, full disk, no permission, a file in the way."""

    exit_code = 6


class UnfinishedRunError(MmclError):
    """``mmcl report`` on a run whose stages or planned evaluations are not all done (the report is
    still written; the exit code tells scripts that its numbers are not final)."""

    exit_code = 5
