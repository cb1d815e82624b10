"""LMNet inference: one lesion mask per box of a preprocess manifest, written as label maps (0/1/2).

For each lesion: a window of ``crop`` voxels at the working ``spacing`` (mm) centred on the box is cut
from the standardised organ map; the network samples the mask from noise conditioned on the lesion's
report; the field is brought back to the 1 mm grid (trilinear) and post-processed (threshold sweep
towards the expected volume, largest component, minimum size, retries with new seeds) inside the
allowed region of its cavity rule, minus the lesions already drawn (no overlap). The label map is
written on the standardised grid and on the input's own grid, and the manifest gains ``label`` and
``label_original`` per case (:meth:`LesionMaskSynthesiser.extend_case`, the iteration of the bundle's
:class:`~lesiondiffusion.pipelines.cases.CaseEvaluator`). A case whose lesion cannot be drawn is marked
failed; the others go on.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from torch import nn

from lesiondiffusion.conditioning import ConditionSpec, lesion_attributes
from lesiondiffusion.diffusion import DiffusionSampler
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.geometry import read_geometry, save_on_input_grid
from lesiondiffusion.io import PathLike, read_nifti_array, save_nifti
from lesiondiffusion.labels import LESION_LABEL, ORGAN_LABEL
from lesiondiffusion.manifest import CaseEntry, LesionEntry
from lesiondiffusion.networks.weights import load_weights, require_weights
from lesiondiffusion.pipelines.cases import lesion_seed
from lesiondiffusion.pipelines.mask_inputs import ORGAN_SCALE, crop_window, working_size
from lesiondiffusion.pipelines.mask_postprocess import (
    DEFAULT_THRESHOLDS,
    ELLIPSOID_FILL,
    largest_component,
    scale_mask,
    select_mask,
    whole_lesions,
)
from lesiondiffusion.placement import Box, PlacementError, allowed_region, box_mask

logger = logging.getLogger(__name__)

LABEL_NAME = "label.nii.gz"
LABEL_ORIGINAL_NAME = "label_original.nii.gz"


@dataclass
class LesionMaskSynthesiser:
    """Draws lesion masks with a trained LMNet.

    Args:
        network: a :class:`~lesiondiffusion.diffusion.ConditionedDiffusionModel`.
        weights: trained weights loaded into ``network``: the ``model.pt`` a training run leaves (a plain
            state dict of the EMA network; a full checkpoint's EMA weights are also accepted). None keeps
            the network's own weights.
        sampler: DDIM or rectified-flow sampler (steps, guidance scale).
        crop: the network's input size in working voxels.
        spacing: working voxel size in mm (the standardised grid is 1 mm).
        seed: base seed; a lesion's seed comes from it, its case's name and its index (:func:`lesion_seed`),
            each retry's from that.
        retries: extra sampling attempts when post-processing finds no acceptable mask.
        min_voxels, min_fraction: a mask needs at least ``max(min_voxels, min_fraction * expected)`` voxels.
        fill: expected lesion volume as a fraction of its box (an inscribed ellipsoid: pi / 6).
        gap: voxels kept free around lesions already drawn, so two lesions never touch.
        min_box_working: the narrowest box (network voxels) drawn as it is; narrower ones are drawn enlarged
            and scaled down (see :meth:`draw`).
        max_box_fraction: the widest box, as a fraction of the network's window along each axis, drawn as
            it is; wider ones are drawn shrunk and scaled up.
    """

    network: nn.Module
    sampler: DiffusionSampler
    crop: Sequence[int]
    weights: PathLike | None = None
    spacing: float = 1.0
    seed: int = 0
    retries: int = 3
    min_voxels: int = 8
    min_fraction: float = 0.1
    fill: float = ELLIPSOID_FILL
    gap: int = 1
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    min_box_working: float = 5.0
    max_box_fraction: float = 0.75
    device: torch.device | str = "cpu"
    spec: ConditionSpec = field(init=False)

    def __post_init__(self) -> None:
        if self.weights is not None:
            require_weights(self.weights, "weights", "LMNet")
            load_weights(self.network, self.weights, "weights", "LMNet")
        self.network.eval()
        encoder = getattr(self.network, "encoder", None)
        self.spec = encoder.spec if encoder is not None else ConditionSpec()
        self.crop = tuple(int(c) for c in self.crop)
        self.window = working_size(self.crop, self.spacing)

    def condition(self, lesion: LesionEntry) -> torch.Tensor:
        """The lesion's condition tensor ``[1, n, width]`` from its report file."""
        attributes = lesion_attributes(lesion.report, lesion.organ_id)
        return self.spec.encode(attributes, lesion.report)[None]

    def _to_working(self, array: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(array, dtype=torch.float32)[None, None]
        return t if tuple(self.window) == self.crop else F.interpolate(t, size=self.crop, mode="nearest")

    def draw(self, organ_seg: np.ndarray, lesion: LesionEntry, occupied: np.ndarray, seed: int) -> np.ndarray:
        """One lesion's boolean mask on the standardised grid (shape of ``organ_seg``).

        A box the network cannot draw as it is (:meth:`box_scale`) has its shape sampled for a box rescaled
        about the same centre, and the mask is scaled back to the requested box (:func:`scale_mask`).
        """
        box: Box = lesion.box
        organ = organ_seg == lesion.organ_id
        if not organ.any():
            raise LesionDiffusionError(f"organ {lesion.organ_id} is absent from the organ map")
        blocked = ndi.binary_dilation(occupied, iterations=self.gap) if self.gap and occupied.any() else occupied
        try:
            allowed = allowed_region(organ, lesion.cavity, box) & ~blocked
        except PlacementError as e:
            raise LesionDiffusionError(str(e)) from None
        if not allowed.any():
            raise LesionDiffusionError(
                f"the box {box.centre}/{box.size} leaves no room for the lesion (cavity rule, other lesions)"
            )
        scale = self.box_scale(box)
        if scale != 1.0:
            drawn_box = Box(box.centre, tuple(max(1, int(math.ceil(s * scale))) for s in box.size))
            try:
                drawn = self._sample(
                    organ_seg,
                    organ,
                    lesion,
                    drawn_box,
                    allowed_region(organ, lesion.cavity, drawn_box) & ~blocked,
                    seed,
                )
            except (PlacementError, LesionDiffusionError) as e:
                logger.info(
                    "lesion in organ %d: rescaled box %s not drawn (%s); drawing the box itself",
                    lesion.organ_id,
                    drawn_box.size,
                    e,
                )
            else:
                mask = ndi.binary_fill_holes(scale_mask(drawn, box.centre, 1.0 / scale)) & allowed
                if mask.any():
                    return largest_component(mask)[0]
        return self._sample(organ_seg, organ, lesion, box, allowed, seed)

    def box_scale(self, box: Box) -> float:
        """The factor a box is drawn at: above 1 for a box narrower than :attr:`min_box_working` network voxels
        (below what the network resolves: a 6 mm nodule is 3 voxels at 2 mm), below 1 for a box wider than
        :attr:`max_box_fraction` of the network's window along an axis (the window would cut the mask flat:
        a cuboid), else 1."""
        fit = min(self.max_box_fraction * w / s for w, s in zip(self.window, box.size))
        if fit < 1.0:
            return fit
        return max(1.0, self.min_box_working * self.spacing / min(box.size))

    def _sample(
        self, organ_seg: np.ndarray, organ: np.ndarray, lesion: LesionEntry, box: Box, allowed: np.ndarray, seed: int
    ) -> np.ndarray:
        """LMNet's mask for ``box`` within ``allowed``, retried with new seeds when the threshold sweep finds none."""
        src, dst = crop_window(box.centre, self.window, organ_seg.shape)

        def window(array: np.ndarray, dtype: type) -> np.ndarray:
            out = np.zeros(self.window, dtype=dtype)
            out[dst] = array[src]
            return out

        allowed_w = window(allowed, bool)
        if not allowed_w.any():
            raise LesionDiffusionError(
                f"the box {box.centre}/{box.size} leaves no room for the lesion (cavity rule, other lesions)"
            )
        extra = torch.cat(
            [
                self._to_working(window(organ_seg, np.float32) / ORGAN_SCALE),
                self._to_working(window(organ, np.float32)),
                self._to_working(window(box_mask(organ_seg.shape, box), np.float32)),
            ],
            dim=1,
        )
        condition = self.condition(lesion)
        expected = float(np.prod(box.size)) * self.fill
        expected = min(expected, float(allowed_w.sum()))
        min_size = max(self.min_voxels, int(self.min_fraction * expected))
        for attempt in range(self.retries + 1):
            sample = self.sampler(
                self.network,
                (1, 1, *self.crop),
                condition=condition,
                extra=extra,
                seed=seed + 7919 * attempt,
                device=self.device,
            )
            up = sample.float().cpu()
            if tuple(self.window) != self.crop:
                up = F.interpolate(up, size=self.window, mode="trilinear", align_corners=False)
            mask = select_mask(up[0, 0].numpy(), allowed_w, expected, min_size, self.thresholds)
            if mask is not None:
                out = np.zeros(organ_seg.shape, dtype=bool)
                out[src] = mask[dst]
                return out
            logger.info(
                "lesion in organ %d: no mask of >= %d voxels on attempt %d", lesion.organ_id, min_size, attempt + 1
            )
        raise LesionDiffusionError(
            f"no lesion mask of at least {min_size} voxels after {self.retries + 1} attempts (organ {lesion.organ_id})"
        )

    def label_map(self, case: CaseEntry) -> tuple[np.ndarray, nib.Nifti1Image]:
        """The case's label map (uint8: 1 target organs, 2 lesions) on the standardised grid, and its image."""
        organ_seg, img = read_nifti_array(case.organ_seg, dtype=np.int32)
        label = np.zeros(organ_seg.shape, dtype=np.uint8)
        for lesion in case.lesions:
            label[organ_seg == lesion.organ_id] = ORGAN_LABEL
        occupied = np.zeros(organ_seg.shape, dtype=bool)
        for j, lesion in enumerate(case.lesions):
            mask = self.draw(organ_seg, lesion, occupied, seed=lesion_seed(self.seed, case.case, j))
            occupied |= mask
        label[occupied] = LESION_LABEL
        return label, img

    def extend_case(self, case: CaseEntry, out_dir: Path) -> CaseEntry:
        """Draw ``case``'s lesions and write its label maps into ``out_dir/<case>/`` (standardised and input
        grids); the entry gains ``label``, ``label_original`` and the network calls spent."""
        if not case.lesions:
            raise LesionDiffusionError("no lesion box to draw")
        calls = self.sampler.network_calls
        label, img = self.label_map(case)
        calls = self.sampler.network_calls - calls  # retries included
        geometry = read_geometry(case.geometry)
        if tuple(geometry.standard_shape) != label.shape:
            raise InputError(
                case.organ_seg, f"shape {label.shape} differs from the geometry record's {geometry.standard_shape}"
            )
        folder = out_dir / case.case
        std = save_nifti(folder / LABEL_NAME, label, img.affine, dtype=np.uint8)
        original = save_on_input_grid(
            folder / LABEL_ORIGINAL_NAME, label, geometry, mode="nearest", dtype=np.uint8,
            postprocess=functools.partial(whole_lesions, n_lesions=len(case.lesions)),
        )  # fmt: skip
        logger.info(
            "%s: %d lesion(s) drawn, %d voxels", case.case, len(case.lesions), int((label == LESION_LABEL).sum())
        )
        extra = {**case.extra, "lmnet": {"network_calls": calls}}
        return replace(case, label=std, label_original=original, synthetic_image=None, extra=extra)
