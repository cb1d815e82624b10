"""MONAI Deploy application: write a described lesion into a CT (a NIfTI file or a DICOM series).

    python deploy/app.py -i IN -o OUT

``IN`` is a folder holding ``request.json``::

    {"image": "ct.nii.gz" | "dicom/",           # a NIfTI file or a DICOM series folder, relative to IN
     "organ_seg": "seg.nii.gz",                 # optional (TotalSegmentator runs without it: extra [totalseg])
     "attributes": {"organ type": "liver", "lesion type": "cyst"} | "text": "a 15 mm cyst in the liver",
     "seed": 0, "steps": 25}                    # optional

``OUT`` receives ``image.nii.gz`` (the synthetic CT on the input's grid), ``label.nii.gz`` (0/1/2),
``report.json``, ``provenance.json``, and ``lesion_seg.dcm`` (a DICOM Segmentation of the lesion,
highdicom) when the input was DICOM. The synthesis is the project's own chain
(``lesiondiffusion synthesize``), so the files are those the command line writes for the same request
and seed. Input and output go through nibabel and pydicom (no SimpleITK).

Operators: :class:`CTLoaderOperator` -> :class:`LesionSynthesisOperator` -> :class:`NiftiWriterOperator`
and :class:`DicomSegWriterOperator`.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import shutil
import site
import sys
import tempfile
from pathlib import Path
from typing import Any


def preload_cudart() -> None:
    """Load ``libcudart.so.13`` from the ``nvidia-cuda-runtime`` wheel before holoscan needs it, so no CUDA
    toolkit has to be installed (holoscan then runs CPU-only where there is no GPU)."""
    for folder in [*site.getsitepackages(), site.getusersitepackages()]:
        for lib in glob.glob(os.path.join(folder, "nvidia", "cu13", "lib", "libcudart.so.13")):
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            return


preload_cudart()

from holoscan.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application, Fragment, Operator, OperatorSpec  # noqa: E402

logger = logging.getLogger("lesiondiffusion.deploy")
REQUEST = "request.json"


class CTLoaderOperator(Operator):
    """Reads ``IN/request.json``; emits the request with absolute paths and whether the CT is DICOM."""

    def __init__(self, fragment: Fragment, *args: Any, input_folder: Path, **kwargs: Any) -> None:
        self.input_folder = Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("request")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from lesiondiffusion.errors import InputError
        from lesiondiffusion.io import image_format, read_json, user_path

        path = self.input_folder / REQUEST
        request = read_json(path)
        if not isinstance(request, dict) or not isinstance(request.get("image"), str):
            raise InputError(path, 'expected a JSON object with "image" (a NIfTI file or DICOM folder)')
        for key in ("image", "organ_seg"):
            if request.get(key):
                p = user_path(request[key])
                request[key] = str(p if p.is_absolute() else self.input_folder / p)
                if not Path(request[key]).exists():
                    raise InputError(request[key], f"{key} not found (named in {path})")
        request["dicom"] = image_format(request["image"]) == "dicom"
        op_output.emit(request, "request")


class LesionSynthesisOperator(Operator):
    """Runs the bundle chain (preprocess -> LMNet -> LINet) on the request; emits the case folder."""

    def __init__(self, fragment: Fragment, *args: Any, work: Path, **kwargs: Any) -> None:
        self.work = Path(work)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("request")
        spec.output("case")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from lesiondiffusion_tools.synthesize import synthesize

        request = op_input.receive("request")
        out = self.work / "synthesis"
        synthesize(
            image=request["image"], organ_seg=request.get("organ_seg"), attributes=request.get("attributes"),
            text=request.get("text"), seed=int(request.get("seed", 0)), steps=int(request.get("steps", 25)), out=str(out),
        )  # fmt: skip
        (case,) = [p for p in out.iterdir() if p.is_dir()]
        op_output.emit({"case": str(case), **request}, "case")


class NiftiWriterOperator(Operator):
    """Copies the synthetic CT, label, report and provenance into ``OUT``."""

    FILES = ("image.nii.gz", "label.nii.gz", "report.json", "provenance.json")

    def __init__(self, fragment: Fragment, *args: Any, output_folder: Path, **kwargs: Any) -> None:
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("case")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        case = Path(op_input.receive("case")["case"])
        self.output_folder.mkdir(parents=True, exist_ok=True)
        for name in self.FILES:
            shutil.copy2(case / name, self.output_folder / name)


class DicomSegWriterOperator(Operator):
    """``OUT/lesion_seg.dcm``: the lesion (label 2) as a DICOM Segmentation of the input series (highdicom)."""

    def __init__(self, fragment: Fragment, *args: Any, output_folder: Path, **kwargs: Any) -> None:
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("case")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        item = op_input.receive("case")
        if item.get("dicom"):
            write_dicom_seg(
                Path(item["image"]), Path(item["case"]) / "label.nii.gz", self.output_folder / "lesion_seg.dcm"
            )


def lesion_frames(datasets: list[Any], label_path: Path) -> Any:
    """The lesion mask sampled at every pixel of every source slice (nearest voxel of the label's grid)."""
    import nibabel as nib
    import numpy as np

    label = nib.load(str(label_path))
    data = np.asarray(label.dataobj) == 2
    inverse = np.linalg.inv(label.affine)
    frames = []
    for ds in datasets:
        rows, cols = int(ds.Rows), int(ds.Columns)
        row_dir, col_dir = (
            np.array(ds.ImageOrientationPatient[:3], float),
            np.array(ds.ImageOrientationPatient[3:], float),
        )
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        lps = np.array(ds.ImagePositionPatient, float) + c[..., None] * dc * row_dir + r[..., None] * dr * col_dir
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = np.rint(ras @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.array(data.shape)), axis=-1)
        frame = np.zeros((rows, cols), bool)
        frame[inside] = data[tuple(ijk[inside].T)]
        frames.append(frame)
    return np.stack(frames)


