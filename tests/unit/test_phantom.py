"""CT phantom from organ maps, and the demo-case builder, on the real demo files."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from scipy import ndimage as ndi

from lesiondiffusion.dataset import read_datalist, read_split
from lesiondiffusion.demo import REPORT_BOX_AXES, build_demo_cases
from lesiondiffusion.errors import InputError
from lesiondiffusion.io import read_nifti_array
from lesiondiffusion.labels import label_table
from lesiondiffusion.phantom import DEFAULT_HU, body_mask, make_phantom, make_phantom_file, organ_hu
from lesiondiffusion.report import read_report

from conftest import snapshot as _snapshot

CASES = ("Bladder_cancer", "Liver_cancer")


def organ_ids(name: str) -> list[int]:
    return list(label_table("v1").ids(name))


def organ_box(liver: dict, name: str) -> tuple[tuple[slice, ...], np.ndarray]:
    """The organ's bounding box (plus a margin) and its mask there, lesion excluded: erosions stay cheap."""
    organ = np.isin(liver["seg"], organ_ids(name))
    box = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in ndi.find_objects(organ.astype(np.uint8))[0])
    return box, organ[box] & (liver["label"][box] != 2)


@pytest.fixture(scope="module")
def sources(demo_src):
    """Per demo case: the source organ map (float32 as stored), its image, and the label map (int)."""
    out = {}
    for case in CASES:
        seg, seg_img = read_nifti_array(demo_src / case / "totalseg_health.nii.gz")
        label, label_img = read_nifti_array(demo_src / case / "label.nii.gz")
        out[case] = {"seg": seg, "seg_img": seg_img, "label": np.rint(label).astype(np.int32), "label_img": label_img}
    return out


@pytest.fixture(scope="module")
def liver(demo_src, sources, tmp_path_factory):
    """The full 280^3 Liver_cancer phantom, lesion painted from its report, plus its inputs."""
    src = demo_src / "Liver_cancer"
    out = tmp_path_factory.mktemp("phantom") / "ct.nii.gz"
    make_phantom_file(
        src / "totalseg_health.nii.gz", out, label_path=src / "label.nii.gz", report_path=src / "type.json"
    )
    ct, img = read_nifti_array(out)
    source = sources["Liver_cancer"]
    return {
        "ct": ct,
        "img": img,
        "seg": np.rint(source["seg"]).astype(np.int32),
        "seg_img": source["seg_img"],
        "label": source["label"],
    }


@pytest.fixture(scope="module")
def bladder_seg(sources):
    return sources["Bladder_cancer"]["seg"], sources["Bladder_cancer"]["label"]


# ---- intensities -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, hu",
    [
        ("liver", 60),
        ("spleen", 50),
        ("kidney", 150),
        ("vertebrae", 500),
        ("lung", -850),
        ("gallbladder", 10),
        ("aorta", 180),
    ],
)
def test_organ_mean_hu_on_the_full_demo_map(liver, name, hu):
    # documented measure: mean over all the organ's voxels, lesion excluded
    organ = np.isin(liver["seg"], organ_ids(name)) & (liver["label"] != 2)
    assert organ.sum() > 1000
    assert abs(float(liver["ct"][organ].mean()) - hu) <= 15
    assert organ_hu(label_table("v1").name(organ_ids(name)[0])) == hu


@pytest.mark.parametrize("name, hu", [("liver", 60), ("spleen", 50), ("kidney", 150)])
def test_soft_organ_interiors_are_flat(liver, name, hu):
    box, organ = organ_box(liver, name)
    interior = ndi.binary_erosion(organ, iterations=2)
    values = liver["ct"][box][interior].astype(float)
    assert abs(values.mean() - hu) <= 15
    assert 4 < values.std() < 30  # textured and noisy, but an organ, not noise


