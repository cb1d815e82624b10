"""``lesiondiffusion fetch-data``: tiny fake sdists with the real layouts (NIfTI, a DICOM series, NRRD), served from
a local folder or a loopback simple index; geometry of the converted scans, hash checks, one-line errors."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lesiondiffusion.corpus import load_sources, on_grid
from lesiondiffusion.errors import InputError
from lesiondiffusion_tools.cli import main

R = "tests/reference_files/"
TS_AFFINE = np.array([[3.0, 0, 0, -20], [0, 3, 0, 10], [0, 0, 3, 90], [0, 0, 0, 1]])
CTA_AFFINE = np.array([[-1.5, 0, 0, 180], [0, -1.5, 0, 275], [0, 0, 1.5, 540], [0, 0, 0, 1]])  # LPS-oriented NIfTI
# the DICOM series: 3 slices of 4 rows x 5 columns; PixelSpacing = (between rows, between columns)
DCM_ROWS, DCM_COLS, DCM_SPACING, DCM_IPP, DCM_Z = 4, 5, (0.8, 0.7), (-10.0, 20.0), (-100.0, -98.0, -96.0)
DCM_MARK = (1, 2, 3)  # slice, row, column of the marked voxel
NRRD_ORIGIN, NRRD_SPACING = np.array([-146.0, -325.0, -777.5]), np.array([0.6, 0.6, 5.0])


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    return gzip.compress(img.to_bytes(), mtime=0)  # the files are named .nii.gz


def _dicom_slice(k: int, z: float, series: str, study: str) -> bytes:
    hu = np.full((DCM_ROWS, DCM_COLS), -1000 + 10 * k, dtype=np.int32)
    if k == DCM_MARK[0]:
        hu[DCM_MARK[1], DCM_MARK[2]] = 555
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = study, series, "CT", "x"
    ds.InstanceNumber = k + 1
    ds.Rows, ds.Columns, ds.PixelSpacing = DCM_ROWS, DCM_COLS, list(DCM_SPACING)
    ds.ImagePositionPatient = [DCM_IPP[0], DCM_IPP[1], z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness, ds.RescaleSlope, ds.RescaleIntercept = 2.0, 1, -1024
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _nrrd_bytes(data: np.ndarray, tmp: Path) -> bytes:
    path = tmp / "x.nrrd"
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": np.diag(NRRD_SPACING),
                                 "space origin": NRRD_ORIGIN, "encoding": "gzip"})  # fmt: skip
    return path.read_bytes()


def fake_files(tmp: Path) -> dict[str, dict[str, bytes]]:
    """File contents per package, paths below the sdist's top folder, as in the real sdists."""
    ct = np.full((6, 5, 4), -1000, dtype=np.int32)
    ct[1, 2, 3] = 777
    seg = np.zeros((6, 5, 4), dtype=np.uint8)
    seg[0:3, 0:2, 0:2], seg[4, 4, 3] = 5, 1  # liver, spleen
    cta = np.full((4, 3, 5), -900, dtype=np.int16)
    cta[2, 1, 3] = 333
    # dcm2niix's grid for the series: columns left to right, rows reversed (anterior up), slices upwards
    dcm_seg_affine = np.array([[-DCM_SPACING[1], 0, 0, -DCM_IPP[0]], [0, DCM_SPACING[0], 0, -DCM_IPP[1] - (DCM_ROWS - 1) * DCM_SPACING[0]],
                               [0, 0, 2.0, DCM_Z[0]], [0, 0, 0, 1]])  # fmt: skip
    dcm_seg = np.zeros((DCM_COLS, DCM_ROWS, 3), dtype=np.uint8)
    dcm_seg[DCM_MARK[2], DCM_ROWS - 1 - DCM_MARK[1], DCM_MARK[0]] = 5
    series, study = generate_uid(), generate_uid()
    # names in another order than the slices, as DICOM file names often are
    dicom = {f"{R}example_ct_dicom/CT.{9 - k}": _dicom_slice(k, z, series, study) for k, z in enumerate(DCM_Z)}
    lung = np.full((5, 4, 3), -800, dtype=np.int16)
    lung[3, 1, 2] = 444
    lesion = np.zeros_like(lung)
    lesion[3, 1, 2] = lesion[3, 2, 2] = 1
    return {
        "totalsegmentator": {
            "LICENSE": b"Apache License\nVersion 2.0, January 2004\n",
            f"{R}example_ct.nii.gz": _nifti_bytes(ct, TS_AFFINE),
            f"{R}example_seg_fast_force_split.nii.gz": _nifti_bytes(seg, TS_AFFINE),
            f"{R}example_seg_dicom.nii.gz": _nifti_bytes(dcm_seg, dcm_seg_affine),
            f"{R}aorta_report/example_ct.nii.gz": _nifti_bytes(cta, CTA_AFFINE),
            **dicom,
        },
        "pyradiomics": {
            "LICENSE.txt": b"Copyright 2017 Harvard Medical School\nRedistribution and use ...\n",
            "data/lung1_image.nrrd": _nrrd_bytes(lung, tmp),
            "data/lung1_label.nrrd": _nrrd_bytes(lesion, tmp),
            "data/lung2_image.nrrd": _nrrd_bytes(lung, tmp),
            "data/lung2_label.nrrd": _nrrd_bytes(lesion, tmp),
        },
    }


