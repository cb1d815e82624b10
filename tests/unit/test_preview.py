"""Preview drawing (lesiondiffusion.preview) and the evaluation's contact sheet: radiological orientation
from any affine, physical aspect, zoom, window by organ, the lesion as an outline, captions."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from lesiondiffusion import preview
from lesiondiffusion.evaluation import case_tile, contact_sheet
from lesiondiffusion.io import StoredImage, save_nifti

SIZE = 96
CUBE_MM = 96.0  # every test scan is this cube of world space, centred on the world origin
RAS_SPACING = (0.8, 1.2, 3.0)  # anisotropic on purpose


def _grid_affine(
    codes: tuple[str, str, str], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, tuple[int, ...]]:
    """An affine storing the cube along ``codes`` (e.g. ("L", "P", "S")), voxel centres symmetric about 0."""
    ornt = nib.orientations.axcodes2ornt(codes)
    rot = np.zeros((3, 3))
    for i, (axis, sign) in enumerate(ornt):
        rot[int(axis), i] = sign * spacing[int(axis)]
    shape = tuple(int(round(CUBE_MM / spacing[int(axis)])) for axis, _ in ornt)
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = -rot @ ((np.asarray(shape) - 1) / 2.0)
    return affine, shape


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _anatomy(world: np.ndarray) -> np.ndarray:
    """HU: brighter in the patient's right half (+120), then anterior (+60), then superior (+30)."""
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    return -100.0 + 120.0 * (x > 0) + 60.0 * (y > 0) + 30.0 * (z > 0)


def _case(tmp_path, codes, radius_mm: float = 6.0, lesion_hu: float = 200.0, name: str | None = None):
    """Input CT, synthetic CT and label map (lesion = 2) of the same anatomy stored along ``codes``."""
    affine, shape = _grid_affine(codes, RAS_SPACING)
    world = _world(affine, shape)
    before = _anatomy(world).astype(np.int16)
    ball = np.linalg.norm(world, axis=-1) <= radius_mm
    after = before.copy()
    after[ball] = lesion_hu
    label = np.where(ball, 2, 0).astype(np.uint8)
    folder = tmp_path / (name or "".join(codes))
    folder.mkdir()
    paths = [
        save_nifti(folder / f"{n}.nii.gz", v, affine)
        for n, v in (("before", before), ("after", after), ("label", label))
    ]
    return paths


def _panels(png, rows: int = 3, size: int = SIZE) -> dict[tuple[int, int], np.ndarray]:
    """(row, column) -> RGB panel; the caption band sits above the panels."""
    px = np.asarray(Image.open(png).convert("RGB")).astype(int)
    top = px.shape[0] - rows * size
    return {
        (r, c): px[top + r * size : top + (r + 1) * size, c * size : (c + 1) * size]
        for r in range(rows)
        for c in range(4)
    }


def _quadrants(panel: np.ndarray) -> tuple[float, float, float, float]:
    """Median blue level (the zoom box is yellow: no blue) of the top-left, top-right, bottom-left,
    bottom-right quadrants, a margin away from the middle lines and the edge letters."""
    h = panel.shape[0] // 2
    q = lambda rs, cs: float(np.median(panel[rs, cs, 2]))  # noqa: E731
    a, b = slice(4, h - 4), slice(h + 4, 2 * h - 4)
    return q(a, a), q(a, b), q(b, a), q(b, b)


def _red(panel: np.ndarray) -> np.ndarray:
    return (panel[..., 0] - panel[..., 1] > 100) & (panel[..., 0] > 200)


# the same anatomy stored RAS, LPS-style (x and y flipped), and permuted with flips (slice axis first)
GRIDS = (("R", "A", "S"), ("L", "P", "S"), ("S", "L", "P"))


