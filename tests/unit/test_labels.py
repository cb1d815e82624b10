import pytest

from lesiondiffusion.labels import UnknownOrganError, convert_ids, is_hollow, label_table, normalize_name


@pytest.mark.parametrize(
    "name", ["urinary bladder", "urinary_bladder", "Urinary-Bladder", "bladder", "BLADDER", 104, "104"]
)
def test_bladder_spellings_resolve_in_v1(name):
    assert label_table("v1").id(name) == 104


def test_v2_numbering_differs_and_converts():
    v1, v2 = label_table("v1"), label_table("v2")
    assert v2.id("bladder") == 21
    assert v2.id("pancreas") == 7 and v1.id("pancreas") == 10
    assert len(v1.names) == 104 and len(v2.names) == 117
    mapping = convert_ids("v2", "v1")
    assert mapping[21] == 104 and mapping[5] == 5
    assert 116 not in mapping  # sternum has no v1 label


def test_synonym_column_and_aliases():
    t = label_table("v1")
    assert t.id("small intestine") == 55
    assert t.id("hepatic portal vein") == 9
    assert t.id("left kidney") == 3
    assert t.ids("hip bone") == (90, 91)  # a synonym shared by left and right is a group


def test_group_word_is_several_ids_and_ambiguous_for_id():
    t = label_table("v1")
    assert t.ids("kidney") == (2, 3)
    assert set(t.ids("lung")) == {13, 14, 15, 16, 17}
    with pytest.raises(UnknownOrganError, match="ambiguous.*kidney right, kidney left"):
        t.id("kidney")


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownOrganError) as e:
        label_table().id("livr")
    assert "close matches: liver" in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_id_and_version():
    with pytest.raises(UnknownOrganError, match="999"):
        label_table().name(999)
    with pytest.raises(LesionDiffusionError, match=r"^unknown TotalSegmentator version 'v3'; use one of v1, v2$"):
        label_table("v3")


def test_names_and_hollow_organs():
    assert normalize_name(" Kidney_Left ") == "kidney left"
    assert label_table().name(5) == "liver"
    assert is_hollow("bladder") and is_hollow("stomach") and is_hollow("gall bladder")
    assert not is_hollow("liver")


# ---- telling v1 from v2 -------------------------------------------------------------------------------
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from lesiondiffusion.data_paths import DEMO_DATA, REPO_ROOT  # noqa: E402
from lesiondiffusion.errors import InputError, LesionDiffusionError  # noqa: E402
from lesiondiffusion.labels import detect_version, resolve_version, to_v1_map  # noqa: E402

TS_SMALL_SEG = REPO_ROOT / "tests" / "data" / "ts_small" / "example_seg.nii.gz"


