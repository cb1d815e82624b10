"""The preprocess bundle's inference.json, run for real (``python -m monai.bundle run`` and the CLI).

Every scenario is a separate process; they are started together once per module (a few at a time) and
each test inspects one scenario's result. Inputs: the demo phantoms cropped to 64^3 at 1 mm (LPS), and
the liver case resliced to 0.8 x 0.8 x 2.5 mm in (P, I, L) axis order.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage, SpatialResample
from scipy import ndimage as ndi

from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.geometry import read_geometry, to_input_grid
from lesiondiffusion.manifest import read_manifest
from lesiondiffusion.pipelines.preprocess_inputs import read_requests
from lesiondiffusion.placement import Box
from lesiondiffusion.report import read_report
from lesiondiffusion.vocabulary import (
    CAVITY_LUMEN,
    CAVITY_PROTRUDING,
    CAVITY_WALL,
    CAVITY_WITHIN,
)
from lesiondiffusion_tools.bundle_runner import BundleRunError, run_bundle_in_process

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "preprocess"

LIVER = {"organ type": "liver", "lesion type": "cyst", "cavity": CAVITY_PROTRUDING, "density": "hyperdense lesion,"}
BLADDER_WALL = {"organ type": "bladder", "lesion type": "tumor", "cavity": CAVITY_WALL}
BLADDER_LUMEN = {"organ type": "Urinary_Bladder", "lesion type": "polyp", "cavity": CAVITY_LUMEN}
LIVER_WITHIN = {"organ type": "liver", "lesion type": "hemangioma", "cavity": CAVITY_WITHIN}
# (P, I, L) axes, 0.8 x 0.8 x 2.5 mm
ANISO_DIRECTIONS = np.array([[0, 0, -0.8], [-0.8, 0, 0], [0, -2.5, 0]])


@dataclass
class Run:
    cmd: list[str]  # empty: the bundle runs in this process with ``overrides``
    out: Path
    returncode: int = -1
    stdout: str = ""
    stderr: str = ""
    overrides: dict | None = None


def bundle_cmd(out: Path, **overrides) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--output_dir",
        str(out),
    ]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def in_process(out: Path, **overrides) -> dict:
    """A bundle run in the test process (what it says is checked; a real process's exit is checked by others)."""
    return {"output_dir": str(out), **overrides}


def cli_cmd(out: Path, **options) -> list[str]:
    args = [sys.executable, "-m", "lesiondiffusion_tools.cli", "preprocess", "--out", str(out)]
    for key, value in options.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def reslice(src: Path, dst: Path, directions: np.ndarray, mode: str, dtype) -> Path:
    """Resample ``src`` onto a grid with voxel axes ``directions`` covering the same world extent."""
    img = LoadImage(image_only=True, ensure_channel_first=True)(str(src))
    corners = np.array(
        [[i, j, k, 1] for i in (0, img.shape[1] - 1) for j in (0, img.shape[2] - 1) for k in (0, img.shape[3] - 1)]
    )
    world = (img.affine.numpy() @ corners.T)[:3].T
    affine = np.eye(4)
    affine[:3, :3] = directions
    # origin at the corner the (negative) axes start from; shape covers the extent
    affine[:3, 3] = [world[:, a].max() if directions[a].sum() < 0 else world[:, a].min() for a in range(3)]
    extent = world.max(0) - world.min(0)
    shape = [
        int(np.floor(extent[np.argmax(np.abs(directions[:, v]))] / np.abs(directions[:, v]).max())) + 1
        for v in range(3)
    ]
    out = SpatialResample(mode=mode, padding_mode="border")(img, dst_affine=torch.as_tensor(affine), spatial_size=shape)
    data = out[0].numpy()
    data = np.rint(data).astype(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else data.astype(dtype)
    nib.save(nib.Nifti1Image(data, affine), str(dst))
    return dst


def digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(small_demo, tmp_path_factory) -> Path:
    """A private copy of the demo cases plus the derived inputs of every scenario."""
    root = tmp_path_factory.mktemp("preprocess_inputs")
    for name in ("Liver_cancer", "Bladder_cancer"):
        (root / name).mkdir()
        for f in ("image.nii.gz", "organ_seg.nii.gz"):
            (root / name / f).write_bytes((small_demo / "cases" / name / f).read_bytes())
    liver, bladder = root / "Liver_cancer", root / "Bladder_cancer"
    aniso = root / "aniso"
    aniso.mkdir()
    reslice(liver / "image.nii.gz", aniso / "image.nii.gz", ANISO_DIRECTIONS, "bilinear", np.int16)
    reslice(liver / "organ_seg.nii.gz", aniso / "organ_seg.nii.gz", ANISO_DIRECTIONS, "nearest", np.uint8)
    bad = root / "bad"
    bad.mkdir()
    (bad / "unreadable.nii.gz").write_bytes(b"this is not a NIfTI file")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), str(bad / "four_d.nii.gz"))
    seg = nib.load(str(liver / "organ_seg.nii.gz"))
    no_liver = np.asanyarray(seg.dataobj).copy()
    no_liver[no_liver == 5] = 0
    nib.save(nib.Nifti1Image(no_liver, seg.affine), str(bad / "seg_without_liver.nii.gz"))
    write_lines(root / "demo_images.txt", [liver / "image.nii.gz", bladder / "image.nii.gz"])
    write_lines(root / "demo_segs.txt", [liver / "organ_seg.nii.gz", bladder / "organ_seg.nii.gz"])
    write_lines(root / "demo_attrs.txt", [json.dumps(LIVER), json.dumps(BLADDER_WALL)])
    write_lines(
        root / "batch_images.txt", ["Liver_cancer/image.nii.gz", "bad/unreadable.nii.gz", "Bladder_cancer/image.nii.gz"]
    )
    write_lines(
        root / "batch_segs.txt",
        ["Liver_cancer/organ_seg.nii.gz", "Liver_cancer/organ_seg.nii.gz", "Bladder_cancer/organ_seg.nii.gz"],
    )
    write_lines(
        root / "batch_attrs.txt", [json.dumps(LIVER_WITHIN), json.dumps(LIVER_WITHIN), json.dumps(BLADDER_LUMEN)]
    )
    write_lines(root / "not_json_attrs.txt", [json.dumps(LIVER), '{"organ type": "liver", "lesion type": cyst}'])
    write_lines(root / "three_attrs.txt", [json.dumps(LIVER)] * 3)
    return root