def write_sdist(folder: Path, top: str, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in {"PKG-INFO": b"Metadata-Version: 2.1\n", "setup.py": b"", **files}.items():
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_table(path: Path, files: dict[str, dict[str, bytes]], sdists: dict[str, Path]) -> Path:
    """The shipped sources table with the fakes' hashes (the scans as shipped)."""
    from importlib import resources

    table = json.loads(resources.files("lesiondiffusion").joinpath("resources/corpus_sources.json").read_text("utf-8"))
    for package in table["packages"]:
        package["sha256"] = sha(sdists[package["name"]].read_bytes())
        package["files"] = {rel: sha(data) for rel, data in files[package["name"]].items()}
    path.write_text(json.dumps(table))
    return path


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fakes")
    files = fake_files(tmp)
    folder = tmp / "sdists"
    sdists = {"totalsegmentator": write_sdist(folder, "totalsegmentator-2.18.0", files["totalsegmentator"]),
              "pyradiomics": write_sdist(folder, "pyradiomics-3.0.1", files["pyradiomics"])}  # fmt: skip
    return {
        "files": files,
        "folder": folder,
        "sdists": sdists,
        "table": write_table(tmp / "sources.json", files, sdists),
    }


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of ``lesiondiffusion`` run in-process."""
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def world_of_max(path: Path) -> np.ndarray:
    img = nib.load(str(path))
    index = np.unravel_index(np.argmax(np.asarray(img.dataobj)), img.shape)
    return nib.affines.apply_affine(img.affine, index)


def lps_to_ras(p) -> np.ndarray:
    return np.array([-p[0], -p[1], p[2]], dtype=float)


def test_fetch_from_local_folder(tmp_path, fakes, capsys):
    out = tmp_path / "corpus"
    code, err = run_cli(
        ["fetch-data", "--out", str(out), "--find_links", str(fakes["folder"]), "--sources", str(fakes["table"])],
        capsys,
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    scans = {s["id"]: s for s in manifest["scans"]}
    assert manifest["version"] == 1 and list(scans) == [
        "ts_abdomen",
        "ts_dicom_abdomen",
        "ts_chest_cta",
        "pyrad_lung1",
        "pyrad_lung2",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no staging folder left

    # every original file is there, with its pinned hash; the licences are the packages' own texts
    for scan in scans.values():
        assert scan["source_files"] and all(
            sha((out / f["path"]).read_bytes()) == f["sha256"] for f in scan["source_files"]
        )
        assert scan["modality"] == "CT" and (out / scan["image"]).is_file()
    assert len(scans["ts_dicom_abdomen"]["source_files"]) == 3 + 1  # the series and its organ map
    assert (out / "licences/totalsegmentator-2.18.0.txt").read_bytes() == fakes["files"]["totalsegmentator"]["LICENSE"]
    assert (out / scans["pyrad_lung1"]["licence_file"]).read_bytes() == fakes["files"]["pyradiomics"]["LICENSE.txt"]
    assert scans["ts_abdomen"]["licence"] == "Apache-2.0" and scans["pyrad_lung2"]["licence"] == "BSD-3-Clause"

    # NIfTI source: same voxels and affine
    ab = scans["ts_abdomen"]
    img = nib.load(str(out / ab["image"]))
    assert np.allclose(img.affine, TS_AFFINE) and img.get_data_dtype() == np.int16 and img.shape == (6, 5, 4)
    assert ab["spacing_mm"] == [3.0, 3.0, 3.0] and ab["shape"] == [6, 5, 4] and ab["contrast_phase"] == "non-contrast"
    assert ab["organ_seg_version"] == "v2" and ab["organs_in_view"] == ["spleen", "liver"] and ab["lesion"] is None
    seg = nib.load(str(out / ab["organ_seg"]))
    assert (
        seg.get_data_dtype() == np.uint8
        and np.allclose(seg.affine, img.affine)
        and np.asarray(seg.dataobj)[1, 1, 1] == 5
    )

    # DICOM series: HU after rescale, the marked pixel at its patient position, the dcm2niix organ map laid on the grid
    dc = scans["ts_dicom_abdomen"]
    hu = np.asarray(nib.load(str(out / dc["image"])).dataobj)
    assert hu.max() == 555 and hu.min() == -1000 and dc["shape"] == [DCM_COLS, DCM_ROWS, 3]
    k, r, c = DCM_MARK
    lps = (DCM_IPP[0] + c * DCM_SPACING[1], DCM_IPP[1] + r * DCM_SPACING[0], DCM_Z[k])
    assert np.allclose(world_of_max(out / dc["image"]), lps_to_ras(lps), atol=1e-4)
    assert np.allclose(dc["spacing_mm"], [0.7, 0.8, 2.0])
    dseg = np.asarray(nib.load(str(out / dc["organ_seg"])).dataobj)
    assert dseg.shape == hu.shape and dseg[np.unravel_index(np.argmax(hu), hu.shape)] == 5 and dseg.sum() == 5
    assert dc["organs_in_view"] == ["liver"]

    # LPS-oriented NIfTI stays as it is
    cta = scans["ts_chest_cta"]
    assert np.allclose(nib.load(str(out / cta["image"])).affine, CTA_AFFINE)
    assert np.allclose(world_of_max(out / cta["image"]), nib.affines.apply_affine(CTA_AFFINE, (2, 1, 3)))
    assert cta["organ_seg"] is None and cta["organ_seg_version"] is None and "heart" in cta["organs_in_view"]

    # NRRD (LPS space): RAS+ affine, marked voxel in place, lesion 0/1 on the image grid
    for sid in ("pyrad_lung1", "pyrad_lung2"):
        lung = scans[sid]
        assert np.allclose(
            world_of_max(out / lung["image"]), lps_to_ras(NRRD_ORIGIN + np.array([3, 1, 2]) * NRRD_SPACING)
        )
        assert np.allclose(lung["spacing_mm"], NRRD_SPACING)
        lesion = nib.load(str(out / lung["lesion"]))
        mask = np.asarray(lesion.dataobj)
        assert lesion.get_data_dtype() == np.uint8 and set(np.unique(mask)) == {0, 1} and mask.sum() == 2
        assert (
            mask[np.unravel_index(np.argmax(np.asarray(nib.load(str(out / lung["image"])).dataobj)), mask.shape)] == 1
        )
        assert np.allclose(lesion.affine, nib.load(str(out / lung["image"])).affine)


class _Index(http.server.BaseHTTPRequestHandler):
    pages: dict[str, tuple[str, bytes]] = {}
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(self.path)
        if self.path not in self.pages:
            self.send_error(404)
            return
        kind, body = self.pages[self.path]
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_fetch_from_loopback_index(tmp_path, fakes, capsys):
    """A simple index on 127.0.0.1: an HTML project page (PEP 503) for one package, JSON (PEP 691) for the other."""
    ts, rad = fakes["sdists"]["totalsegmentator"], fakes["sdists"]["pyradiomics"]
    _Index.pages = {
        "/simple/totalsegmentator/": (
            "text/html",
            f'<html><body><a href="../../files/{ts.name}#sha256=x">{ts.name}</a></body></html>'.encode(),
        ),
        "/simple/pyradiomics/": (
            "application/vnd.pypi.simple.v1+json",
            json.dumps(
                {
                    "meta": {"api-version": "1.0"},
                    "name": "pyradiomics",
                    "files": [
                        {"filename": "pyradiomics-3.0.1-py3-none-any.whl", "url": "/nowhere.whl"},
                        {"filename": rad.name, "url": f"/files/{rad.name}"},
                    ],
                }
            ).encode(),
        ),  # fmt: skip
        f"/files/{ts.name}": ("application/gzip", ts.read_bytes()),
        f"/files/{rad.name}": ("application/gzip", rad.read_bytes()),
    }
    _Index.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/simple"
        code, err = run_cli(
            ["fetch-data", "--out", str(tmp_path / "c"), "--index_url", url, "--sources", str(fakes["table"])], capsys
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert code == 0, err
    assert f"/files/{ts.name}" in _Index.seen and f"/files/{rad.name}" in _Index.seen
    manifest = json.loads((tmp_path / "c/manifest.json").read_text())
    assert len(manifest["scans"]) == 5 and {p["sha256"] for p in manifest["packages"]} == {
        sha(ts.read_bytes()),
        sha(rad.read_bytes()),
    }


def _assert_one_line_failure(code: int, err: str, tmp_path: Path, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_tampered_extracted_file_fails(tmp_path, fakes, capsys):
    """The sdist's own hash matches (pinned to the tampered archive), one file inside it does not."""
    files = {k: dict(v) for k, v in fakes["files"].items()}
    table = write_table(tmp_path / "sources.json", files, fakes["sdists"])
    files["pyradiomics"]["data/lung2_label.nrrd"] = files["pyradiomics"]["data/lung1_image.nrrd"]
    rad = write_sdist(tmp_path / "sdists", "pyradiomics-3.0.1", files["pyradiomics"])
    shutil.copy(fakes["sdists"]["totalsegmentator"], tmp_path / "sdists")
    sources = json.loads(table.read_text())
    sources["packages"][1]["sha256"] = sha(rad.read_bytes())
    table.write_text(json.dumps(sources))
    args = [
        "fetch-data",
        "--out",
        str(tmp_path / "out"),
        "--find_links",
        str(tmp_path / "sdists"),
        "--sources",
        str(table),
    ]
    _assert_one_line_failure(
        *run_cli(args, capsys), tmp_path, "pyradiomics-3.0.1.tar.gz:data/lung2_label.nrrd", "SHA-256"
    )


def test_tampered_sdist_fails(tmp_path, fakes, capsys):
    sources = json.loads(fakes["table"].read_text())
    sources["packages"][0]["sha256"] = "0" * 64
    table = tmp_path / "sources.json"
    table.write_text(json.dumps(sources))
    args = ["fetch-data", "--out", str(tmp_path / "out"), "--find_links", str(fakes["folder"]), "--sources", str(table)]
    _assert_one_line_failure(*run_cli(args, capsys), tmp_path, "totalsegmentator-2.18.0.tar.gz", "SHA-256", "0" * 64)


def test_unreachable_index_is_one_line(tmp_path, fakes, capsys):
    args = [
        "fetch-data",
        "--out",
        str(tmp_path / "out"),
        "--index_url",
        "http://127.0.0.1:9/simple",
        "--sources",
        str(fakes["table"]),
    ]
    _assert_one_line_failure(
        *run_cli(args, capsys), tmp_path, "cannot reach the package index at http://127.0.0.1:9/simple"
    )


def test_missing_package_in_local_folder(tmp_path, fakes, capsys):
    (tmp_path / "empty").mkdir()
    args = [
        "fetch-data",
        "--out",
        str(tmp_path / "out"),
        "--find_links",
        str(tmp_path / "empty"),
        "--sources",
        str(fakes["table"]),
    ]
    _assert_one_line_failure(*run_cli(args, capsys), tmp_path, "empty", "no totalsegmentator-2.18.0.tar.gz")


def test_existing_output_needs_overwrite(tmp_path, fakes, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    args = ["fetch-data", "--out", str(out), "--find_links", str(fakes["folder"]), "--sources", str(fakes["table"])]
    code, err = run_cli(args, capsys)
    assert code == 1 and "already exists" in err and (out / "old.txt").exists()
    code, err = run_cli([*args, "--overwrite", "true"], capsys)
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "manifest.json").is_file()


def test_label_off_the_image_grid_is_an_error():
    label = np.zeros((4, 3, 2), dtype=np.uint8)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    flipped = affine @ np.array([[-1, 0, 0, 3], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    label[0, 1, 1] = 7
    assert on_grid(label, flipped, (4, 3, 2), affine, "l.nii.gz")[3, 1, 1] == 7  # same voxels, other direction
    shifted = affine.copy()
    shifted[0, 3] = 0.5
    with pytest.raises(InputError, match="l.nii.gz: not on the image's grid"):
        on_grid(label, shifted, (4, 3, 2), affine, "l.nii.gz")


def test_shipped_sources_table_is_consistent():
    packages, scans = load_sources()
    assert {p.name: p.version for p in packages.values()} == {"totalsegmentator": "2.18.0", "pyradiomics": "3.0.1"}
    assert [s["id"] for s in scans] == ["ts_abdomen", "ts_dicom_abdomen", "ts_chest_cta", "pyrad_lung1", "pyrad_lung2"]
    assert sum(f.startswith(f"{R}example_ct_dicom/") for f in packages["totalsegmentator"].files) == 20
    assert all(len(h) == 64 for p in packages.values() for h in [p.sha256, *p.files.values()])
