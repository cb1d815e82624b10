"""Optional dependencies (the wheel's extras): one clear line when a feature's package is missing.

``pip install 'lesiondiffusion-monai[llm]'`` brings ``openai`` (the ``openai`` report provider),
``[totalseg]`` brings TotalSegmentator (organ maps when none is given), ``[deploy]`` the MONAI Deploy
application's SDK. From a source checkout the same extras install with ``pip install '.[llm]'``.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from lesiondiffusion.errors import LesionDiffusionError

#: extra name -> the importable module that stands for it
EXTRAS = {"llm": "openai", "totalseg": "totalsegmentator", "deploy": "monai.deploy"}


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f"pip install 'lesiondiffusion-monai[{extra}]' (from a source checkout: pip install '.[{extra}]')"


def available(extra: str) -> bool:
    """Whether the package behind ``extra`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(EXTRAS[extra]) is not None
    except ModuleNotFoundError:  # a dotted name whose parent is missing
        return False


def require(extra: str, purpose: str) -> ModuleType:
    """Import the module behind ``extra``, or raise one line naming ``purpose`` and how to install it."""
    module = EXTRAS[extra]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LesionDiffusionError(
            f"{purpose} needs the optional package {module!r}, not installed: {install_hint(extra)}"
        ) from None