def test_radiological_orientation_from_any_affine(tmp_path):
    attributes = {"organ type": "liver", "lesion type": "cyst", "size in mm": "12", "density": "hyperdense"}
    images = []
    for codes in GRIDS:
        before, after, label = _case(tmp_path, codes)
        assert nib.aff2axcodes(nib.load(before).affine) == codes
        png = preview.write_case_preview(
            tmp_path / f"{''.join(codes)}.png", before, after, label, attributes, tile=SIZE
        )
        images.append(np.asarray(Image.open(png).convert("RGB")))
    assert all(np.array_equal(images[0], other) for other in images[1:])  # orientation comes from the affine
    p = _panels(tmp_path / "RAS.png")
    for col in (0, 1):  # overview and zoomed "before"
        tl, tr, bl, br = _quadrants(p[0, col])  # axial: patient's right on the LEFT, anterior at the top
        assert tl > bl > tr > br, ("axial", col, tl, tr, bl, br)
        tl, tr, bl, br = _quadrants(p[1, col])  # coronal: right on the left, superior at the top
        assert tl > bl > tr > br, ("coronal", col, tl, tr, bl, br)
        tl, tr, bl, br = _quadrants(p[2, col])  # sagittal: anterior on the left, superior at the top
        assert tl > bl > tr > br, ("sagittal", col, tl, tr, bl, br)
    assert preview.letters("axial") == ("A", "P", "R", "L") and preview.letters("sagittal") == ("S", "I", "A", "P")


def test_zoomed_at_physical_aspect_with_overview_box(tmp_path):
    before, after, label = _case(tmp_path, ("L", "P", "S"))
    p = _panels(
        preview.write_case_preview(tmp_path / "p.png", before, after, label, {"organ type": "liver"}, tile=SIZE)
    )
    fov = max(preview.MIN_FOV_MM, preview.ZOOM_FACTOR * 12.0)  # a 12 mm ball (extent of 4-5 slices of 3 mm: 12-15 mm)
    for row in range(3):
        red = _red(p[row, 3])
        rows, cols = np.nonzero(red)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert 0.85 < height / width < 1.2, (row, height, width)  # round in mm, whatever the voxel shape
        assert SIZE * 10.0 / fov < width < SIZE * 15.5 / fov, (row, width)  # zoomed: the ball is ~1/4 of the panel
        box = (p[row, 0][..., 0] > 200) & (p[row, 0][..., 1] > 180) & (p[row, 0][..., 2] < 60)  # yellow
        br, bc = np.nonzero(box)
        # the overview shows the whole 96 mm cube; the box the zoomed field of view around the centre
        assert (
            abs((np.ptp(bc) + 1) - SIZE * fov / CUBE_MM) <= 2
            and abs(bc.mean() - SIZE / 2) < 2
            and abs(br.mean() - SIZE / 2) < 3
        )
        assert not _red(p[row, 0]).any() and not _red(p[row, 2]).any()  # the outline only in its own column


def test_lesion_is_drawn_as_a_one_pixel_outline(tmp_path):
    before, after, label = _case(tmp_path, ("R", "A", "S"), radius_mm=20.0, lesion_hu=-300.0)  # large and dark
    p = _panels(
        preview.write_case_preview(tmp_path / "p.png", before, after, label, {"organ type": "liver"}, tile=SIZE)
    )
    for row in range(3):
        red = _red(p[row, 3])
        inside = ndi.binary_fill_holes(red)
        assert inside.sum() > 400  # a large lesion: 40 mm of a 140 mm field, ~27 pixels across
        assert red.sum() < 0.25 * inside.sum()  # an outline, not a fill
        interior = ndi.binary_erosion(inside, iterations=2)
        assert interior.sum() > 0.5 * inside.sum() and not red[interior].any()
        # inside the outline the panel is the "after" panel itself, untinted
        assert np.array_equal(p[row, 3][interior], p[row, 2][interior])
        thick = ndi.binary_erosion(red, structure=np.ones((2, 2), bool))
        assert not thick.any()  # nowhere two pixels thick in both directions


@pytest.mark.parametrize(
    "organ, lung",
    [("lung_upper_lobe_left", True), ("superior lobe of left lung", True), ("right upper lobe", True), ("lung", True),
     ("liver", False), ("caudate lobe of liver", False), ("urinary bladder", False), (None, False)],
)  # fmt: skip
def test_window_follows_the_organ(organ, lung):
    assert preview.window_for(organ) == (preview.LUNG_WINDOW if lung else preview.SOFT_TISSUE_WINDOW)


