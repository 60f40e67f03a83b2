"""The exceptions the command line turns into exit codes.

Anything raised as `InputError` is the user's to fix (a path, flag, key or value): the CLI prints its message,
which must name what is wrong and what was expected, and exits with status 2 without a traceback.
`Interrupted` is a stop the user asked for.
"""


class InputError(ValueError):
    """Bad user input: a missing or malformed file, flag, key or value."""


class Interrupted(Exception):
    """The command was asked to stop (SIGINT, SIGTERM) and did, without publishing partial results; the
    CLI exits with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int, stage: str = "") -> None:
        super().__init__(signum, stage)
        self.signum, self.stage = signum, stage

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
