"""Errors for user mistakes: caught at the entry point and printed as one line, no traceback."""


class DpoLabError(Exception):
    """Base class for errors that are the user's to fix (config, data, paths)."""


class ConfigError(DpoLabError):
    """A config key has a bad value, is unknown, or is missing. The message names the key."""


class DataError(DpoLabError):
    """Input data is malformed. The message names the file, row or column."""


class NonFiniteError(DpoLabError):
    """A training step produced a non-finite loss or gradient. Names the step and examples."""
