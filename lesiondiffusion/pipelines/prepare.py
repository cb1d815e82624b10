"""Prepare a labelled dataset for training (design 4.1, train side): the loop behind ``configs/train.json``.

Input: per case a CT (HU), a label map (0 background, 1 organ, 2 lesion) and a TotalSegmentator organ
map, from a datalist JSON (its ``organ_seg_version`` declaration is honoured unless ``version`` is set) or
aligned list files; a report (``type.json``) per case is optional and only
names the lesion's organ. The config's MONAI chain (``LoadImaged`` + ``Orientationd`` + ``Spacingd``)
puts every case on the standardised grid (RAS, 1 mm). Output, in ``output_dir`` (written beside it and
renamed into place when every case succeeded; inputs are only read)::

    cases/<case>/image.nii.gz       CT, int16 HU (linear resampling, rounded)
    cases/<case>/label.nii.gz       label map, uint8 (nearest)
    cases/<case>/organ_seg.nii.gz   organ map (nearest), TotalSegmentator v1 numbering (v2 maps converted)
    cases/<case>/type.json          the report extracted from the three (lesiondiffusion.attributes)
    datalist.json                   {"organ_seg_version": "v1", "training": [...], "validation": [...]}, paths relative to it
    train_*_list.txt, val_*_list.txt   the original's aligned list files (absolute paths)
    measurements.json               the numbers behind each report (HU, mm, fractions), per case

All label-2 voxels of a case form one lesion (one report entry per organ, as in the original).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lesiondiffusion.dataset import (
    Case,
    datalist_version,
    holdout_indices,
    load_cases,
    validate_cases,
    write_datalist,
    write_list_files,
)
from lesiondiffusion.errors import InputError, LesionDiffusionError, exit_on_user_error
from lesiondiffusion.io import atomic_dir, save_nifti, voxel_spacing, write_json
from lesiondiffusion.labels import AUTO, choose_version, resolve_version, to_v1_map
from lesiondiffusion.report import Report, read_report, write_report
from lesiondiffusion.reports.extraction import measure_lesion, report_from_measurements
from lesiondiffusion.settings import flag

logger = logging.getLogger(__name__)

KEYS = ("image", "label", "organ_seg")
FILE_NAMES = {"image": "image.nii.gz", "label": "label.nii.gz", "organ_seg": "organ_seg.nii.gz", "report": "type.json"}
INT16_RANGE = (-32768, 32767)


def read_cases(
    datalist: str | None = None,
    image_list: str | None = None,
    label_list: str | None = None,
    seg_list: str | None = None,
    type_list: str | None = None,
) -> list[Case]:
    """The input cases, from a datalist (every split, in order) or from aligned list files.

    Every case needs an image, a label map and an organ map; a missing one is an error naming the case.
    """
    cases = load_cases(datalist, image_list, label_list, type_list, seg_list)
    if not cases:
        raise InputError(datalist or image_list, "no cases listed")
    for i, case in enumerate(cases):
        for key in ("label", "organ_seg"):
            if getattr(case, key) is None:
                where = datalist or image_list
                raise InputError(
                    where,
                    f"case {i} ({case.source or case.image}) has no {key}; training cases need image, label and organ_seg",
                )
    return cases


def case_names(cases: Sequence[Case]) -> list[str]:
    """A unique folder name per case: the image's file name, else its folder's name, else both, else an index."""
    stems = [_stem(c.image) for c in cases]
    folders = [Path(c.image).parent.name for c in cases]
    for names in (stems, folders, [f"{f}_{s}" for f, s in zip(folders, stems)]):
        if len(set(names)) == len(names) and all(names):
            return names
    return [f"case_{i:04d}_{s}" for i, s in enumerate(stems)]


def _stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class TrainingSetWriter:
    """Standardises every case, extracts its report and writes the training set (module docstring)."""

    def __init__(
        self,
        standardise: Callable[[dict[str, Any]], dict[str, Any]],
        output_dir: str | None,
        datalist: str | None = None,
        image_list: str | None = None,
        label_list: str | None = None,
        seg_list: str | None = None,
        type_list: str | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        version: str = AUTO,
        overwrite: bool = False,
        exit_on_error: bool = True,
    ) -> None:
        self.inputs = dict(
            datalist=datalist, image_list=image_list, label_list=label_list, seg_list=seg_list, type_list=type_list
        )
        self.cases: list[Case] = []
        self.standardise = standardise
        self.output_dir = output_dir
        self.val_fraction, self.split_seed = float(val_fraction), int(split_seed)
        self.version = version  # numbering of the given organ maps: v1, v2 or auto (told per map)
        self.versions: dict[str, str] = {}
        self.overwrite, self.exit_on_error = flag(overwrite), flag(exit_on_error)

    def run(self) -> Path:
        """Write the training set; returns its datalist. A user error is one line on stderr + exit 1."""
        return exit_on_user_error(self._run, "preparing the training set", self.exit_on_error)

    def _run(self) -> Path:
        if not self.output_dir:
            raise LesionDiffusionError("set output_dir (--output_dir DIR)")
        self.cases = read_cases(**self.inputs)
        datalist = self.inputs["datalist"]
        # an explicit version wins; else the numbering the datalist declares; else told per map
        self.version = choose_version(self.version, datalist_version(datalist) if datalist else None)
        out = Path(self.output_dir)
        inputs = {Path(p).resolve() for c in self.cases for p in c.files().values()}
        if any(out.resolve() == p or out.resolve() in p.parents for p in inputs):
            raise InputError(out, "output folder holds input files; inputs are never written")
        train_idx, val_idx = holdout_indices(len(self.cases), self.val_fraction, self.split_seed)
        problems = validate_cases(self.cases, self.version)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise InputError(problems[0].file, f"{problems[0].message} [{problems[0].where}]{more}")
        names = case_names(self.cases)
        final_out = out.resolve()
        with atomic_dir(out, overwrite=self.overwrite) as tmp:
            written, measurements = [], {}
            for case, name in tqdm(list(zip(self.cases, names)), desc="cases", unit="case", disable=None):
                files, m = self._prepare_case(case, tmp / "cases" / name)
                written.append(files)
                measurements[name] = asdict(m)
            built = [Case(**f) for f in written]
            final = [Case(**{k: final_out / p.relative_to(tmp) for k, p in f.items()}) for f in written]
            splits = {"training": [built[i] for i in train_idx], "validation": [built[i] for i in val_idx]}
            written_list = write_datalist(tmp / "datalist.json", splits, "v1")  # every map was converted to v1
            write_list_files(tmp, "train", [final[i] for i in train_idx])
            write_list_files(tmp, "val", [final[i] for i in val_idx])
            write_json(tmp / "measurements.json", measurements)
            write_json(tmp / "organ_seg_versions.json", self.versions)
        logger.info(
            "training set of %d case(s) (%d training, %d validation) written to %s",
            len(written),
            len(train_idx),
            len(val_idx),
            out,
        )
        return out / written_list.name

    def _organ_id(self, case: Case) -> int | None:
        """The organ named by the case's own report, if it has one (else it is inferred from the maps)."""
        if case.report is None:
            return None
        report = read_report(case.report)
        return report.lesions[0].organ_id if report.lesions else None

    def _prepare_case(self, case: Case, dest: Path) -> tuple[dict[str, Path], Any]:
        data = self.standardise({k: str(getattr(case, k)) for k in KEYS})
        affine = np.asarray(data["image"].affine, dtype=np.float64)
        hu = data["image"][0].numpy()
        label = np.rint(data["label"][0].numpy()).astype(np.uint8)
        # every prepared map is in v1 numbering, as the networks and reports use it
        version = resolve_version(self.version, data["organ_seg"][0].numpy(), affine, case.organ_seg, image_hu=hu)
        seg = to_v1_map(data["organ_seg"][0].numpy(), version)
        self.versions[str(case.organ_seg)] = version
        spacing = tuple(float(s) for s in voxel_spacing(affine))
        organ_id = self._organ_id(case)
        try:
            m = measure_lesion(hu, label, seg, spacing, organ_id, version="v1")
        except LesionDiffusionError as e:
            raise InputError(case.label, str(e)) from None
        report = report_from_measurements(m, "v1")
        files = {k: dest / FILE_NAMES[k] for k in ("image", "label", "report", "organ_seg")}
        image = np.clip(np.rint(hu), *INT16_RANGE).astype(np.int16)
        save_nifti(files["image"], image, affine, dtype=np.int16)
        save_nifti(files["label"], label, affine, dtype=np.uint8)
        save_nifti(files["organ_seg"], seg, affine)
        write_report(files["report"], Report((report,)))
        logger.info(
            "%s: organ %d, lesion %s voxels, %.1f HU (organ %s HU): %s, %s",
            dest.name,
            m.organ_id,
            "x".join(map(str, m.size)),
            m.mean_hu,
            "?" if m.reference_hu is None else f"{m.reference_hu:.0f}",
            report.attributes["density"].rstrip(","),
            report.attributes["density variations"].rstrip(","),
        )
        return files, m
