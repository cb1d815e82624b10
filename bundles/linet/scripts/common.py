"""Command-line behaviour shared by this bundle's configs: user errors end the run with one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from lesiondiffusion.errors import LesionDiffusionError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``; a :class:`LesionDiffusionError` becomes one line on stderr and exit status 1.

    ``SystemExit`` is not an ``Exception``, so ``monai.bundle run`` lets it through without a traceback.
    """
    try:
        return fn(*args, **kwargs)
    except LesionDiffusionError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def flag(value: Any) -> bool:
    """A boolean setting from JSON or the command line (``--resume false`` arrives as the string ``"false"``)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off", ""):
            return False
        print(f"error: expected true or false, not {value!r}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    return bool(value)