def complete_uids(datasets: list[Any], series: Path) -> None:
    """Fill identifiers an anonymised series left empty, in memory only (the files are not touched):
    the SOP class and instance from the file meta, study and series UIDs derived from the folder."""
    from pydicom.uid import generate_uid

    filled = False
    for i, ds in enumerate(datasets):
        meta = getattr(ds, "file_meta", None)
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID, filled = (meta.MediaStorageSOPClassUID if meta else "1.2.840.10008.5.1.4.1.1.2"), True
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = (meta.get("MediaStorageSOPInstanceUID") if meta else None) or generate_uid(
                entropy_srcs=[str(series), str(i)]
            )
            filled = True
        for key in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(key):
                setattr(ds, key, generate_uid(entropy_srcs=[str(series.resolve()), key]))
                filled = True
    if filled:
        logger.warning("%s: the series lacks some UIDs (anonymised?); the DICOM SEG references generated ones", series)


def write_dicom_seg(series: Path, label_path: Path, dest: Path) -> Path:
    """A binary DICOM Segmentation (one segment, the lesion) referencing every slice of ``series``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    datasets = [pydicom.dcmread(str(p)) for p in sorted(series.iterdir()) if p.is_file()]
    datasets = [d for d in datasets if "ImagePositionPatient" in d]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    complete_uids(datasets, series)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="synthetic lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(name="LesionDiffusion-MONAI", version="0.2.0", family=codes.cid7162.ArtificialIntelligence),
    )  # fmt: skip
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=lesion_frames(datasets, label_path).astype("uint8"),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=hd.UID(), series_number=900, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="LesionDiffusion-MONAI", manufacturer_model_name="lesion synthesis", software_versions="0.2.0",
        device_serial_number="0",
    )  # fmt: skip
    dest.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(dest))
    return dest


class LesionSynthesisApp(Application):
    """Loader -> lesion synthesis -> NIfTI writer and DICOM SEG writer."""

    def compose(self) -> None:
        context = Application.init_app_context(self.argv)
        work = Path(tempfile.mkdtemp(prefix="lesiondiffusion-deploy-"))
        loader = CTLoaderOperator(self, CountCondition(self, 1), input_folder=Path(context.input_path), name="loader")
        synth = LesionSynthesisOperator(self, work=work, name="synthesis")
        nifti = NiftiWriterOperator(self, output_folder=Path(context.output_path), name="nifti_writer")
        dicom = DicomSegWriterOperator(self, output_folder=Path(context.output_path), name="dicom_seg_writer")
        self.add_flow(loader, synth, {("request", "request")})
        self.add_flow(synth, nifti, {("case", "case")})
        self.add_flow(synth, dicom, {("case", "case")})


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    LesionSynthesisApp().run()
    sys.exit(0)
