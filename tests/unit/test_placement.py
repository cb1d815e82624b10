import numpy as np
import pytest
from scipy import ndimage as ndi

from lesiondiffusion.placement import (
    Box,
    PlacementError,
    allowed_region,
    bounding_box,
    box_mask,
    centre_region,
    place_box,
    place_boxes,
)
from lesiondiffusion.vocabulary import CAVITY_LUMEN, CAVITY_PROTRUDING, CAVITY_WALL, CAVITY_WITHIN


def ellipsoid(shape=(48, 48, 40), centre=(24, 24, 20), radii=(16, 14, 12)):
    idx = np.indices(shape).astype(float)
    r = sum(((i - c) / a) ** 2 for i, c, a in zip(idx, centre, radii))
    return r <= 1.0


def depth(mask):
    return ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]


def test_box_geometry_convention():
    box = Box((10, 10, 10), (4, 5, 1))
    assert box.lo == (8, 8, 10) and box.hi == (12, 13, 11)
    assert box_mask((20, 20, 20), box).sum() == 4 * 5 * 1  # exactly size voxels
    assert box.inside((20, 20, 20)) and not box.inside((11, 20, 20))
    assert box.overlaps(Box((12, 10, 10), (3, 3, 3))) and not box.overlaps(Box((13, 10, 10), (3, 3, 3)))
    assert Box.from_json(box.to_json()) == box
    assert bounding_box(box_mask((20, 20, 20), box)) == box
    with pytest.raises(ValueError):
        Box((1, 2, 3), (0, 1, 1))


@pytest.mark.parametrize("seed", range(5))
def test_within_box_lies_wholly_inside_the_organ(seed):
    organ = ellipsoid()
    box = place_box(organ, CAVITY_WITHIN, (8, 6, 7), np.random.default_rng(seed), hollow=False)
    assert box.size == (8, 6, 7) and box.inside(organ.shape)
    assert organ[box.slices].all()


def test_within_box_that_fits_nowhere_is_shrunk_until_it_does():
    organ = ellipsoid()
    size = bounding_box(organ).size  # a box as big as the organ's box cannot lie inside an ellipsoid
    box = place_box(organ, CAVITY_WITHIN, size, np.random.default_rng(0), hollow=False)
    assert all(b < s for b, s in zip(box.size, size))
    assert organ[box.slices].all()


@pytest.mark.parametrize("seed", range(5))
def test_protruding_box_is_centred_in_the_organ_and_reaches_outside(seed):
    organ = ellipsoid()
    box = place_box(organ, CAVITY_PROTRUDING, (10, 10, 10), np.random.default_rng(seed), hollow=False)
    assert organ[box.centre] and box.inside(organ.shape)
    assert not organ[box.slices].all()


@pytest.mark.parametrize("seed", range(5))
def test_hollow_rules_use_the_eroded_organ(seed):
    organ = ellipsoid()
    d = depth(organ)
    lumen = place_box(organ, CAVITY_LUMEN, (6, 6, 6), np.random.default_rng(seed), hollow=True)
    assert d[lumen.centre] > 5
    wall = place_box(organ, CAVITY_WALL, (6, 6, 6), np.random.default_rng(seed), hollow=True)
    assert organ[wall.centre] and d[wall.centre] <= 5


def test_thin_hollow_organ_uses_its_deepest_voxels_for_the_lumen():
    organ = np.zeros((30, 30, 30), bool)
    organ[5:25, 5:25, 13:17] = True  # 4 voxels thick: nothing survives a 5-voxel erosion
    box = place_box(organ, CAVITY_LUMEN, (4, 4, 2), np.random.default_rng(0), hollow=True)
    d = depth(organ)
    assert d[box.centre] == d.max()


def test_box_never_leaves_the_image_even_when_the_organ_touches_its_edge():
    organ = np.zeros((32, 32, 32), bool)
    organ[:10, :10, :10] = True  # organ in a corner of the image
    for seed in range(10):
        for cavity in (CAVITY_WITHIN, CAVITY_PROTRUDING):
            box = place_box(organ, cavity, (6, 6, 6), np.random.default_rng(seed), hollow=False)
            assert box.inside(organ.shape), (cavity, box)
            assert organ[box.centre]
        box = place_box(organ, CAVITY_WALL, (6, 6, 6), np.random.default_rng(seed), hollow=True)
        assert box.inside(organ.shape)


