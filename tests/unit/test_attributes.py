"""Reports: extraction from (CT, label, organ map) on synthetic scenes, offline generation, request merge."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from lesiondiffusion import attributes as A
from lesiondiffusion import vocabulary as V
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.labels import UnknownOrganError, label_table
from lesiondiffusion.report import Report, parse_ct_value, read_report, write_report
from lesiondiffusion.reports import extraction, generation

LIVER, KIDNEY, SPLEEN, AORTA, BLADDER = 5, 2, 1, 7, 104  # TotalSegmentator v1
LUNG = label_table().id("lung upper lobe left")


# ---- synthetic scenes (coordinates in mm, so one scene can be sampled on any grid) -----------------------
def coords(spacing=(1.0, 1.0, 1.0), extent=48.0):
    n = [int(round(extent / s)) for s in spacing]
    return np.meshgrid(*[(np.arange(k) + 0.5) * s for k, s in zip(n, spacing)], indexing="ij")


def ball(c, centre, radii):
    radii = (radii,) * 3 if np.isscalar(radii) else radii
    return sum(((ci - p) / r) ** 2 for ci, p, r in zip(c, centre, radii)) <= 1.0


def paint(
    organ,
    lesion,
    spacing=(1.0, 1.0, 1.0),
    organ_hu=60.0,
    lesion_hu=20.0,
    noise=5.0,
    blur_mm=0.6,
    blobs=0.0,
    extra=(),
    seed=0,
    lesion_blur_mm=None,
):
    """A CT (float32 HU): fat, organ, lesion and extra (mask, HU) regions, blurred, with white noise."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing)
    image = np.full(organ.shape, -100.0)
    image[organ] = organ_hu
    for mask, hu in extra:
        image[mask] = hu
    if lesion_blur_mm is None:
        image[lesion] = lesion_hu
    else:  # a lesion fading into the organ over a few mm
        image[lesion] = organ_hu
        weight = ndi.gaussian_filter(lesion.astype(float), lesion_blur_mm / sp)
        image = image + weight * (lesion_hu - organ_hu) * (organ | lesion)
    if blobs:
        field = ndi.gaussian_filter(rng.standard_normal(organ.shape), 2.5 / sp)
        inside = field[lesion]
        image[lesion] += blobs * (inside - inside.mean()) / inside.std()
    image = ndi.gaussian_filter(image, blur_mm / sp) + rng.normal(0.0, noise, organ.shape)
    return image.astype(np.float32)


def maps(organ, lesion, organ_id=LIVER, extra=()):
    seg = np.where(organ | lesion, organ_id, 0).astype(np.int16)
    for mask, label_id in extra:
        seg[mask & ~lesion] = label_id
    label = organ.astype(np.uint8)
    label[lesion] = 2
    return label, seg


def liver_scene(lesion_hu=20.0, radius=7.0, centre=(24.0, 24.0, 24.0), spacing=(1.0, 1.0, 1.0), **kw):
    c = coords(spacing)
    organ = ball(c, (24.0, 24.0, 24.0), (21.0, 20.0, 19.0))
    lesion = ball(c, centre, radius)
    label, seg = maps(organ, lesion)
    return paint(organ & ~lesion, lesion, spacing, lesion_hu=lesion_hu, **kw), label, seg


def extract(image, label, seg, spacing=(1.0, 1.0, 1.0), **kw):
    return extraction.extract_report(image, label, seg, spacing, **kw).attributes


