"""The one error type for bad input: it always names the file and the problem."""

from __future__ import annotations

import os


class InputError(ValueError):
    """Invalid input data. ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # keep path/problem through pickling (pydra crash files)
        return (type(self), (self.path, self.problem))


class UsageError(ValueError):
    """A command-line value that matches nothing in the input (e.g. a participant
    label no subject has): a usage mistake, exit status 64, naming the value."""


def check_choice(name: str, value, choices) -> None:
    """A ValueError naming the option when ``value`` is not one of ``choices``."""
    if choices and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