def scenarios(root: Path, outs: Path) -> dict[str, Run]:
    liver, bladder, aniso, bad = root / "Liver_cancer", root / "Bladder_cancer", root / "aniso", root / "bad"
    # the maps are 64 mm crops of v1 demo maps: too little anatomy to tell the numbering, so it is stated
    v1 = {"organ_seg_version": "v1"}
    cli_lumen = dict(
        image=str(bladder / "image.nii.gz"),
        organ_seg=str(bladder / "organ_seg.nii.gz"),
        attributes=json.dumps(BLADDER_LUMEN),
        seed="5",
        **v1,
    )
    runs = {
        "demo": bundle_cmd(
            outs / "demo", image_list=str(root / "demo_images.txt"), attributes_list=str(root / "demo_attrs.txt"),
            organ_seg_list=str(root / "demo_segs.txt"), num_lesions=2, **v1,
        ),
        "aniso": in_process(
            outs / "aniso", image=str(aniso / "image.nii.gz"), organ_seg=str(aniso / "organ_seg.nii.gz"),
            attributes=json.dumps(LIVER_WITHIN), num_lesions=2, seed=1, **v1,
        ),
        "cli_a": cli_cmd(outs / "cli_a", **cli_lumen),
        "bundle_b": bundle_cmd(outs / "bundle_b", **cli_lumen),
        "bundle_seed6": in_process(outs / "bundle_seed6", **{**cli_lumen, "seed": "6"}),
        "batch": cli_cmd(
            outs / "batch", image_list=str(root / "batch_images.txt"), attributes_list=str(root / "batch_attrs.txt"),
            organ_seg_list=str(root / "batch_segs.txt"), **v1,
        ),
        # bad inputs: each one line on stderr, exit 1, no output (through the command line and the bundle alike)
        "unreadable": cli_cmd(outs / "unreadable", image=str(bad / "unreadable.nii.gz"), organ_seg=str(liver / "organ_seg.nii.gz"), attributes=json.dumps(LIVER)),
        "four_d": bundle_cmd(outs / "four_d", image=str(bad / "four_d.nii.gz"), attributes=json.dumps(LIVER)),
        "organ_absent": cli_cmd(outs / "organ_absent", image=str(liver / "image.nii.gz"), organ_seg=str(bad / "seg_without_liver.nii.gz"), attributes=json.dumps(LIVER), **v1),
        "unknown_organ": in_process(outs / "unknown_organ", image=str(liver / "image.nii.gz"), organ_seg=str(liver / "organ_seg.nii.gz"), attributes='{"organ type": "livr", "lesion type": "cyst"}', **v1),
        "not_json": in_process(outs / "not_json", image_list=str(root / "demo_images.txt"), attributes_list=str(root / "not_json_attrs.txt")),
        "lengths": in_process(outs / "lengths", image_list=str(root / "demo_images.txt"), attributes_list=str(root / "three_attrs.txt")),
    }  # fmt: skip
    return {
        name: Run([], outs / name, overrides=how) if isinstance(how, dict) else Run(how, outs / name)
        for name, how in runs.items()
    }


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory) -> dict[str, Run]:
    """Run every scenario (three processes at a time, the in-process ones meanwhile); inputs are hashed before
    and after."""
    before = digest(inputs)
    outs = tmp_path_factory.mktemp("preprocess_outputs")
    todo = scenarios(inputs, outs)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # only our own messages on stderr

    def execute(run: Run) -> None:
        done = subprocess.run(run.cmd, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)
        run.returncode, run.stdout, run.stderr = done.returncode, done.stdout, done.stderr

    def execute_here(run: Run) -> None:
        try:
            run_bundle_in_process("preprocess", run.overrides or {})
            run.returncode = 0
        except BundleRunError as e:
            run.returncode, run.stderr = 1, str(e)

    with ThreadPoolExecutor(max_workers=3) as pool:
        started = [pool.submit(execute, run) for run in todo.values() if run.cmd]
        for run in todo.values():
            if not run.cmd:
                execute_here(run)
        for future in started:
            future.result()
    todo["inputs_unchanged"] = Run([], outs, returncode=int(digest(inputs) != before))
    return todo


