"""``lesiondiffusion preprocess``: run the preprocess bundle's ``configs/inference.json`` in its own process.

The bundle runs as ``python -m monai.bundle run`` in a child process (each bundle's ``scripts`` package
is imported only there; two bundles' ``scripts`` never meet in one process). The command's options
become the bundle's config overrides, written to a temporary ``--args_file`` so that paths and JSON
attributes reach the bundle verbatim. Errors the bundle reports are already one line on stderr; this
module only adds its own checks and passes the exit status on.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lesiondiffusion.errors import LesionDiffusionError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundles" / "preprocess"
PATH_KEYS = ("image", "image_list", "attributes_list", "organ_seg", "organ_seg_list", "output_dir")


def bundle_overrides(
    image: str | None = None,
    attributes: Any = None,
    out: str | None = None,
    organ_seg: str | None = None,
    image_list: str | None = None,
    attributes_list: str | None = None,
    organ_seg_list: str | None = None,
    seed: int = 0,
    num_lesions: int = 1,
    report_provider: str = "offline",
    overwrite: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """The command's options as ``inference.json`` overrides (paths absolute, unset options left out)."""
    if out is None:
        raise LesionDiffusionError("give the output folder: --out DIR")
    overrides: dict[str, Any] = {
        "image": image,
        "image_list": image_list,
        "attributes_list": attributes_list,
        "organ_seg": organ_seg,
        "organ_seg_list": organ_seg_list,
        "output_dir": out,
        "seed": int(seed),
        "num_lesions": int(num_lesions),
        "report_provider": str(report_provider),
        "overwrite": bool(overwrite),
        **extra,
    }
    for key in PATH_KEYS:
        if overrides.get(key) is not None:
            overrides[key] = str(Path(str(overrides[key])).expanduser().absolute())
    if attributes is not None:
        # a file name becomes absolute (the bundle runs from its own folder); JSON text and dicts pass as is
        text = attributes if isinstance(attributes, dict) else str(attributes)
        if isinstance(text, str) and not text.lstrip().startswith("{") and Path(text).expanduser().exists():
            text = str(Path(text).expanduser().absolute())
        overrides["attributes"] = text
    return {k: v for k, v in overrides.items() if v is not None}


def bundle_command(args_file: Path, bundle_root: Path = BUNDLE_ROOT) -> list[str]:
    """``python -m monai.bundle run`` for the bundle's inference config with an overrides file."""
    configs = bundle_root / "configs"
    return [
        sys.executable, "-m", "monai.bundle", "run",
        "--bundle_root", str(bundle_root),
        "--config_file", str(configs / "inference.json"),
        "--meta_file", str(configs / "metadata.json"),
        "--logging_file", str(configs / "logging.conf"),
        "--args_file", str(args_file),
    ]  # fmt: skip


def run_preprocess(bundle_root: Path = BUNDLE_ROOT, **options: Any) -> Path:
    """Run the preprocess bundle with the command's ``options``; returns the manifest path.

    A failure the bundle reported (one line on its stderr) ends this process with the bundle's exit
    status; a problem with the options themselves is a :class:`LesionDiffusionError`.
    """
    bundle_root = Path(bundle_root)
    if not (bundle_root / "configs" / "inference.json").is_file():
        raise LesionDiffusionError(f"{bundle_root}: preprocess bundle not found (configs/inference.json missing)")
    overrides = bundle_overrides(**options)
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")  # library warnings would bury the one-line error
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(bundle_root), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="lesiondiffusion-preprocess-") as tmp:
        args_file = Path(tmp) / "overrides.json"
        args_file.write_text(json.dumps(overrides), encoding="utf-8")
        rc = subprocess.run(bundle_command(args_file, bundle_root), cwd=bundle_root, env=env).returncode
    if rc != 0:
        raise SystemExit(rc)
    return Path(overrides["output_dir"]) / "manifest.json"
