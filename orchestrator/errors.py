"""User-facing outcomes that are not results: bad input (exit code 2) and nothing to do."""

from __future__ import annotations


def last_line(error: BaseException) -> str:
    """The last non-empty line of an error's text ("" for none): Ray puts a trial's or an
    actor's own error last, after its traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else ""


class UserInputError(ValueError):
    """Bad input from the user: the message names the field, the value and the fix."""


class NothingToDo(Exception):
    """The request is already satisfied (e.g. resuming a finished sweep); not an error."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: its state is saved in ``sweep_dir``, where ``resume`` finds it."""

    def __init__(self, sweep_dir: str) -> None:
        super().__init__(sweep_dir)
        self.sweep_dir = sweep_dir
