"""User-facing errors: a mistake in what the user gave us, not a bug in ft.

The CLI prints such an error as one line and exits non-zero, without a traceback
unless `--debug` is given. Anything else that escapes is a bug and keeps its
traceback.
"""


class FtError(Exception):
    """A user mistake: bad input, missing file, unknown name."""

    exit_code = 1


class ConfigError(FtError):
    """An unknown config key or a value of the wrong type."""

    exit_code = 2


class AssetError(FtError):
    """A malformed, missing or unusable asset card."""


class DataError(FtError):
    """A dataset that cannot be read: missing, empty or malformed."""


class CheckpointError(FtError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


class CheckpointDamagedError(CheckpointError):
    """A checkpoint ft wrote whose files no longer match its manifest, or which ft cannot prove it wrote."""


class OutputDirError(FtError):
    """An output directory that cannot be created or written: under a file, read-only, full."""


class RunLockedError(FtError):
    """Another process is running on the same output directory."""


class NonFiniteError(FtError):
    """Training produced a non-finite loss or gradient norm; nothing was saved after it."""

    exit_code = 3


# Exit codes a wrapper script can rely on (documented in docs/promises.md).
EXIT_OK = 0
EXIT_STOPPED = 75  # stopped by SIGTERM/SIGINT after saving a checkpoint: re-run to resume (EX_TEMPFAIL)
EXIT_NONFINITE = NonFiniteError.exit_code  # the loss or gradient norm became nan/inf; nothing saved after it
EXIT_INTERRUPTED = 130  # a second signal stopped the run at once; the newest complete checkpoint is intact