def test_bone_has_bright_cortex(liver):
    box, bone = organ_box(liver, "vertebrae")
    marrow = ndi.binary_erosion(bone, iterations=2)
    cortex = bone & ~ndi.binary_erosion(bone)
    ct = liver["ct"][box]
    assert ct[cortex].mean() > ct[marrow].mean() + 100


def test_bladder_mean_on_the_small_demo_crop(small_demo):
    case = small_demo / "cases" / "Bladder_cancer"
    ct, _ = read_nifti_array(case / "image.nii.gz")
    seg, _ = read_nifti_array(case / "organ_seg.nii.gz")
    label, _ = read_nifti_array(case / "label.nii.gz")
    bladder = (seg == label_table("v1").id("bladder")) & (label != 2)
    assert bladder.sum() > 1000
    assert abs(float(ct[bladder].mean()) - 10) <= 15


def test_v1_and_v2_numbering_give_the_same_organ_the_same_hu():
    seg = np.zeros((40, 40, 40), np.uint8)
    seg[10:30, 10:30, 10:30] = 21  # v1: vertebrae L2; v2: urinary bladder
    block = seg > 0
    assert abs(make_phantom(seg, version="v1")[block].mean() - 500) <= 15
    assert abs(make_phantom(seg, version="v2")[block].mean() - 10) <= 15
    seg[10:30, 10:30, 10:30] = 250  # no such label: the default soft tissue
    assert abs(make_phantom(seg)[block].mean() - DEFAULT_HU) <= 15
    assert organ_hu("kidney cyst left") == 10 and organ_hu("kidney left") == 150


# ---- geometry, determinism, body ----------------------------------------------------------------------
def test_phantom_file_has_the_organ_maps_grid(liver):
    img, seg_img = liver["img"], liver["seg_img"]
    assert img.shape == seg_img.shape
    assert img.get_data_dtype() == np.int16 and liver["ct"].dtype == np.int16
    np.testing.assert_allclose(img.affine, seg_img.affine, atol=1e-6)
    np.testing.assert_allclose(img.header.get_zooms()[:3], seg_img.header.get_zooms()[:3])
    assert liver["ct"].min() >= -1024


def test_same_seed_same_image_other_seed_other_image(bladder_seg):
    seg, label = bladder_seg
    region = (slice(110, 170), slice(160, 220), slice(50, 110))
    kw = dict(lesion_mask=label == 2, lesion_hu=35.0, region=region)
    a = make_phantom(seg, seed=3, **kw)
    assert a.shape == (60, 60, 60)
    np.testing.assert_array_equal(a, make_phantom(seg, seed=3, **kw))
    b = make_phantom(seg, seed=4, **kw)
    assert np.mean(a != b) > 0.5
    organs = np.rint(seg[region]) > 0
    assert abs(float(a[organs].mean()) - float(b[organs].mean())) < 3  # only the noise differs


def test_body_outline_contains_every_organ_and_air_is_outside(liver):
    ct, seg = liver["ct"], liver["seg"]
    body = body_mask(seg, axial_axis=2)
    organs = seg > 0
    assert body[organs].all()
    assert body.sum() > organs.sum() * 1.2  # fat and muscle around the organs
    near = ndi.maximum_filter(body.view(np.uint8), size=5) > 0  # partial volume reaches 1-2 voxels out
    assert (ct[~near] == -1000).all() and (~near).sum() > 1e6
    # columns farther than 40 voxels in-plane from every organ are air from top to bottom
    far = ndi.distance_transform_edt(~organs.any(axis=2)) > 40
    assert far.sum() > 1000 and (ct[far] == -1000).all()
    # non-organ body tissue: subcutaneous/visceral fat and muscle, not air
    soft = ct[body & ~ndi.binary_dilation(organs, iterations=2)]
    assert (soft < -50).mean() > 0.2 and (soft > 0).mean() > 0.1 and np.median(soft) > -200
    lungs = np.isin(seg, organ_ids("lung"))
    assert (ct[organs & ~lungs] > -400).mean() > 0.999


