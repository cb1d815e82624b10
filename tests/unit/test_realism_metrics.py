"""Realism measures (:mod:`lesiondiffusion.lesion_metrics`) on volumes of known answer, and
``evaluate_outputs`` with a ground-truth reference dataset (:mod:`lesiondiffusion.realism`).

The end-to-end scene is the tiny demo liver phantom (48^3 voxels of 2 mm): reference cases carry
liver lesions 50 HU below the liver that keep the liver's own noise (the tissue shifted, as real
hypodense tumours look), written as a ``make-dataset``-style datalist; synthetic cases are a lesion made
the same way, the same mask filled flat, a checkerboard speckle mask and a lesion only 16 HU below the
liver (what the report asked, but unlike any real lesion of the class).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy import stats

from lesiondiffusion import attributes as A
from lesiondiffusion import lesion_metrics as L
from lesiondiffusion import realism as R
from lesiondiffusion.evaluation import evaluate_outputs, summary_line
from lesiondiffusion.report import LesionReport, Report, format_ct_value, format_size
from lesiondiffusion.reports import extraction
from lesiondiffusion.requests import SynthesisRequest, write_requests

LIVER = 5


def _ball(shape, centre, radius_vox, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape).astype(np.float64)
    r = radius_vox * min(spacing)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= r**2


def _checkerboard(mask):
    return mask & (np.indices(mask.shape).sum(axis=0) % 2 == 0)


# ---- mask ---------------------------------------------------------------------------------------------
def test_solid_ball_scores_as_a_real_tumour_mask():
    ball = _ball((32, 32, 32), (15.5, 15.5, 15.5), 8)
    m = L.mask_measures(ball, (1.0, 1.0, 1.0))
    assert m["fill_ratio"] == 1.0 and m["interior_fraction"] > 0.6
    assert m["solidity"] == pytest.approx(1.0, abs=0.01)
    assert m["sphericity"] == pytest.approx(1.0, abs=0.03)
    assert m["components_6"] == 1 and m["components_26"] == 1
    # the same ball on a 0.8 x 0.8 x 2.5 mm grid: the measures are physical
    aniso = _ball((48, 48, 16), (23.5, 23.5, 7.5), 12.0 / 0.8, (0.8, 0.8, 2.5))
    assert L.sphericity(aniso, (0.8, 0.8, 2.5)) == pytest.approx(1.0, abs=0.05)
    # a plain face count would make the ball's area 1.5 times too large
    faces = sum(np.count_nonzero(np.diff(np.pad(ball, 1).astype(np.int8), axis=a)) for a in range(3))
    assert L.surface_area_mm2(ball, (1, 1, 1)) < 0.75 * faces


def test_a_cuboid_lesion_is_told_from_a_ball_by_how_much_of_its_box_it_fills():
    ball = _ball((32, 32, 32), (15.5, 15.5, 15.5), 8)
    cuboid = np.zeros((32, 32, 32), bool)
    cuboid[6:26, 8:24, 10:22] = True
    cuboid[6, 8, 10] = cuboid[25, 23, 21] = False  # two corners off: still a box
    small = _ball((16, 16, 16), (7.5, 7.5, 7.5), 3.5)  # 6 voxels across: a round lesion, boxy by voxelisation
    ball_m, cuboid_m, small_m = (L.mask_measures(m, (1.0, 1.0, 1.0)) for m in (ball, cuboid, small))
    assert 0.4 < ball_m["box_fill"] < 0.55 and cuboid_m["box_fill"] > 0.99
    assert cuboid_m["sphericity"] > 0.75  # why sphericity alone does not catch it
    assert R.not_cuboid(ball_m) is True and R.not_cuboid(cuboid_m) is False
    assert small_m["box_fill"] > R.MAX_BOX_FILL and R.not_cuboid(small_m) is None  # too few voxels to tell
    assert cuboid_m["box_voxels"] == [20, 16, 12]


def test_checkerboard_speckle_is_porous_and_many_pieces():
    speckle = _checkerboard(_ball((32, 32, 32), (15.5, 15.5, 15.5), 8))
    m = L.mask_measures(speckle, (1.0, 1.0, 1.0))
    assert m["fill_ratio"] < 0.8 and m["interior_fraction"] == 0.0
    assert m["components_26"] == 1  # diagonal contact joins it under 26-connectivity...
    assert m["components_6"] == np.count_nonzero(speckle) > 100  # ...but every voxel is its own face-connected piece
    assert m["solidity"] < 0.7 and m["sphericity"] < 0.3


def test_a_hole_and_a_notch_lower_the_fill_ratio_and_solidity():
    ball = _ball((32, 32, 32), (15.5, 15.5, 15.5), 10)
    hollow = ball & ~_ball((32, 32, 32), (15.5, 15.5, 15.5), 5)  # an enclosed cavity is filled by hole filling
    assert L.fill_ratio(hollow) == pytest.approx(np.count_nonzero(hollow) / np.count_nonzero(ball))
    notched = ball.copy()
    notched[:, 14:18, :16] = False  # a slot cut to the centre: concave, not closed by one voxel
    assert L.mask_measures(notched, (1, 1, 1))["solidity"] < 0.97
    assert L.components(notched) == 1


# ---- appearance ---------------------------------------------------------------------------------------
def _scene(shape=(40, 40, 40), radius=8, organ_hu=60.0, offset=-50.0, noise=20.0, seed=0):
    rng = np.random.default_rng(seed)
    lesion = _ball(shape, [s / 2 - 0.5 for s in shape], radius)
    image = organ_hu + rng.normal(0.0, noise, shape)
    return image, lesion


def test_noise_ratio_of_a_lesion_with_the_organs_noise_and_of_a_flat_one():
    image, lesion = _scene()
    organ = ~lesion
    noisy = np.where(lesion, image - 50.0, image).astype(np.float32)
    flat = np.where(lesion, 10.0, image).astype(np.float32)
    # a smooth gradient across the lesion is not noise: the high-pass removes it
    ramp = noisy + np.where(lesion, 4.0 * np.indices(lesion.shape)[0], 0.0).astype(np.float32)
    ratios = {}
    for name, img in (("noisy", noisy), ("flat", flat), ("ramp", ramp)):
        ratios[name] = L.noise_measures(L.LesionCrop(img, lesion, organ, (1.0, 1.0, 1.0), 60.0))["noise_std_ratio"]
    assert ratios["noisy"] == pytest.approx(1.0, abs=0.15)
    assert ratios["flat"] < 0.05
    assert ratios["ramp"] == pytest.approx(ratios["noisy"], abs=0.05)


def test_edge_width_orders_sharp_and_blurred_edges():
    _, lesion = _scene(noise=0.0)
    rng = np.random.default_rng(1)
    step = np.where(lesion, 10.0, 60.0)
    widths = {}
    for name, sigma in (("sharp", 0.0), ("soft", 1.0), ("blurred", 2.0)):
        img = (ndi.gaussian_filter(step, sigma) if sigma else step) + rng.normal(0.0, 5.0, step.shape)
        widths[name] = L.edge_width_mm(L.LesionCrop(img.astype(np.float32), lesion, ~lesion, (1.0, 1.0, 1.0), 60.0))
    assert widths["sharp"] < 1.2 < widths["soft"] < widths["blurred"]
    # in mm: the same lesion at 2 mm voxels has a sharp edge twice as wide in mm
    img = (step + rng.normal(0.0, 5.0, step.shape)).astype(np.float32)
    assert L.edge_width_mm(L.LesionCrop(img, lesion, ~lesion, (2.0, 2.0, 2.0), 60.0)) == pytest.approx(
        2 * widths["sharp"], rel=0.2
    )
    # no step, no width
    flat = (60.0 + rng.normal(0.0, 5.0, step.shape)).astype(np.float32)
    assert L.edge_width_mm(L.LesionCrop(flat, lesion, ~lesion, (1.0, 1.0, 1.0), 60.0)) is None


# ---- features and the distance ------------------------------------------------------------------------
def test_interior_fraction_is_compared_with_real_lesions_of_the_same_size_in_voxels():
    from lesiondiffusion.realism import ReferenceLesion, same_size

    def ref(name, diameter):
        return ReferenceLesion(name, "liver", None, None, None, {"equivalent_diameter_voxels": diameter})  # type: ignore[arg-type]

    pool = [ref("tiny", 5.0), ref("small", 9.5), ref("small2", 10.5), ref("mid", 11.0), ref("big", 30.0)]
    assert {r.source for r in same_size(pool, 10.0)} == {"small", "small2", "mid"}  # within 1.2x, any organ
    # fewer than three within 1.2x: the three nearest by ratio, never the 30-voxel lesion for a 6-voxel one
    assert [r.source for r in same_size(pool, 6.0)] == ["tiny", "small", "small2"]
    # a solid ball's interior share grows with its size in voxels: the reason the match is by size
    small, big = (L.interior_fraction(_ball((40, 40, 40), (20, 20, 20), r)) for r in (3, 12))
    assert small < 0.5 < big


def test_first_order_and_glcm_features():
    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, 10.0, 5000) - 50.0
    f = L.first_order(x)
    assert f["skewness"] == pytest.approx(stats.skew(x)) and f["kurtosis"] == pytest.approx(
        stats.kurtosis(x, fisher=False)
    )
    assert f["p50"] == pytest.approx(np.median(x)) and f["std"] == pytest.approx(x.std())
    const = L.first_order(np.full(100, -30.0))
    assert (const["std"], const["entropy"], const["skewness"], const["p10"]) == (0.0, 0.0, 0.0, -30.0)
    mask = np.ones((6, 6, 6), bool)
    flat = L.glcm(np.zeros((6, 6, 6), np.int64), mask)
    assert flat == {"glcm_contrast": 0.0, "glcm_homogeneity": 1.0, "glcm_energy": 1.0, "glcm_correlation": 1.0}
    stripes = np.indices((6, 6, 6))[2] % 2  # levels alternate along one axis only
    g = L.glcm(stripes.astype(np.int64), mask)
    # pairs along that axis (and the 8 diagonals through it) differ by one level, the other 4 directions not
    assert g["glcm_contrast"] == pytest.approx(9 / 13) and g["glcm_correlation"] < 0


def _feature_set(n, seed, flat=False, noise=20.0):
    rows = []
    for i in range(n):
        image, lesion = _scene(shape=(28, 28, 28), radius=5 + i % 3, noise=noise, seed=seed + i)
        img = np.where(lesion, 10.0 if flat else image - 50.0, image).astype(np.float32)
        rows.append(L.features(L.LesionCrop(img, lesion, ~lesion, (1.0, 1.0, 1.0), 60.0)))
    return L.feature_matrix(rows)


def test_frechet_distance_is_zero_to_itself_and_ranks_flat_fill_last():
    truth = _feature_set(6, 100)
    scale = L.feature_scale(truth)
    assert L.frechet_distance(truth, truth, scale) == pytest.approx(0.0, abs=1e-12)
    matched = _feature_set(6, 200)  # same kind of lesion, other noise draws
    flat = _feature_set(6, 200, flat=True)  # the same masks filled flat at the same contrast
    smooth = _feature_set(6, 200, noise=8.0)  # texture too faint
    d_matched, d_smooth, d_flat = (L.frechet_distance(s, truth, scale) for s in (matched, smooth, flat))
    assert d_matched < 0.5 < d_smooth < d_flat
    assert L.frechet_distance(truth[:0], truth, scale) is None


# ---- end to end ---------------------------------------------------------------------------------------
def _deep_points(seg, label, spacing, radius_mm, n):
    free = (seg == LIVER) & ~ndi.binary_dilation(label == 2, iterations=6)
    depth = ndi.distance_transform_edt(np.pad(free, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    points = []
    for _ in range(n):
        p = np.unravel_index(int(depth.argmax()), depth.shape)
        assert depth[p] >= radius_mm + 6, "the demo liver is too thin for the test lesions"
        points.append(tuple(int(v) for v in p))
        depth[_ball(depth.shape, p, 1.2 * radius_mm / spacing[0])] = 0  # the next one elsewhere
    return points


def _report(centre, diameter, density, ct_value) -> Report:
    attrs = {
        "enhancement status": "enhanced CT,", "lesion location": str(LIVER), "shape": "round-like,",
        "size": format_size((diameter,) * 3), "density": density + ",", "density variations": "homogeneous,",
        "CT value": format_ct_value(ct_value), "surface characteristics": "well-defined margin,",
        "relationship with adjacent organs": "no close relationship with surrounding organs,",
        "specific features": "", "cavity": A.V.CAVITY_WITHIN,
    }  # fmt: skip
    return Report((LesionReport(LIVER, attrs, tuple(centre)[::-1], (diameter,) * 3, "round-like,", "tumor"),))


def _save(folder: Path, src: Path, image: np.ndarray, label: np.ndarray) -> None:
    ref = nib.load(src / "image.nii.gz")
    folder.mkdir(parents=True)
    nib.save(
        nib.Nifti1Image(image.astype(ref.get_data_dtype()), ref.affine, header=ref.header), str(folder / "image.nii.gz")
    )
    nib.save(nib.Nifti1Image(label.astype(np.uint8), ref.affine), str(folder / "label.nii.gz"))
    shutil.copyfile(src / "organ_seg.nii.gz", folder / "organ_seg.nii.gz")


@pytest.fixture(scope="module")
def realism_scene(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    src = tiny_demo / "cases" / "Liver_cancer"
    root = tmp_path_factory.mktemp("realism")
    before = np.asarray(nib.load(src / "image.nii.gz").dataobj)
    spacing = tuple(float(s) for s in nib.load(src / "image.nii.gz").header.get_zooms()[:3])
    seg = np.asarray(nib.load(src / "organ_seg.nii.gz").dataobj)
    liver = seg == LIVER
    points = _deep_points(seg, np.asarray(nib.load(src / "label.nii.gz").dataobj), spacing, 8.0, 3)
    reference_hu = extraction.organ_reference_hu(before, liver, spacing)

    # ground truth: three hypodense liver lesions 50 HU below the liver, the liver's own noise kept
    entries = []
    for i, (p, r_mm) in enumerate(zip(points, (7.0, 8.0, 6.0))):
        lesion = _ball(before.shape, p, r_mm / spacing[0], spacing)
        image = np.where(lesion, before - 50, before)
        case = root / "reference" / "cases" / f"gt_{i}"
        _save(case, src, image, np.where(lesion, 2, liver.astype(np.uint8)))
        (case / "type.json").write_text(
            json.dumps(_report(p, int(2 * r_mm), "hypodense lesion", reference_hu - 50).to_json())
        )
        entries.append({k: f"cases/gt_{i}/{n}" for k, n in
                        (("image", "image.nii.gz"), ("label", "label.nii.gz"), ("report", "type.json"), ("organ_seg", "organ_seg.nii.gz"))})  # fmt: skip
    (root / "reference" / "datalist.json").write_text(json.dumps({"training": entries[:2], "validation": entries[2:]}))

    # synthetic outputs, each written into the lesion-free input at the first point
    inputs = root / "inputs"
    inputs.mkdir()
    shutil.copyfile(src / "image.nii.gz", inputs / "ct.nii.gz")
    shutil.copyfile(src / "organ_seg.nii.gz", inputs / "seg.nii.gz")
    ball = _ball(before.shape, points[1], 7.0 / spacing[0], spacing)
    cases = {  # case -> (mask, image, CT value in the report)
        "realistic": (ball, np.where(ball, before - 50, before), reference_hu - 50),
        "flat": (ball, np.where(ball, np.rint(reference_hu - 50), before), reference_hu - 50),
        "speckle": (_checkerboard(ball), np.where(_checkerboard(ball), before - 50, before), reference_hu - 50),
        "faint": (ball, np.where(ball, before - 16, before), reference_hu - 16),
    }
    requests = []
    for case, (mask, image, ct_value) in cases.items():
        attrs = {
            "organ type": "liver",
            "lesion type": "tumor",
            "density": "hypodense",
            "density variations": "homogeneous",
        }
        request = SynthesisRequest(case, inputs / "ct.nii.gz", attrs, inputs / "seg.nii.gz")
        requests.append(request)
        folder = root / "pred" / case
        _save(folder, src, image, np.where(mask, 2, liver.astype(np.uint8)))
        (folder / "report.json").write_text(json.dumps(_report(points[1], 14, "hypodense lesion", ct_value).to_json()))
        provenance = {
            "case": case,
            "request": {"image": str(request.image.resolve())},
            "parameters": {"seed": 0, "margin_mm": 3.0},
        }
        (folder / "provenance.json").write_text(json.dumps(provenance))
    requests_file = write_requests(root / "requests.json", requests)
    snapshot = {p: p.read_bytes() for p in sorted((root / "reference").rglob("*")) if p.is_file()}
    report, paths = evaluate_outputs(root / "pred", requests_file, root / "report", reference=root / "reference")
    plain, _ = evaluate_outputs(root / "pred", requests_file, root / "report_plain")
    return {"root": root, "report": report, "plain": plain, "paths": paths, "snapshot": snapshot,
            "cases": {c["case"]: c for c in report["cases"]}}  # fmt: skip


def test_a_realistic_synthetic_lesion_passes_every_realism_check(realism_scene):
    m = realism_scene["cases"]["realistic"]["realism"]
    assert m["fill_ratio"] == 1.0 and m["solid"] and m["interior_ok"]
    assert m["delta_ok"] and m["delta_in_reference_range"] and m["noise_ok"]
    assert m["median_delta_hu"] == pytest.approx(-50.0, abs=3.0) and m["noise_std_ratio"] == pytest.approx(1.0, abs=0.3)
    ref = m["reference"]
    assert ref["match"] == "organ+density" and ref["lesions"] == 3
    assert ref["median_delta_hu"] == pytest.approx(-50.0, abs=3.0) and ref["fill_ratio"] == 1.0
    assert m["copy_paste_source"].endswith(("training[0]", "training[1]", "validation[0]"))


def test_flat_speckled_and_faint_lesions_are_caught(realism_scene):
    cases = realism_scene["cases"]
    flat = cases["flat"]["realism"]
    assert flat["noise_std_ratio"] < 0.1 and flat["noise_ok"] is False and flat["delta_ok"]
    speckle = cases["speckle"]
    assert speckle["realism"]["fill_ratio"] < 0.8 and speckle["realism"]["solid"] is False
    assert speckle["realism"]["interior_fraction"] == 0.0 and speckle["realism"]["interior_ok"] is False
    # one lesion only under 6-connectivity: the 26-connected count calls the speckle one piece
    assert (
        speckle["mask"]["components_26"] == 1
        and speckle["mask"]["components"] > 50
        and not speckle["mask"]["connected"]
    )
    faint = cases["faint"]["realism"]
    assert faint["delta_ok"] and faint["median_delta_hu"] == pytest.approx(-16.0, abs=3.0)  # what the report asked...
    assert faint["delta_in_reference_range"] is False  # ...but no real hypodense lesion of the set is that faint


def test_totals_distance_and_baselines(realism_scene):
    t = realism_scene["report"]["totals"]["realism"]
    assert t["reference_lesions"] == 3 and t["matched_reference_lesions"] == 3 and t["cases"] == 4
    assert t["solid_rate"] == pytest.approx(3 / 4) and t["noise_ok_rate"] == pytest.approx(2 / 3)
    assert t["one_piece_rate"] == pytest.approx(3 / 4) and t["delta_in_reference_range_rate"] == pytest.approx(3 / 4)
    assert t["ground_truth"]["fill_ratio"] == 1.0 and t["ground_truth"]["median_delta_hu"] == pytest.approx(
        -50.0, abs=3.0
    )
    assert t["edge_width_by_margin"]["well-defined"]["reference_lesions"] == 3
    d = t["realism_distance"]
    assert d["cases_with_features"] == {"synthetic": 4, "flat": 4, "copy_paste": 4}
    # real texture in the synthetic masks is close to the ground truth; a flat fill is far from it
    assert d["copy_paste"] < d["flat"] and d["synthetic"] < d["flat"] and d["beats_flat"]
    assert realism_scene["report"]["totals"]["connected_rate"] == pytest.approx(3 / 4)


def test_report_files_show_the_realism_measures(realism_scene):
    md = realism_scene["paths"]["evaluation.md"].read_text()
    assert "## Realism" in md and "### Realism distance to the ground-truth lesions" in md
    assert "| speckle | 0." in md and "fill, interior" in md and "| flat fill (baseline) |" in md
    on_disk = json.loads(realism_scene["paths"]["evaluation.json"].read_text())
    assert on_disk["reference"] == str((realism_scene["root"] / "reference").resolve())
    line = summary_line(realism_scene["report"])
    assert "realism: solid 75.0%" in line and "distance" in line and "flat" in line and "copy-paste" in line
    # without a reference the per-case measures remain, the comparisons are absent
    plain = {c["case"]: c for c in realism_scene["plain"]["cases"]}
    assert plain["speckle"]["realism"]["fill_ratio"] < 0.8 and "reference" not in plain["speckle"]["realism"]
    assert realism_scene["plain"]["totals"]["realism"]["realism_distance"]["synthetic"] is None
    assert "distance" not in summary_line(realism_scene["plain"])
    # the reference dataset is read, never written
    assert {p: p.read_bytes() for p in realism_scene["snapshot"]} == realism_scene["snapshot"]


def test_a_missing_reference_is_one_input_error(realism_scene, tmp_path):
    from lesiondiffusion.errors import InputError

    root = realism_scene["root"]
    with pytest.raises(InputError, match="no datalist.json"):
        evaluate_outputs(root / "pred", root / "requests.json", tmp_path / "r", reference=tmp_path)
    with pytest.raises(InputError, match="reference dataset not found"):
        evaluate_outputs(root / "pred", root / "requests.json", tmp_path / "r", reference=tmp_path / "nope.json")
    assert not (tmp_path / "r").exists()
