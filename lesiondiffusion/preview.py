"""Preview images of a synthesis, laid out for a radiologist.

Used by LINet inference and ``synthesize`` (``preview.png``) and by the evaluation's contact sheet. One
row per plane (axial, coronal, sagittal) through the lesion: an un-zoomed overview with a box around the
zoomed region, then the zoomed region before, after, and after with the lesion mask drawn as a one-pixel
outline. A caption band above the panels names the request (organ, lesion type, size, density, sentence).

Radiological convention, from the affine whatever the stored orientation: the patient's right on the
image's LEFT in axial and coronal panels, anterior at the top of axial panels, superior at the top of
coronal and sagittal ones, anterior on the left of sagittal ones; every panel carries its orientation
letters. Pixels are shown at their physical aspect (anisotropic voxels are stretched accordingly). The
window is soft tissue (W400/L40), lung (W1500/L-600) when the lesion's organ is a lung. Only the slices
shown are converted to HU, so a whole scan costs no extra memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from lesiondiffusion import attributes as A
from lesiondiffusion import vocabulary as V
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import PathLike, atomic_path, read_nifti_array, read_stored, voxel_spacing
from lesiondiffusion.labels import label_ids, label_table, mask_bounds, normalize_name

logger = logging.getLogger(__name__)

SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # W400 / L40: HU shown from black to white
LUNG_WINDOW = (-1350.0, 150.0)  # W1500 / L-600
OUTSIDE_HU = -3000.0  # beyond the scan: black in every window, so it never passes for tissue
CONTOUR_RGB = (255, 40, 40)
BOX_RGB = (255, 215, 0)
TEXT_RGB = (255, 255, 255)
PLANES = ("axial", "coronal", "sagittal")
ZOOM_FACTOR = 3.5  # zoomed field of view: this many lesion extents ...
MIN_FOV_MM = 40.0  # ... and at least this wide, so small lesions keep some surroundings
SCALE_BAR_MM = 10.0
LESION_LABEL = 2  # label.nii.gz: 0 background, 1 organ, 2 lesion
SENTENCE_KEYS = ("sentence", "description", "text")  # request keys that may hold the user's own words

# Per plane: the RAS axis sliced, the RAS axes shown down the rows and across the columns (each shown
# from its + end: anterior/superior at the top, the patient's right or anterior at the left), and the
# letters at the top, bottom, left and right edges.
_VIEWS: dict[str, tuple[int, int, int, tuple[str, str, str, str]]] = {
    "axial": (2, 1, 0, ("A", "P", "R", "L")),
    "coronal": (1, 2, 0, ("S", "I", "R", "L")),
    "sagittal": (0, 2, 1, ("S", "I", "A", "P")),
}


# ---- geometry ------------------------------------------------------------------------------------------
def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` reoriented to RAS axes (flips and transposes: a view, no resampling) and its voxel
    sizes along those axes."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(volume, ornt)
    zooms = voxel_spacing(affine)
    # io_orientation's row i says where input axis i goes; the RAS axis j holds the input axis whose row says j
    order = np.argsort(ornt[:, 0])
    return ras, zooms[order]


def centre_of(mask: np.ndarray) -> np.ndarray:
    """The voxel nearest ``mask``'s centre of mass (the array's middle for an empty mask)."""
    centre = np.asarray(mask.shape) // 2
    for axis in range(mask.ndim):
        counts = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis))  # projections: no index list
        if counts.any():
            centre[axis] = round(float(np.average(np.arange(counts.size), weights=counts)))
    return centre


def plane(
    volume: np.ndarray, zooms: Sequence[float], centre: Sequence[int], name: str
) -> tuple[np.ndarray, tuple[float, float]]:
    """The ``name`` plane (axial, coronal or sagittal) of a RAS volume through ``centre``, in radiological
    display orientation (see the module docstring), and its (row, column) pixel size in mm."""
    if name not in _VIEWS:
        raise ValueError(f"unknown plane {name!r}; use one of {', '.join(PLANES)}")
    cut, rows, cols, _ = _VIEWS[name]
    index: list[int | slice] = [slice(None)] * 3
    index[cut] = int(centre[cut])
    section = volume[tuple(index)]  # the two remaining axes, in increasing order
    if rows > cols:
        section = section.T
    return section[::-1, ::-1], (float(zooms[rows]), float(zooms[cols]))


def display_index(shape: Sequence[int], centre: Sequence[float], name: str) -> tuple[float, float]:
    """Where the RAS voxel ``centre`` lies on the ``name`` plane returned by :func:`plane` (row, column)."""
    _, rows, cols, _ = _VIEWS[name]
    return shape[rows] - 1 - float(centre[rows]), shape[cols] - 1 - float(centre[cols])


def letters(name: str) -> tuple[str, str, str, str]:
    """Orientation letters at the top, bottom, left and right edges of a ``name`` panel."""
    return _VIEWS[name][3]


# ---- windows and captions ----------------------------------------------------------------------------
def window_for(organ: str | int | None) -> tuple[float, float]:
    """The HU window for a lesion in ``organ``: lung for any lung or lobe of lung, else soft tissue."""
    if organ is None or not str(organ).strip():
        return SOFT_TISSUE_WINDOW
    names = [normalize_name(str(organ))]
    try:
        table = label_table()
        names = [table.name(i) for i in table.ids(organ)]  # "right upper lobe" -> "lung upper lobe right"
    except LesionDiffusionError:
        pass  # not a table name: judge the words themselves
    return LUNG_WINDOW if all("lung" in n or "pulmonary" in n for n in names) else SOFT_TISSUE_WINDOW


def _clean(value: object) -> str:
    return " ".join(str(value).split()).strip(" ,;")


def request_caption(attributes: Mapping[str, object], sentence: str | None = None) -> str:
    """A short caption of a request: organ, lesion type, size, density; the sentence on its own line.

    ``sentence`` defaults to a ``sentence``/``description``/``text`` entry of ``attributes``. A size
    in voxels ("[[28 29 26]] pixel") is left out: it means nothing on the picture.
    """
    parts = []
    for label, keys in (
        ("organ", (A.ORGAN_TYPE,)),
        ("lesion", (A.LESION_TYPE,)),
        ("size", (A.SIZE_MM, V.SIZE)),
        ("density", (V.DENSITY,)),
    ):
        for key in keys:
            value = _clean(attributes.get(key, ""))
            if value and not (key == V.SIZE and any(w in value.lower() for w in ("pixel", "voxel", "[["))):
                if key == A.SIZE_MM and not any(c.isalpha() for c in value):
                    value += " mm"
                parts.append(f"{label}: {value}")
                break
    if sentence is None:
        sentence = next((str(attributes[k]) for k in SENTENCE_KEYS if _clean(attributes.get(k, ""))), None)
    text = "   ".join(parts)
    if sentence and _clean(sentence):
        text += f'\n"{_clean(sentence)}"'
    return text


def to_gray(stored: np.ndarray, window: Sequence[float], slope: float = 1.0, inter: float = 0.0) -> np.ndarray:
    """Stored values (HU = value * ``slope`` + ``inter``) as 8-bit grey levels over the HU ``window``."""
    lo, hi = window
    hu = stored.astype(np.float32) * slope + inter
    return (np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


# ---- drawing -------------------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(9, size // 15))


def _view_box(
    shape: Sequence[int], pixel: tuple[float, float], centre: tuple[float, float], fov_mm: float
) -> tuple[float, float, float, float]:
    """PIL box (left, top, right, bottom; pixel edges) of a square ``fov_mm`` field centred on ``centre``."""
    half_r, half_c = fov_mm / 2.0 / pixel[0], fov_mm / 2.0 / pixel[1]
    r, c = centre[0] + 0.5, centre[1] + 0.5  # pixel centres sit half a pixel in from their edges
    return (c - half_c, r - half_r, c + half_c, r + half_r)


def _resample(
    image: np.ndarray, box: tuple[float, float, float, float], size: int, nearest: bool, fill: int = 0
) -> np.ndarray:
    """``image[box]`` resampled to ``size`` x ``size`` (box in pixel edges; outside the array: ``fill``)."""
    pad = int(math.ceil(max(-box[0], -box[1], box[2] - image.shape[1], box[3] - image.shape[0], 0.0))) + 1
    padded = np.pad(image, pad, constant_values=fill)
    shifted = (box[0] + pad, box[1] + pad, box[2] + pad, box[3] + pad)
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(padded).resize((size, size), method, box=shifted))


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's one-pixel inner outline (pixels with a 4-neighbour outside the mask)."""
    return mask & ~ndi.binary_erosion(mask, structure=ndi.generate_binary_structure(2, 1), border_value=0)