# ---- extraction ----------------------------------------------------------------------------------------------
def test_box_size_and_ct_value_in_the_reports_axis_order():
    c = coords()
    organ = ball(c, (24, 24, 24), 22)
    lesion = ball(c, (20.0, 24.0, 28.0), (6.0, 4.0, 3.0))  # 12 x 8 x 6 voxels along the array axes
    label, seg = maps(organ, lesion)
    image = paint(organ & ~lesion, lesion, lesion_hu=25.0)
    report = extraction.extract_report(image, label, seg)
    idx = np.argwhere(lesion)
    size = tuple(int(v) for v in idx.max(0) - idx.min(0) + 1)
    centre = tuple(int(v) for v in idx.min(0) + np.array(size) // 2)
    assert report.size == size[::-1] and report.centre == centre[::-1]  # reversed: the original files' order
    assert report.array_box() == (centre, size)
    assert report.attributes["size"] == f"[[{size[2]} {size[1]} {size[0]}]] pixel"
    assert report.attributes[A.SIZE_MM] == f"{size[2]} x {size[1]} x {size[0]} mm"
    assert report.organ_id == LIVER and report.attributes["lesion location"] == "5"
    assert abs(report.mean_hu - float(image[lesion].mean())) < 0.06  # rounded to 0.1 HU
    assert report.summary == report.attributes["shape"]


@pytest.mark.parametrize(
    "lesion_hu, density",
    [
        (8.0, "hypoattenuating fluid-like lesion"),
        (30.0, "hypodense lesion"),
        (63.0, "isodense lesion"),
        (110.0, "hyperdense lesion"),
    ],
)
def test_density_relative_to_the_parenchyma(lesion_hu, density):
    attrs = extract(*liver_scene(lesion_hu))
    assert V.parse_classes("density", attrs["density"])[0] == [density]
    assert attrs["density variations"] == "homogeneous,"


def test_density_follows_the_organ_not_a_fixed_scale():
    # 60 HU is isodense in a 60 HU liver and hypodense in a 100 HU one
    assert extract(*liver_scene(60.0))["density"] == "isodense lesion,"
    assert extract(*liver_scene(60.0, organ_hu=100.0))["density"] == "hypodense lesion,"


def test_mixed_density():
    c = coords()
    organ = ball(c, (24, 24, 24), 21)
    lesion = ball(c, (24, 24, 24), 8)
    label, seg = maps(organ, lesion)
    half = lesion & (c[0] < 24)
    image = paint(organ & ~lesion, lesion, lesion_hu=100.0, extra=())
    image[half] -= 80.0  # half the lesion at ~20 HU, half at ~100 HU, in a 60 HU liver
    attrs = extract(image, label, seg)
    assert attrs["density"] == "mixed-density lesion," and attrs["density variations"] == "heterogeneous,"


def test_hollow_organ_density_is_against_the_wall_not_the_contents():
    c = coords()
    organ = ball(c, (24, 24, 24), 21)
    lesion = ball(c, (24, 24, 24), 7)
    label, seg = maps(organ, lesion, organ_id=BLADDER)
    image = paint(organ & ~lesion, lesion, organ_hu=10.0, lesion_hu=42.0)  # urine 10 HU, lesion 42 HU
    attrs = extract(image, label, seg)
    assert attrs["density"] == "isodense lesion,"  # like the wall (HOLLOW_REFERENCE_HU), not "hyperdense"


@pytest.mark.parametrize(
    "lesion_hu, density", [(35.0, "isodense soft tissue mass"), (-600.0, "low-density ground-glass opacity")]
)
def test_lung_lesions(lesion_hu, density):
    c = coords()
    organ = ball(c, (24, 24, 24), 21)
    lesion = ball(c, (24, 24, 24), 6)
    label, seg = maps(organ, lesion, organ_id=LUNG)
    attrs = extract(paint(organ & ~lesion, lesion, organ_hu=-850.0, lesion_hu=lesion_hu), label, seg)
    assert attrs["density"] == density + ","


def test_voxel_noise_is_not_heterogeneity_but_structure_is():
    quiet = extract(*liver_scene(30.0, noise=20.0))  # real CT noise level, no structure
    assert quiet["density variations"] == "homogeneous," and quiet["specific features"] == ""
    blobby = extract(*liver_scene(30.0, radius=9.0, blobs=25.0))  # the phantom's heterogeneous lesions
    assert blobby["density variations"] == "heterogeneous,"
    assert V.parse_classes("specific features", blobby["specific features"])[0] == [
        "presence of increased density areas",
        "presence of decreased density areas",
    ]


@pytest.mark.parametrize(
    "focus_hu, feature", [(90.0, "presence of increased density areas"), (-40.0, "presence of decreased density areas")]
)
def test_density_areas(focus_hu, feature):
    c = coords()
    organ = ball(c, (24, 24, 24), 21)
    lesion = ball(c, (24, 24, 24), 9)
    label, seg = maps(organ, lesion)
    image = paint(organ & ~lesion, lesion, lesion_hu=30.0, extra=())
    focus = ball(c, (24, 24, 27), 5)  # ~17% of the lesion
    image[focus] += focus_hu - 30.0
    attrs = extract(image, label, seg)
    assert V.parse_classes("specific features", attrs["specific features"])[0] == [feature]


def test_calcific_lesion_is_a_stone():
    attrs = extract(*liver_scene(600.0, radius=4.0))
    assert "stone" in V.parse_classes("specific features", attrs["specific features"])[0]
    assert attrs["density"] == "hyperdense lesion,"


def test_shape_classes():
    c = coords()
    organ = ball(c, (24, 24, 24), 22)
    shapes = {
        "round-like": ball(c, (24, 24, 24), 8),
        "elongated": ball(c, (24, 24, 24), (14, 4, 4)),  # axis ratio 3.5
        "ovoid": ball(c, (24, 24, 24), (12, 8, 7)),  # 12:7, still round-like
        "lobulated": ball(c, (18, 24, 24), 7) | ball(c, (30, 24, 24), 7),  # two touching balls
        "punctate": ball(c, (24, 24, 24), 3),
    }
    got = {}
    for name, lesion in shapes.items():
        label, seg = maps(organ, lesion)
        got[name] = extract(paint(organ & ~lesion, lesion, lesion_hu=20.0), label, seg)["shape"]
    assert got == {
        "round-like": "round-like,",
        "ovoid": "round-like,",
        "elongated": "irregular,",
        "lobulated": "irregular,",
        "punctate": "punctate,",
    }


def test_cavity_in_a_solid_organ():
    inside = extract(*liver_scene(30.0, centre=(24, 24, 24)))
    assert inside["cavity"] == V.CAVITY_WITHIN
    # centred on the organ's surface: half of it sticks out
    edge = extract(*liver_scene(30.0, centre=(24, 24, 43.0)))
    assert edge["cavity"] == V.CAVITY_PROTRUDING


def test_cavity_in_a_hollow_organ():
    c = coords()
    organ = ball(c, (24, 24, 24), 20)
    for centre, radius, cavity, shape in [
        ((24, 24, 24), 6, V.CAVITY_LUMEN, "round-like,protrusion into the lumen,"),
        ((24, 24, 42.5), 4, V.CAVITY_WALL, "irregular wall thickening,"),  # centre 1.5 mm inside the wall
    ]:
        lesion = ball(c, centre, radius) & organ
        label, seg = maps(organ, lesion, organ_id=BLADDER)
        attrs = extract(paint(organ & ~lesion, lesion, organ_hu=10.0, lesion_hu=45.0), label, seg)
        assert (attrs["cavity"], attrs["shape"]) == (cavity, shape)
        assert attrs["surface characteristics"] in ("clear serosal surface,", "serosal surface irregularity,")


def test_relationship_with_adjacent_organs():
    c = coords()
    organ = ball(c, (24, 24, 20), 18)
    lesion = ball(c, (24, 24, 33), 5)  # reaches the organ's top at z = 38
    spleen_touching = (c[2] > 38) & ball(c, (24, 24, 44), 9)
    spleen_far = ball(c, (6, 6, 44), 3)
    for other, relation in [
        (spleen_touching, "close relationship with adjacent organs,"),
        (spleen_far, "no close relationship with surrounding organs,"),
    ]:
        label, seg = maps(organ, lesion, extra=[(other, SPLEEN)])
        image = paint(organ & ~lesion, lesion, extra=[(other, 50.0)])
        assert extract(image, label, seg)["relationship with adjacent organs"] == relation


def test_margin_from_the_boundary_sharpness():
    sharp = extract(*liver_scene(20.0, radius=8.0))
    assert sharp["surface characteristics"] == "well-defined margin,"
    fading = extract(*liver_scene(20.0, radius=8.0, lesion_blur_mm=3.0))
    assert fading["surface characteristics"] == "ill-defined margin,"
    faint = extract(*liver_scene(55.0, radius=8.0))  # 5 HU of contrast: no visible boundary
    assert faint["surface characteristics"] == "ill-defined margin,"


def test_kidney_margin_wording():
    c = coords()
    organ = ball(c, (24, 24, 24), 21)
    lesion = ball(c, (24, 24, 24), 7)
    label, seg = maps(organ, lesion, organ_id=KIDNEY)
    attrs = extract(paint(organ & ~lesion, lesion, organ_hu=150.0, lesion_hu=20.0), label, seg)
    assert attrs["surface characteristics"] == "clear boundary with the renal parenchyma,"


@pytest.mark.parametrize("aorta_hu, status", [(180.0, "enhanced CT,"), (45.0, "non-contrast CT,"), (None, "")])
def test_enhancement_from_the_aorta(aorta_hu, status):
    c = coords()
    organ = ball(c, (24, 24, 20), 16)
    lesion = ball(c, (24, 24, 20), 5)
    aorta = ball(c, (40, 40, 40), 5)
    extra_seg = [(aorta, AORTA)] if aorta_hu is not None else []
    label, seg = maps(organ, lesion, extra=extra_seg)
    image = paint(organ & ~lesion, lesion, extra=[(aorta, aorta_hu)] if aorta_hu is not None else [])
    assert extract(image, label, seg)["enhancement status"] == status


def test_same_lesion_on_an_anisotropic_grid():
    iso = extraction.measure_lesion(*liver_scene(30.0, radius=(9.0, 7.0, 6.0)))
    aniso_scene = liver_scene(30.0, radius=(9.0, 7.0, 6.0), spacing=(0.8, 0.8, 2.5))
    aniso = extraction.measure_lesion(*aniso_scene, spacing=(0.8, 0.8, 2.5))
    assert np.all(np.abs(np.array(iso.size_mm) - np.array(aniso.size_mm)) <= 2.6)
    assert abs(iso.volume_mm3 - aniso.volume_mm3) / iso.volume_mm3 < 0.1
    a = extraction.report_from_measurements(iso).attributes
    b = extraction.report_from_measurements(aniso).attributes
    for name in (
        "density",
        "density variations",
        "shape",
        "cavity",
        "surface characteristics",
        "relationship with adjacent organs",
    ):
        assert a[name] == b[name], name


def test_extraction_is_pure_and_writes_a_valid_report(tmp_path):
    image, label, seg = liver_scene(30.0)
    copies = [image.copy(), label.copy(), seg.copy()]
    report = extraction.extract_report(image, label, seg)
    for before, after in zip(copies, (image, label, seg)):
        np.testing.assert_array_equal(before, after)
    write_report(tmp_path / "type.json", Report((report,)))
    back = read_report(tmp_path / "type.json")[LIVER]
    assert back == report
    assert back.unrecognised() == {}  # every categorical value is a vocabulary class
    assert set(V.REPORT_FIELDS) <= set(back.attributes)


def test_organ_id_given_or_inferred():
    image, label, seg = liver_scene(30.0)
    assert extraction.extract_report(image, label, seg).organ_id == LIVER
    seg2 = seg.copy()
    seg2[seg2 == LIVER] = KIDNEY
    assert extraction.extract_report(image, label, seg2, organ_id=KIDNEY).organ_id == KIDNEY


def test_extraction_errors():
    image, label, seg = liver_scene(30.0)
    with pytest.raises(LesionDiffusionError, match=r"no lesion voxels \(label 2\)"):
        extraction.extract_report(image, np.minimum(label, 1), seg)
    with pytest.raises(LesionDiffusionError, match="must be 3D arrays of one shape"):
        extraction.extract_report(image[:-1], label, seg)
    with pytest.raises(LesionDiffusionError, match="cannot tell the lesion's organ"):
        extraction.extract_report(image, label, np.zeros_like(seg))
    with pytest.raises(UnknownOrganError, match="250"):
        extraction.extract_report(image, label, seg, organ_id=250)


# ---- generation ------------------------------------------------------------------------------------------------
def propose(request, organ, seed=0, **kw):
    return generation.OfflineReportProvider().propose(request, organ, np.random.default_rng(seed), **kw)


def test_proposals_are_seeded_and_vocabulary_only():
    request = {"organ type": "liver", "lesion type": "hepatocellular carcinoma"}
    assert propose(request, "liver", 3) == propose(request, "liver", 3)
    assert len({str(sorted(propose(request, "liver", s).items())) for s in range(8)}) > 1
    for seed in range(10):
        out = propose(request, "liver", seed)
        assert set(out) == set(V.REPORT_FIELDS + V.OPTIONAL_FIELDS) - {V.LOCATION}
        for name, text in out.items():
            if V.is_categorical(name):
                assert V.parse_classes(name, text)[1] == [], (name, text)


def test_cyst_in_the_liver_is_fluid_like():
    for seed in range(20):
        out = propose({"organ type": "liver", "lesion type": "simple cyst"}, "liver", seed)
        assert out["density"] == "hypoattenuating fluid-like lesion,"
        assert out["density variations"] == "homogeneous,"
        assert out["surface characteristics"] == "well-defined margin,"
        assert parse_ct_value(out["CT value"]) <= A.FLUID_MAX_HU
        assert out["cavity"] in (V.CAVITY_WITHIN, V.CAVITY_PROTRUDING)
        assert out["shape"] in ("round-like,", "irregular,", "cystic,")


def test_hollow_organs_get_lumen_or_wall():
    seen = set()
    for seed in range(30):
        out = propose({"organ type": "bladder", "lesion type": "bladder cancer"}, "urinary bladder", seed)
        seen.add(out["cavity"])
        if out["cavity"] == V.CAVITY_WALL:
            assert out["shape"].startswith("irregular wall thickening,")
        else:
            assert out["cavity"] == V.CAVITY_LUMEN and out["shape"].endswith("protrusion into the lumen,")
        assert out["surface characteristics"] in ("clear serosal surface,", "serosal surface irregularity,")
    assert seen == {V.CAVITY_LUMEN, V.CAVITY_WALL}


def test_kidney_stone():
    out = propose({"organ type": "kidney", "lesion type": "kidney stone"}, "kidney left", 1)
    assert "stone" in V.parse_classes("specific features", out["specific features"])[0]
    assert parse_ct_value(out["CT value"]) >= A.CALCIFIC_MIN_HU
    assert out["surface characteristics"].endswith("boundary with the renal parenchyma,")


def test_given_fields_condition_the_others():
    out = propose(
        {"organ type": "liver", "lesion type": "tumour", "density": "hyperdense lesion"},
        "liver",
        0,
        organ_reference_hu=95.0,
    )
    assert parse_ct_value(out["CT value"]) > 95.0 + A.ISO_HU
    out = propose({"organ type": "bladder", "lesion type": "tumour", "cavity": "wall thickening"}, "urinary bladder", 0)
    assert out["cavity"] == V.CAVITY_WALL and out["shape"].startswith("irregular wall thickening")


def test_proposed_size_is_relative_to_the_organ():
    for seed in range(20):
        out = propose({"organ type": "liver", "lesion type": "metastasis"}, "liver", seed, organ_box_size=(30, 20, 10))
        size = A.parse_lesion_size(out["size"])
        assert all(s <= A.MAX_ORGAN_FRACTION * o for s, o in zip(size, (30, 20, 10)))


@pytest.mark.parametrize(
    "density", ["hypoattenuating fluid-like lesion", "hypodense lesion", "isodense lesion", "hyperdense lesion"]
)
def test_generated_ct_value_is_measured_back_as_its_density(density):
    # what the generator writes, the extractor (and so the evaluation of synthetic lesions) reads back
    for seed in range(5):
        out = propose(
            {"organ type": "liver", "lesion type": "lesion", "density": density}, "liver", seed, organ_reference_hu=60.0
        )
        attrs = extract(*liver_scene(parse_ct_value(out["CT value"]), seed=seed))
        assert attrs["density"] == density + ",", (seed, out["CT value"])


def test_lesion_kinds():
    assert A.lesion_kind("Hepatocellular carcinoma").name == "tumour"
    assert A.lesion_kind("renal cyst").name == "cyst"
    assert A.lesion_kind("Kidney-Stone").name == "stone"
    assert A.lesion_kind("something else").name == "generic"


# ---- the request merge -------------------------------------------------------------------------------------------
ORGAN_BOX = (60, 50, 40)


def complete(request, proposed=None, organ_id=LIVER, box=ORGAN_BOX, seed=0, **kw):
    rng = np.random.default_rng(seed)
    organ = label_table().name(organ_id)
    if proposed is None:
        proposed = generation.OfflineReportProvider().propose(request, organ, rng, organ_box_size=box)
    return generation.complete_report(request, organ_id, box, proposed, rng, **kw)


def test_user_fields_win(tmp_path):
    request = {
        "organ type": "liver",
        "lesion type": "cyst",
        "density": "hyperdense lesion",
        "shape": "irregular",
        "CT value": "140 HU",
        "surface characteristics": "ill-defined margin",
        "size": "25x20x18 mm",
    }
    proposed = propose({"organ type": "liver", "lesion type": "cyst"}, "liver", 0)
    report = complete(request, proposed)
    attrs = report.attributes
    assert attrs["density"] == "hyperdense lesion" and attrs["shape"] == "irregular"
    assert attrs["surface characteristics"] == "ill-defined margin"
    assert parse_ct_value(attrs["CT value"]) == 140.0
    assert attrs["density variations"] == proposed["density variations"]  # not given: the proposal
    assert report.array_box() == (None, (25, 20, 18))
    assert report.size == (18, 20, 25) and attrs["size"] == "[[18 20 25]] pixel"
    assert attrs["lesion location"] == "5" and report.note == "cyst"
    write_report(tmp_path / "r.json", Report((report,)))  # schema-valid


@pytest.mark.parametrize(
    "text, spacing, size",
    [
        ("[[10 12 14]] pixel", (1, 1, 1), (14, 12, 10)),  # the report's own form and axis order
        ("[[10 12 14]] pixel,", (1, 1, 1), (14, 12, 10)),
        ("2 cm", (1, 1, 1), (20, 20, 20)),
        ("25 mm", (0.8, 0.8, 2.5), (31, 31, 10)),
        ("25 x 20 x 18 mm", (1, 1, 1), (25, 20, 18)),
        ("25mm x 20mm x 18mm", (1, 1, 1), (25, 20, 18)),
    ],
)
def test_size_forms(text, spacing, size):
    assert A.parse_lesion_size(text, spacing) == size


@pytest.mark.parametrize("text", ["big", "25", "1x2 mm", "-5 mm", "0 mm", "[[1 2]] pixel"])
def test_unreadable_size_is_one_line_error(text):
    with pytest.raises(LesionDiffusionError) as err:
        complete({"organ type": "liver", "lesion type": "cyst", "size": text})
    assert "\n" not in str(err.value) and repr(text) in str(err.value)


def test_size_never_exceeds_the_organ_box(caplog):
    caplog.set_level(logging.WARNING)
    report = complete({"organ type": "liver", "lesion type": "cyst", "size": "80 mm"}, box=(15, 40, 70))
    assert report.array_box()[1] == (15, 40, 70)
    assert "exceeds" in caplog.text


def test_cavity_must_fit_the_organ():
    with pytest.raises(LesionDiffusionError, match=r"cavity 'wall thickening' does not fit the liver \(organ 5\)"):
        complete({"organ type": "liver", "lesion type": "cyst", "cavity": "wall thickening"})
    report = complete({"organ type": "bladder", "lesion type": "polyp", "cavity": "within the lumen"}, organ_id=BLADDER)
    assert report.attributes["cavity"] == V.CAVITY_LUMEN
    # a proposal that does not fit (from a careless provider) is replaced by one that does
    proposed = {**propose({"organ type": "liver", "lesion type": "cyst"}, "liver", 0), "cavity": V.CAVITY_LUMEN}
    assert complete({"organ type": "liver", "lesion type": "cyst"}, proposed).attributes["cavity"] in (
        V.CAVITY_WITHIN,
        V.CAVITY_PROTRUDING,
    )


def test_missing_proposed_fields_are_filled():
    report = complete(
        {"organ type": "spleen", "lesion type": "cyst"}, proposed={"density": "isodense lesion,"}, organ_id=SPLEEN
    )
    attrs = report.attributes
    assert attrs["density"] == "isodense lesion,"
    for name in V.REPORT_FIELDS:
        assert name == "specific features" or attrs[name].strip(), name
    assert list(attrs)[: len(V.REPORT_FIELDS)] == list(V.REPORT_FIELDS)  # the original's order


def test_ct_value_forms():
    assert (
        parse_ct_value(
            complete({"organ type": "liver", "lesion type": "cyst", "CT value": "12"}).attributes["CT value"]
        )
        == 12.0
    )
    with pytest.raises(LesionDiffusionError, match="cannot read the CT value 'about twelve'"):
        complete({"organ type": "liver", "lesion type": "cyst", "CT value": "about twelve"})


# ---- whole-volume arrays: the cropped computations agree with direct whole-volume ones --------------------------
def nearest_mm(points: np.ndarray, targets: np.ndarray, spacing) -> np.ndarray:
    """Exact distance (mm, voxel centres) from each voxel index in ``points`` to the nearest in ``targets``."""
    if not len(targets):
        return np.full(len(points), np.inf)
    return cKDTree(targets * np.asarray(spacing)).query(points * np.asarray(spacing))[0]


def whole_volume_reference_hu(image, organ, spacing, exclude):
    """The organ's parenchyma median computed directly on the whole volume, with distances found by a
    nearest-neighbour search over voxel centres (not the module's distance transforms)."""
    everywhere = np.argwhere(np.ones(organ.shape, bool))
    near = (nearest_mm(everywhere, np.argwhere(exclude), spacing) <= A.LESION_MARGIN_MM).reshape(organ.shape)
    free = organ & ~near
    # the rim: distance to the nearest voxel outside the organ, the frame just beyond the image counting as outside
    frame = np.argwhere(np.pad(np.zeros(organ.shape, bool), 1, constant_values=True)) - 1
    outside = np.concatenate([np.argwhere(~organ), frame])
    core = free & (nearest_mm(everywhere, outside, spacing) > A.ORGAN_RIM_MM).reshape(organ.shape)
    for region in (core, free, organ & ~exclude):
        if np.count_nonzero(region) >= A.MIN_REFERENCE_VOXELS:
            return float(np.median(image[region]))
    region = organ & ~exclude
    return float(np.median(image[region])) if region.any() else None


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5)])
def test_organ_reference_is_the_whole_volume_value(spacing):
    c = coords(spacing, extent=64.0)
    # an organ touching the image border, a lesion near its rim and a second, distant excluded region
    organ = ball(c, (20.0, 30.0, 34.0), (20.0, 16.0, 14.0))
    lesion = ball(c, (8.0, 30.0, 34.0), 5.0) | ball(c, (56.0, 56.0, 56.0), 3.0)
    image = paint(
        organ & ~lesion,
        lesion,
        spacing,
        organ_hu=60.0,
        lesion_hu=10.0,
        noise=12.0,
        extra=[(ball(c, (44.0, 30.0, 34.0), 6.0), 200.0)],
    )
    for exclude in (lesion, np.zeros_like(lesion)):
        got = extraction.organ_reference_hu(image, organ & ~exclude, spacing, exclude=exclude)
        assert got == whole_volume_reference_hu(image, organ & ~exclude, spacing, exclude)
    # a thin organ falls back to the voxels it has; an empty one has no reference
    sheet = np.zeros(organ.shape, bool)
    sheet[:, :, 10] = True
    assert extraction.organ_reference_hu(image, sheet, spacing, exclude=lesion) == whole_volume_reference_hu(
        image, sheet, spacing, lesion
    )
    assert extraction.organ_reference_hu(image, np.zeros_like(organ), spacing, exclude=lesion) is None


