"""``lesiondiffusion evaluate`` on synthesis outputs written by hand (no network runs).

The scene: the tiny demo liver phantom (48^3 voxels of 2 mm) is the input CT of every request. Each
case folder follows the synthesis output contract: the input CT with a 14 mm spherical lesion written
into it at a known HU (lesion voxels at the organ's reference plus an offset, a half-way blend within the
3 mm margin, nothing else touched), its label map, organ map, report and provenance. Some cases carry a
known defect; one case has no folder (its synthesis failed) and one folder is broken.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from lesiondiffusion import attributes as A
from lesiondiffusion.errors import InputError
from lesiondiffusion.evaluation import evaluate_outputs, inside_fraction, preservation
from lesiondiffusion.io import read_stored
from lesiondiffusion.report import LesionReport, Report, format_ct_value, format_size
from lesiondiffusion.reports import extraction
from lesiondiffusion.requests import SynthesisRequest, write_requests

LIVER = 5
RADIUS_MM = 7.0
MARGIN_MM = 3.0
CLI = [sys.executable, "-c", "from lesiondiffusion_tools.cli import main; main()"]

HYPO, ISO, HYPER = "hypodense lesion", "isodense lesion", "hyperdense lesion"
# case -> (request density, HU offset written, seed, centre ("deep" | "edge"), cavity, defect)
CASES = {
    "good_hypo": (HYPO, -30.0, 0, "deep", A.V.CAVITY_WITHIN, None),
    "good_iso": (ISO, 0.0, 0, "deep", A.V.CAVITY_WITHIN, None),
    "good_hyper": (HYPER, 30.0, 0, "deep", A.V.CAVITY_WITHIN, None),
    "outside": (HYPO, -30.0, 2, "edge", A.V.CAVITY_WITHIN, None),
    "protruding": (HYPO, -30.0, 2, "edge", A.V.CAVITY_PROTRUDING, None),
    "far_changed": (HYPO, -30.0, 3, "deep", A.V.CAVITY_WITHIN, "far voxel"),
    "wrong_density": (HYPER, -30.0, 1, "deep", A.V.CAVITY_WITHIN, None),
    "pair_hypo": (HYPO, -20.0, 1, "deep", A.V.CAVITY_WITHIN, None),
    "broken": (HYPO, -30.0, 4, "deep", A.V.CAVITY_WITHIN, "label shape"),
}
MISSING = "failed_case"


def _sphere(shape, centre, spacing, radius_mm):
    grid = np.indices(shape).astype(np.float64)
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
    return dist2 <= radius_mm**2


def _centres(seg: np.ndarray, label: np.ndarray, spacing) -> dict[str, tuple[int, ...]]:
    """A deep liver voxel away from the phantom's own lesion, and a liver voxel on the organ's edge."""
    liver = seg == LIVER
    free = liver & ~ndi.binary_dilation(label == 2, iterations=6)
    depth = ndi.distance_transform_edt(np.pad(free, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    deep = np.unravel_index(int(depth.argmax()), depth.shape)
    assert depth[deep] >= RADIUS_MM + MARGIN_MM + 2, "the demo liver is too thin for the test lesion"
    rim = liver & ~ndi.binary_erosion(liver) & (seg == LIVER)
    inner = np.zeros_like(rim)
    inner[6:-6, 6:-6, 6:-6] = True
    rim &= inner & ~ndi.binary_dilation(label == 2, iterations=6)
    edge = tuple(int(v) for v in np.argwhere(rim)[0])
    return {"deep": tuple(int(v) for v in deep), "edge": edge}


def _write_case(folder: Path, src: Path, request: SynthesisRequest, spec, centres, spacing) -> dict:
    density, offset, seed, where, cavity, defect = spec
    image = nib.load(src / "image.nii.gz")
    before = np.asarray(image.dataobj)
    seg = np.asarray(nib.load(src / "organ_seg.nii.gz").dataobj)
    lesion = _sphere(before.shape, centres[where], spacing, RADIUS_MM * (1.5 if defect == "oversized" else 1.0))
    if defect == "split":  # a slab through the centre cuts the lesion in two
        lesion[centres[where][0]] = False
    liver = seg == LIVER
    reference = extraction.organ_reference_hu(before, liver, spacing, exclude=lesion)
    value = reference + offset
    rng = np.random.default_rng(seed + 100)
    after = before.astype(np.float64)
    after[lesion] = value + rng.normal(0.0, 3.0, int(lesion.sum()))
    if defect == "textured":  # blobs of +-40 HU: heterogeneous, though homogeneous was asked for
        blobs = ndi.gaussian_filter(rng.normal(0.0, 1.0, before.shape), 1.0)
        after[lesion] += 40.0 * blobs[lesion] / blobs[lesion].std()
    dist = ndi.distance_transform_edt(~lesion, sampling=spacing)
    ring = ~lesion & (dist < MARGIN_MM)
    after[ring] = 0.5 * (after[ring] + value)
    after = np.rint(after).astype(before.dtype)
    if defect == "far voxel":
        after[0, 0, 0] += 1
    label = np.where(lesion, 2, np.where(liver, 1, 0)).astype(np.uint8)
    if defect == "label shape":
        label = label[:40]
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(after, image.affine, header=image.header), str(folder / "image.nii.gz"))
    nib.save(nib.Nifti1Image(label, image.affine), str(folder / "label.nii.gz"))
    shutil.copyfile(src / "organ_seg.nii.gz", folder / "organ_seg.nii.gz")
    diameter = int(2 * RADIUS_MM)
    attrs = {
        "enhancement status": "enhanced CT,", "lesion location": str(LIVER), "shape": "round-like,",
        "size": format_size((diameter, diameter, diameter)), "density": density + ",",
        "density variations": "homogeneous,", "CT value": format_ct_value(value),
        "surface characteristics": "well-defined margin,",
        "relationship with adjacent organs": "no close relationship with surrounding organs,",
        "specific features": "", "cavity": cavity,
    }  # fmt: skip
    report = LesionReport(LIVER, attrs, centres[where][::-1], (diameter,) * 3, "round-like,", "tumor")
    (folder / "report.json").write_text(json.dumps(Report((report,)).to_json()))
    provenance = {
        "case": request.case,
        "request": {"image": str(request.image.resolve()), "organ_seg": None, "attributes": request.attributes},
        "parameters": {"seed": seed, "steps": 10, "sampler": "ddim", "guidance_scale": 2.0, "num_lesions": 1,
                       "margin_mm": MARGIN_MM, "feather_mm": 2.0, "preset": "cpu", "device": "cpu"},
        "lesions": [{"organ_id": LIVER, "cavity": cavity, "report": Report((report,)).to_json()}],
    }  # fmt: skip
    (folder / "provenance.json").write_text(json.dumps(provenance))
    return {"lesion_voxels": int(lesion.sum()), "reference": reference, "value": value}


@pytest.fixture(scope="module")
def scene(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    src = tiny_demo / "cases" / "Liver_cancer"
    root = tmp_path_factory.mktemp("evaluate")
    inputs = root / "inputs"
    inputs.mkdir()
    shutil.copyfile(src / "image.nii.gz", inputs / "ct.nii.gz")
    shutil.copyfile(src / "organ_seg.nii.gz", inputs / "seg.nii.gz")
    image = nib.load(src / "image.nii.gz")
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    label = np.asarray(nib.load(src / "label.nii.gz").dataobj)
    seg = np.asarray(nib.load(src / "organ_seg.nii.gz").dataobj)
    centres = _centres(seg, label, spacing)

    requests, truth = [], {}
    pred = root / "pred"
    for case, spec in CASES.items():
        attrs = {
            "organ type": "liver",
            "lesion type": "tumor",
            "density": spec[0].split()[0],
            "density variations": "homogeneous",
        }
        if spec[4] == A.V.CAVITY_PROTRUDING:
            attrs["cavity"] = spec[4]
        request = SynthesisRequest(case, inputs / "ct.nii.gz", attrs, inputs / "seg.nii.gz")
        requests.append(request)
        truth[case] = _write_case(pred / case, src, request, spec, centres, spacing)
    requests.append(SynthesisRequest(MISSING, inputs / "ct.nii.gz", {"organ type": "liver", "lesion type": "cyst"}))
    (pred / "summary.json").write_text(json.dumps({"cases": [
        *({"case": c, "status": "ok"} for c in CASES),
        {"case": MISSING, "status": "error", "stage": "lmnet", "error": "no lesion mask met the box"},
    ]}))  # fmt: skip
    requests_file = write_requests(root / "requests.json", requests)
    snapshot = {p: p.read_bytes() for p in sorted((*inputs.iterdir(), *pred.rglob("*"))) if p.is_file()}
    report, paths = evaluate_outputs(pred, requests_file, root / "report")
    return {"root": root, "pred": pred, "requests": requests_file, "report": report, "paths": paths,
            "truth": truth, "spacing": spacing, "snapshot": snapshot,
            "cases": {c["case"]: c for c in report["cases"]}}  # fmt: skip


def test_correct_case_scores_full_marks(scene):
    case, truth = scene["cases"]["good_hypo"], scene["truth"]["good_hypo"]
    assert case["status"] == "ok" and case["problems"] == []
    mask, look, kept = case["mask"], case["appearance"], case["preservation"]
    assert mask["inside_fraction"] == 1.0 and mask["connected"] and mask["components"] == 1
    assert mask["lesion_voxels"] == truth["lesion_voxels"]
    voxel = float(np.prod(scene["spacing"]))
    wanted = np.pi / 6 * (2 * RADIUS_MM) ** 3
    assert mask["volume_mm3"] == pytest.approx(truth["lesion_voxels"] * voxel)
    assert mask["volume_error"] == pytest.approx((truth["lesion_voxels"] * voxel - wanted) / wanted)
    assert abs(mask["volume_error"]) < 0.25  # a voxelised sphere at 2 mm is close to its ellipsoid
    assert mask["diameter_error"] == pytest.approx((1 + mask["volume_error"]) ** (1 / 3) - 1)
    assert look["requested_density"] == HYPO and look["density_source"] == "request"
    assert look["measured_density"] == HYPO and look["density_match"] and look["direction_match"]
    assert look["delta_hu"] == pytest.approx(-30.0, abs=3.0)
    assert abs(look["ct_value_error_hu"]) < 2.0
    assert look["measured_homogeneity"] == "homogeneous" and look["homogeneity_match"]
    assert kept["preserved"] and kept["preserved_fraction"] == 1.0 and kept["far_changed"] == 0
    assert kept["margin_mm"] == MARGIN_MM and kept["far_voxels"] > 0.9 * 48**3
    # the blend zone, recomputed by brute force from the files on disk: every voxel outside the lesion
    # closer than the margin (mm, voxel centres) to some lesion voxel; PSNR over a 2000 HU peak
    before = nib.load(scene["root"] / "inputs" / "ct.nii.gz").get_fdata()
    after = nib.load(scene["pred"] / "good_hypo" / "image.nii.gz").get_fdata()
    lesion = np.asarray(nib.load(scene["pred"] / "good_hypo" / "label.nii.gz").dataobj) == 2
    spacing = np.asarray(scene["spacing"])
    points = np.argwhere(lesion) * spacing
    lo, hi = np.argwhere(lesion).min(0) - 3, np.argwhere(lesion).max(0) + 4
    zone = []
    for idx in np.ndindex(*(hi - lo)):
        voxel = lo + np.asarray(idx)
        if not lesion[tuple(voxel)] and np.sqrt(((points - voxel * spacing) ** 2).sum(1)).min() < MARGIN_MM:
            zone.append(tuple(voxel))
    diff = np.array([after[v] - before[v] for v in zone])
    assert kept["blend_zone_voxels"] == len(zone) > 0
    assert kept["blend_zone_rmse_hu"] == pytest.approx(np.sqrt(np.mean(diff**2)), rel=1e-9)
    assert kept["blend_zone_psnr_db"] == pytest.approx(20 * np.log10(2000.0 / np.sqrt(np.mean(diff**2))), rel=1e-9)


def test_each_density_class_is_recognised(scene):
    for case, cls in (("good_iso", ISO), ("good_hyper", HYPER), ("pair_hypo", HYPO)):
        look = scene["cases"][case]["appearance"]
        assert look["measured_density"] == cls and look["density_match"], (case, look)
    assert scene["cases"]["good_hyper"]["appearance"]["delta_hu"] > A.ISO_HU


def test_mask_outside_the_organ_is_reported(scene):
    outside = scene["cases"]["outside"]["mask"]
    assert outside["allowed_region"] == "organ"
    assert 0.0 < outside["inside_fraction"] < 0.9
    # the same mask requested as protruding may leave the organ by the lesion's radius
    protruding = scene["cases"]["protruding"]["mask"]
    assert protruding["allowed_region"] == f"organ dilated by {RADIUS_MM:g} mm (protruding)"
    assert protruding["inside_fraction"] == 1.0
    t = scene["report"]["totals"]
    assert t["inside_rate"] == pytest.approx(7 / 8) and not t["targets"]["masks inside the allowed region"]["met"]


def test_changed_far_voxel_is_reported(scene):
    kept = scene["cases"]["far_changed"]["preservation"]
    assert not kept["preserved"] and kept["far_changed"] == 1
    assert kept["changed_far_voxels"] == [[0, 0, 0]]
    assert kept["preserved_fraction"] == pytest.approx(1 - 1 / kept["far_voxels"])
    t = scene["report"]["totals"]
    assert t["far_voxels_changed"] == 1 and t["preserved_rate"] == pytest.approx(7 / 8)
    assert t["targets"]["voxels beyond the margin unchanged"]["met"] is False


def test_wrong_density_is_reported(scene):
    look = scene["cases"]["wrong_density"]["appearance"]
    assert look["requested_density"] == HYPER and look["measured_density"] == HYPO
    assert look["density_match"] is False and look["direction_match"] is False
    t = scene["report"]["totals"]
    assert t["density_accuracy"] == pytest.approx(7 / 8) and t["density_cases"] == 8
    assert t["density_per_class"][HYPER] == {"cases": 2, "correct": 1, "accuracy": 0.5}
    assert t["density_per_class"][HYPO]["accuracy"] == 1.0


def test_a_split_an_oversized_and_a_textured_lesion_are_reported(tiny_demo, tmp_path):
    src = tiny_demo / "cases" / "Liver_cancer"
    spacing = tuple(float(v) for v in nib.load(src / "image.nii.gz").header.get_zooms()[:3])
    seg, label = (np.asarray(nib.load(src / name).dataobj) for name in ("organ_seg.nii.gz", "label.nii.gz"))
    centres = _centres(seg, label, spacing)
    defects = {"split": "split", "oversized": "oversized", "textured": "textured"}
    requests = []
    for case, defect in defects.items():
        attrs = {"organ type": "liver", "lesion type": "tumor", "density": "hypo", "density variations": "homogeneous"}
        request = SynthesisRequest(case, src / "image.nii.gz", attrs, src / "organ_seg.nii.gz")
        requests.append(request)
        _write_case(
            tmp_path / "pred" / case,
            src,
            request,
            (HYPO, -30.0, 0, "deep", A.V.CAVITY_WITHIN, defect),
            centres,
            spacing,
        )
    report, _ = evaluate_outputs(
        tmp_path / "pred", write_requests(tmp_path / "requests.json", requests), tmp_path / "report"
    )
    cases = {c["case"]: c for c in report["cases"]}
    split = cases["split"]["mask"]
    assert split["components"] == 2 and not split["connected"]
    assert abs(cases["split"]["mask"]["volume_error"]) < 0.3  # only the connectivity is wrong
    oversized = cases["oversized"]["mask"]
    assert oversized["connected"] and oversized["volume_error"] == pytest.approx(1.5**3 - 1, rel=0.25)
    textured = cases["textured"]["appearance"]
    assert textured["measured_homogeneity"] == "heterogeneous" and textured["homogeneity_match"] is False
    assert textured["smoothed_std_hu"] > A.HOMOGENEOUS_MAX_STD_HU
    for case in ("split", "oversized"):
        assert cases[case]["appearance"]["homogeneity_match"]  # each defect is reported alone
    t = report["totals"]
    assert t["connected_rate"] == pytest.approx(2 / 3) and t["homogeneity_accuracy"] == pytest.approx(2 / 3)


def test_density_ordering_groups_and_pairs(scene):
    ordering = scene["report"]["density_ordering"]
    # seed 0: hypo < iso < hyper (3 ordered pairs); seed 1: a "hyperdense" lesion darker than the hypodense one
    assert ordering["groups"] == 2 and ordering["pairs"] == 4 and ordering["ordered_pairs"] == 3
    groups = {frozenset(g["cases"]): g for g in ordering["details"]}
    assert groups[frozenset({"good_hypo", "good_iso", "good_hyper"})]["ordered_pairs"] == 3
    assert groups[frozenset({"wrong_density", "pair_hypo"})]["ordered_pairs"] == 0
    assert scene["report"]["totals"]["density_ordering"] == pytest.approx(0.75)


def test_missing_and_broken_cases_are_listed(scene):
    report = scene["report"]
    assert report["missing"] == [
        {"case": MISSING, "status": "missing", "error": "failed in lmnet: no lesion mask met the box"}
    ]
    assert [c["case"] for c in report["invalid"]] == ["broken"]
    assert "label.nii.gz: shape (40, 48, 48) differs from the input CT's (48, 48, 48)" in report["invalid"][0]["error"]
    t = report["totals"]
    assert (t["requested"], t["evaluated"], t["missing"], t["invalid"]) == (10, 8, 1, 1)


def test_report_files_and_inputs_untouched(scene):
    paths = scene["paths"]
    on_disk = json.loads(paths["evaluation.json"].read_text())
    assert on_disk["totals"] == json.loads(json.dumps(scene["report"]["totals"]))
    md = paths["evaluation.md"].read_text()
    for case in (*CASES, MISSING):
        assert f"| {case} |" in md
    assert "| density-class accuracy | 87.5% of 8 |" in md
    sheet = Image.open(paths["contact_sheet.png"])
    assert sheet.width == 4 * 160 and sheet.height % 10 == 0 and sheet.height > 10 * 160  # one row per case
    # a tile shows the lesion: the outline panel (last, at the row's foot) of the first case carries the lesion colour
    row = sheet.height // 10
    tile = np.asarray(sheet.convert("RGB"))[row - 160 : row, 3 * 160 : 4 * 160].astype(int)
    assert ((tile[..., 0] - tile[..., 1]) > 60).sum() > 20
    assert {p: p.read_bytes() for p in scene["snapshot"]} == scene["snapshot"]
    assert not list(scene["pred"].glob("evaluation*"))


def test_cli_writes_report_and_summary_line(scene, tmp_path):
    out = tmp_path / "cli_report"
    run = subprocess.run([*CLI, "evaluate", "--pred", str(scene["pred"]), "--requests", str(scene["requests"]), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("evaluated 8/10 case(s) (1 missing, 1 invalid): inside 87.5%")
    assert "density 87.5%" in lines[0] and "density order 75.0% of 4 pair(s)" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "evaluation.json", "evaluation.md"]
    # default report folder: beside the outputs, never inside them
    run = subprocess.run([*CLI, "evaluate", "--pred", str(scene["pred"]), "--requests", str(scene["requests"])],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (scene["pred"].parent / "pred_evaluation" / "evaluation.json").is_file()


@pytest.mark.parametrize("problem", ["no requests file", "bad requests JSON", "no pred folder", "input CT missing"])
def test_cli_bad_input_one_line_exit_1(scene, tmp_path, problem):
    requests, pred = scene["requests"], scene["pred"]
    named = None
    if problem == "no requests file":
        requests = named = tmp_path / "nope.json"
    elif problem == "bad requests JSON":
        requests = named = tmp_path / "bad.json"
        requests.write_text('{"requests": [')
    elif problem == "no pred folder":
        pred = named = tmp_path / "no_outputs"
    else:
        data = json.loads(Path(scene["requests"]).read_text())
        for entry in data["requests"]:
            entry["image"] = str(tmp_path / "gone.nii.gz")
        requests = tmp_path / "requests.json"
        requests.write_text(json.dumps(data))
        named = tmp_path / "gone.nii.gz"
    out = tmp_path / "report"
    run = subprocess.run([*CLI, "evaluate", "--pred", str(pred), "--requests", str(requests), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(named) in errors[0], run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists()


def test_inside_fraction_dilation_is_physical():
    organ = np.zeros((20, 20, 20), bool)
    organ[:10] = True
    lesion = np.zeros_like(organ)
    lesion[8:14, 8:12, 8:12] = True  # 2 layers inside, 4 outside (at 1, 2, 3, 4 voxels)
    assert inside_fraction(lesion, organ, (1.0, 1.0, 1.0)) == pytest.approx(2 / 6)
    assert inside_fraction(lesion, organ, (1.0, 1.0, 1.0), dilate_mm=2.0) == pytest.approx(4 / 6)
    assert inside_fraction(lesion, organ, (2.0, 1.0, 1.0), dilate_mm=2.0) == pytest.approx(3 / 6)


def test_preservation_uses_mm_and_stored_bits(write_nifti):
    shape = (16, 16, 16)
    base = np.zeros(shape, np.float32)
    lesion = np.zeros(shape, bool)
    lesion[8, 8, 8] = True
    after = base.copy()
    after[8, 8, 8] = 50.0
    after[8, 8, 10] = 5.0  # 2 voxels away: inside a 3 mm margin at 1 mm, beyond it at 2 mm along axis 2
    after[0, 0, 0] = -0.0  # same value, other bits: a change
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    b = read_stored(write_nifti("b.nii.gz", base, affine))
    a = read_stored(write_nifti("a.nii.gz", after, affine))
    kept = preservation(b, a, lesion, 3.0)
    assert kept.far_changed == 1 and kept.examples == [[0, 0, 0]]
    assert kept.zone_rmse_hu == pytest.approx(np.sqrt(25.0 / kept.zone_voxels))
    affine2 = np.diag([1.0, 1.0, 2.0, 1.0])
    b2 = read_stored(write_nifti("b2.nii.gz", base, affine2))
    a2 = read_stored(write_nifti("a2.nii.gz", after, affine2))
    kept2 = preservation(b2, a2, lesion, 3.0)
    assert kept2.far_changed == 2 and [8, 8, 10] in kept2.examples


def test_unreadable_input_ct_is_an_input_error(tmp_path):
    bad = tmp_path / "ct.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="ct.nii.gz"):
        read_stored(bad)


def test_output_in_another_dtype_is_not_preserved(scene, tmp_path):
    from lesiondiffusion.evaluation import evaluate_case
    from lesiondiffusion.requests import read_requests

    request = next(r for r in read_requests(scene["requests"]) if r.case == "good_hypo")
    folder = tmp_path / "good_hypo"
    shutil.copytree(scene["pred"] / "good_hypo", folder)
    image = nib.load(folder / "image.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj).astype(np.float32), image.affine), str(folder / "image.nii.gz"))
    record, tile = evaluate_case(request, folder)
    kept = record["preservation"]
    assert kept["far_changed"] == 0 and not kept["grid_matches"] and not kept["preserved"]
    assert any("stored dtype float32 differs from the input CT's int16" in p for p in record["problems"])
    assert (
        record["appearance"]["density_match"] and tile.width == 4 * 160 and tile.height > 160
    )  # caption line over four panels


def test_requested_classes_from_free_text():
    from lesiondiffusion.evaluation import density_of, homogeneity_of

    assert density_of("low density lesion,") == HYPO  # a vocabulary synonym
    assert density_of("hypodense") == HYPO and density_of("Hyperdense") == HYPER and density_of("iso") == ISO
    assert density_of("hypodense fluid-like lesion") == "hypoattenuating fluid-like lesion"
    assert density_of("") is None and density_of("enhancing") is None
    assert homogeneity_of("homogeneous,") == "homogeneous" and homogeneity_of("inhomogeneous") == "heterogeneous"
    assert homogeneity_of("heterogeneous") == "heterogeneous" and homogeneity_of("") is None


def test_fluid_like_fulfils_a_hypodense_request_but_not_the_reverse():
    from lesiondiffusion import attributes as A
    from lesiondiffusion.evaluation import density_matches

    assert density_matches(A.HYPO_CLASS, A.FLUID_CLASS)
    assert not density_matches(A.FLUID_CLASS, A.HYPO_CLASS)
    assert not density_matches("hyperdense lesion", A.FLUID_CLASS)