def _map(path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def test_ts_small_map_is_v2():
    seg, affine = _map(TS_SMALL_SEG)
    assert detect_version(seg, affine) == "v2"


@pytest.mark.parametrize("case", ["Liver_cancer", "Bladder_cancer"])
def test_demo_maps_are_v1_by_anatomy(case):
    seg, affine = _map(DEMO_DATA / case / "totalseg_health.nii.gz")
    assert seg.max() <= 104  # no id beyond v1's range: only anatomy can tell
    assert detect_version(seg, affine) == "v1"


def test_v2_map_without_labels_above_104_is_still_v2_by_anatomy():
    seg, affine = _map(TS_SMALL_SEG)
    seg = np.where(seg > 104, 0, seg)
    assert detect_version(seg, affine) == "v2"
    # read as v1 it would be a different map: its pancreas (v2 id 7) is no aorta
    assert (to_v1_map(seg, "v2")[seg == 7] == label_table("v1").id("pancreas")).all()


def test_v1_map_mirrored_left_right_is_not_taken_for_v1():
    """Anatomy is what decides: the same labels with right and left swapped fit neither numbering."""
    seg, affine = _map(DEMO_DATA / "Liver_cancer" / "totalseg_health.nii.gz")
    mirrored = affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # world x flipped: the liver now lies on the left
    with pytest.raises(InputError):
        detect_version(seg, mirrored)


def test_a_single_blob_asks_for_the_flag_in_one_line():
    seg = np.zeros((40, 40, 40), np.uint8)
    seg[10:30, 10:30, 10:30] = 10  # v1 pancreas or v2 upper left lung lobe: nothing to tell them apart
    with pytest.raises(InputError) as err:
        detect_version(seg, np.eye(4), "blob.nii.gz")
    message = str(err.value)
    assert message.startswith("blob.nii.gz: cannot tell") and "--organ_seg_version" in message and "\n" not in message
    assert resolve_version("v1", seg, np.eye(4)) == "v1"  # the flag settles it
    with pytest.raises(LesionDiffusionError, match="organ_seg_version must be one of"):
        resolve_version("v3", seg, np.eye(4))


def test_labels_both_numberings_share_need_no_flag_and_out_of_range_labels_are_refused():
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[:5] = 5  # liver is 5 in both
    assert detect_version(seg, np.eye(4)) == "v1"
    seg[5:] = 200
    with pytest.raises(InputError, match="not TotalSegmentator ids"):
        detect_version(seg, np.eye(4))


def test_ct_density_adds_evidence():
    """A v2 map's ids 13/14 are right lung lobes (dark in the CT); read as v1 they would be left lobes too."""
    from lesiondiffusion.labels import density_evidence

    seg, _ = _map(TS_SMALL_SEG)
    hu = np.asanyarray(nib.load(str(TS_SMALL_SEG.parent / "example_ct_sm.nii.gz")).dataobj)
    v1, v2 = density_evidence(seg, hu, "v1"), density_evidence(seg, hu, "v2")
    assert v2.failed == 0 and v2.held >= 10
    assert v1.failed >= 3  # read as v1, its lung lobes and ribs land on soft tissue and organs on bone or air


def test_mask_bounds_agree_with_the_voxel_list_in_either_memory_order():
    from lesiondiffusion.labels import mask_bounds

    rng = np.random.default_rng(0)
    for order in ("C", "F"):
        mask = np.zeros((23, 31, 17), dtype=np.uint8, order=order)
        mask[rng.integers(0, 23, 9), rng.integers(0, 31, 9), rng.integers(0, 17, 9)] = 3
        idx = np.argwhere(mask)
        lo, hi = mask_bounds(mask)
        assert lo.tolist() == idx.min(axis=0).tolist() and hi.tolist() == idx.max(axis=0).tolist()
    assert mask_bounds(np.zeros((4, 4, 4), dtype=bool)) is None


def test_present_ids_counted_in_blocks_finds_every_label(monkeypatch):
    from lesiondiffusion import labels

    seg = np.zeros((30, 20, 10), dtype=np.uint8, order="F")
    seg[0, 0, 0], seg[29, 19, 9], seg[15, 3, 4] = 7, 104, 1  # the first and last voxels, one in between
    monkeypatch.setattr(labels, "_COUNT_BLOCK", 64)  # many blocks, the last one partial
    assert labels.present_ids(seg).tolist() == [0, 1, 7, 104]
    assert labels.present_ids(seg.astype(np.float32)).tolist() == [0, 1, 7, 104]


def test_a_large_map_is_surveyed_at_every_other_voxel_and_still_told_apart(monkeypatch):
    """Tissue medians and centres of a full-body map come from every other voxel: same verdict, an eighth of the reads."""
    from lesiondiffusion import labels

    seg, affine = _map(TS_SMALL_SEG)
    seg = np.where(seg > 104, 0, seg)  # only anatomy and density can tell v2
    hu = np.asanyarray(nib.load(str(TS_SMALL_SEG.parent / "example_ct_sm.nii.gz")).dataobj)
    surveyed = []
    full_medians = labels.label_medians

    def recording(ids, image_hu, *args):
        surveyed.append((ids.shape, np.shape(image_hu)))
        return full_medians(ids, image_hu, *args)

    monkeypatch.setattr(labels, "label_medians", recording)
    monkeypatch.setattr(labels, "SURVEY_STRIDE_ABOVE", seg.size - 1)
    assert labels.detect_version(seg, affine, image_hu=hu) == "v2"
    half = tuple(-(-n // 2) for n in seg.shape)
    assert surveyed == [(half, half)]