def test_measurements_do_not_depend_on_the_array_types():
    image, label, seg = liver_scene(30.0, blobs=15.0, extra=())
    seg[:4] = AORTA  # an aorta slab at the volume edge: its core is measured in its own box
    image[:4] = 180.0
    base = extraction.measure_lesion(image, label, seg)
    assert base.aorta_hu == pytest.approx(180.0, abs=1.0)
    for args in (
        (image.astype(np.float64), label.astype(np.float32), seg.astype(np.float32)),
        (np.rint(image).astype(np.int16), label.astype(np.int64), seg.astype(np.uint8)),
    ):
        other = extraction.measure_lesion(*args)
        assert (other.organ_id, other.centre, other.size) == (base.organ_id, base.centre, base.size)
        assert other.mean_hu == pytest.approx(base.mean_hu, abs=0.5)
        assert other.reference_hu == pytest.approx(base.reference_hu, abs=1.0)


def test_lesion_organ_falls_back_to_the_lesion_then_its_surroundings():
    label = np.zeros((20, 20, 20), np.uint8)
    seg = np.zeros((20, 20, 20), np.int16)
    label[8:12, 8:12, 8:12] = 2
    seg[8:10, 8:12, 8:12] = KIDNEY  # under the lesion: kidney, though more spleen lies right around it
    seg[4:8, :, :] = SPLEEN
    assert extraction.infer_organ_id(label, seg) == KIDNEY
    seg[8:10] = 0  # nothing under the lesion: the organ next to it
    assert extraction.infer_organ_id(label, seg) == SPLEEN
    assert extraction.infer_organ_id(label.astype(np.float32), seg.astype(np.float64)) == SPLEEN
    seg[4:8] = 0
    seg[0] = SPLEEN  # more than 2 voxels away: not the lesion's organ
    with pytest.raises(LesionDiffusionError, match="cannot tell the lesion's organ"):
        extraction.infer_organ_id(label, seg)
    label[15:18, 15:18, 15:18] = 1  # label 1 names the organ first
    seg[15:18, 15:18, 15:18] = LIVER
    assert extraction.infer_organ_id(label, seg) == LIVER


