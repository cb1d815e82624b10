"""Scan-aware reports: the organ's HU and the contrast phase measured in the scan, and reports that agree.

Real data: ``tests/data/ts_small`` (a crop of TotalSegmentator's example abdomen CT, non-contrast, 3 mm,
with its v2 organ map). A contrast-enhanced scan is made from it by brightening the vessels and the liver.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion import attributes as A
from lesiondiffusion import vocabulary as V
from lesiondiffusion.labels import label_table
from lesiondiffusion.manifest import read_manifest
from lesiondiffusion.report import parse_ct_value, read_report
from lesiondiffusion.reports import extraction, generation
from lesiondiffusion_tools.bundle_runner import run_bundle_in_process

DATA = Path(__file__).resolve().parents[1] / "data" / "ts_small"
V2 = label_table("v2")
LIVER, KIDNEY = V2.id("liver"), V2.id("kidney left")
AORTA, PORTAL = V2.id(A.AORTA), V2.id(A.PORTAL_VEIN)
BOX = (90, 80, 30)


@pytest.fixture(scope="module")
def ct():
    """(HU image, v2 organ map, spacing) of the real non-contrast crop."""
    image = nib.load(str(DATA / "example_ct_sm.nii.gz"))
    seg = nib.load(str(DATA / "example_seg.nii.gz"))
    return (np.asanyarray(image.dataobj).astype(np.float32), np.asanyarray(seg.dataobj).astype(np.int16),
            tuple(float(z) for z in image.header.get_zooms()))  # fmt: skip


@pytest.fixture(scope="module")
def plain(ct):
    return extraction.measure_scan(ct[0], ct[1], LIVER, "v2", ct[2])


def enhanced_copy(ct, aorta_hu, portal_hu, liver_add=55.0):
    """The crop with contrast: vessels set to the given HU (plus noise), the liver brighter."""
    image, seg, spacing = ct
    rng = np.random.default_rng(0)
    out = image.copy()
    for label, hu in ((AORTA, aorta_hu), (PORTAL, portal_hu)):
        inside = seg == label
        out[inside] = hu + rng.normal(0, 12, int(inside.sum()))
    out[seg == LIVER] += liver_add
    return out


def report_for(request, scan, organ_id=LIVER, seed=0, **kw):
    rng = np.random.default_rng(seed)
    proposed = generation.OfflineReportProvider().propose(
        request, V2.name(organ_id), rng, organ_box_size=BOX, scan=scan
    )
    return generation.complete_report(request, organ_id, BOX, proposed, rng, version="v2", scan=scan, **kw).attributes


# ---- measuring ---------------------------------------------------------------------------------------------------
def test_the_real_plain_scan_is_measured(plain, ct):
    # unenhanced liver is 40-65 HU; the example measures 46 HU (aorta 43, portal vein 38)
    assert 40.0 <= plain.organ_hu <= 60.0
    assert plain.phase == A.PHASE_NON_CONTRAST and plain.contrast is False
    assert plain.aorta_hu < A.NON_CONTRAST_MAX_AORTA_HU and 20.0 < plain.portal_vein_hu < 70.0
    assert plain.enhancement == A.NON_CONTRAST
    record = plain.to_json()
    assert json.loads(json.dumps(record)) == record
    assert record["summary"].startswith(f"liver {plain.organ_hu:.0f} HU, non-contrast (aorta ")
    # the organ's value is its eroded median: the rim (partial volume with fat) does not pull it down
    liver = ct[1] == LIVER
    assert plain.organ_hu >= float(np.median(ct[0][liver]))


def test_the_measurement_does_not_depend_on_the_grid(ct, plain):
    # the same scan on a 1 mm grid along z (what the preprocess stage measures) gives about the same values
    image, seg, spacing = ct
    fine = np.repeat(image, 3, axis=2), np.repeat(seg, 3, axis=2)
    scan = extraction.measure_scan(*fine, LIVER, "v2", (spacing[0], spacing[1], spacing[2] / 3))
    assert scan.phase == plain.phase and abs(scan.organ_hu - plain.organ_hu) <= 3.0


@pytest.mark.parametrize(
    "aorta_hu, portal_hu, phase",
    [(250.0, 160.0, A.PHASE_ARTERIAL), (170.0, 180.0, A.PHASE_PORTAL_VENOUS), (250.0, 180.0, A.PHASE_ARTERIAL)],
)
def test_a_contrast_enhanced_scan_is_read_as_enhanced(ct, aorta_hu, portal_hu, phase):
    scan = extraction.measure_scan(enhanced_copy(ct, aorta_hu, portal_hu), ct[1], LIVER, "v2", ct[2])
    assert scan.phase == phase and scan.contrast is True and scan.enhancement == A.ENHANCED
    assert abs(scan.aorta_hu - aorta_hu) < 10 and abs(scan.portal_vein_hu - portal_hu) < 10
    assert scan.organ_hu > 90.0
    # a hypodense tumour there sits clearly below the enhanced liver, and the report says enhanced
    for seed in range(5):
        attrs = report_for(
            {"organ type": "liver", "lesion type": "metastasis", "density": "hypodense"}, scan, seed=seed
        )
        assert attrs["enhancement status"] == "enhanced CT,"
        assert parse_ct_value(attrs["CT value"]) <= scan.organ_hu - A.GENERATED_MIN_GAP_HU


def test_vessels_missing_from_the_map_leave_the_phase_unknown(ct, plain):
    image, seg, spacing = ct
    no_vessels = np.where(np.isin(seg, (AORTA, PORTAL)), 0, seg)
    scan = extraction.measure_scan(image, no_vessels, LIVER, "v2", spacing)
    assert scan.phase == A.PHASE_UNKNOWN and scan.contrast is None and scan.enhancement == ""
    assert scan.organ_hu == plain.organ_hu  # the organ's own value still anchors the CT value
    assert "no aorta or portal vein" in scan.describe()
    # an enhanced portal vein alone tells the phase
    portal_only = np.where(seg == AORTA, 0, seg)
    assert (
        extraction.measure_scan(enhanced_copy(ct, 60.0, 175.0), portal_only, LIVER, "v2", spacing).phase
        == A.PHASE_PORTAL_VENOUS
    )
    # v1 maps have the same vessels
    assert {A.AORTA, A.PORTAL_VEIN} <= {n.replace(" ", "_") for n in label_table("v1").names.values()}


# ---- reports on the measured scan ----------------------------------------------------------------------------------
def test_a_cyst_is_water_and_the_report_says_plain_scan(plain):
    proposed = generation.OfflineReportProvider().propose(
        {"organ type": "liver", "lesion type": "cyst"}, "liver", np.random.default_rng(0), scan=plain
    )
    assert proposed["enhancement status"] == "non-contrast CT,"  # the provider's own proposal, before any merge
    for seed in range(10):
        attrs = report_for({"organ type": "liver", "lesion type": "cyst", "size": "25 mm"}, plain, seed=seed)
        hu = parse_ct_value(attrs["CT value"])
        assert 0.0 <= hu <= 20.0 and hu <= plain.organ_hu - A.GENERATED_MIN_GAP_HU
        assert attrs["density"] == "hypoattenuating fluid-like lesion,"
        assert attrs["enhancement status"] == "non-contrast CT,"


def test_a_hypodense_tumour_is_clearly_below_the_measured_liver(plain):
    for seed in range(10):
        for request in ({"organ type": "liver", "lesion type": "tumour", "density": "hypodense"},
                        {"organ type": "liver", "lesion type": "metastasis", "density": "hypodense lesion"}):  # fmt: skip
            attrs = report_for(request, plain, seed=seed)
            assert parse_ct_value(attrs["CT value"]) <= plain.organ_hu - A.GENERATED_MIN_GAP_HU
            assert attrs["enhancement status"] == "non-contrast CT,"
        # with no density asked, whatever class is drawn agrees with the value; nothing enhances
        attrs = report_for({"organ type": "liver", "lesion type": "hepatocellular carcinoma"}, plain, seed=seed)
        assert not A.report_conflicts(attrs, "liver", plain)
        assert V.parse_classes("density", attrs["density"])[0][0] not in ("ring enhancement", "hyperdense lesion")


@pytest.mark.parametrize(
    "lesion_type, organ_id", [("angiomyolipoma", KIDNEY), ("lipoma", LIVER), ("mature teratoma", LIVER)]
)
def test_a_fat_containing_lesion_is_negative(plain, ct, lesion_type, organ_id):
    scan = extraction.measure_scan(ct[0], ct[1], organ_id, "v2", ct[2])
    for seed in range(5):
        attrs = report_for({"organ type": V2.name(organ_id), "lesion type": lesion_type}, scan, organ_id, seed)
        assert A.FAT_HU[0] <= parse_ct_value(attrs["CT value"]) <= A.FAT_HU[1]
        assert attrs["density"] == "hypodense lesion,"  # fat is not fluid


def test_a_calcification_is_dense(plain):
    for seed in range(5):
        attrs = report_for({"organ type": "liver", "lesion type": "calcification"}, plain, seed=seed)
        assert parse_ct_value(attrs["CT value"]) > 200.0
        assert attrs["density"] == "hyperdense lesion," and "stone" in attrs["specific features"]


def test_a_haematoma_is_blood_and_its_density_follows_the_liver(plain):
    seen = set()
    for seed in range(12):
        attrs = report_for({"organ type": "liver", "lesion type": "subcapsular haematoma"}, plain, seed=seed)
        hu = parse_ct_value(attrs["CT value"])
        assert A.BLOOD_HU[0] <= hu <= A.BLOOD_HU[1]
        assert attrs["density"] == A.density_for_value(hu, plain.organ_hu, "liver") + ","
        assert abs(hu - plain.organ_hu) <= A.ISO_GENERATED_HU or abs(hu - plain.organ_hu) >= A.GENERATED_MIN_GAP_HU
        seen.add(attrs["density"])
    assert seen == {"isodense lesion,", "hyperdense lesion,"}


def test_the_users_values_win_and_a_contradiction_is_a_warning(plain, caplog):
    caplog.set_level(logging.INFO)
    # the user's CT value sets the density class
    attrs = report_for({"organ type": "liver", "lesion type": "tumour", "CT value": "80 HU"}, plain)
    assert parse_ct_value(attrs["CT value"]) == 80.0 and attrs["density"] == "hyperdense lesion,"
    # a density and CT value that contradict each other on this scan are kept, with a warning
    caplog.clear()
    request = {"organ type": "liver", "lesion type": "tumour", "density": "hypodense", "CT value": "60 HU"}
    attrs = report_for(request, plain)
    assert attrs["density"] == "hypodense" and parse_ct_value(attrs["CT value"]) == 60.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'hypodense lesion' at 60 HU is not below the liver's 46 HU" in w for w in warnings), warnings
    # the user's enhancement status wins too, with a warning
    caplog.clear()
    attrs = report_for({"organ type": "liver", "lesion type": "cyst", "enhancement status": "enhanced CT"}, plain)
    assert attrs["enhancement status"] == "enhanced CT"
    assert any("contradicts the scan" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_a_careless_proposal_is_made_to_agree(plain):
    rng = np.random.default_rng(0)
    proposed = generation.OfflineReportProvider().propose(
        {"organ type": "liver", "lesion type": "cyst"}, "liver", rng, scan=plain
    )
    careless = {**proposed, "enhancement status": "enhanced CT,", "density": "hyperdense lesion,"}
    attrs = generation.complete_report(
        {"organ type": "liver", "lesion type": "cyst"}, LIVER, BOX, careless, rng, version="v2", scan=plain
    ).attributes
    assert attrs["enhancement status"] == "non-contrast CT,"
    assert attrs["density"] == "hypoattenuating fluid-like lesion,"  # the proposal's own CT value (water) decides
    assert not A.report_conflicts(attrs, "liver", plain)


def test_conflicts_are_named():
    scan = A.ScanContext("liver", 46.0, A.PHASE_NON_CONTRAST, 43.0, 38.0)
    attrs = {"density": "hypodense lesion,", "CT value": "50 HU", "enhancement status": "enhanced CT,"}
    problems = A.report_conflicts(attrs, "liver", scan)
    assert len(problems) == 2 and "not below the liver's 46 HU" in problems[0] and "non-contrast" in problems[1]
    assert A.report_conflicts(attrs, "liver", scan, fixed=("density", "CT value", "enhancement status")) == []
    assert A.report_conflicts({"density": "ring enhancement,", "CT value": "10 HU"}, "liver", scan)
    assert not A.report_conflicts(
        {"density": "isodense lesion,", "CT value": "52 HU", "enhancement status": "non-contrast CT,"}, "liver", scan
    )


@pytest.mark.slow
def test_preprocess_records_the_scan_and_writes_a_plain_scan_cyst(tmp_path):
    out = tmp_path / "out"
    run_bundle_in_process("preprocess", {
        "output_dir": str(out), "image": str(DATA / "example_ct_sm.nii.gz"), "organ_seg": str(DATA / "example_seg.nii.gz"),
        "organ_seg_version": "v2", "attributes": json.dumps({"organ type": "liver", "lesion type": "cyst", "size": "25 mm"}),
    })  # fmt: skip
    (case,) = read_manifest(out / "manifest.json").cases
    scan = case.extra["scan"]
    assert scan["organ"] == "liver" and scan["phase"] == "non-contrast" and scan["contrast"] is False
    assert 40.0 <= scan["organ_hu"] <= 60.0 and scan["aorta_hu"] < 70.0
    assert scan["summary"].startswith("liver ") and "non-contrast (aorta" in scan["summary"]
    attrs = read_report(case.lesions[0].report)[case.lesions[0].organ_id].attributes
    assert attrs["enhancement status"] == "non-contrast CT,"
    assert 0.0 <= parse_ct_value(attrs["CT value"]) <= 20.0
