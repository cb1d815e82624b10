"""``pip install .`` (a built wheel, not editable) gives a working ``lesiondiffusion`` with its bundles and data.

The wheel is built offline from a copy of the source tree (``pip wheel --no-deps --no-build-isolation``)
and installed with ``--no-deps`` into a fresh virtual environment. That environment sees the test
environment's third-party packages through a path file, but not its editable install of this project
(path files inside an added folder are not run), so every ``lesiondiffusion`` import, bundle, weight and
resource comes from the wheel. The command runs outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from lesiondiffusion.data_paths import REPO_ROOT

TS_SMALL = REPO_ROOT / "tests" / "data" / "ts_small"
EXCLUDED = ("runs/", "demo_output/", "mutants/")


def source_files() -> list[str]:
    """The tracked and untracked-but-not-ignored files of the source tree (what a checkout holds)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and not f.startswith(EXCLUDED) and (REPO_ROOT / f).is_file()]


def build_wheel(dest: Path) -> Path:
    """A wheel of the project built from a clean copy of the source tree (the working tree is not written)."""
    src = dest / "src"
    for name in source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, src / name)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        str(dest / "dist"),
        str(src),
    ]
    subprocess.run(pip, check=True, capture_output=True, cwd=dest)
    (wheel,) = (dest / "dist").glob("lesiondiffusion_monai-*.whl")
    return wheel


def wheel_venv(dest: Path, wheel: Path) -> Path:
    """A fresh venv holding the wheel; third-party packages come from this interpreter's site-packages."""
    venv = dest / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (purelib / "third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    pip = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(venv / "bin" / "python"),
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        str(wheel),
    ]
    subprocess.run(pip, check=True, capture_output=True)
    return venv


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    dest = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(dest)
    return {"wheel": wheel, "venv": wheel_venv(dest, wheel), "dest": dest}


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_carries_bundles_data_and_every_module(installed: dict) -> None:
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for path in (REPO_ROOT / "bundles").rglob("*"):
        rel = path.relative_to(REPO_ROOT).as_posix()
        if path.is_file() and "__pycache__" not in rel and rel in source_files():
            assert f"lesiondiffusion/{rel}" in names, rel
    assert "lesiondiffusion/data/ts_example/example_ct.nii.gz" in names
    assert "lesiondiffusion/resources/description.json" in names
    # every module of the source tree imports from the installed wheel (a sub-package missing from
    # pyproject's package list fails here), and the bundles and data are the installed ones
    src = installed["dest"] / "src"
    modules = sorted(
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__")
        for p in (src / "lesiondiffusion").rglob("*.py")
    )
    modules += [f"lesiondiffusion_tools.{p.stem}" for p in (src / "tools").glob("*.py") if p.stem != "__init__"]
    venv = installed["venv"]
    code = (
        "import importlib, json, sys; mods = json.loads(sys.argv[1]); [importlib.import_module(m) for m in mods];"
        "import lesiondiffusion, lesiondiffusion.data_paths as d;"
        "print(json.dumps([lesiondiffusion.__file__, str(d.BUNDLES), str(d.TS_EXAMPLE_CT), d.TS_EXAMPLE_CT.is_file()]))"
    )
    res = run(venv, str(venv / "bin" / "python"), "-c", code, json.dumps(modules), cwd=installed["dest"])
    assert res.returncode == 0, res.stderr[-3000:]
    init, bundles, ct, ct_exists = json.loads(res.stdout.strip().splitlines()[-1])
    for path in (init, bundles, ct):
        assert Path(path).is_relative_to(venv), path
    assert ct_exists and (Path(bundles) / "linet" / "models" / "model.pt").is_file()


def test_installed_command_synthesizes_outside_the_repository(installed: dict, tmp_path: Path) -> None:
    venv = installed["venv"]
    exe = str(venv / "bin" / "lesiondiffusion")
    helped = run(venv, exe, "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "synthesize" in helped.stdout + helped.stderr
    attrs = {"organ type": "liver", "lesion type": "cyst", "density": "hypodense", "size": "15 mm"}
    res = run(
        venv, exe, "synthesize", "--image", str(TS_SMALL / "example_ct_sm.nii.gz"), "--organ_seg", str(TS_SMALL / "example_seg.nii.gz"),
        "--attributes", json.dumps(attrs), "--steps", "2", "--out", "out", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    case = tmp_path / "out" / "example_ct_sm"
    for name in ("image.nii.gz", "label.nii.gz", "report.json", "provenance.json", "preview.png"):
        assert (case / name).is_file(), name
    # the three shipped networks were read from the installed package, not from the repository
    text = json.dumps(json.loads((case / "provenance.json").read_text()))
    site = str(venv / "lib")
    assert text.count(site + "/") >= 3 and str(REPO_ROOT / "bundles") not in text