def ok(run: Run) -> Run:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stderr[-3000:]}\n{run.stdout[-3000:]}"
    assert "Traceback" not in run.stderr
    return run


def depth(organ: np.ndarray) -> np.ndarray:
    return ndi.distance_transform_edt(np.pad(organ, 1))[1:-1, 1:-1, 1:-1]


def assert_rule(organ: np.ndarray, cavity: str, box: Box) -> None:
    """The box satisfies design 4.1's organ-aware rule for its cavity, and lies inside the image."""
    assert box.inside(organ.shape), box
    c = box.centre
    if cavity == CAVITY_WITHIN:
        assert organ[box.slices].all()
    elif cavity == CAVITY_PROTRUDING:
        assert organ[c] and not organ[box.slices].all()
    elif cavity == CAVITY_LUMEN:
        assert depth(organ)[c] > 5
    else:
        assert organ[c] and depth(organ)[c] <= 5


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def check_case(entry, request: dict, organ_id: int, num_lesions: int) -> np.ndarray:
    """Everything a prepared case must hold; returns its standardised organ map."""
    assert entry.ok and entry.extra["request"] == request and entry.extra["organ_seg_version"] == "v1"
    image, affine = load(entry.image)
    seg, seg_affine = load(entry.organ_seg)
    assert nib.aff2axcodes(affine) == ("R", "A", "S") and np.allclose(nib.affines.voxel_sizes(affine), 1.0)
    assert np.allclose(seg_affine, affine) and seg.shape == image.shape and seg.dtype == np.uint8
    organ = seg == organ_id
    boxes = []
    assert len(entry.lesions) == num_lesions
    for k, lesion in enumerate(entry.lesions):
        assert lesion.organ_id == organ_id and lesion.report.name == f"lesion_{k}.json"
        report = read_report(lesion.report)[organ_id]
        assert report.attributes["cavity"] == lesion.cavity == request["cavity"]  # user attributes win
        for key, value in request.items():
            if key not in ("organ type", "lesion type", "cavity"):
                assert report.attributes[key] == value
        assert report.array_box() == (lesion.box.centre, lesion.box.size)  # element 3 = the placed box
        obox = np.ptp(np.argwhere(organ), axis=0) + 1
        assert all(s <= o for s, o in zip(lesion.box.size, obox))
        assert_rule(organ, lesion.cavity, lesion.box)
        boxes.append(lesion.box)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    return seg


