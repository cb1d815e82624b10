"""``lesiondiffusion make-dataset``: CTs with lesions of known attributes, for training or evaluation.

``--source phantom`` (the default) paints phantom CTs from the demo organ maps; ``--source real --corpus
DIR`` writes lesions into the real scans of a corpus (``lesiondiffusion fetch-data``), adds the corpus's
real lesions and holds out whole scans, with synthesis requests on them (:mod:`lesiondiffusion.real_dataset`).

Training mode writes ``cases/<case>/`` (image, label, organ map, ``type.json``), the four list files per
split and ``datalist.json``; ``--requests`` writes held-out synthesis requests instead (lesion-free
phantoms, their organ maps and ``requests.json``, three requests per image differing only in density).
The demo organ maps (``data/demo`` in the repository, or ``--src``) are the only input.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lesiondiffusion.data_paths import DEMO_DATA
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.io import check_inputs_outside, output_lock, user_path
from lesiondiffusion.settings import flag

DEMO_SOURCE = DEMO_DATA


def _scan_ids(value: str | Sequence[str] | None) -> list[str] | None:
    """``--val_scans a,b`` (fire may hand over a string or a tuple) as a list of ids."""
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [p.strip() for p in parts if p.strip()]


def run_make_dataset(
    n: int | None,
    out: str,
    seed: int = 0,
    requests: bool = False,
    src: str | None = None,
    val_fraction: float = 0.2,
    overwrite: bool = False,
    source: str = "phantom",
    corpus: str | None = None,
    val_scans: str | Sequence[str] | None = None,
    lesions_per_scan: int = 8,
    requests_per_scan: int = 2,
    segmenter: str = "auto",
) -> Path:
    """Build the dataset (or the requests with ``requests=True``) into ``out``; returns the file to use next."""
    inputs = [user_path(p) for p in (src if src is not None else DEMO_SOURCE, corpus) if p is not None]
    check_inputs_outside(user_path(out), inputs)  # --overwrite would delete them
    with output_lock(user_path(out).absolute(), flag(overwrite), "make-dataset"):  # one writer per output folder
        return _run_make_dataset(
            n,
            out,
            seed,
            requests,
            src,
            val_fraction,
            overwrite,
            source,
            corpus,
            val_scans,
            lesions_per_scan,
            requests_per_scan,
            segmenter,
        )


def _run_make_dataset(
    n: int | None, out: str, seed: int, requests: bool, src: str | None, val_fraction: float, overwrite: bool, source: str,
    corpus: str | None, val_scans: str | Sequence[str] | None, lesions_per_scan: int, requests_per_scan: int, segmenter: str,
) -> Path:  # fmt: skip
    if source == "real":
        return _run_real(
            out,
            seed,
            requests,
            corpus,
            val_fraction,
            overwrite,
            val_scans,
            lesions_per_scan,
            requests_per_scan,
            segmenter,
        )
    if source != "phantom":
        raise LesionDiffusionError(f"--source must be phantom or real, not {source!r}")
    if n is None:
        raise LesionDiffusionError("--n (number of phantom cases) is required with --source phantom")
    from lesiondiffusion.phantom_dataset import build_dataset, build_requests

    source = Path(src) if src is not None else DEMO_SOURCE
    if not source.is_dir():
        raise LesionDiffusionError(f"{source}: demo data folder not found (pass --src DIR)")
    if isinstance(n, bool) or not isinstance(n, int):
        raise LesionDiffusionError(f"--n must be a whole number of cases, got {n!r}")
    if flag(requests):
        folder = build_requests(source, Path(out), int(n), seed=int(seed), overwrite=flag(overwrite))
        return folder / "requests.json"
    folder = build_dataset(
        source, Path(out), int(n), seed=int(seed), val_fraction=float(val_fraction), overwrite=flag(overwrite)
    )
    return folder / "datalist.json"


def _run_real(
    out: str,
    seed: int,
    requests: bool,
    corpus: str | None,
    val_fraction: float,
    overwrite: bool,
    val_scans: str | Sequence[str] | None,
    lesions_per_scan: int,
    requests_per_scan: int,
    segmenter: str,
) -> Path:
    from lesiondiffusion.real_dataset import build_real_dataset

    if corpus is None:
        raise LesionDiffusionError("--source real needs --corpus DIR (a folder made by lesiondiffusion fetch-data)")
    if not Path(corpus).is_dir():
        raise LesionDiffusionError(f"{corpus}: corpus folder not found")
    if isinstance(lesions_per_scan, bool) or not isinstance(lesions_per_scan, int):
        raise LesionDiffusionError(f"--lesions_per_scan must be a whole number, got {lesions_per_scan!r}")
    folder = build_real_dataset(
        Path(corpus), Path(out), lesions_per_scan=lesions_per_scan, seed=int(seed), val_scans=_scan_ids(val_scans),
        val_fraction=float(val_fraction), requests_per_scan=int(requests_per_scan), segmenter=segmenter,
        overwrite=flag(overwrite),
    )  # fmt: skip
    # the real dataset always writes both: --requests only chooses which file is printed
    return folder / "requests" / "requests.json" if flag(requests) else folder / "datalist.json"
