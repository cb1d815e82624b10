"""The real-CT dataset: lesions of known attributes written into real scans (``tests/data/ts_small``,
a 3 mm abdomen CT with its v2 organ map), a synthetic chest with a real lesion label and no organ map
(lungs by thresholds), whole-scan hold-out and requests, and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from in_process import run_cli
from scipy import ndimage as ndi

from lesiondiffusion import real_dataset as R
from lesiondiffusion.dataset import load_cases, read_datalist, read_split, validate_cases
from lesiondiffusion.labels import label_table
from lesiondiffusion.placement import Box, allowed_region
from lesiondiffusion.report import read_report
from lesiondiffusion.reports.extraction import organ_reference_hu
from lesiondiffusion.requests import read_requests

TS_SMALL = Path(__file__).resolve().parents[1] / "data" / "ts_small"
SPACING = 2.5  # mm, the synthetic chest's voxel size


def synthetic_chest(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A chest CT (HU, RAS 2.5 mm): body, two lungs (the left at -x: RAS +x is the patient's right), a
    midline trachea, a nodule in the upper half of the left lung. Returns image, affine, left lung, right lung (nodule included in the left), nodule."""
    shape = (80, 64, 24)
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * SPACING for n in shape], indexing="ij")
    body = (x / 90.0) ** 2 + (y / 70.0) ** 2 <= 1.0
    left = ((x + 45.0) / 30.0) ** 2 + (y / 45.0) ** 2 <= 1.0
    right = ((x - 45.0) / 30.0) ** 2 + (y / 45.0) ** 2 <= 1.0
    trachea = x**2 + (y + 20.0) ** 2 <= 8.0**2
    nodule = (x + 45.0) ** 2 + y**2 + (z - 12.0) ** 2 <= 9.0**2
    image = np.full(shape, -1000.0, np.float32)
    image[body] = 40.0
    image[left | right] = -850.0
    image[trachea] = -1000.0
    image[nodule] = 30.0
    image += rng.normal(0, 12.0, shape).astype(np.float32) * body
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * SPACING for n in shape]
    return np.rint(image).astype(np.int16), affine, left, right, nodule


def make_corpus(root: Path) -> Path:
    """A corpus in fetch-data's layout: ts_small (v2 map, non-contrast) and the synthetic chest (lesion, no map)."""
    (root / "scans" / "ts_small").mkdir(parents=True)
    shutil.copyfile(TS_SMALL / "example_ct_sm.nii.gz", root / "scans" / "ts_small" / "image.nii.gz")
    shutil.copyfile(TS_SMALL / "example_seg.nii.gz", root / "scans" / "ts_small" / "organ_seg.nii.gz")
    image, affine, _, _, nodule = synthetic_chest()
    (root / "scans" / "chest").mkdir(parents=True)
    nib.save(nib.Nifti1Image(image, affine), root / "scans" / "chest" / "image.nii.gz")
    nib.save(nib.Nifti1Image(nodule.astype(np.uint8), affine), root / "scans" / "chest" / "lesion.nii.gz")
    scans = [
        {"id": "ts_small", "image": "scans/ts_small/image.nii.gz", "organ_seg": "scans/ts_small/organ_seg.nii.gz",
         "organ_seg_version": "v2", "lesion": None, "contrast_phase": "non-contrast", "region": "abdomen"},
        {"id": "chest", "image": "scans/chest/image.nii.gz", "organ_seg": None, "organ_seg_version": None,
         "lesion": "scans/chest/lesion.nii.gz", "contrast_phase": "", "region": "chest"},
    ]  # fmt: skip
    (root / "manifest.json").write_text(json.dumps({"version": 1, "scans": scans}))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real")
    corpus = make_corpus(root / "corpus")
    return R.build_real_dataset(
        corpus, root / "out", lesions_per_scan=3, seed=0, val_scans=["ts_small"], requests_per_scan=1
    )


@pytest.fixture(scope="module")
def ts_ctx() -> R.ScanContext:
    meta = R.CorpusScan(
        "ts_small", TS_SMALL / "example_ct_sm.nii.gz", TS_SMALL / "example_seg.nii.gz", "v2", None, "non-contrast"
    )
    return R.scan_context(R.load_scan(meta))


def _paint(ctx: R.ScanContext, seed: int, **fixed) -> R.Painted:
    table = label_table("v1")
    organ_id = table.id(fixed.pop("organ", "liver"))
    intent = R.draw_intent(
        table.name(organ_id), organ_id, ctx.reference_hu[organ_id], np.random.default_rng(seed), **fixed
    )
    painted = R.paint_lesion(ctx.scan, intent, np.random.default_rng(seed + 1))
    assert painted is not None
    return painted


