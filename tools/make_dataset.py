"""``lesiondiffusion make-dataset``: phantom CTs with lesions of known attributes, for training or evaluation.

Training mode writes ``cases/<case>/`` (image, label, organ map, ``type.json``), the four list files per
split and ``datalist.json``; ``--requests`` writes held-out synthesis requests instead (lesion-free
phantoms, their organ maps and ``requests.json``, three requests per image differing only in density).
The demo organ maps (``data/demo`` in the repository, or ``--src``) are the only input.
"""

from __future__ import annotations

from pathlib import Path

from lesiondiffusion.data_paths import DEMO_DATA
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.settings import flag

DEMO_SOURCE = DEMO_DATA


def run_make_dataset(
    n: int,
    out: str,
    seed: int = 0,
    requests: bool = False,
    src: str | None = None,
    val_fraction: float = 0.2,
    overwrite: bool = False,
) -> Path:
    """Build the dataset (or the requests with ``requests=True``) into ``out``; returns the file to use next."""
    from lesiondiffusion.phantom_dataset import build_dataset, build_requests

    source = Path(src) if src is not None else DEMO_SOURCE
    if not source.is_dir():
        raise LesionDiffusionError(f"{source}: demo data folder not found (pass --src DIR)")
    if isinstance(n, bool) or not isinstance(n, int):
        raise LesionDiffusionError(f"--n must be a whole number of cases, got {n!r}")
    if flag(requests):
        folder = build_requests(source, Path(out), int(n), seed=int(seed), overwrite=flag(overwrite))
        return folder / "requests.json"
    folder = build_dataset(source, Path(out), int(n), seed=int(seed), val_fraction=float(val_fraction), overwrite=flag(overwrite))
    return folder / "datalist.json"
