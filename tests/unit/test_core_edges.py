"""Edge cases of the core modules that a mutation run found untested (``benchmarks/results/mutation.md``):
each test fails on the mutant it was written for, and on the bug that mutant stands for."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch
from test_attributes import liver_scene

from lesiondiffusion import attributes as A
from lesiondiffusion import lesion_metrics as L
from lesiondiffusion import placement as P
from lesiondiffusion.pipelines import mask_postprocess
from lesiondiffusion.pipelines.cases import lesion_seed
from lesiondiffusion.reports import extraction, generation
from lesiondiffusion.transforms import CTIntensityMapd


def test_scale_mask_maps_each_voxel_from_its_own_side_of_the_centre() -> None:
    """An off-centre block scaled by 2 about a voxel: every output voxel samples the source on its own side
    (a point reflection about the centre would mirror the block to the other side)."""
    mask = np.zeros((1, 1, 40), bool)
    mask[0, 0, 22:26] = True  # voxels 22..25, right of the centre 20
    out = mask_postprocess.scale_mask(mask, (0, 0, 20), 2.0)
    # source position of output voxel x is 20 + (x - 20) / 2; kept where the interpolated value >= 0.5
    expected = [x for x in range(40) if 21.5 <= 20 + (x - 20) / 2 <= 25.5]
    assert np.flatnonzero(out[0, 0]).tolist() == expected == list(range(23, 32))


def test_generated_values_fall_in_each_allowed_band_in_proportion_to_its_width() -> None:
    """The organ at 50 HU leaves out 35..44 and 56..65 (neither clearly iso nor clearly hypo/hyper) from
    a tissue range of -100..300: three bands 135, 12 and 235 HU wide, drawn in that proportion."""
    rng = np.random.default_rng(0)
    values = np.array([generation._sample_tissue_hu((-100.0, 300.0), 50.0, rng) for _ in range(3000)])
    assert not ((values > 35) & (values < 44)).any() and not ((values > 56) & (values < 65)).any()
    shares = [np.mean(values <= 35), np.mean((values >= 44) & (values <= 56)), np.mean(values >= 65)]
    assert np.allclose(shares, np.array([135, 12, 235]) / 382, atol=0.03), shares


def test_dictionary_intensity_map_may_skip_missing_keys() -> None:
    data = {"image": torch.tensor([[[[-1000.0, 0.0, 3000.0]]]])}
    out = CTIntensityMapd(keys=["image", "absent"], allow_missing_keys=True)(data)
    assert set(out) == {"image"} and out["image"].shape == (1, 1, 1, 3)
    assert torch.equal(out["image"], CTIntensityMapd(keys=["image"])(data)["image"])


def test_a_component_of_exactly_min_voxels_qualifies_and_masks_come_back_boolean() -> None:
    field = np.full((6, 6, 6), -1.0)
    field[1:3, 1:3, 1:3] = 1.0  # 8 voxels, one piece
    allowed = np.ones(field.shape, np.uint8)  # a 0/1 array, not bool
    got = mask_postprocess.select_mask(field, allowed, target_volume=8, min_voxels=8)
    assert got is not None and got.dtype == bool and int(got.sum()) == 8
    assert mask_postprocess.select_mask(field, allowed, target_volume=8, min_voxels=9) is None
    empty, size = mask_postprocess.largest_component(np.zeros((3, 3, 3), np.uint8))
    assert size == 0 and empty.dtype == bool and not empty.any()


def test_feature_scale_is_the_spread_and_the_floor_added_in_quadrature() -> None:
    floor = np.array([L.FEATURE_FLOOR[k] for k in L.FEATURES])
    reference = np.stack([np.zeros(len(floor)), np.full(len(floor), 6.0), np.full(len(floor), 3.0)])
    spread = np.full(len(floor), np.sqrt(6.0))  # population std of 0, 6, 3
    assert np.allclose(L.feature_scale(reference), np.sqrt(spread**2 + floor**2))
    assert np.array_equal(L.feature_scale(reference[:1]), floor)  # one lesion: no spread, the floor alone


def _fits(shape, size) -> np.ndarray:
    """Centres whose box (``size``, starting half a size before the centre) lies inside the image, by loops."""
    out = np.zeros(shape, bool)
    for c in np.ndindex(*shape):
        out[c] = all(ci - s // 2 >= 0 and ci - s // 2 + s <= n for ci, s, n in zip(c, size, shape))
    return out


def test_lumen_and_wall_centres_are_their_rule_within_the_image() -> None:
    organ = np.zeros((30, 26, 26), bool)
    organ[1:29, 1:25, 1:25] = True  # thick enough for a lumen deeper than the erosion
    size = (3, 4, 5)
    depth = P._depth(organ)
    fits = _fits(organ.shape, size)
    lumen = P.centre_region(organ, P.CAVITY_LUMEN, size, hollow=True)
    assert np.array_equal(lumen, fits & (depth > P.DEFAULT_EROSION))
    assert lumen.any() and depth[lumen].min() < depth.max()  # not only the deepest voxels
    wall = P.centre_region(organ, P.CAVITY_WALL, size, hollow=True)
    assert np.array_equal(wall, fits & organ & (depth <= P.DEFAULT_EROSION)) and wall.any()


def test_fluid_needs_a_homogeneous_value_within_the_fluid_range_inclusive() -> None:
    for hu in (A.FLUID_MIN_HU, 5.0, A.FLUID_MAX_HU):
        assert A.density_for_value(hu, 60.0, "liver") == A.FLUID_LIKE
        assert A.density_for_value(hu, 60.0, "liver", homogeneous=False) == A.HYPODENSE
    assert A.density_for_value(A.FLUID_MAX_HU + 0.5, 60.0, "liver") == A.HYPODENSE


def test_proposals_keep_the_given_variations_and_know_colon_and_lung_nodules() -> None:
    provider = generation.OfflineReportProvider()

    def proposals(request: dict, organ: str, key: str) -> set[str]:
        return {provider.propose(request, organ, np.random.default_rng(s))[key] for s in range(20)}

    for given in ("heterogeneous", "homogeneous"):
        request = {"organ type": "liver", "lesion type": "tumor", "density variations": given}
        assert proposals(request, "liver", "density variations") == {given}
    # a heterogeneous lesion always gets areas of other density among its features, whatever the draw
    hetero = {"organ type": "liver", "lesion type": "tumor", "density variations": "heterogeneous"}
    assert all("density areas" in features for features in proposals(hetero, "liver", "specific features"))
    colon = proposals({"organ type": "colon", "lesion type": "colon cancer"}, "colon", "shape")
    assert "irregular wall thickening,luminal narrowing," in colon and "irregular wall thickening," in colon
    nodule = proposals({"organ type": "lung", "lesion type": "nodule"}, "lung upper lobe left", "density")
    assert nodule == {"isodense soft tissue mass,", "low-density ground-glass opacity,"}


def test_edge_width_is_the_distance_between_the_10_and_90_percent_crossings() -> None:
    """A lesion filling x < 10 of the crop: each shell is one plane of voxels, so the profile is known."""
    lesion = np.zeros((20, 6, 6), bool)
    lesion[:10] = True
    by_x = {7: 100.0, 8: 90.0, 9: 60.0, 10: 20.0, 11: 5.0}
    image = np.array([by_x.get(x, 100.0 if x < 7 else 0.0) for x in range(20)], np.float32)[:, None, None]
    image = np.broadcast_to(image, lesion.shape).copy()
    crop = L.LesionCrop(image, lesion, ~lesion, (1.0, 1.0, 1.0), 60.0)
    assert L.edge_profile(crop) == ([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5], [100.0, 90.0, 60.0, 20.0, 5.0, 0.0])
    # fractions of the 100 HU step: 0, .1, .4, .8, .95, 1; the 10% crossing at -1.5 mm, the 90% one at 0.5 + 2/3
    assert L.edge_width_mm(crop) == pytest.approx(1.5 + 0.5 + 2 / 3)


def test_absolute_density_classes_draw_their_ct_value_in_their_own_range() -> None:
    rng = np.random.default_rng(0)
    for density, (lo, hi) in ((A.GROUND_GLASS, (-700, -400)), (A.SOLID_MASS, (20, 50))):
        values = [generation._sample_ct_value(density, False, 60.0, rng) for _ in range(50)]
        assert all(lo <= v <= hi and v == int(v) for v in values) and len(set(values)) > 10


def test_a_thin_organ_with_an_excluded_comb_falls_back_to_its_voxels_outside_it() -> None:
    """A one-voxel sheet (no core) with excluded lines every 4 voxels (nothing 3 mm away from them): the
    reference is the median of the organ's voxels outside the excluded ones, never of the excluded ones."""
    organ = np.zeros((24, 24, 21), bool)
    organ[2:22, 2:22, 10] = True
    excluded = np.zeros_like(organ)
    excluded[2:22:4, 2:22, 10] = True
    image = np.where(excluded, 500.0, np.where(organ, 10.0, -100.0))
    assert extraction.organ_reference_hu(image, organ, (1.0, 1.0, 1.0), exclude=excluded) == 10.0
    assert extraction.organ_reference_hu(image, organ & ~excluded, (1.0, 1.0, 1.0), exclude=excluded) == 10.0