# ---- lesion -------------------------------------------------------------------------------------------
def test_lesion_has_the_reports_hu(liver, demo_src, small_demo):
    report = read_report(demo_src / "Liver_cancer" / "type.json").lesions[0]
    lesion = liver["label"] == 2
    assert abs(float(liver["ct"][lesion].mean()) - report.mean_hu) <= 10
    case = small_demo / "cases" / "Bladder_cancer"
    ct, _ = read_nifti_array(case / "image.nii.gz")
    label, _ = read_nifti_array(case / "label.nii.gz")
    assert abs(float(ct[label == 2].mean()) - read_report(case / "type.json").lesions[0].mean_hu) <= 10


def test_heterogeneous_lesion_varies_more(bladder_seg):
    seg, label = bladder_seg
    region = (slice(110, 180), slice(160, 220), slice(55, 105))
    lesion = (label == 2)[region]
    kw = dict(lesion_mask=label == 2, lesion_hu=35.0, region=region, seed=1)
    flat = make_phantom(seg, lesion_heterogeneous=False, **kw)[lesion].astype(float)
    mottled = make_phantom(seg, lesion_heterogeneous=True, **kw)[lesion].astype(float)
    assert abs(flat.mean() - 35) <= 10 and abs(mottled.mean() - 35) <= 10
    assert mottled.var() > 3 * flat.var()


# ---- make_phantom_file errors -------------------------------------------------------------------------
def assert_input_error(path: Path, out: Path, fn, **kw):
    with pytest.raises(InputError) as e:
        fn(**kw)
    assert path.name in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp leftovers
    return e.value


def test_missing_organ_map(tmp_path):
    out = tmp_path / "out" / "ct.nii.gz"
    out.parent.mkdir()
    missing = tmp_path / "nope.nii.gz"
    assert_input_error(missing, out, make_phantom_file, organ_seg_path=missing, out_path=out)


def test_garbage_organ_map(tmp_path):
    out = tmp_path / "out" / "ct.nii.gz"
    out.parent.mkdir()
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a NIfTI file" * 10)
    assert_input_error(bad, out, make_phantom_file, organ_seg_path=bad, out_path=out)


def test_4d_organ_map(tmp_path, write_nifti):
    out = tmp_path / "out" / "ct.nii.gz"
    out.parent.mkdir()
    path = write_nifti("four_d.nii.gz", np.ones((8, 8, 8, 3), np.uint8))
    err = assert_input_error(path, out, make_phantom_file, organ_seg_path=path, out_path=out)
    assert "3D" in str(err)


def test_ct_instead_of_organ_map(tmp_path, write_nifti):
    out = tmp_path / "out" / "ct.nii.gz"
    out.parent.mkdir()
    path = write_nifti("ct_by_mistake.nii.gz", np.full((8, 8, 8), -1000.5, np.float32))
    assert_input_error(path, out, make_phantom_file, organ_seg_path=path, out_path=out)


def test_label_map_of_another_grid(tmp_path, write_nifti):
    out = tmp_path / "out" / "ct.nii.gz"
    out.parent.mkdir()
    seg = np.zeros((16, 16, 16), np.uint8)
    seg[4:12, 4:12, 4:12] = 5
    seg_path = write_nifti("seg.nii.gz", seg)
    small = write_nifti("label_small.nii.gz", np.zeros((16, 16, 15), np.uint8))
    assert_input_error(small, out, make_phantom_file, organ_seg_path=seg_path, out_path=out, label_path=small)
    shifted = write_nifti("label_shifted.nii.gz", (seg > 0).astype(np.uint8), affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    assert_input_error(shifted, out, make_phantom_file, organ_seg_path=seg_path, out_path=out, label_path=shifted)


def test_small_organ_map_round_trip(tmp_path, write_nifti):
    seg = np.zeros((30, 30, 30), np.int16)
    seg[8:22, 8:22, 8:22] = 5
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10, -20, 30]
    out = make_phantom_file(write_nifti("seg.nii.gz", seg, affine=affine), tmp_path / "ct.nii.gz", seed=7)
    ct, img = read_nifti_array(out)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert ct.dtype == np.int16 and abs(ct[seg == 5].mean() - 60) <= 15 and ct[0, 0, 0] == -1000


