"""``lesiondiffusion preprocess``: run the preprocess bundle's ``configs/inference.json`` in its own process.

The bundle runs through :func:`lesiondiffusion_tools.bundle_runner.run_bundle` (a child
``python -m monai.bundle run`` with the options as an ``--args_file``). Errors the bundle reports are
already one line on its stderr; this module only adds its own checks and passes the exit status on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.io import output_lock, user_path
from lesiondiffusion.manifest import MANIFEST_NAME
from lesiondiffusion.settings import flag
from lesiondiffusion_tools.bundle_runner import BundleRunError, run_bundle

PATH_KEYS = (
    "image",
    "image_list",
    "attributes_list",
    "organ_seg",
    "organ_seg_list",
    "organ_seg_version_list",
    "case_list",
    "output_dir",
)


# options whose command-line form must reach the bundle as a number / flag / name
CASTS = {"seed": int, "num_lesions": int, "overwrite": flag, "report_provider": str, "organ_seg_version": str}


def bundle_overrides(out: str | None = None, attributes: Any = None, **options: Any) -> dict[str, Any]:
    """The command's options as ``inference.json`` overrides (paths absolute, unset options left out).

    ``out`` is the bundle's ``output_dir``; every other option keeps its config key name.
    """
    if out is None:
        raise LesionDiffusionError("give the output folder: --out DIR")
    overrides = {k: v for k, v in options.items() if v is not None}
    overrides["output_dir"] = out
    for key, cast in CASTS.items():
        if key in overrides:
            overrides[key] = cast(overrides[key])
    for key in PATH_KEYS:
        if key in overrides:
            overrides[key] = str(user_path(str(overrides[key])).absolute())
    if attributes is not None:
        # a file name becomes absolute (the bundle runs from its own folder); JSON text and dicts pass as is
        text = attributes if isinstance(attributes, dict) else str(attributes)
        if isinstance(text, str) and not text.lstrip().startswith("{") and user_path(text).exists():
            text = str(user_path(text).absolute())
        overrides["attributes"] = text
    return overrides


def run_preprocess(**options: Any) -> Path:
    """Run the preprocess bundle with the command's ``options``; returns the manifest path.

    A failure the bundle reported (one line on its stderr, shown as it happens) ends this process with
    the bundle's exit status; a problem with the options themselves is a :class:`LesionDiffusionError`.
    When some cases of a batch failed, the others are prepared and in the manifest, and the bundle
    ends with one error line naming the failed ones (exit 1).
    """
    overrides = bundle_overrides(**options)
    try:
        # one writer per output folder; work folders killed runs left beside it are named (removed with --overwrite)
        with output_lock(overrides["output_dir"], flag(overrides.get("overwrite", False)), "preprocess"):
            run_bundle("preprocess", overrides)
    except BundleRunError as e:
        raise SystemExit(e.returncode) from None
    return Path(overrides["output_dir"]) / MANIFEST_NAME