def test_shape_of_fewer_than_four_voxels_is_solid_and_round() -> None:
    lesion = np.zeros((5, 5, 5), bool)
    lesion[2, 2, 1:4] = True
    assert extraction._shape_metrics(lesion, (1.0, 1.0, 1.0)) == (1.0, 1.0)


def test_lesion_seed_is_an_integer_from_seed_case_and_index_only() -> None:
    assert lesion_seed(0, "case_a", 1) == zlib.crc32(b"case_a:1")
    assert lesion_seed(7, "case_a", 1) == 7 * 1_000_003 + zlib.crc32(b"case_a:1")
    big = lesion_seed(2**62, "x", 0)
    assert isinstance(big, int) and big == (2**62 * 1_000_003 + zlib.crc32(b"x:0")) % (2**63 - 1)


def test_a_protruding_box_that_finds_no_room_fails_at_its_own_size() -> None:
    """Only a box wholly within the organ is shrunk to fit; others fail at the size asked for."""
    organ = np.zeros((16, 16, 16), bool)
    organ[2:14, 2:14, 2:14] = True
    first = P.place_box(organ, P.CAVITY_PROTRUDING, (10, 10, 10), np.random.default_rng(0), hollow=False)
    with pytest.raises(P.PlacementError, match=r"lesion box of size \(10, 10, 10\) without overlapping the 1 already"):
        P.place_box(organ, P.CAVITY_PROTRUDING, (10, 10, 10), np.random.default_rng(0), hollow=False, avoid=[first])


def test_a_lesion_of_exactly_the_punctate_diameter_is_punctate() -> None:
    measured = extraction.measure_lesion(*liver_scene(30.0, radius=(9.0, 7.0, 6.0)))
    shapes = {
        d: extraction.report_from_measurements(dataclasses.replace(measured, equivalent_diameter_mm=d)).attributes[
            "shape"
        ]
        for d in (A.PUNCTATE_MAX_MM, A.PUNCTATE_MAX_MM + 0.01)
    }
    assert shapes == {A.PUNCTATE_MAX_MM: "punctate,", A.PUNCTATE_MAX_MM + 0.01: "round-like,"}