def _text(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, anchor: str = "la", fill=TEXT_RGB
) -> None:
    # a dark halo keeps letters readable on white bone and black air alike
    draw.text(xy, text, font=font, anchor=anchor, fill=fill, stroke_width=2, stroke_fill=(0, 0, 0))


def _panel(gray: np.ndarray, name: str, title: str, outline: np.ndarray | None = None, box: tuple[float, ...] | None = None,
           scale_px: float | None = None) -> Image.Image:  # fmt: skip
    """One RGB panel: grey image, optional red outline and yellow box, orientation letters and a title."""
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if outline is not None:
        rgb[outline] = CONTOUR_RGB
    img = Image.fromarray(rgb, mode="RGB")
    size = gray.shape[0]
    draw, font = ImageDraw.Draw(img), _font(size)
    if box is not None:
        draw.rectangle([round(box[0]), round(box[1]), round(box[2]) - 1, round(box[3]) - 1], outline=BOX_RGB, width=1)
    top, bottom, left, right = letters(name)
    m = 3
    _text(draw, (size / 2, m), top, font, "ma")
    _text(draw, (size / 2, size - m), bottom, font, "md")
    _text(draw, (m, size / 2), left, font, "lm")
    _text(draw, (size - m, size / 2), right, font, "rm")
    _text(draw, (m, m), title, font, "la", fill=(200, 200, 200))
    if scale_px is not None:  # scale bar, bottom left
        y = size - m - 2
        draw.line([(m + 2, y), (m + 2 + scale_px, y)], fill=TEXT_RGB, width=2)
        _text(draw, (m + 2, y - 3), f"{SCALE_BAR_MM:g} mm", font, "ld")
    return img