def edge_width_mm(image: np.ndarray, lesion: np.ndarray, organ: np.ndarray, spacing: float) -> float:
    """10-90% width of the mean HU profile across the lesion's boundary (signed distance bins of 1 mm)."""
    d = ndi.distance_transform_edt(~lesion, sampling=spacing) - ndi.distance_transform_edt(lesion, sampling=spacing)
    d = np.where(lesion, d + spacing / 2, d - spacing / 2)  # voxel centres: boundary half a voxel away
    sel = (organ | lesion) & (np.abs(d) <= 15.0)
    bins = np.arange(-15.0, 15.01, 1.5)
    centres, means = [], []
    for a, b in zip(bins[:-1], bins[1:]):
        m = sel & (d >= a) & (d < b)
        if m.sum() >= 5:
            centres.append((a + b) / 2)
            means.append(float(image[m].mean()))
    centres, means = np.array(centres), np.array(means)
    inner, outer = means[centres < -9].mean(), means[centres > 9].mean()
    frac = (means - outer) / (inner - outer)  # 1 in the lesion, 0 in the organ, decreasing outwards
    frac = np.minimum.accumulate(np.clip(frac, 0, 1))  # monotone: noise does not add crossings
    at = lambda level: float(np.interp(-level, -frac, centres))  # noqa: E731
    return at(0.1) - at(0.9)


def test_lesion_hu_follows_class_and_value_in_this_scan(ts_ctx: R.ScanContext) -> None:
    spacing = ts_ctx.scan.spacing
    liver = ts_ctx.scan.seg == label_table("v1").id("liver")
    ref = ts_ctx.reference_hu[label_table("v1").id("liver")]
    assert abs(ref - 46.0) < 3  # the non-contrast liver of this scan, not a typical enhanced value
    for density, hu, lo, hi in (
        (R.HYPERDENSE, ref + 40.0, 20, 60),
        (R.HYPODENSE, ref - 20.5, -60, -20),
        (R.FLUID_LIKE, 8.0, -999, -20),
    ):
        p = _paint(
            ts_ctx, 3, density=density, hu=hu, diameter_mm=25.0, shape="round", heterogeneous=False, well_defined=True
        )
        mean = float(p.image[p.lesion].mean())
        organ_now = organ_reference_hu(p.image, liver, spacing, exclude=p.lesion)
        assert abs(mean - hu) < 1.0, (density, mean, hu)
        assert lo - 3 <= mean - organ_now <= hi + 3, (density, mean, organ_now)
        # only voxels of the organ changed, and the lesion lies in the allowed region of its placement box
        changed = p.image != ts_ctx.scan.image
        assert not (changed & ~liver).any()
        assert not (p.lesion & ~allowed_region(liver, "within the parenchymal organ", p.box, hollow=False)).any()


def test_lesion_keeps_the_scans_noise(ts_ctx: R.ScanContext) -> None:
    liver = ts_ctx.scan.seg == label_table("v1").id("liver")
    interior_organ = ndi.binary_erosion(liver, iterations=1)
    ratios = []
    for seed in (5, 6, 7):
        p = _paint(
            ts_ctx, seed, density=R.HYPERDENSE, diameter_mm=30.0, shape="oval", heterogeneous=False, well_defined=True
        )
        core = ndi.binary_erosion(p.lesion, iterations=1)
        far = interior_organ & ~ndi.binary_dilation(p.lesion, iterations=3)
        ratios.append(float(p.image[core].std() / p.image[far].std()))
    assert all(0.7 <= r <= 1.5 for r in ratios), ratios


def test_ill_defined_margin_is_wider(ts_ctx: R.ScanContext) -> None:
    liver = ts_ctx.scan.seg == label_table("v1").id("liver")
    widths = {}
    for well in (True, False):
        sigma = 0.3 if well else 4.0
        p = _paint(ts_ctx, 11, density=R.HYPERDENSE, hu=110.0, diameter_mm=36.0, shape="round", heterogeneous=False,
                   well_defined=well, margin_sigma_mm=sigma)  # fmt: skip
        widths[well] = edge_width_mm(p.image, p.lesion, liver, 3.0)
    assert widths[False] > widths[True] + 3.0, widths


def test_threshold_lung_map_finds_the_lungs() -> None:
    image, affine, left, right, _ = synthetic_chest(1)
    seg = R.threshold_organ_map(image, affine, "v1")
    table = label_table("v1")
    upper_half = (np.arange(image.shape[2]) >= image.shape[2] / 2)[None, None, :]
    for truth, side in ((left, "left"), (right, "right")):
        found = np.isin(seg, [table.id(R.THRESHOLD_LUNG_NAMES[side, p]) for p in ("upper", "lower")])
        dice = 2 * (found & truth).sum() / (found.sum() + truth.sum())
        assert dice > 0.93, (side, dice)
        upper = seg == table.id(R.THRESHOLD_LUNG_NAMES[side, "upper"])
        assert (upper == (found & upper_half)).mean() > 0.99
    body = R.body_mask(image, affine)
    assert not (seg > 0)[~body].any()  # the air around the body is no lung
    near_midline = np.abs(np.arange(image.shape[0]) - (image.shape[0] - 1) / 2) * SPACING < 8.0
    assert not (seg[near_midline] > 0).any()  # the trachea is no lung


