"""MONAI transforms shared by the bundles: the CT intensity map of design 4 and its inverse."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils.type_conversion import convert_data_type, convert_to_tensor

# The original's map: HU clipped to [-1000, 1000], then piecewise linear through these knots.
HU_KNOTS = (-1000.0, -200.0, 200.0, 1000.0)
UNIT_KNOTS = (0.0, 0.2, 0.8, 1.0)


def _piecewise(x: torch.Tensor, xp: Sequence[float], fp: Sequence[float]) -> torch.Tensor:
    """Piecewise-linear interpolation through (xp, fp), clamped at the ends (like ``np.interp``)."""
    xp_t = torch.as_tensor(xp, dtype=x.dtype, device=x.device)
    fp_t = torch.as_tensor(fp, dtype=x.dtype, device=x.device)
    xc = x.clamp(xp_t[0], xp_t[-1])
    idx = torch.bucketize(xc, xp_t[1:-1])  # segment index 0..len(xp)-2
    x0, x1, f0, f1 = xp_t[idx], xp_t[idx + 1], fp_t[idx], fp_t[idx + 1]
    return f0 + (xc - x0) * (f1 - f0) / (x1 - x0)


class CTIntensityMap(Transform):
    """Map HU to [0, 1] through the knots ``hu`` -> ``unit`` (``inverse=True``: [0, 1] back to HU).

    The map is strictly increasing, so the inverse is exact within the clipped HU range.
    """

    backend = [NdarrayOrTensor]

    def __init__(
        self, hu: Sequence[float] = HU_KNOTS, unit: Sequence[float] = UNIT_KNOTS, inverse: bool = False
    ) -> None:
        if len(hu) != len(unit) or len(hu) < 2:
            raise ValueError("hu and unit knots must have the same length (>= 2)")
        if any(b <= a for a, b in zip(hu, hu[1:])) or any(b <= a for a, b in zip(unit, unit[1:])):
            raise ValueError("intensity knots must be strictly increasing")
        self.src, self.dst = (tuple(unit), tuple(hu)) if inverse else (tuple(hu), tuple(unit))

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        x = convert_to_tensor(img, track_meta=True)
        dtype = x.dtype if x.is_floating_point() else torch.float32
        out = _piecewise(x.to(dtype), self.src, self.dst)
        return convert_data_type(out, output_type=type(img) if isinstance(img, np.ndarray) else None)[0]


class CTIntensityMapd(MapTransform):
    """Dictionary version of :class:`CTIntensityMap`."""

    backend = CTIntensityMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        hu: Sequence[float] = HU_KNOTS,
        unit: Sequence[float] = UNIT_KNOTS,
        inverse: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mapper = CTIntensityMap(hu, unit, inverse)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.mapper(d[key])
        return d


def hu_to_unit(x: NdarrayOrTensor) -> NdarrayOrTensor:
    """HU -> [0, 1] with the default knots."""
    return CTIntensityMap()(x)


def unit_to_hu(x: NdarrayOrTensor) -> NdarrayOrTensor:
    """[0, 1] -> HU with the default knots."""
    return CTIntensityMap(inverse=True)(x)