def caption_band(text: str, width: int, size: int, max_lines: int | None) -> Image.Image | None:
    """The caption wrapped to ``width`` pixels (at most ``max_lines`` lines, the last one cut short)."""
    if not text.strip():
        return None
    font = _font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for paragraph in text.splitlines():
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if line and measure.textlength(trial, font=font) > width - 8:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and measure.textlength(lines[-1] + "...", font=font) > width - 8:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    step = font.size + 4 if hasattr(font, "size") else 14
    band = Image.new("RGB", (width, step * len(lines) + 6), (16, 16, 16))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * step), line, font=font, fill=(235, 235, 235))
    return band


def _slice_index(mask: np.ndarray, axis: int, at: int) -> int:
    """``at``, or the slice along ``axis`` with the most lesion voxels when ``at`` misses the lesion."""
    counts = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    return int(at) if counts[int(at)] or not counts.any() else int(np.argmax(counts))


def before_after(
    before: np.ndarray,
    after: np.ndarray,
    lesion: np.ndarray,
    affine: np.ndarray,
    planes: Sequence[str] = PLANES,
    window: Sequence[float] | None = None,
    size: int = 192,
    before_scaling: tuple[float, float] = (1.0, 0.0),
    after_scaling: tuple[float, float] = (1.0, 0.0),
    organ: str | int | None = None,
    caption: str | None = None,
    caption_lines: int | None = None,
) -> Image.Image:
    """The preview figure: a caption band (when ``caption``), then a row of four ``size`` x ``size``
    panels per plane: overview with the zoom box, zoomed before, zoomed after, zoomed after with the
    lesion outline.

    ``before``/``after``/``lesion`` share one grid (``affine``); ``*_scaling`` is each volume's NIfTI
    ``(slope, inter)`` from stored values to HU. ``window`` defaults to :func:`window_for` ``(organ)``.
    ``caption_lines`` caps the caption's height (a contact sheet wants equal rows).
    """
    window = tuple(window) if window is not None else window_for(organ)
    before_ras, zooms = to_ras(np.asarray(before), affine)
    after_ras, _ = to_ras(np.asarray(after), affine)
    lesion = np.asarray(lesion)
    mask_ras, _ = to_ras(lesion if lesion.dtype == bool else lesion > 0, affine)
    centre = centre_of(mask_ras)
    found = mask_bounds(mask_ras)
    if found is not None:
        lo, hi = found
        middle = (lo + hi) / 2.0
        extent = float(((hi - lo + 1) * zooms).max())
        fov = min(
            max(MIN_FOV_MM, ZOOM_FACTOR * extent), float((np.asarray(mask_ras.shape) * zooms).max())
        )  # never beyond the scan
    else:
        middle, fov = np.asarray(centre, float), None
    rows = []
    for name in planes:
        cut = _VIEWS[name][0] if name in _VIEWS else 0
        at = np.array(centre)
        at[cut] = _slice_index(mask_ras, cut, centre[cut])
        b, pixel = plane(before_ras, zooms, at, name)
        a, _ = plane(after_ras, zooms, at, name)
        m, _ = plane(mask_ras, zooms, at, name)
        gb, ga = to_gray(b, window, *before_scaling), to_gray(a, window, *after_scaling)
        h_mm, w_mm = b.shape[0] * pixel[0], b.shape[1] * pixel[1]
        whole = _view_box(b.shape, pixel, ((b.shape[0] - 1) / 2.0, (b.shape[1] - 1) / 2.0), max(h_mm, w_mm))
        zoom = whole if fov is None else _view_box(b.shape, pixel, display_index(mask_ras.shape, middle, name), fov)
        # the zoom box on the overview: the same pixel edges through the overview's mapping
        sx, sy = size / (whole[2] - whole[0]), size / (whole[3] - whole[1])
        marker = (
            None
            if fov is None or fov >= 0.95 * max(h_mm, w_mm)
            else (
                (zoom[0] - whole[0]) * sx,
                (zoom[1] - whole[1]) * sy,
                (zoom[2] - whole[0]) * sx,
                (zoom[3] - whole[1]) * sy,
            )
        )
        mask_zoom = _resample(m.astype(np.uint8), zoom, size, nearest=True) > 0
        zoom_mm = fov if fov is not None else max(h_mm, w_mm)
        row = [
            _panel(_resample(gb, whole, size, nearest=False), name, name, box=marker),
            _panel(_resample(gb, zoom, size, nearest=False), name, "before", scale_px=SCALE_BAR_MM * size / zoom_mm),
            _panel(za := _resample(ga, zoom, size, nearest=False), name, "after"),
            _panel(za, name, "lesion", outline=_outline(mask_zoom)),
        ]
        rows.append(row)
    width = 4 * size
    band = caption_band(caption or "", width, size, caption_lines)
    top = band.height if band is not None else 0
    canvas = Image.new("RGB", (width, top + len(rows) * size))
    if band is not None:
        canvas.paste(band, (0, 0))
    for r, row in enumerate(rows):
        for c, panel_img in enumerate(row):
            canvas.paste(panel_img, (c * size, top + r * size))
    return canvas