def test_lung_and_soft_tissue_windows_render(tmp_path):
    assert preview.SOFT_TISSUE_WINDOW == (40 - 200, 40 + 200) and preview.LUNG_WINDOW == (-600 - 750, -600 + 750)
    vol = np.full((24, 24, 24), -600, np.int16)  # aerated lung
    vol[:, :, :12] = 40  # soft tissue below
    lesion = np.zeros(vol.shape, bool)
    lesion[10:14, 10:14, 11:13] = True
    levels = {}
    for organ in ("lung_lower_lobe_right", "liver"):
        png = preview.write_preview(
            tmp_path / f"{organ}.png", vol, vol, lesion, np.diag([2.0, 2.0, 2.0, 1.0]), tile=SIZE, organ=organ
        )
        coronal = _panels(png)[1, 0]
        levels[organ] = (
            float(np.median(coronal[8:40, 20:76, 2])),
            float(np.median(coronal[56:88, 20:76, 2])),
        )  # top, bottom
    assert abs(levels["lung_lower_lobe_right"][0] - 127) <= 3 and abs(levels["lung_lower_lobe_right"][1] - 236) <= 3
    assert levels["liver"][0] == 0 and abs(levels["liver"][1] - 127) <= 3


def test_caption_names_the_request(tmp_path):
    attributes = {"organ type": "liver", "lesion type": "cyst", "size in mm": "25", "density": "hypodense lesion,"}
    sentence = "A 25 mm cyst in segment VII."
    text = preview.request_caption(attributes, sentence)
    assert (
        text == 'organ: liver   lesion: cyst   size: 25 mm   density: hypodense lesion\n"A 25 mm cyst in segment VII."'
    )
    assert preview.request_caption({**attributes, "description": sentence}) == text
    assert "size" not in preview.request_caption({"organ type": "liver", "size": "[[28 29 26]] pixel,"})
    before, after, label = _case(tmp_path, ("R", "A", "S"))
    plain = np.asarray(Image.open(preview.write_preview(tmp_path / "a.png", *[np.asarray(nib.load(f).dataobj) for f in (before, after)],
                                                        np.asarray(nib.load(label).dataobj) == 2, nib.load(before).affine, tile=SIZE)))  # fmt: skip
    captioned = np.asarray(
        Image.open(preview.write_case_preview(tmp_path / "b.png", before, after, label, attributes, SIZE, sentence))
    )
    assert plain.shape == (3 * SIZE, 4 * SIZE, 3)
    band = captioned.shape[0] - 3 * SIZE
    assert band > 20 and (captioned[:band] > 200).any()  # two lines of text above the panels
    assert np.array_equal(captioned[band:], plain)


def test_to_ras_voxel_sizes_follow_a_permuted_affine():
    affine, shape = _grid_affine(("S", "L", "P"), RAS_SPACING)
    volume = np.zeros(shape, np.float32)
    ras, zooms = preview.to_ras(volume, affine)
    assert ras.shape == (120, 80, 32) and zooms.tolist() == pytest.approx(list(RAS_SPACING))


def test_contact_sheet_one_row_per_case(tmp_path):
    before, after, label = _case(tmp_path, ("L", "P", "S"))
    vol = lambda p: StoredImage(np.asarray(nib.load(p).dataobj), 1.0, 0.0, nib.load(p))  # noqa: E731
    lesion = np.asarray(nib.load(label).dataobj) == 2
    tile = case_tile(
        vol(before), vol(after), lesion, preview.SOFT_TISSUE_WINDOW, SIZE, caption="organ: liver   lesion: cyst"
    )
    sheet = np.asarray(
        contact_sheet([("a", "inside 100%", tile), ("b", "missing", None), ("c", "inside 90%", tile)], SIZE)
    ).astype(int)
    assert sheet.shape[1] == 4 * SIZE and sheet.shape[0] % 3 == 0
    row = sheet.shape[0] // 3
    for r, shown in enumerate((True, False, True)):
        band = sheet[r * row : (r + 1) * row]
        panel = band[row - SIZE :, 3 * SIZE :]  # the outline column, at the bottom of the row
        assert _red(panel).any() == shown
        if shown:  # the axial panels in the preview's style: right on the left, anterior at the top
            tl, tr, bl, br = _quadrants(band[row - SIZE :, SIZE : 2 * SIZE])
            assert tl > bl > tr > br
