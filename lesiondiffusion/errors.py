"""Errors that reach the user as one line naming the file (and line) and the problem."""

from __future__ import annotations

from os import PathLike


class LesionDiffusionError(Exception):
    """Base class of every error this project raises on purpose; its message is one line."""


class InputError(LesionDiffusionError):
    """A problem with one input file, optionally at a given line (1-based)."""

    def __init__(self, path: str | PathLike[str] | None, problem: str, line: int | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())  # keep it on one line
        self.line = line
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(self.problem if where is None else f"{where}: {self.problem}")
