"""Prepare new scans for synthesis (design 4.1, inference side): the loop behind ``configs/inference.json``.

Per case, in ``<output_dir>/<case>/`` (``case_list`` names the cases, else ``case_<i>``; inputs are only read):

- ``image.nii.gz``: the CT on the standardised grid (RAS, 1 mm; HU) from the config's MONAI
  ``standardise`` chain, and ``geometry.json``: the input's grid, to write results back onto it. With a
  given organ map and ``crop_margin_mm`` set (the default), only the organ's neighbourhood (its box
  grown by ``crop_margin_mm``) of that grid is resampled (:mod:`lesiondiffusion.pipelines.standard_grid`):
  the same voxels the whole standardised scan holds there, without standardising the whole scan;
- ``source_image.nii.gz``, only for a DICOM series folder or an NRRD file: the input as NIfTI on its own
  grid (RAS+ affine from the reader's metadata, HU after rescale slope/intercept); the manifest's
  ``source_image`` points to it (``input_image`` to the user's input), so later stages write onto it;
- ``organ_seg.nii.gz``: the organ map on that grid, v1 numbering (:mod:`lesiondiffusion.pipelines.segment`; a user's map in
  v1 or v2 numbering, told from its labels and anatomy unless ``organ_seg_version`` says which, or the
  case's line of ``organ_seg_version_list`` declares it);
- ``lesion_<k>.json`` for each of ``num_lesions`` lesions: the full report (``type.json`` format, user
  attributes win over generated ones) whose box (element 3) was placed by the organ-aware rules of
  :mod:`lesiondiffusion.placement`;

and ``<output_dir>/manifest.json`` (:mod:`lesiondiffusion.manifest`) listing every case in input order.

The output folder is built beside its place and renamed into it when at least one case is prepared.
A case that fails in a batch is reported, kept in the manifest with its error, and skipped; the run then
ends with one line naming the failed cases (:mod:`lesiondiffusion.pipelines.cases`, exit 1). Nothing is
written when no case succeeds or the inputs as a whole are malformed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lesiondiffusion.attributes import AORTA, PORTAL_VEIN, ScanContext, contrast_phase
from lesiondiffusion.errors import InputError, LesionDiffusionError, exit_on_user_error
from lesiondiffusion.geometry import cast_to, record_geometry, same_grid, write_geometry
from lesiondiffusion.io import as_nifti, atomic_dir, load_nifti, read_stored, save_nifti, user_path
from lesiondiffusion.labels import is_hollow, label_table, mask_bounds
from lesiondiffusion.manifest import MANIFEST_NAME, CaseEntry, LesionEntry, Manifest, write_manifest
from lesiondiffusion.pipelines.cases import case_seed, failed_cases_error
from lesiondiffusion.pipelines.preprocess_inputs import CaseRequest, read_requests
from lesiondiffusion.pipelines.segment import OrganSegmenter
from lesiondiffusion.pipelines.standard_grid import box_on_grid, resample_region, standard_grid
from lesiondiffusion.placement import DEFAULT_EROSION, Box, bounding_box, place_box
from lesiondiffusion.report import Report, write_report
from lesiondiffusion.reports.extraction import measure_scan, organ_reference_hu, vessel_hu
from lesiondiffusion.reports.generation import complete_report
from lesiondiffusion.settings import default, flag
from lesiondiffusion.vocabulary import CAVITY

logger = logging.getLogger(__name__)

IMAGE_NAME = "image.nii.gz"
ORGAN_SEG_NAME = "organ_seg.nii.gz"
GEOMETRY_NAME = "geometry.json"
SOURCE_NAME = "source_image.nii.gz"  # a DICOM series' or NRRD input's NIfTI: the grid outputs are written on
SEG_INPUT_NAME = ".organ_seg_input.nii.gz"  # a non-NIfTI organ map, removed once standardised
DEFAULT_CROP_MARGIN_MM = float(default("preprocess", "crop_margin_mm", "cpu"))
VESSEL_MARGIN = 3  # voxels around a vessel's box: its lumen measure erodes by one


class PreprocessRunner:
    """Runs every case of a request list and writes the output folder (see the module docstring)."""

    def __init__(
        self,
        output_dir: str | None,
        standardise: Callable[[dict[str, Any]], dict[str, Any]],
        segmenter: OrganSegmenter,
        provider: Any,
        image: str | None = None,
        image_list: str | None = None,
        attributes: Any = None,
        attributes_list: str | None = None,
        organ_seg: str | None = None,
        organ_seg_list: str | None = None,
        organ_seg_version_list: str | None = None,
        case_list: str | None = None,
        seed: int = 0,
        num_lesions: int = 1,
        erosion: float = DEFAULT_EROSION,
        axcodes: str = "RAS",
        pixdim: Sequence[float] = (1.0, 1.0, 1.0),
        overwrite: bool = False,
        exit_on_error: bool = True,
        crop_margin_mm: float | None = DEFAULT_CROP_MARGIN_MM,
    ) -> None:
        self.output_dir = output_dir
        self.standardise, self.segmenter, self.provider = standardise, segmenter, provider
        self.inputs = dict(
            image=image,
            image_list=image_list,
            attributes=attributes,
            attributes_list=attributes_list,
            organ_seg=organ_seg,
            organ_seg_list=organ_seg_list,
            organ_seg_version_list=organ_seg_version_list,
            case_list=case_list,
        )
        self.seed, self.num_lesions, self.erosion = int(seed), int(num_lesions), float(erosion)
        self.axcodes, self.pixdim = axcodes, tuple(float(p) for p in pixdim)
        self.overwrite, self.exit_on_error = flag(overwrite), flag(exit_on_error)
        self.crop_margin_mm = None if crop_margin_mm in (None, "") else float(crop_margin_mm)

    # ---- entry point ---------------------------------------------------------------------------------
    def run(self) -> Path:
        """Prepare every case; returns the manifest path. A user error is one line on stderr + exit 1."""
        return exit_on_user_error(self._run, "preprocess", self.exit_on_error)

    def _run(self) -> Path:
        if not self.output_dir:
            raise LesionDiffusionError("set output_dir (--output_dir DIR)")
        if self.num_lesions < 1:
            raise LesionDiffusionError(f"num_lesions must be at least 1, got {self.num_lesions}")
        out = user_path(str(self.output_dir)).absolute()
        requests = read_requests(**self.inputs)
        self._check_output(out, requests)

        entries: list[CaseEntry] = []
        errors: dict[str, str] = {}
        # everything is written into a sibling folder that becomes ``out`` only at the end
        # replaced only when told to, or when it was the empty folder _check_output let through: a folder
        # that appears meanwhile is never deleted without overwrite
        with atomic_dir(out, overwrite=bool(self.overwrite) or out.exists()) as tmp:
            for request in tqdm(requests, desc="preprocess", unit="case", disable=None):
                name = request.name
                try:
                    with atomic_dir(tmp / name) as folder:
                        entry = self._prepare(request, name, folder, out / name)
                    entries.append(_moved(entry, folder, tmp / name))
                    logger.info("%s: %s -> %s (%d lesion(s))", name, request.image, out / name, len(entry.lesions))
                except Exception as e:  # one bad case never stops the others
                    message = _one_line(e)
                    if not isinstance(e, LesionDiffusionError):
                        logger.debug("%s failed", name, exc_info=True)
                    errors[name] = message
                    if len(requests) > 1:
                        logger.error("%s skipped: %s", name, message)
                    entries.append(CaseEntry(name, source_image=request.image.absolute()).failed(message))
            if len(errors) == len(requests):  # nothing to pass on: no output at all
                first = next(iter(errors.values()))
                raise LesionDiffusionError(
                    first if len(errors) == 1 else f"all {len(errors)} cases failed; first: {first}"
                )
            write_manifest(tmp / MANIFEST_NAME, Manifest(tuple(entries)))
        ok = len(requests) - len(errors)
        logger.info("%d of %d case(s) prepared in %s; manifest %s", ok, len(requests), out, out / MANIFEST_NAME)
        error = failed_cases_error(errors, len(requests), out / MANIFEST_NAME)
        if error is not None:  # the others are prepared and in the manifest
            raise error
        return out / MANIFEST_NAME

    def _check_output(self, out: Path, requests: list[CaseRequest]) -> None:
        if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not self.overwrite:
            raise InputError(out, "output folder already exists and is not empty (set overwrite true to replace it)")
        for request in requests:
            for path in (request.image, request.organ_seg):
                if path is not None and (out == path.absolute() or out in path.absolute().parents):
                    raise InputError(path, f"input lies inside the output folder {out}; inputs are never replaced")

    # ---- one case ------------------------------------------------------------------------------------
    def _prepare(self, request: CaseRequest, name: str, folder: Path, final: Path | None = None) -> CaseEntry:
        """One case into ``folder``, which becomes ``final`` (where the recorded source image will lie)."""
        final = folder if final is None else final
        # a DICOM series or NRRD file becomes a NIfTI inside the case folder: the grid later stages paste onto
        image_path = as_nifti(request.image, folder, SOURCE_NAME)
        converted = image_path != request.image
        header = load_nifti(image_path, ndim=3)  # unreadable or 4D: one-line error before MONAI sees it
        seg_path = None
        if request.organ_seg is not None:
            seg_path = as_nifti(request.organ_seg, folder, SEG_INPUT_NAME, label=True)
            seg_header = load_nifti(seg_path, ndim=3)
            if not same_grid(seg_header.affine, seg_header.shape, header.affine, header.shape):
                if sorted(seg_header.shape[:3]) != sorted(header.shape[:3]):
                    raise InputError(
                        request.organ_seg,
                        f"organ map shape {seg_header.shape[:3]} differs from the image's {header.shape[:3]}",
                    )
                raise InputError(request.organ_seg, f"organ map affine differs from the image's ({request.image})")

        if seg_path is not None and self.crop_margin_mm is not None and not self.segmenter.prefer_totalseg:
            hu, affine, seg, seg_source, seg_version, scan = self._standardise_region(request, image_path, seg_path)
        else:
            hu, affine, seg, seg_source, seg_version, scan = self._standardise_scan(request, image_path, seg_path)
        if seg_path is not None and seg_path != request.organ_seg and seg_path.exists():
            seg_path.unlink()  # a converted organ map is only read through the standardised copy
        organ = seg == request.organ_id
        logger.info("%s: %s", name, scan.describe())
        fallbacks = len(getattr(self.provider, "fallbacks", []))
        lesions = self._lesions(request, organ, folder, scan)

        dtype = np.int16 if np.issubdtype(header.get_data_dtype(), np.integer) else np.float32
        save_nifti(folder / IMAGE_NAME, cast_to(hu, dtype), affine)
        save_nifti(folder / ORGAN_SEG_NAME, seg.astype(np.uint8), affine)
        geometry = record_geometry(image_path, affine, hu.shape, axcodes=self.axcodes, pixdim=self.pixdim)
        source = final.absolute() / SOURCE_NAME if converted else image_path.absolute()
        if converted:
            geometry = replace(geometry, path=str(source))
        write_geometry(folder / GEOMETRY_NAME, geometry)
        extra: dict[str, Any] = {
            "organ_seg_source": seg_source,
            "organ_seg_version": seg_version,
            "request": request.attributes,
        }
        if converted:
            extra["input_image"] = str(request.image.absolute())  # the user's series or file; source_image is its NIfTI
        return CaseEntry(
            name,
            source_image=source,
            geometry=folder / GEOMETRY_NAME,
            image=folder / IMAGE_NAME,
            organ_seg=folder / ORGAN_SEG_NAME,
            lesions=tuple(lesions),
            extra={**extra, "scan": scan.to_json(), **_provider_record(self.provider, fallbacks)},
        )

    def _standardise_scan(
        self, request: CaseRequest, image_path: Path, seg_path: Path | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, str, ScanContext]:
        """The whole scan on the standardised grid (the config's ``standardise`` chain), its v1 organ map
        (given or segmented), and the scan measured there."""
        data = {"image": str(image_path)}
        if seg_path is not None:
            data["organ_seg"] = str(seg_path)
        try:
            std = self.standardise(data)
        except Exception as e:  # truncated gzip and other decoding errors surface only here
            cause = e.__cause__ or e
            raise InputError(
                request.image, f"cannot be read or standardised ({type(cause).__name__}: {_one_line(cause)})"
            ) from None
        if seg_path is not None and seg_path != request.organ_seg:
            seg_path.unlink()  # only read through the standardised copy below
        image = std["image"]
        affine = np.asarray(image.affine, dtype=np.float64)
        hu = image[0].detach().cpu().numpy().astype(np.float32)
        given = std["organ_seg"][0].detach().cpu().numpy() if "organ_seg" in std else None
        seg, seg_source, seg_version = self.segmenter.segment(
            hu, affine, given, request.image, request.organ_seg, declared=request.organ_seg_version
        )

        self._check_organ(request, seg_source, seg, seg == request.organ_id)
        # the organ's HU and the contrast phase, measured on the standardised grid (1 mm; v1 ids, as segmented)
        scan = measure_scan(hu, seg, request.organ_id, "v1", self.pixdim)
        return hu, affine, seg, seg_source, seg_version, scan

    def _standardise_region(
        self, request: CaseRequest, image_path: Path, seg_path: Path
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, str, ScanContext]:
        """The organ's neighbourhood on the standardised grid, its v1 organ map and the scan measured there.

        The organ map's numbering is told and converted on the input grid; the organ's box, grown by
        ``crop_margin_mm``, is resampled from the input voxels it needs; the aorta and portal vein (the
        contrast phase) are measured on small standardised boxes of their own. Same voxels, same numbers
        as the whole-scan path.
        """
        try:
            stored = read_stored(image_path)
        except InputError as e:  # truncated gzip and other decoding errors surface only here
            raise InputError(request.image, f"cannot be read or standardised: {e.problem}") from None
        raw, scale = stored.raw, (stored.slope, stored.inter)
        given = read_stored(seg_path).raw
        hu_in = stored.values()
        seg_in, seg_source, seg_version = self.segmenter.segment(
            hu_in, stored.affine, given, request.image, request.organ_seg,
            declared=request.organ_seg_version,
        )  # fmt: skip
        del hu_in, given
        organ_in = seg_in == request.organ_id
        self._check_organ(request, seg_source, seg_in, organ_in)
        src_affine = stored.affine
        std_affine, std_shape = standard_grid(src_affine, raw.shape, self.axcodes, self.pixdim)
        margin = self.crop_margin_mm / min(self.pixdim)

        def region(mask: np.ndarray, grow: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            first, last = mask_bounds(mask)
            start, stop = box_on_grid(first, last + 1, src_affine, std_affine, std_shape, grow)
            hu = resample_region(raw, src_affine, std_affine, start, stop, "bilinear", scale)
            seg = np.rint(resample_region(seg_in, src_affine, std_affine, start, stop, "nearest")).astype(np.uint8)
            return hu, seg, start

        hu, seg, start = region(organ_in, margin)
        shift = np.eye(4)
        shift[:3, 3] = start
        table = label_table("v1")
        vessels = []
        for vessel in (AORTA, PORTAL_VEIN):
            inside = seg_in == table.id(vessel)
            if not inside.any():
                vessels.append(None)
                continue
            v_hu, v_seg, _ = region(inside, VESSEL_MARGIN)
            vessels.append(vessel_hu(v_hu, v_seg == table.id(vessel), self.pixdim))
        organ_hu = organ_reference_hu(hu, seg == request.organ_id, self.pixdim)
        scan = ScanContext(request.organ_name, organ_hu, contrast_phase(*vessels), *vessels)
        return hu, std_affine @ shift, seg, seg_source, seg_version, scan

    def _check_organ(self, request: CaseRequest, seg_source: str, seg: np.ndarray, organ: np.ndarray) -> None:
        """The requested organ must be in the organ map."""
        if not organ.any():
            where = request.organ_seg if seg_source == "given" else request.image
            found = ", ".join(str(i) for i in np.unique(seg)[1:8]) or "none"
            raise InputError(
                where,
                f"organ {request.organ_name!r} (TotalSegmentator v1 label {request.organ_id}) is absent from the organ segmentation (v1 labels present: {found})",
            )

    def _lesions(self, request: CaseRequest, organ: np.ndarray, folder: Path, scan: ScanContext) -> list[LesionEntry]:
        """Report + box for each lesion, seeded per case by its name (same seed, name and inputs, same boxes,
        wherever the case stands in the batch); the reports agree with what ``scan`` measured (organ HU,
        contrast phase)."""
        rng = np.random.default_rng(case_seed(self.seed, request.name))
        organ_box = bounding_box(organ).size
        hollow = is_hollow(request.organ_id)
        boxes: list[Box] = []
        entries = []
        for k in range(self.num_lesions):
            proposed = self.provider.propose(
                request.attributes, request.organ_name, rng, organ_box_size=organ_box, scan=scan
            )
            report = complete_report(request.attributes, request.organ_id, organ_box, proposed, rng, scan=scan)
            cavity = report.attributes[CAVITY]
            _, size = report.array_box()
            box = place_box(organ, cavity, size, rng, hollow, avoid=boxes, erosion=self.erosion)
            boxes.append(box)
            report = report.with_array_box(box.centre, box.size)
            path = folder / f"lesion_{k}.json"
            write_report(path, Report((report,)))
            entries.append(LesionEntry(request.organ_id, cavity, path, box))
        return entries


def _provider_record(provider: Any, since: int) -> dict[str, Any]:
    """The report provider's endpoint and this case's fallbacks (those after the first ``since``), for provenance."""
    if not hasattr(provider, "record"):
        return {"report_provider": {"provider": getattr(provider, "name", "offline")}}
    record = provider.record()
    return {"report_provider": {**record, "fallbacks": record.get("fallbacks", [])[since:]}}


def _moved(entry: CaseEntry, old: Path, new: Path) -> CaseEntry:
    """The entry with paths under ``old`` (the case's temporary folder) re-rooted at ``new``."""

    def move(p: Path | None) -> Path | None:
        return None if p is None or old not in p.parents else new / p.relative_to(old)

    lesions = tuple(LesionEntry(e.organ_id, e.cavity, move(e.report), e.box, e.extra) for e in entry.lesions)  # type: ignore[arg-type]
    return CaseEntry(
        entry.case,
        entry.status,
        source_image=entry.source_image,
        geometry=move(entry.geometry),
        image=move(entry.image),
        organ_seg=move(entry.organ_seg),
        lesions=lesions,
        extra=entry.extra,
    )


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__
