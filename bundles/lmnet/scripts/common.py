"""Command-line behaviour of this bundle's runs: user errors end the run with one line, no traceback."""

from __future__ import annotations

import sys
from types import TracebackType

from lesiondiffusion.errors import LesionDiffusionError


def user_error(exc: BaseException | None) -> LesionDiffusionError | None:
    """The :class:`LesionDiffusionError` behind ``exc`` (MONAI wraps errors raised while building components)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LesionDiffusionError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_error_hook() -> None:
    """Print uncaught user errors as ``error: <one line>`` on stderr (exit status 1); others as usual."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        error = user_error(exc)
        if error is None:
            previous(kind, exc, tb)
        else:
            print(f"error: {error}", file=sys.stderr, flush=True)

    sys.excepthook = hook
