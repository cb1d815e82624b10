"""Demo cases: a phantom CT for each published demo organ map, beside its real label map and report.

The original's demo folders (``data/demo/<Case>/``, :data:`lesiondiffusion.data_paths.DEMO_DATA`) hold ``totalseg_health.nii.gz`` (organ map),
``label.nii.gz`` (0/1/2) and ``type.json`` but no CT. :func:`build_demo_cases` writes

```
out/cases/<Case>/{image,label,organ_seg}.nii.gz, type.json
out/datalist.json                      # "training": every case, paths relative to out/
out/train_{img,label,type,seg}_list.txt  # the original's aligned list files (absolute paths)
```

optionally cropped around the lesion and/or subsampled, with each report's box moved to the new grid.

Box axes: a report's element 3 (box centre and size, and the ``size`` attribute) lists the axes in
reversed NIfTI voxel order (:data:`lesiondiffusion.report.REPORT_BOX_AXES`; both demo boxes hit their
lesion only when read that way); the box is moved axis by axis accordingly and written back in the
same order. The demo boxes are smaller than their labelled lesions: a fact of the published data, see
the preprocess bundle's docs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lesiondiffusion.dataset import Case, write_datalist, write_list_files
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import atomic_dir, read_nifti_array, save_nifti
from lesiondiffusion.labels import LESION_LABEL
from lesiondiffusion.phantom import axial_axis_of, check_label_map, make_phantom, read_organ_map
from lesiondiffusion.report import (
    REPORT_BOX_AXES,
    Report,
    format_size,
    parse_size,
    read_report,
    to_report_axes,
    write_report,
)
from lesiondiffusion.vocabulary import SIZE

logger = logging.getLogger(__name__)

SOURCE_FILES = {"organ_seg": "totalseg_health.nii.gz", "label": "label.nii.gz", "report": "type.json"}
OUTPUT_FILES = {
    "image": "image.nii.gz",
    "label": "label.nii.gz",
    "organ_seg": "organ_seg.nii.gz",
    "report": "type.json",
}
__all__ = [  # REPORT_BOX_AXES stays importable from here
    "OUTPUT_FILES", "REPORT_BOX_AXES", "SOURCE_FILES",
    "build_case", "build_demo_cases", "crop_slices", "find_demo_cases", "transform_report",
]  # fmt: skip


def find_demo_cases(src: Path) -> list[Path]:
    """Case folders of ``src`` (sorted): sub-folders holding an organ map, a label map and a report.

    A folder with some of the three files but not all is an error naming the missing file.
    """
    src = Path(src)
    if not src.is_dir():
        raise InputError(src, "demo source folder not found")
    cases = []
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        present = {k: (folder / n).is_file() for k, n in SOURCE_FILES.items()}
        if all(present.values()):
            cases.append(folder)
        elif any(present.values()):
            missing = next(n for k, n in SOURCE_FILES.items() if not present[k])
            raise InputError(
                folder / missing, "file not found (a demo case needs " + ", ".join(SOURCE_FILES.values()) + ")"
            )
    if not cases:
        raise InputError(src, "no demo cases (folders with " + ", ".join(SOURCE_FILES.values()) + ")")
    return cases


def crop_slices(shape: Sequence[int], centre: Sequence[int], crop: int | None) -> tuple[slice, ...]:
    """``crop``-voxel slices centred on ``centre``, shifted to stay inside ``shape`` (whole axis if smaller)."""
    if crop is None:
        return tuple(slice(0, int(n)) for n in shape)
    out = []
    for n, c in zip(shape, centre):
        size = min(int(crop), int(n))
        start = int(np.clip(int(c) - size // 2, 0, int(n) - size))
        out.append(slice(start, start + size))
    return tuple(out)


def transform_report(report: Report, region: Sequence[slice], step: int, shape: Sequence[int]) -> Report:
    """Move every lesion's box (and ``size`` text) to the grid ``arr[region][::step, ::step, ::step]``.

    A box centre ``c`` becomes ``round((c - start) / step)``, clamped to the new ``shape``; a size
    ``s`` becomes ``max(1, round(s / step))``; the box stays in the report's axis order.
    """
    starts = to_report_axes([int(sl.start) for sl in region])
    dims = to_report_axes([int(n) for n in shape])

    def size_of(size: Sequence[int]) -> tuple[int, int, int]:
        return tuple(max(1, int(round(s / step))) for s in size)  # type: ignore[return-value]

    lesions = []
    for lesion in report.lesions:
        attrs = dict(lesion.attributes)
        text_size = parse_size(attrs.get(SIZE, ""))
        if text_size is not None and step != 1:
            attrs[SIZE] = format_size(size_of(text_size))
        centre, size = lesion.centre, lesion.size
        if centre is not None and size is not None:
            moved = [int(round((c - s0) / step)) for c, s0 in zip(centre, starts)]
            clamped = [int(np.clip(c, 0, d - 1)) for c, d in zip(moved, dims)]
            if clamped != moved:
                logger.warning(
                    "organ %s: box centre %s is outside the new grid; clamped to %s", lesion.organ_id, moved, clamped
                )
            centre, size = tuple(clamped), size_of(size)
        lesions.append(replace(lesion, attributes=attrs, centre=centre, size=size))  # type: ignore[arg-type]
    return Report(tuple(lesions))


def _lesion_centre(lesion: np.ndarray) -> tuple[int, ...]:
    idx = np.nonzero(lesion)
    return tuple((int(i.min()) + int(i.max())) // 2 for i in idx)


def build_case(
    folder: Path, dest: Path, seed: int = 0, crop: int | None = None, step: int = 1, version: str = "v1"
) -> dict[str, Path]:
    """Write one demo case (phantom CT, label, organ map, report) into ``dest``; returns its files."""
    seg_path, label_path, report_path = (folder / SOURCE_FILES[k] for k in ("organ_seg", "label", "report"))
    seg, seg_img = read_organ_map(seg_path)
    label, label_img = read_nifti_array(label_path)
    check_label_map(seg_img, label_img, label_path)
    report = read_report(report_path)
    if not report.lesions:
        raise InputError(report_path, "the report has no lesion entry")
    label = np.rint(label).astype(np.uint8)
    lesion = label == LESION_LABEL
    if not lesion.any():
        raise InputError(label_path, "no lesion voxels (label 2)")

    region = crop_slices(seg.shape, _lesion_centre(lesion), crop)
    sub = tuple(slice(sl.start, sl.stop, step) for sl in region)
    first = report.lesions[0]
    image = make_phantom(
        seg,
        spacing=tuple(float(z) for z in seg_img.header.get_zooms()[:3]),
        seed=seed,
        version=version,
        lesion_mask=lesion,
        lesion_hu=first.mean_hu,
        lesion_heterogeneous="heterogeneous" in first.classes("density variations"),
        axial_axis=axial_axis_of(seg_img.affine),
        region=region,
    )[::step, ::step, ::step]
    # nibabel's slicer moves the origin to the crop and scales the voxel axes by the step
    affine = seg_img.slicer.slice_affine(seg_img.slicer.check_slicing(sub))  # no voxel read
    out_label = label[sub]
    out_seg = np.rint(seg[sub]).astype(np.uint8 if seg.max() <= 255 else np.int16)

    dest.mkdir(parents=True, exist_ok=True)
    files = {k: dest / n for k, n in OUTPUT_FILES.items()}
    save_nifti(files["image"], image, affine, header=seg_img.header, dtype=np.int16)
    save_nifti(files["label"], out_label, affine, header=label_img.header, dtype=np.uint8)
    save_nifti(files["organ_seg"], out_seg, affine, header=seg_img.header)
    write_report(files["report"], transform_report(report, region, step, image.shape))
    in_lesion = out_label == LESION_LABEL
    mean_hu = float(image[in_lesion].mean()) if in_lesion.any() else float("nan")
    logger.info("%s: grid %s, lesion %d voxels at %.1f HU", folder.name, image.shape, int(in_lesion.sum()), mean_hu)
    return files


def build_demo_cases(
    src: Path,
    out: Path,
    seed: int = 0,
    crop: int | None = None,
    step: int = 1,
    overwrite: bool = False,
) -> Path:
    """Build every demo case of ``src`` into ``out`` (atomically; ``src`` is only read); returns ``out``.

    ``crop`` keeps ``crop``^3 voxels centred on the lesion (clamped to the volume); ``step`` subsamples
    by nearest neighbour (``arr[::step, ::step, ::step]``). Writes ``out/cases/<Case>/``,
    ``out/datalist.json`` (all cases under "training") and the ``train_*_list.txt`` files.
    """
    src, out = Path(src), Path(out)
    if crop is not None and int(crop) < 1:
        raise LesionDiffusionError(f"crop must be a positive number of voxels, got {crop}")
    if int(step) < 1:
        raise LesionDiffusionError(f"step must be a positive integer, got {step}")
    folders = find_demo_cases(src)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise InputError(out, "output folder is inside the demo source; the source is never written")
    final_out = out.resolve()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        built, final = [], []
        for folder in tqdm(folders, desc="demo cases", unit="case", disable=None):
            files = build_case(folder, tmp / "cases" / folder.name, seed=seed, crop=crop, step=int(step))
            built.append(Case(**files))
            # list files hold absolute paths: name where the files will be once the folder is in place
            final.append(Case(**{k: final_out / p.relative_to(tmp) for k, p in files.items()}))
        write_datalist(tmp / "datalist.json", {"training": built, "validation": []}, "v1")  # the demo maps are v1
        write_list_files(tmp, "train", final)
    logger.info("demo cases written to %s", out)
    return out