@pytest.mark.slow
def test_inputs_are_never_modified(runs):
    assert runs["inputs_unchanged"].returncode == 0


@pytest.mark.slow
def test_demo_batch_with_its_organ_maps(runs, inputs):
    run = ok(runs["demo"])
    manifest = read_manifest(run.out / "manifest.json")
    assert [c.case for c in manifest.cases] == ["case_000", "case_001"]
    for entry, name, request, organ_id in zip(
        manifest.cases, ("Liver_cancer", "Bladder_cancer"), (LIVER, BLADDER_WALL), (5, 104)
    ):
        assert entry.source_image == (inputs / name / "image.nii.gz").resolve()
        seg = check_case(entry, request, organ_id, num_lesions=2)
        # a 1 mm LPS input: standardising is a flip, and the way back is exact
        src_image, _ = load(inputs / name / "image.nii.gz")
        src_seg, src_affine = load(inputs / name / "organ_seg.nii.gz")
        image, _ = load(entry.image)
        assert np.array_equal(image, src_image[::-1, ::-1, :]) and np.array_equal(seg, src_seg[::-1, ::-1, :])
        geometry = read_geometry(entry.geometry)
        assert geometry.shape == src_seg.shape and np.allclose(geometry.input_affine, src_affine)
        assert geometry.dtype == "int16" and geometry.path == str((inputs / name / "image.nii.gz").resolve())
        assert np.array_equal(to_input_grid(seg, geometry, mode="nearest"), src_seg)
        assert np.array_equal(to_input_grid(image, geometry, mode="linear"), src_image)


@pytest.mark.slow
def test_anisotropic_reoriented_scan(runs, inputs):
    run = ok(runs["aniso"])
    (entry,) = read_manifest(run.out / "manifest.json").cases
    src_seg, src_affine = load(inputs / "aniso" / "organ_seg.nii.gz")
    assert nib.aff2axcodes(src_affine) == ("P", "I", "L")
    seg = check_case(entry, LIVER_WITHIN, 5, num_lesions=2)
    # same anatomy in world space: the liver's volume (mm^3) and centroid survive standardisation
    src_voxel = abs(np.linalg.det(src_affine[:3, :3]))
    assert (seg == 5).sum() == pytest.approx((src_seg == 5).sum() * src_voxel, rel=0.03)
    _, affine = load(entry.organ_seg)

    def centroid(mask, aff):
        idx = np.argwhere(mask)
        return (aff[:3, :3] @ idx.T + aff[:3, 3:]).T.mean(0)

    assert np.allclose(centroid(seg == 5, affine), centroid(src_seg == 5, src_affine), atol=1.0)
    geometry = read_geometry(entry.geometry)
    assert geometry.shape == src_seg.shape and np.allclose(geometry.input_affine, src_affine)
    back = to_input_grid(seg, geometry, mode="nearest")
    assert back.shape == src_seg.shape
    dice = 2 * ((back == 5) & (src_seg == 5)).sum() / ((back == 5).sum() + (src_seg == 5).sum())
    assert dice > 0.97


