"""Optional dependencies: a feature whose extra is missing says so in one line, naming the pip command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lesiondiffusion.data_paths import REPO_ROOT
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.extras import available, require

TS_SMALL = REPO_ROOT / "tests" / "data" / "ts_small"


def blocker(tmp_path: Path, module: str) -> Path:
    """A folder that, first on the import path, makes ``import module`` fail as if it were not installed."""
    pkg = tmp_path / "blocked" / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"raise ModuleNotFoundError({f'No module named {module!r}'!r})\n")
    return pkg.parent


def test_require_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert require("llm", "x").__name__ == "openai" and available("llm")
    monkeypatch.syspath_prepend(str(blocker(tmp_path, "openai")))
    monkeypatch.delitem(sys.modules, "openai", raising=False)
    with pytest.raises(LesionDiffusionError) as err:
        require("llm", "the openai report provider")
    message = str(err.value)
    assert "\n" not in message and "'openai'" in message and "pip install 'lesiondiffusion-monai[llm]'" in message
    assert not available("totalseg") or require("totalseg", "x") is not None


def test_openai_provider_without_the_extra_is_one_line(tmp_path: Path) -> None:
    """The whole command: the case fails with the install line, no traceback, exit status 1."""
    env = {**os.environ, "PYTHONPATH": str(blocker(tmp_path, "openai")), "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable, "-m", "lesiondiffusion_tools.cli", "synthesize", "--image", str(TS_SMALL / "example_ct_sm.nii.gz"),
        "--organ_seg", str(TS_SMALL / "example_seg.nii.gz"), "--organ", "liver", "--lesion_type", "cyst",
        "--report_provider", "openai", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (case,) = summary["cases"]
    assert case["status"] == "error" and "lesiondiffusion-monai[llm]" in case["error"], case
