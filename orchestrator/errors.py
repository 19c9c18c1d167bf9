"""The user-facing error type: a bad spec, option or store, reported with exit code 2."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user: the message names the field, the value and the fix."""
