"""Bundle settings as they arrive from JSON or the command line."""

from __future__ import annotations

from lesiondiffusion.errors import LesionDiffusionError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "none", "null", "")


def flag(value: object) -> bool:
    """A boolean setting given as JSON or on the command line (``--resume false`` arrives as a string).

    Raises :class:`~lesiondiffusion.errors.LesionDiffusionError` for any other string, so a typo never
    reads as true.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise LesionDiffusionError(f"expected true or false, got {value!r}")
    return bool(value)