def test_size_is_clipped_to_the_organ_box():
    organ = ellipsoid()
    obox = bounding_box(organ)
    box = place_box(organ, CAVITY_PROTRUDING, (200, 5, 200), np.random.default_rng(0), hollow=False)
    assert box.size == (obox.size[0], 5, obox.size[2])


def test_same_seed_same_box_different_seed_different_box():
    organ = ellipsoid()
    a = place_box(organ, CAVITY_WITHIN, (5, 5, 5), np.random.default_rng(7), hollow=False)
    b = place_box(organ, CAVITY_WITHIN, (5, 5, 5), np.random.default_rng(7), hollow=False)
    others = {place_box(organ, CAVITY_WITHIN, (5, 5, 5), np.random.default_rng(s), hollow=False) for s in range(8)}
    assert a == b and len(others) > 1


@pytest.mark.parametrize("cavity", [CAVITY_WITHIN, CAVITY_PROTRUDING])
def test_several_boxes_never_overlap(cavity):
    organ = ellipsoid()
    boxes = place_boxes(organ, [cavity] * 6, [(7, 6, 5)] * 6, np.random.default_rng(3), hollow=False)
    assert len(boxes) == 6
    for i, a in enumerate(boxes):
        assert a.inside(organ.shape)
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)
            assert not (box_mask(organ.shape, a) & box_mask(organ.shape, b)).any()


def test_no_room_for_another_box_is_an_error():
    organ = np.zeros((20, 20, 20), bool)
    organ[5:11, 5:11, 5:11] = True
    first = place_box(organ, CAVITY_WITHIN, (6, 6, 6), np.random.default_rng(0), hollow=False)
    assert first == Box((8, 8, 8), (6, 6, 6))
    with pytest.raises(PlacementError, match="overlapping"):
        place_box(organ, CAVITY_PROTRUDING, (6, 6, 6), np.random.default_rng(0), hollow=False, avoid=[first])


def test_cavity_must_match_the_organ_kind():
    organ = ellipsoid()
    with pytest.raises(PlacementError, match="does not apply to a solid organ"):
        place_box(organ, CAVITY_LUMEN, (4, 4, 4), np.random.default_rng(0), hollow=False)
    with pytest.raises(PlacementError, match="does not apply to a hollow organ"):
        place_box(organ, CAVITY_WITHIN, (4, 4, 4), np.random.default_rng(0), hollow=True)
    with pytest.raises(PlacementError, match="unknown cavity"):
        place_box(organ, "inside", (4, 4, 4), np.random.default_rng(0), hollow=True)


def test_empty_organ_is_an_error():
    with pytest.raises(PlacementError, match="empty"):
        place_box(np.zeros((8, 8, 8), bool), CAVITY_WITHIN, (2, 2, 2), np.random.default_rng(0), hollow=False)


def test_centre_region_matches_a_brute_force_check():
    rng = np.random.default_rng(0)
    organ = ndi.binary_opening(rng.random((16, 14, 12)) > 0.3, iterations=1)
    size = (3, 4, 2)
    region = centre_region(organ, CAVITY_WITHIN, size, hollow=False)
    expected = np.zeros_like(organ)
    for c in np.ndindex(organ.shape):
        box = Box(c, size)
        expected[c] = box.inside(organ.shape) and organ[box.slices].all()
    assert np.array_equal(region, expected)


def test_allowed_region_follows_the_cavity():
    organ = ellipsoid()
    box = Box((24, 24, 8), (10, 10, 10))  # straddles the organ's lower edge
    inner = allowed_region(organ, CAVITY_WITHIN, box, hollow=False)
    assert inner.sum() == (organ & box_mask(organ.shape, box)).sum() > 0
    assert np.array_equal(allowed_region(organ, CAVITY_LUMEN, box), inner)
    outer = allowed_region(organ, CAVITY_PROTRUDING, box, hollow=False)
    assert np.array_equal(outer, box_mask(organ.shape, box)) and outer.sum() > inner.sum()
    with pytest.raises(PlacementError):
        allowed_region(organ, CAVITY_WALL, box, hollow=False)