def test_dataset_validates_and_holds_out_whole_scans(built: Path) -> None:
    cases = load_cases(datalist=built / "datalist.json")
    # every map is written in v1; a lung-only threshold map's numbering cannot be told from its anatomy
    assert validate_cases(cases, "v1") == []
    meta = json.loads((built / "dataset.json").read_text())
    train = [str(c.image) for c in read_split(built, "train")]
    val = [str(c.image) for c in read_split(built, "val")]
    assert train and val and not set(train) & set(val)
    assert all("/ts_small_" not in p for p in train) and all("/ts_small_" in p for p in val)
    assert {t["scan"] for t in meta["cases"] if t["split"] == "training"} == {"chest"}
    assert len(read_datalist(built / "datalist.json")["validation"]) == 3
    # the organ maps are v1 (ts_small's v2 map converted): the liver is 5 in both, the pancreas 10 in v1 (7 in v2)
    seg = np.asanyarray(nib.load(built / "cases" / "ts_small_000" / "organ_seg.nii.gz").dataobj)
    assert label_table("v1").id("pancreas") in np.unique(seg) and meta["organ_seg_version"] == "v1"


def test_synthetic_cases_state_their_truth(built: Path) -> None:
    meta = json.loads((built / "dataset.json").read_text())
    for t in (t for t in meta["cases"] if t["kind"] == "synthetic"):
        folder = built / "cases" / t["case"]
        image = np.asanyarray(nib.load(folder / "image.nii.gz").dataobj).astype(np.float32)
        label = np.asanyarray(nib.load(folder / "label.nii.gz").dataobj)
        seg = np.asanyarray(nib.load(folder / "organ_seg.nii.gz").dataobj)
        lesion = label == 2
        organ = seg == t["organ_id"]
        assert lesion.any() and not (lesion & ~organ).any()
        box = Box(**t["box"])
        crop_box = Box(tuple(c - s for c, s in zip(box.centre, t["crop_start"])), box.size)
        assert not (lesion & ~allowed_region(organ, "within the parenchymal organ", crop_box, hollow=False)).any()
        assert abs(float(image[lesion].mean()) - t["lesion_hu"]) < 1.0
        report = read_report(folder / "type.json")[t["organ_id"]]
        assert report.classes("density") == [t["density"]]
        assert report.mean_hu == pytest.approx(t["measured_mean_hu"], abs=0.05)
        assert report.classes("enhancement status") == ["non-contrast ct"]


def test_real_lesion_case_and_requests(built: Path) -> None:
    folder = built / "cases" / "chest_real"
    label = np.asanyarray(nib.load(folder / "label.nii.gz").dataobj)
    seg = np.asanyarray(nib.load(folder / "organ_seg.nii.gz").dataobj)
    left_id = label_table("v1").id(R.THRESHOLD_LUNG_NAMES["left", "upper"])
    report = read_report(folder / "type.json")
    assert report.organ_ids == (left_id,)
    assert (seg[label == 2] == left_id).all()
    # the extracted report reads the nodule as a solid mass near its true mean (30 HU)
    assert report[left_id].classes("density") == ["isodense soft tissue mass"]
    assert abs(report[left_id].mean_hu - 30.0) < 8
    requests = read_requests(built / "requests" / "requests.json")
    assert requests and {r.image.name for r in requests} == {"ts_small.nii.gz"}
    assert [r.attributes["density"] for r in requests] == ["hypodense lesion", "isodense lesion", "hyperdense lesion"]
    original = (TS_SMALL / "example_ct_sm.nii.gz").read_bytes()
    assert requests[0].image.read_bytes() == original  # the held-out scan as it is, lesion-free


def test_command_line(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    run = run_cli("make-dataset", "--source", "real", "--corpus", str(corpus), "--out", str(tmp_path / "out"),
                  "--val_scans", "ts_small", "--lesions_per_scan", "1")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("datalist.json")
    assert validate_cases(load_cases(datalist=run.stdout.strip()), "v1") == []
    bad = run_cli(
        "make-dataset",
        "--source",
        "real",
        "--corpus",
        str(corpus),
        "--out",
        str(tmp_path / "o2"),
        "--val_scans",
        "nope",
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr


def test_every_lesion_type_the_real_dataset_writes_is_a_known_request_value():
    from lesiondiffusion.real_dataset import LESION_TYPE
    from lesiondiffusion.sanity import known_lesion_type

    assert all(known_lesion_type(t) for t in LESION_TYPE.values())  # its own held-out requests must run
    assert not known_lesion_type("dragon egg")
