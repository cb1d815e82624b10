"""Bundle and command-line runs in the test process, for checks of what a run says or writes rather than
how a process ends.

A process start (torch and MONAI imports) costs seconds of CPU; the exit status and stderr of a real
``python -m monai.bundle run`` are checked once per bundle, further error messages in process; the
command line's own process behaviour (exit status, one line on stderr, signals) is checked in
``tests/cli/test_battery.py`` and ``tests/cli/test_faults.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import subprocess
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


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``lesiondiffusion ARGS`` through its entry point in this process: the exit status, stdout and stderr a
    child process would give (its log records go to pytest's log capture, not to stderr)."""
    from lesiondiffusion_tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}  # main installs its own
    handlers = list(logging.getLogger().handlers)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        for sig, handler in signals.items():
            signal.signal(sig, handler)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)  # a basicConfig handler bound to the redirected stream
    return subprocess.CompletedProcess(["lesiondiffusion", *args], code, out.getvalue(), err.getvalue())
