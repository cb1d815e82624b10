"""One-line user errors (lesiondiffusion.errors) and boolean settings (lesiondiffusion.settings)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lesiondiffusion.errors import InputError, LesionDiffusionError, user_error
from lesiondiffusion.settings import flag


def test_user_errors_found_behind_wrapping_errors():
    try:
        try:
            raise InputError("x.json", "bad")
        except InputError as e:
            raise RuntimeError("Failed to instantiate") from e
    except RuntimeError as wrapped:
        assert isinstance(user_error(wrapped), InputError)
    assert user_error(ValueError("other")) is None
    assert user_error(None) is None


HOOKED = """
import sys
from lesiondiffusion.errors import InputError, install_error_hook
install_error_hook()
try:
    raise InputError("x.json", "bad\\nvalue", line=3)
except InputError as e:
    if sys.argv[1] == "user":
        raise RuntimeError("Failed to instantiate component") from e
raise ValueError("a bug")
"""


@pytest.mark.parametrize("kind", ["user", "bug"])
def test_error_hook_prints_user_errors_as_one_line(kind):
    run = subprocess.run([sys.executable, "-c", HOOKED, kind], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    if kind == "user":
        assert run.stderr == "error: x.json:3: bad value\n"  # the root error, on one line, no traceback
    else:
        assert "Traceback" in run.stderr and "ValueError: a bug" in run.stderr  # not a user error: kept


def test_boolean_settings_from_the_command_line():
    values = ("false", "False", " no ", "off", "0", "", "none", "true", "TRUE", "yes", "on", "1", True, False, 0, 1)
    assert [flag(v) for v in values] == [False] * 7 + [True] * 5 + [True, False, False, True]
    with pytest.raises(LesionDiffusionError, match="expected true or false, got 'maybe'"):
        flag("maybe")