# ---- demo builder -------------------------------------------------------------------------------------
@pytest.mark.parametrize("which, size, spacing", [("small_demo", 64, 1.0), ("tiny_demo", 48, 2.0)])
def test_demo_files_and_datalist(request, which, size, spacing):
    out: Path = request.getfixturevalue(which)
    for case in CASES:
        folder = out / "cases" / case
        assert sorted(p.name for p in folder.iterdir()) == [
            "image.nii.gz",
            "label.nii.gz",
            "organ_seg.nii.gz",
            "type.json",
        ]
        img = nib.load(folder / "image.nii.gz")
        assert img.shape == (size,) * 3 and img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.header.get_zooms()[:3], (spacing,) * 3)
        for name in ("label.nii.gz", "organ_seg.nii.gz"):
            np.testing.assert_allclose(nib.load(folder / name).affine, img.affine)
    entries = load_decathlon_datalist(str(out / "datalist.json"), data_list_key="training")
    assert [Path(e["image"]).parent.name for e in entries] == list(CASES)
    assert all(Path(e[k]).is_file() for e in entries for k in ("image", "label", "report", "organ_seg"))
    assert read_datalist(out / "datalist.json")["validation"] == []
    listed = read_split(out, "train")
    assert [c.image for c in listed] == [Path(e["image"]) for e in entries]
    assert all(p.is_file() for c in listed for p in c.files().values())


@pytest.mark.parametrize("which, step", [("small_demo", 1), ("tiny_demo", 2)])
def test_demo_crop_matches_the_source(request, sources, which, step):
    out: Path = request.getfixturevalue(which)
    for case in CASES:
        src_label, src_img, src_seg = sources[case]["label"], sources[case]["label_img"], sources[case]["seg"]
        label, img = read_nifti_array(out / "cases" / case / "label.nii.gz")
        seg, _ = read_nifti_array(out / "cases" / case / "organ_seg.nii.gz")
        # the crop's first voxel, found from the geometry: the affine must place the crop correctly
        start = np.rint(np.linalg.solve(src_img.affine, img.affine[:, 3])[:3]).astype(int)
        np.testing.assert_allclose(img.affine[:3, :3], src_img.affine[:3, :3] * step)
        sub = tuple(slice(s, s + n * step, step) for s, n in zip(start, label.shape))
        np.testing.assert_array_equal(label, np.rint(src_label[sub]))
        np.testing.assert_array_equal(seg, np.rint(src_seg[sub]))
        assert (label == 2).sum() > 0.9 * (src_label == 2).sum() / step**3  # the crop is around the lesion


@pytest.mark.parametrize("which, step", [("small_demo", 1), ("tiny_demo", 2)])
def test_demo_report_boxes_point_at_the_lesion(request, demo_src, which, step):
    out: Path = request.getfixturevalue(which)
    for case in CASES:
        source = read_report(demo_src / case / "type.json").lesions[0]
        lesion = read_report(out / "cases" / case / "type.json").lesions[0]
        label, _ = read_nifti_array(out / "cases" / case / "label.nii.gz")
        voxel = [0, 0, 0]
        for a, axis in enumerate(REPORT_BOX_AXES):
            voxel[axis] = lesion.centre[a]
        assert label[tuple(voxel)] == 2
        assert lesion.size == tuple(max(1, round(s / step)) for s in source.size)
        assert lesion.size_voxels == lesion.size
        assert lesion.attributes["CT value"] == source.attributes["CT value"]
        assert lesion.organ_id == source.organ_id


