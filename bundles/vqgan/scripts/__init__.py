"""The VQ-GAN bundle's own code: data lists, the VQ-GAN trainer, checkpoints and inference output.

Everything shared with other bundles lives in :mod:`lesiondiffusion` (the autoencoder API is
:mod:`lesiondiffusion.autoencoder`).
"""

from __future__ import annotations

import sys
from types import TracebackType

from lesiondiffusion.errors import LesionDiffusionError


def _root_error(exc: BaseException | None) -> LesionDiffusionError | None:
    """The project's own error behind ``exc`` (MONAI re-raises config errors as RuntimeError ``from`` it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LesionDiffusionError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def flag(value: object) -> bool:
    """A boolean setting given as JSON or on the command line (``--resume false`` arrives as a string)."""
    if isinstance(value, str):
        if value.strip().lower() in ("false", "no", "off", "0", "none", "null", ""):
            return False
        if value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        raise LesionDiffusionError(f"expected true or false, got {value!r}")
    return bool(value)


def one_line_errors() -> None:
    """Print input errors as one line (``error: file: problem``) instead of a traceback; exit status 1.

    Installed first thing in every config's ``initialize``; other exceptions keep their traceback.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        root = _root_error(exc)
        if root is None:
            previous(kind, exc, tb)
        else:
            print(f"error: {root}", file=sys.stderr)

    sys.excepthook = hook


from . import checkpoint, data, inference, trainer  # noqa: E402  (configs reach them as scripts.<module>)