def test_voxel_noise_on_a_coarse_grid_is_not_heterogeneity():
    # a homogeneous liver lesion carrying a 3 mm scan's voxel noise (16 HU): noise is not structure
    rng = np.random.default_rng(0)
    shape = (40, 40, 20)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    organ = (((grid - (20, 20, 10)) / (17, 17, 8)) ** 2).sum(-1) <= 1
    lesion = (((grid - (20, 20, 10)) / (4, 4, 4)) ** 2).sum(-1) <= 1
    image = np.where(organ, 50.0, -100.0) + rng.normal(0, 16, shape)
    image[lesion] -= 30.0
    label = organ.astype(np.uint8) + lesion.astype(np.uint8)
    seg = organ * label_table().id("liver")
    m = extraction.measure_lesion(image, label, seg, spacing=(3.0, 3.0, 3.0))
    assert m.smoothed_std_hu <= A.HOMOGENEOUS_MAX_STD_HU
    # and real structure still counts: +-40 HU halves of the lesion
    image[lesion & (grid[..., 0] < 20)] += 40.0
    image[lesion & (grid[..., 0] >= 20)] -= 40.0
    assert (
        extraction.measure_lesion(image, label, seg, spacing=(3.0, 3.0, 3.0)).smoothed_std_hu > A.HOMOGENEOUS_MAX_STD_HU
    )
