"""LMNet's own data transforms: network inputs from (label map, organ map), and a crop centred on the box."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage as ndi

from lesiondiffusion.errors import InputError
from lesiondiffusion.labels import LESION_LABEL

LESION, ORGAN_CHANNEL, ORGAN_MASK, BOX, WEIGHT = "lesion", "organ_channel", "organ_mask", "box", "weight"
INPUT_KEYS = (LESION, ORGAN_CHANNEL, ORGAN_MASK, BOX, WEIGHT)
EXTRA_KEYS = (ORGAN_CHANNEL, ORGAN_MASK, BOX)  # the network's known input channels, in order
ORGAN_SCALE = 104.0  # the original feeds the TotalSegmentator v1 label / 104 as one channel


def box_channel(lesion: torch.Tensor) -> torch.Tensor:
    """The filled bounding box of the nonzero voxels of ``lesion`` (``[1, X, Y, Z]``), as 0/1."""
    box = torch.zeros_like(lesion, dtype=torch.float32)
    idx = torch.nonzero(lesion[0] > 0)
    if idx.numel():
        lo, hi = idx.min(0).values, idx.max(0).values + 1
        box[0, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1.0
    return box


def input_channels(
    organ_seg: torch.Tensor,
    organ_mask: torch.Tensor,
    box: torch.Tensor,
    box_weight: float,
    organ_scale: float = ORGAN_SCALE,
) -> dict[str, torch.Tensor]:
    """The known channels (organ map / scale, organ mask, box) and the loss weight (``box_weight`` in the box)."""
    box = box.float()
    return {
        ORGAN_CHANNEL: organ_seg.float() / organ_scale,
        ORGAN_MASK: organ_mask.float(),
        BOX: box,
        WEIGHT: 1.0 + (float(box_weight) - 1.0) * box,
    }


class LesionInputsd(MapTransform):
    """Label map (0/1/2) + organ map -> LMNet's training channels.

    Writes ``lesion`` (0/1; the sample ``x0`` once mapped to {-1, 1}), ``organ_channel`` (organ map /
    104), ``organ_mask`` (label >= 1: the target organ with its lesion), ``box`` (the lesion's filled
    bounding box), ``weight`` (``box_weight`` inside the box, 1 outside) and ``organ_id`` (the organ-map
    label most common under the lesion, to pick the report entry when a report lists several).
    A label map without lesion voxels is an :class:`InputError` naming the file.
    """

    def __init__(self, label_key: str = "label", organ_seg_key: str = "organ_seg", box_weight: float = 1000.0) -> None:
        super().__init__([label_key, organ_seg_key])
        self.label_key = label_key
        self.organ_seg_key = organ_seg_key
        self.box_weight = box_weight

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label, seg = d[self.label_key], d[self.organ_seg_key]
        label_t = torch.as_tensor(label).round()
        lesion = (label_t == LESION_LABEL).float()
        if not bool(lesion.any()):
            source = label.meta.get("filename_or_obj") if isinstance(label, MetaTensor) else None
            raise InputError(source, "the label map has no lesion voxels (value 2)")
        seg_t = torch.as_tensor(seg).round()
        under = seg_t[lesion > 0].long()
        under = under[under > 0]
        d["organ_id"] = int(torch.bincount(under).argmax()) if under.numel() else 0
        channels = input_channels(seg_t, (label_t >= 1), box_channel(lesion), self.box_weight)
        meta_like = label if isinstance(label, MetaTensor) else None
        for key, value in {LESION: lesion, **channels}.items():
            d[key] = MetaTensor(value, meta=meta_like.meta) if meta_like is not None else value
        return d


MASK_TARGETS = ("binary", "sdf")


def signed_distance_target(mask: np.ndarray, spacing: float | Sequence[float], softness_mm: float) -> np.ndarray:
    """``tanh(d / softness_mm)`` of the signed distance ``d`` (mm, > 0 inside) to the border of ``mask``.

    The border sits halfway between an inside and an outside voxel, so one voxel on either side of it is
    at +-half a voxel. A binary target in {-1, 1} has all its energy in the sharp border, and a few
    sampling steps leave that border as speckle; this smooth field has the same zero level set as the mask
    and little high-frequency content, so the sampled field thresholds into a solid, compact lesion.
    """
    inside = np.asarray(mask, dtype=bool)
    sp = [float(spacing)] * inside.ndim if np.isscalar(spacing) else [float(s) for s in spacing]  # type: ignore[arg-type]
    if not inside.any():
        return np.full(inside.shape, -1.0, dtype=np.float32)
    half = 0.5 * min(sp)
    d_in = ndi.distance_transform_edt(inside, sampling=sp) - half
    d_out = ndi.distance_transform_edt(~inside, sampling=sp) - half
    d = np.where(inside, d_in, -d_out)
    return np.tanh(d / float(softness_mm)).astype(np.float32)


class MaskTargetd(MapTransform):
    """The 0/1 lesion mask -> the diffusion sample ``x0`` in [-1, 1].

    ``kind="binary"``: ``2 m - 1`` (the original's target). ``kind="sdf"``: :func:`signed_distance_target`
    on the working grid (``spacing`` mm per voxel), with ``softness_mm`` setting how fast it saturates.
    """

    def __init__(
        self, keys: KeysCollection, kind: str = "sdf", spacing: float | Sequence[float] = 1.0, softness_mm: float = 2.0
    ) -> None:
        super().__init__(keys)
        if kind not in MASK_TARGETS:
            raise InputError(None, f"mask_target must be one of {', '.join(MASK_TARGETS)}, not {kind!r}")
        self.kind, self.spacing, self.softness_mm = kind, spacing, float(softness_mm)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            m = torch.as_tensor(d[key])
            if self.kind == "binary":
                value = m.float() * 2.0 - 1.0
            else:
                field = np.stack(
                    [signed_distance_target(c > 0.5, self.spacing, self.softness_mm) for c in m.detach().cpu().numpy()]
                )
                value = torch.as_tensor(field)
            d[key] = MetaTensor(value, meta=d[key].meta) if isinstance(d[key], MetaTensor) else value
        return d


def crop_window(
    centre: Sequence[int], size: Sequence[int], shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Source and destination slices of a ``size`` window centred on ``centre`` over an array of ``shape``.

    The window starts at ``centre - size // 2``; its parts outside the array are left to padding:
    ``out[dst] = array[src]`` fills the covered part of an output of ``size``.
    """
    src, dst = [], []
    for c, s, n in zip(centre, size, shape):
        lo = int(c) - int(s) // 2
        a, b = max(lo, 0), min(lo + int(s), int(n))
        if b <= a:
            a = b = max(min(lo, int(n)), 0)
        src.append(slice(a, b))
        dst.append(slice(a - lo, a - lo + (b - a)))
    return tuple(src), tuple(dst)


def crop_array(array: torch.Tensor, centre: Sequence[int], size: Sequence[int], fill: float = 0.0) -> torch.Tensor:
    """``[C, *size]`` window of a channel-first ``array`` centred on ``centre``, ``fill`` outside the array."""
    src, dst = crop_window(centre, size, array.shape[1:])
    out = torch.full((array.shape[0], *[int(s) for s in size]), fill, dtype=array.dtype)
    out[(slice(None), *dst)] = torch.as_tensor(array)[(slice(None), *src)]
    return out


def box_centre(box: torch.Tensor) -> tuple[int, int, int]:
    """Centre voxel of the nonzero region of a ``[1, X, Y, Z]`` box channel (image centre if empty)."""
    idx = torch.nonzero(box[0] > 0)
    if not idx.numel():
        return tuple(int(s) // 2 for s in box.shape[1:])  # type: ignore[return-value]
    lo, hi = idx.min(0).values, idx.max(0).values + 1
    return tuple(int(v) for v in (lo + (hi - lo) // 2))  # type: ignore[return-value]


class CropAroundBoxd(MapTransform):
    """Crop ``keys`` to ``spatial_size`` centred on the box channel (zero padding outside the image)."""

    def __init__(
        self, keys: KeysCollection, spatial_size: Sequence[int], box_key: str = BOX, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.box_key = box_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        centre = box_centre(torch.as_tensor(d[self.box_key]))
        for key in self.key_iterator(d):
            d[key] = crop_array(torch.as_tensor(d[key]), centre, self.spatial_size)
        return d


def working_size(crop: Sequence[int], spacing: float | Sequence[float]) -> tuple[int, int, int]:
    """Size in standardised (1 mm) voxels of a ``crop`` at ``spacing`` mm."""
    sp = [float(spacing)] * 3 if np.isscalar(spacing) else [float(s) for s in spacing]  # type: ignore[arg-type]
    return tuple(int(round(c * s)) for c, s in zip(crop, sp))  # type: ignore[return-value]
