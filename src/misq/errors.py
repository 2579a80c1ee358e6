"""User-facing errors.

A :class:`MisqError` is a mistake the user can fix (a bad path, a bad flag, missing data).
The CLI prints its message as one line and exits with status 2, with no traceback; library
callers get an ordinary exception. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MisqError(Exception):
    """A problem with the user's input. ``str(err)`` says what is wrong and how to fix it."""

    exit_code = 2


class NumericalError(MisqError):
    """NaN/Inf in activations or a solved layer, or a Hessian that stays indefinite."""
