"""The standardised working grid (RAS, 1 mm isotropic) and the way back to the input's own grid.

Every stage works on the standardised grid (design 4); every output goes back onto the grid of the
input the user gave: orientation, spacing, origin, shape and dtype. :class:`InputGeometry` is the
JSON-able record of that input grid (written by preprocess as ``geometry.json``), together with the
standardised grid it was mapped to, so a later stage can write results back without the original
transform chain:

>>> geometry = read_geometry("case_000/geometry.json")                  # doctest: +SKIP
>>> label_on_input = to_input_grid(label_std, geometry, mode="nearest")  # doctest: +SKIP

Both directions use MONAI: :func:`standardise` is ``Orientation`` + ``Spacing`` (the preprocess
bundle lists the same transforms in its ``inference.json``), :func:`to_input_grid` is
``SpatialResample`` onto the input's affine and shape. When the input already has 1 mm spacing the
standardisation is a pure axis flip/permutation, and the round trip is exact voxel for voxel.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing, SpatialResample

from lesiondiffusion.errors import InputError
from lesiondiffusion.io import PathLike, load_nifti, read_json, write_json
from lesiondiffusion.labels import mask_bounds

logger = logging.getLogger(__name__)

STANDARD_AXCODES = "RAS"
STANDARD_PIXDIM = (1.0, 1.0, 1.0)
GEOMETRY_VERSION = "1.0"

Mode = Literal["nearest", "linear"]
_MONAI_MODE = {"nearest": "nearest", "linear": "bilinear"}  # MONAI calls trilinear "bilinear"


@dataclass(frozen=True)
class InputGeometry:
    """The input's grid (``affine``, ``shape``, on-disk ``dtype``, ``path``) and its standardised grid."""

    path: str
    affine: tuple[tuple[float, ...], ...]
    shape: tuple[int, int, int]
    dtype: str
    standard_affine: tuple[tuple[float, ...], ...]
    standard_shape: tuple[int, int, int]
    axcodes: str = STANDARD_AXCODES
    pixdim: tuple[float, float, float] = STANDARD_PIXDIM

    @property
    def input_affine(self) -> np.ndarray:
        """The input's voxel -> world (RAS mm) matrix, 4x4."""
        return np.asarray(self.affine, dtype=np.float64)

    @property
    def standard_affine_array(self) -> np.ndarray:
        """The standardised grid's voxel -> world matrix, 4x4."""
        return np.asarray(self.standard_affine, dtype=np.float64)

    @property
    def numpy_dtype(self) -> np.dtype:
        """The input's on-disk dtype as a numpy dtype."""
        return np.dtype(self.dtype)

    def to_json(self) -> dict[str, Any]:
        """A plain dict for ``geometry.json``."""
        obj = asdict(self)
        obj["version"] = GEOMETRY_VERSION
        return obj

    @classmethod
    def from_json(cls, obj: Any, source: PathLike | None = None) -> InputGeometry:
        """Build from :meth:`to_json`'s dict; malformed content is an :class:`InputError` naming ``source``."""
        try:
            return cls(
                path=str(obj["path"]),
                affine=_matrix(obj["affine"]),
                shape=_triple(obj["shape"], int),
                dtype=str(np.dtype(obj["dtype"])),
                standard_affine=_matrix(obj["standard_affine"]),
                standard_shape=_triple(obj["standard_shape"], int),
                axcodes=str(obj.get("axcodes", STANDARD_AXCODES)),
                pixdim=_triple(obj.get("pixdim", STANDARD_PIXDIM), float),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(source, f"not a valid geometry record ({type(e).__name__}: {e})") from None


def _matrix(value: Any) -> tuple[tuple[float, ...], ...]:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (4, 4) or not np.all(np.isfinite(arr)):
        raise ValueError(f"expected a finite 4x4 affine, got shape {arr.shape}")
    return tuple(tuple(float(v) for v in row) for row in arr)


def _triple(value: Any, kind: type) -> tuple:
    if len(value) != 3:
        raise ValueError(f"expected 3 values, got {list(value)}")
    return tuple(kind(v) for v in value)


def record_geometry(
    path: PathLike,
    standard_affine: np.ndarray | torch.Tensor,
    standard_shape: Sequence[int],
    axcodes: str = STANDARD_AXCODES,
    pixdim: Sequence[float] = STANDARD_PIXDIM,
) -> InputGeometry:
    """The geometry record of the input image at ``path`` (header only) and its standardised grid."""
    img = load_nifti(path, ndim=3)
    return InputGeometry(
        path=str(Path(path).resolve()),
        affine=_matrix(img.affine),
        shape=_triple(img.shape[:3], int),
        dtype=str(img.get_data_dtype()),
        standard_affine=_matrix(np.asarray(standard_affine, dtype=np.float64)),
        standard_shape=_triple(standard_shape, int),
        axcodes=axcodes,
        pixdim=_triple(pixdim, float),
    )


def canonical_grid(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The same voxels with array axes reordered and flipped to lie closest to RAS: (affine, shape).

    Two files of one scan (a DICOM series and a NIfTI converted from it) often store the same grid
    with flipped or swapped axes; their canonical grids are equal.
    """
    aff = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(aff)
    new_shape = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        new_shape[int(target)] = int(shape[axis])
    return aff @ nib.orientations.inv_ornt_aff(ornt, tuple(int(s) for s in shape[:3])), tuple(new_shape)


def same_grid(
    affine_a: np.ndarray, shape_a: Sequence[int], affine_b: np.ndarray, shape_b: Sequence[int], atol: float = 1e-3
) -> bool:
    """True when two grids hold the same voxel centres, whatever the order and direction of their array axes."""
    a, sa = canonical_grid(affine_a, shape_a[:3])
    b, sb = canonical_grid(affine_b, shape_b[:3])
    return sa == sb and bool(np.allclose(a, b, atol=atol))


def write_geometry(path: PathLike, geometry: InputGeometry) -> Path:
    """Write the record as JSON (atomically)."""
    return write_json(path, geometry.to_json())


def read_geometry(path: PathLike) -> InputGeometry:
    """Read a record written by :func:`write_geometry`."""
    return InputGeometry.from_json(read_json(path), path)


def standardise(
    image: MetaTensor,
    mode: Mode = "linear",
    axcodes: str = STANDARD_AXCODES,
    pixdim: Sequence[float] = STANDARD_PIXDIM,
) -> MetaTensor:
    """A channel-first image (with its affine) reoriented to ``axcodes`` and resampled to ``pixdim`` mm.

    Use ``mode="nearest"`` for label maps. This is the chain the preprocess bundle runs as
    ``Orientationd`` + ``Spacingd``.
    """
    out = Orientation(axcodes=axcodes, labels=None)(image)
    # float32 sampling: a 512 x 512 x 300 scan needs 2.2 GB instead of 3.8 GB (float64), within 0.02 HU
    return Spacing(pixdim=tuple(pixdim), mode=_MONAI_MODE[mode], padding_mode="border", dtype=torch.float32)(out)


def to_input_grid(
    array: np.ndarray | torch.Tensor,
    geometry: InputGeometry,
    mode: Mode = "nearest",
    dtype: Any = None,
) -> np.ndarray:
    """Resample a 3D array on the standardised grid onto the input's grid (shape and affine).

    ``mode="nearest"`` for label maps, ``"linear"`` for images. The result is cast to ``dtype``
    (default: the input's on-disk dtype for ``linear``, the array's own dtype for ``nearest``);
    integer targets are rounded and clipped to the dtype's range, never wrapped.
    """
    if isinstance(array, MetaTensor):
        array = array.as_tensor()  # the standardised grid's affine comes from the record, not the tensor
    data = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
    if tuple(data.shape) != tuple(geometry.standard_shape):
        raise ValueError(f"array shape {tuple(data.shape)} is not the standardised grid's {geometry.standard_shape}")
    if dtype is None:
        dtype = geometry.numpy_dtype if mode == "linear" else _numpy_dtype(data.dtype)
    if mode == "linear":
        return cast_to(
            _resample(data, geometry.standard_affine_array, geometry.input_affine, geometry.shape, mode), dtype
        )
    # A label map is zero almost everywhere: resample only the input-grid block its non-zero voxels
    # reach. The full-grid resampling of a 512 x 512 x 300 scan needs several GB for its sampling grid.
    out = np.zeros(geometry.shape, dtype=np.dtype(dtype))
    window = _support_window(data, geometry)
    if window is not None:
        (src, src_start), (dst, dst_start) = window
        size = tuple(sl.stop - sl.start for sl in dst)
        block = _resample(
            data[src],
            _shifted(geometry.standard_affine_array, src_start),
            _shifted(geometry.input_affine, dst_start),
            size,
            mode,
        )
        out[dst] = cast_to(block, dtype)
    return out


def _resample(
    data: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray, shape: Sequence[int], mode: Mode
) -> np.ndarray:
    """MONAI ``SpatialResample`` of a 3D array from one grid onto another (border padding)."""
    src = MetaTensor(
        data[None].to(torch.float64 if mode == "linear" else torch.float32), affine=torch.as_tensor(src_affine)
    )
    resample = SpatialResample(mode=_MONAI_MODE[mode], padding_mode="border", dtype=torch.float64)
    out = resample(src, dst_affine=torch.as_tensor(dst_affine), spatial_size=tuple(int(s) for s in shape))
    return np.asarray(out.array if isinstance(out, MetaTensor) else out)[0]


def _shifted(affine: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """The affine of a block of the grid ``affine`` whose first voxel is ``start``."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(start, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ shift


def _support_window(
    data: torch.Tensor, geometry: InputGeometry, pad: int = 2
) -> tuple[tuple[tuple[slice, ...], list[int]], tuple[tuple[slice, ...], list[int]]] | None:
    """``((source slices, start), (input-grid slices, start))`` covering every non-zero voxel, or None if all zero.

    The source block is the non-zero bounding box grown by ``pad`` voxels, so its rim is zero (or the
    grid's own border) and border padding beyond it gives what the whole grid would; the input block
    holds every input voxel whose centre falls within the source block.
    """
    bounds = mask_bounds(data.detach().cpu().numpy())
    if bounds is None:
        return None
    lo = [max(int(a) - pad, 0) for a in bounds[0]]
    hi = [min(int(b) + pad, n - 1) for b, n in zip(bounds[1], data.shape, strict=True)]
    corners = np.array(list(itertools.product(*[(a - 0.5, b + 0.5) for a, b in zip(lo, hi)])), dtype=np.float64)
    world = corners @ geometry.standard_affine_array[:3, :3].T + geometry.standard_affine_array[:3, 3]
    voxels = (world - geometry.input_affine[:3, 3]) @ np.linalg.inv(geometry.input_affine[:3, :3]).T
    start = np.clip(np.floor(voxels.min(axis=0)).astype(int), 0, np.asarray(geometry.shape) - 1)
    stop = np.clip(np.ceil(voxels.max(axis=0)).astype(int) + 1, 1, np.asarray(geometry.shape))
    if np.any(stop <= start):
        return None
    src = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
    dst = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    return (src, lo), (dst, [int(a) for a in start])


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def cast_to(array: np.ndarray, dtype: Any) -> np.ndarray:
    """``array`` as ``dtype``; integer targets are rounded and clipped to their range."""
    target = np.dtype(dtype)
    if np.issubdtype(target, np.integer):
        info = np.iinfo(target)
        return np.clip(np.rint(array), info.min, info.max).astype(target)
    return np.asarray(array).astype(target)


def save_on_input_grid(
    path: PathLike,
    array: np.ndarray | torch.Tensor,
    geometry: InputGeometry,
    mode: Mode = "nearest",
    dtype: Any = None,
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Path:
    """Resample ``array`` onto the input's grid (then ``postprocess`` it) and save it with the input's header (atomically)."""
    from lesiondiffusion.io import save_nifti

    data = to_input_grid(array, geometry, mode=mode, dtype=dtype)
    if postprocess is not None:
        data = postprocess(data)
    header = _input_header(geometry)
    if header is not None:
        header.set_slope_inter(None, None)  # ``data`` is already in output units; never rescale it
    return save_nifti(path, data, geometry.input_affine, header=header)


def _input_header(geometry: InputGeometry) -> nib.Nifti1Header | None:
    """The input's header when the file is still readable (units, descriptions), else None."""
    try:
        img = load_nifti(geometry.path, ndim=3)
    except InputError:
        logger.warning("%s: input no longer readable; writing with a fresh header", geometry.path)
        return None
    return img.header.copy() if isinstance(img.header, nib.Nifti1Header) else None
