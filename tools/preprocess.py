"""``lesiondiffusion preprocess``: run the preprocess bundle's ``configs/inference.json`` in its own process.

The bundle runs through :func:`lesiondiffusion_tools.bundle_runner.run_bundle` (a child
``python -m monai.bundle run`` with the options as an ``--args_file``). Errors the bundle reports are
already one line on its stderr; this module only adds its own checks and passes the exit status on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion_tools.bundle_runner import BundleRunError, run_bundle

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


def run_preprocess(**options: Any) -> Path:
    """Run the preprocess bundle with the command's ``options``; returns the manifest path.

    A failure the bundle reported (one line on its stderr, shown as it happens) ends this process with
    the bundle's exit status; a problem with the options themselves is a :class:`LesionDiffusionError`.
    """
    overrides = bundle_overrides(**options)
    try:
        run_bundle("preprocess", overrides)
    except BundleRunError as e:
        raise SystemExit(e.returncode) from None
    return Path(overrides["output_dir"]) / "manifest.json"