def test_demo_leaves_the_source_alone_and_writes_atomically(
    demo_src, demo_src_snapshot, small_demo, tiny_demo, tmp_path
):
    assert _snapshot(demo_src) == demo_src_snapshot  # taken before the session's demo builds
    # an existing output is not replaced without overwrite
    written = _snapshot(small_demo)
    with pytest.raises(InputError, match="already exists"):
        build_demo_cases(demo_src, small_demo, crop=64)
    assert _snapshot(small_demo) == written
    assert [p.name for p in small_demo.parent.iterdir() if p.name.startswith(".")] == []
    # a broken case: one-line error naming the file, and nothing written
    broken = tmp_path / "broken"
    shutil.copytree(demo_src / "Bladder_cancer", broken / "Bladder_cancer")
    nib.save(
        nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), str(broken / "Bladder_cancer" / "label.nii.gz")
    )
    with pytest.raises(InputError, match="label.nii.gz"):
        build_demo_cases(broken, tmp_path / "broken_out", crop=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
    with pytest.raises(InputError, match="inside the demo source"):
        build_demo_cases(broken, broken / "out")
    assert sorted(p.name for p in broken.iterdir()) == ["Bladder_cancer"]


# ---- the command line ---------------------------------------------------------------------------------
def _cropped_demo_source(demo_src: Path, out: Path, size: int = 64) -> Path:
    """The demo folders in their own format (organ map, label, type.json), cut to ``size``^3 around each lesion."""
    for case in ("Bladder_cancer", "Liver_cancer"):
        label_img = nib.load(demo_src / case / "label.nii.gz")
        centre = np.argwhere(np.asarray(label_img.dataobj) == 2).mean(axis=0).astype(int)
        lo = np.clip(centre - size // 2, 0, np.asarray(label_img.shape) - size)
        box = tuple(slice(int(a), int(a) + size) for a in lo)
        (out / case).mkdir(parents=True)
        for name in ("label.nii.gz", "totalseg_health.nii.gz"):
            img = nib.load(demo_src / case / name)
            nib.save(img.slicer[box], str(out / case / name))
        shutil.copyfile(demo_src / case / "type.json", out / case / "type.json")
    return out


def test_cli_phantom_and_demo_cases(demo_src, tmp_path):
    from in_process import run_cli as cli

    src = _cropped_demo_source(demo_src, tmp_path / "src")
    seg_path = src / "Liver_cancer" / "totalseg_health.nii.gz"
    run = cli("phantom", "--organ_seg", str(seg_path), "--out", str(tmp_path / "ct.nii.gz"), "--seed", "3")
    assert run.returncode == 0, run.stderr[-2000:]
    ct, seg = nib.load(tmp_path / "ct.nii.gz"), nib.load(seg_path)
    assert ct.get_data_dtype() == np.int16 and ct.shape == seg.shape and np.allclose(ct.affine, seg.affine)
    values, labels = np.asarray(ct.dataobj), np.asarray(seg.dataobj)
    liver = labels == label_table().id("liver")
    assert abs(float(np.median(values[liver])) - organ_hu("liver")) < 15
    bad = cli("phantom", "--organ_seg", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "x.nii.gz"))
    assert (
        bad.returncode == 1
        and bad.stderr.strip().splitlines()[-1].startswith("error: ")
        and "missing.nii.gz" in bad.stderr
    )
    assert not (tmp_path / "x.nii.gz").exists()

    run = cli("demo-cases", "--src", str(src), "--out", str(tmp_path / "cases"))
    assert run.returncode == 0, run.stderr[-2000:]
    datalist = read_datalist(tmp_path / "cases" / "datalist.json")
    cases = [c for split in datalist.values() for c in split]
    assert len(cases) == 2 and "Bladder_cancer" in run.stdout and "Liver_cancer" in run.stdout
    for case in cases:
        image, label = nib.load(case.image), nib.load(case.label)
        assert image.shape == label.shape == (64, 64, 64) and np.allclose(image.affine, label.affine)