@pytest.mark.slow
def test_cli_and_bundle_prepare_one_case_alike_for_a_seed(runs, inputs):
    a, b = ok(runs["cli_a"]), ok(runs["bundle_b"])
    assert a.stdout.strip().splitlines()[-1] == str(a.out / "manifest.json")  # the command prints the manifest
    ma, mb = read_manifest(a.out / "manifest.json"), read_manifest(b.out / "manifest.json")
    check_case(ma.cases[0], BLADDER_LUMEN, 104, num_lesions=1)
    assert ma.cases[0].lesions[0].box == mb.cases[0].lesions[0].box
    assert (a.out / "case_000" / "lesion_0.json").read_bytes() == (b.out / "case_000" / "lesion_0.json").read_bytes()
    assert (
        load(a.out / "case_000" / "image.nii.gz")[0].tobytes() == load(b.out / "case_000" / "image.nii.gz")[0].tobytes()
    )
    # the same request with another seed puts the box elsewhere
    other = read_manifest(ok(runs["bundle_seed6"]).out / "manifest.json")
    check_case(other.cases[0], BLADDER_LUMEN, 104, num_lesions=1)
    assert other.cases[0].lesions[0].box.centre != ma.cases[0].lesions[0].box.centre


@pytest.mark.slow
def test_batch_reports_and_skips_a_bad_case_keeping_the_order(runs, inputs):
    run = runs["batch"]
    assert run.returncode == 1 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: 1 of 3 case(s) failed (case_001: ")
    assert "unreadable.nii.gz" in errors[0] and errors[0].endswith(f"; the others are in {run.out / 'manifest.json'}")
    manifest = read_manifest(run.out / "manifest.json")
    assert [(c.case, c.status) for c in manifest.cases] == [
        ("case_000", "ok"),
        ("case_001", "error"),
        ("case_002", "ok"),
    ]
    failed = manifest.cases[1]
    assert failed.source_image == (inputs / "bad" / "unreadable.nii.gz").resolve()
    assert "unreadable.nii.gz" in failed.error and "unreadable NIfTI" in failed.error and "\n" not in failed.error
    assert failed.image is None and not (run.out / "case_001").exists()
    assert "case_001 skipped" in run.stdout
    check_case(manifest.cases[0], LIVER_WITHIN, 5, num_lesions=1)
    check_case(manifest.cases[2], BLADDER_LUMEN, 104, num_lesions=1)
    assert sorted(p.name for p in run.out.iterdir()) == ["case_000", "case_002", "manifest.json"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, expected",
    [
        ("unreadable", ["bad/unreadable.nii.gz: unreadable NIfTI"]),
        ("four_d", ["bad/four_d.nii.gz: expected a 3D image, got shape (8, 8, 8, 3)"]),
        (
            "organ_absent",
            [
                "bad/seg_without_liver.nii.gz: organ 'liver' (TotalSegmentator v1 label 5) is absent from the organ segmentation"
            ],
        ),
        ("unknown_organ", ["attributes: unknown organ name 'livr'", "close matches: liver"]),
        ("not_json", ["not_json_attrs.txt:2: attribute line is not valid JSON"]),
        (
            "lengths",
            ["three_attrs.txt: has 3 lines but", "demo_images.txt has 2; the lists must be aligned line by line"],
        ),
    ],
)
def test_bad_input_is_one_line_exit_1_and_no_output(runs, name, expected):
    run = runs[name]
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1, run.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in run.stdout
    assert not run.out.exists()
    assert not [p for p in run.out.parent.iterdir() if p.name.startswith(f".{name}")]  # no temporary leftovers


# ---- request reading (in process) ------------------------------------------------------------------
def test_single_request_forms(tmp_path):
    one = read_requests(image="ct.nii.gz", attributes='{"organ type": "bladder", "lesion type": "polyp"}')
    (request,) = one
    assert request.organ_id == 104 and request.organ_name == "urinary bladder" and request.organ_seg is None
    assert request.attributes == {"organ type": "bladder", "lesion type": "polyp"}
    as_dict = read_requests(
        image="ct.nii.gz", organ_seg="seg.nii.gz", attributes={"organ type": "Liver", "lesion type": "cyst", "size": 25}
    )
    assert (
        as_dict[0].organ_id == 5
        and as_dict[0].attributes["size"] == "25"
        and as_dict[0].organ_seg == Path("seg.nii.gz")
    )
    pretty = tmp_path / "attrs.json"
    pretty.write_text(json.dumps(LIVER, indent=2))
    assert read_requests(image="ct.nii.gz", attributes=str(pretty))[0].attributes == LIVER
    line = write_lines(tmp_path / "attrs.txt", [json.dumps(BLADDER_WALL)])
    assert read_requests(image="ct.nii.gz", attributes=str(line))[0].attributes == BLADDER_WALL
    assert read_requests(image="ct.nii.gz", attributes_list=str(line))[0].organ_id == 104


def test_batch_requests_resolve_list_paths_and_share_one_attribute_object(tmp_path):
    (tmp_path / "lists").mkdir()
    images = write_lines(tmp_path / "lists" / "images.txt", ["a.nii.gz", "/abs/b.nii.gz"])
    segs = write_lines(tmp_path / "lists" / "segs.txt", ["sa.nii.gz", "sb.nii.gz"])
    requests = read_requests(image_list=str(images), organ_seg_list=str(segs), attributes=json.dumps(LIVER))
    assert [r.image for r in requests] == [tmp_path / "lists" / "a.nii.gz", Path("/abs/b.nii.gz")]
    assert [r.organ_seg for r in requests] == [tmp_path / "lists" / "sa.nii.gz", tmp_path / "lists" / "sb.nii.gz"]
    assert [r.index for r in requests] == [0, 1] and all(r.attributes == LIVER for r in requests)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({}, "give either image"),
        ({"image": "a", "image_list": "b", "attributes": "{}"}, "give either image"),
        ({"image": "a"}, "give attributes"),
        ({"image": "a", "attributes": json.dumps(LIVER), "attributes_list": "x"}, "not both"),
        ({"image": "a", "attributes": json.dumps(LIVER), "organ_seg_list": "x"}, "organ_seg_list goes with image_list"),
        ({"image": "a", "attributes": '{"organ type": "liver"}'}, "attributes: attributes need 'lesion type'"),
        (
            {"image": "a", "attributes": '{"organ type": "liver", "lesion type": ["x"]}'},
            "attribute 'lesion type' must be text",
        ),
        ({"image": "a", "attributes": "[1, 2]"}, "neither a JSON object nor an existing file"),
        ({"image": "a", "attributes": '{"organ type": "kidney", "lesion type": "cyst"}'}, "ambiguous"),
    ],
)
def test_malformed_requests_are_one_line_errors(kwargs, error):
    with pytest.raises(LesionDiffusionError, match=error) as err:
        read_requests(**kwargs)
    assert "\n" not in str(err.value)


