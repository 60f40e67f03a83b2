"""The one exception type for bad user input.

Anything raised as `InputError` is the user's to fix (a path, flag, key or value): the CLI prints its message,
which must name what is wrong and what was expected, and exits with status 2 without a traceback.
"""


class InputError(ValueError):
    """Bad user input: a missing or malformed file, flag, key or value."""
