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
