"""User-facing outcomes that are not results: bad input (exit code 2) and nothing to do."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user: the message names the field, the value and the fix."""


class NothingToDo(Exception):
    """The request is already satisfied (e.g. resuming a finished sweep); not an error."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: its state is saved in ``sweep_dir``, where ``resume`` finds it."""

    def __init__(self, sweep_dir: str) -> None:
        super().__init__(sweep_dir)
        self.sweep_dir = sweep_dir