def test_list_problems_name_the_file_and_line(tmp_path):
    images = write_lines(tmp_path / "images.txt", ["a.nii.gz", "b.nii.gz"])
    gap = write_lines(tmp_path / "gap.txt", [json.dumps(LIVER), "", json.dumps(LIVER)])
    with pytest.raises(InputError, match="gap.txt:2: empty line inside the list"):
        read_requests(image_list=str(images), attributes_list=str(gap))
    organ = write_lines(tmp_path / "organ.txt", [json.dumps(LIVER), json.dumps({**LIVER, "organ type": "spleeen"})])
    with pytest.raises(InputError, match="organ.txt:2: unknown organ name 'spleeen'.*close matches: spleen"):
        read_requests(image_list=str(images), attributes_list=str(organ))
    segs = write_lines(tmp_path / "segs.txt", ["s.nii.gz"])
    with pytest.raises(InputError, match="segs.txt: has 1 lines but .*images.txt has 2"):
        read_requests(image_list=str(images), organ_seg_list=str(segs), attributes=json.dumps(LIVER))


def test_a_case_list_names_the_cases_and_rejects_bad_names(tmp_path):
    images = write_lines(tmp_path / "images.txt", ["a.nii.gz", "b.nii.gz"])
    names = write_lines(tmp_path / "names.txt", ["liver_1", "bladder.2"])
    requests = read_requests(image_list=str(images), attributes=json.dumps(LIVER), case_list=str(names))
    assert [r.name for r in requests] == ["liver_1", "bladder.2"]
    assert [r.name for r in read_requests(image_list=str(images), attributes=json.dumps(LIVER))] == [
        "case_000",
        "case_001",
    ]
    for lines, error in (
        (["liver_1", "liver_1"], "names.txt:2: case name 'liver_1' repeats line 1"),
        (["liver_1", "../up"], "names.txt:2: '../up' is not a case name"),
        (["_hidden", "b"], "names.txt:1: '_hidden' is not a case name"),
        (["a", "manifest.json"], "names.txt:2: case name 'manifest.json' is a file or folder the output already holds"),
        (["only_one"], "names.txt: has 1 lines but there are 2 images"),
    ):
        write_lines(names, lines)
        with pytest.raises(InputError, match=error):
            read_requests(image_list=str(images), attributes=json.dumps(LIVER), case_list=str(names))


