"""User-facing errors.

Anything the user can fix (a recipe key, a dataset column, a path) raises `AlignerError` with a
one-line message that names the file, field or row and says what would fix it. The CLI prints
the message and exits with code 2; the Python API lets it propagate.
"""


class AlignerError(Exception):
    """A problem with the user's input: printed as one line by the CLI, exit code 2."""


class ConfigError(AlignerError):
    """Malformed recipe, unknown key, wrong type, bad flag."""


class DataError(AlignerError):
    """Missing or empty dataset, missing columns, sequences that cannot be built."""
