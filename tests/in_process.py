"""Bundle runs in the test process, for checks of what a run says rather than how a process ends.

A process start (torch and MONAI imports) costs seconds of CPU; the exit status and stderr of a real
``python -m monai.bundle run`` are checked once per bundle, and further error messages in process.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lesiondiffusion_tools.bundle_runner import BundleRunError, run_bundle_in_process


def overrides_of(args: list[str]) -> dict[str, Any]:
    """``["--key", "value", ...]`` command-line overrides as a dict (JSON values parsed, other text kept)."""
    out: dict[str, Any] = {}
    for key, text in zip(args[::2], args[1::2]):
        try:
            out[key.removeprefix("--")] = json.loads(text)
        except json.JSONDecodeError:
            out[key.removeprefix("--")] = text
    return out


def error_line(stage: str, overrides: dict[str, Any], configs: tuple[str, ...] = ("inference.json",)) -> str:
    """The one ``error: ...`` line the ``stage`` bundle's run ends with (the run must fail)."""
    with pytest.raises(BundleRunError) as info:
        run_bundle_in_process(stage, {k: v for k, v in overrides.items() if v is not None}, configs)
    line = str(info.value)
    assert line.startswith("error: ") and "\n" not in line, line
    return line