def test_a_cases_boxes_and_reports_follow_its_name_not_its_place_in_the_batch(inputs, tmp_path):
    """The same case, second in a batch or alone, gets the same boxes and reports for one seed."""

    liver, bladder = inputs / "Liver_cancer", inputs / "Bladder_cancer"

    def prepare(out: str, cases: list[tuple[str, Path, dict]]) -> dict:
        lists = {
            "image_list": write_lines(tmp_path / f"{out}_images.txt", [c[1] / "image.nii.gz" for c in cases]),
            "organ_seg_list": write_lines(tmp_path / f"{out}_segs.txt", [c[1] / "organ_seg.nii.gz" for c in cases]),
            "attributes_list": write_lines(tmp_path / f"{out}_attrs.txt", [json.dumps(c[2]) for c in cases]),
            "case_list": write_lines(tmp_path / f"{out}_names.txt", [c[0] for c in cases]),
        }
        args = {k: str(v) for k, v in lists.items()}
        run_bundle_in_process(
            "preprocess", {**args, "output_dir": str(tmp_path / out), "seed": 3, "organ_seg_version": "v1"}
        )
        entries = read_manifest(tmp_path / out / "manifest.json").cases
        return {e.case: [(les.box, les.report.read_text()) for les in e.lesions] for e in entries}

    batch = prepare("batch", [("liver_a", liver, LIVER), ("bladder_b", bladder, BLADDER_WALL)])
    alone = prepare("alone", [("bladder_b", bladder, BLADDER_WALL)])
    assert list(batch) == ["liver_a", "bladder_b"] and (tmp_path / "batch" / "bladder_b" / "image.nii.gz").is_file()
    assert alone["bladder_b"] == batch["bladder_b"]
    other = prepare("renamed", [("bladder_c", bladder, BLADDER_WALL)])
    assert other["bladder_c"] != alone["bladder_b"]  # another name, another draw
