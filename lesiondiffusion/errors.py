"""Errors that reach the user as one line naming the file (and line) and the problem."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from os import PathLike
from types import TracebackType
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


class LesionDiffusionError(Exception):
    """Base class of every error this project raises on purpose; its message is one line."""


class InputError(LesionDiffusionError):
    """A problem with one input file, optionally at a given line (1-based)."""

    def __init__(self, path: str | PathLike[str] | None, problem: str, line: int | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = " ".join(str(problem).split())  # keep it on one line
        self.line = line
        # a file name with a newline in it still makes one line
        shown = self.path if self.path is None or self.path.isprintable() else repr(self.path)
        where = shown if line is None else f"{shown}:{line}"
        super().__init__(self.problem if where is None else f"{where}: {self.problem}")


def exit_on_user_error(fn: Callable[[], T], what: str, enabled: bool = True) -> T:
    """Call ``fn``; with ``enabled``, a :class:`LesionDiffusionError` ends the process as one line
    (``error: ...`` on stderr, exit status 1; the traceback goes to the debug log as ``what``).

    ``SystemExit`` is not an ``Exception``, so ``monai.bundle run`` lets it through without a traceback.
    """
    try:
        return fn()
    except LesionDiffusionError as e:
        if not enabled:
            raise
        logger.debug("%s failed", what, exc_info=True)
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def user_error(exc: BaseException | None) -> LesionDiffusionError | None:
    """The :class:`LesionDiffusionError` behind ``exc``, if any (MONAI re-raises errors met while building a
    config's components as ``RuntimeError`` ``from`` them)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LesionDiffusionError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_error_hook() -> None:
    """Print an uncaught user error as ``error: <one line>`` on stderr instead of a traceback (exit status 1).

    A bundle config calls this first thing in its ``initialize``; so every user error its components or
    expressions raise afterwards ends the run as one line. Other exceptions keep their traceback.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        error = user_error(exc)
        if error is None:
            previous(kind, exc, tb)
        else:
            logger.debug("run failed", exc_info=(kind, exc, tb))
            print(f"error: {error}", file=sys.stderr, flush=True)

    sys.excepthook = hook


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT, SIGTERM, SIGHUP); raised so every ``finally`` cleans up."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def raise_on_termination() -> None:
    """Turn SIGTERM and SIGHUP into :class:`Interrupted` (SIGINT already raises ``KeyboardInterrupt``).

    Without this a terminated run dies at once, leaving its work folders and lock behind.
    """
    import signal

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(sig, stop)
        except (ValueError, OSError):  # not the main thread, or no such signal here
            pass