def write_preview(
    path: PathLike,
    before: np.ndarray,
    after: np.ndarray,
    lesion: np.ndarray,
    affine: np.ndarray,
    tile: int = 192,
    slope: float = 1.0,
    inter: float = 0.0,
    organ: str | int | None = None,
    caption: str | None = None,
) -> Path:
    """Write the preview PNG (:func:`before_after`, all three planes) atomically.

    ``before``/``after`` are stored values (HU = value * ``slope`` + ``inter``) on one grid (``affine``);
    ``organ`` picks the window (lung or soft tissue); ``caption`` labels the figure.
    """
    image = before_after(before, after, lesion, affine, size=tile, before_scaling=(slope, inter), after_scaling=(slope, inter),
                         organ=organ, caption=caption)  # fmt: skip
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def write_case_preview(
    path: PathLike, before: PathLike, after: PathLike, label: PathLike, attributes: Mapping[str, object], tile: int = 192,
    sentence: str | None = None,
) -> Path:  # fmt: skip
    """The preview of one synthesised case from its files: input CT, synthetic CT, label map (lesion = 2),
    captioned with the request's ``attributes`` (and its ``sentence``, if it was described in words) and
    windowed for its organ."""
    original, synthetic = read_stored(before), read_stored(after)
    labels, _ = read_nifti_array(label)
    if labels.shape != original.raw.shape or synthetic.raw.shape != original.raw.shape:
        raise InputError(
            label, f"shape {labels.shape} / {synthetic.raw.shape} differs from the input CT's {original.raw.shape}"
        )
    image = before_after(
        original.raw, synthetic.raw, label_ids(labels) == LESION_LABEL, original.affine, size=tile,
        before_scaling=(original.slope, original.inter), after_scaling=(synthetic.slope, synthetic.inter),
        organ=str(attributes.get(A.ORGAN_TYPE, "")) or None, caption=request_caption(attributes, sentence),
    )  # fmt: skip
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
