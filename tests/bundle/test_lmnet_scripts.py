"""LMNet bundle code (post-processing, crops, training inputs), loaded under its own package name.

Two bundles' ``scripts`` packages share a name, so this module imports the LMNet one as ``lmnet_scripts``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage as ndi

from lesiondiffusion.dataset import holdout_indices
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.labels import mask_bounds
from lesiondiffusion.pipelines import lmnet as inference
from lesiondiffusion.pipelines import mask_inputs, mask_postprocess
from lesiondiffusion.training import split_datalist

LMNET_NEEDS = ("label", "report", "organ_seg")


def blob(shape, centre, radius):
    """A smooth field in [-1, 1]: 1 at ``centre``, 0 at ``radius``, negative beyond."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    d = np.linalg.norm(grid - np.asarray(centre), axis=-1)
    return np.clip(1 - d / radius, -1, 1)


def test_threshold_sweep_picks_the_volume_closest_to_the_target():
    field = blob((24, 24, 24), (12, 12, 12), 8.0)
    allowed = np.ones(field.shape, bool)
    for target in (50, 400, 1500):
        mask = mask_postprocess.select_mask(field, allowed, target)
        errors = [
            abs(mask_postprocess.largest_component(field > t)[1] - target) for t in mask_postprocess.DEFAULT_THRESHOLDS
        ]
        assert abs(int(mask.sum()) - target) == min(errors)


def test_selected_mask_is_one_component_inside_the_allowed_region():
    field = np.maximum(blob((24, 24, 24), (6, 12, 12), 5.0), blob((24, 24, 24), (18, 12, 12), 3.0))
    allowed = np.zeros(field.shape, bool)
    allowed[:, :, :14] = True
    mask = mask_postprocess.select_mask(field, allowed, target_volume=300)
    assert mask is not None and not (mask & ~allowed).any()
    assert ndi.label(mask)[1] == 1
    assert mask[6, 12, 10] and not mask[18, 12, 12]  # the larger blob wins
    assert mask_postprocess.select_mask(field, np.zeros_like(allowed), 100) is None
    assert mask_postprocess.select_mask(field, allowed, 100, min_voxels=10_000) is None


def test_the_selected_mask_has_no_enclosed_hole():
    field = blob((24, 24, 24), (12, 12, 12), 8.0)
    field[12, 12, 12] = -1.0  # one voxel of the sampled field below every threshold, deep inside
    mask = mask_postprocess.select_mask(field, np.ones(field.shape, bool), target_volume=900)
    assert mask[12, 12, 12] and not (ndi.binary_fill_holes(mask) & ~mask).any()


def test_signed_distance_target_is_smooth_with_the_mask_as_its_positive_set():
    mask = np.zeros((20, 20, 12), bool)
    mask[5:15, 6:14, 3:9] = True
    field = mask_inputs.signed_distance_target(mask, spacing=2.0, softness_mm=2.0)
    assert field.dtype == np.float32 and field.min() >= -1 and field.max() <= 1
    assert np.array_equal(field > 0, mask)  # the zero level set is the mask's border
    # one voxel on either side of the border sits at +-half a voxel (1 mm): tanh(0.5), not +-1
    assert field[5, 10, 6] == pytest.approx(np.tanh(0.5), abs=1e-5) and field[4, 10, 6] == pytest.approx(
        -np.tanh(0.5), abs=1e-5
    )
    assert field[10, 10, 6] == pytest.approx(np.tanh(2.5), abs=1e-5)  # 3 voxels (6 mm) from the nearest outside voxel
    assert field[0, 0, 0] < -0.99  # saturated far outside
    binary = mask * 2.0 - 1.0
    # far less high-frequency energy than the {-1, 1} target: what lets a few DDIM steps give a solid mask
    assert np.abs(np.diff(field, axis=0)).max() < 0.5 * np.abs(np.diff(binary, axis=0)).max()


def test_mask_target_transform_kinds():
    lesion = torch.zeros(1, 10, 10, 10)
    lesion[0, 3:7, 3:7, 3:7] = 1
    binary = mask_inputs.MaskTargetd("lesion", kind="binary")({"lesion": lesion})["lesion"]
    assert torch.equal(binary, lesion * 2 - 1)
    meta = MetaTensor(lesion, meta={"filename_or_obj": "x.nii.gz"})
    sdf = mask_inputs.MaskTargetd("lesion", kind="sdf", spacing=1.0, softness_mm=1.0)({"lesion": meta})["lesion"]
    assert isinstance(sdf, MetaTensor) and sdf.meta["filename_or_obj"] == "x.nii.gz"
    assert torch.equal(sdf > 0, lesion > 0) and not torch.equal(sdf, binary)
    with pytest.raises(InputError, match="mask_target"):
        mask_inputs.MaskTargetd("lesion", kind="ellipse")


def test_fragments_cut_off_by_resampling_become_organ():
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:18, 2:18, 2:18] = 1
    label[4:9, 4:9, 4:9] = 2  # lesion A
    label[10, 10, 10] = 2  # a fragment of A, cut off on the coarse grid
    label[12:16, 12:16, 12:16] = 2  # lesion B
    label[9, 9, 9] = 1  # not part of anything: stays organ
    out = mask_postprocess.whole_lesions(label.copy(), n_lesions=2)
    assert out[10, 10, 10] == 1 and (out[4:9, 4:9, 4:9] == 2).all() and (out[12:16, 12:16, 12:16] == 2).all()
    assert ndi.label(out == 2, structure=np.ones((3, 3, 3)))[1] == 2
    touching = label.copy()
    touching[9, 9, 9] = 2  # diagonal bridge: A and the fragment are one 26-connected piece with it
    assert np.array_equal(mask_postprocess.whole_lesions(touching.copy(), n_lesions=2), touching)
    assert (mask_postprocess.whole_lesions(label.copy(), n_lesions=1) == 2).sum() == 125  # only A, the largest


def test_crop_window_pads_outside_the_array():
    array = torch.arange(6 * 5 * 4, dtype=torch.float32).reshape(1, 6, 5, 4)
    out = mask_inputs.crop_array(array, centre=(0, 2, 3), size=(4, 4, 4), fill=-1)
    assert out.shape == (1, 4, 4, 4)
    assert torch.equal(out[0, 2:, :, :3], array[0, :2, 0:4, 1:4])  # window starts at (-2, 0, 1)
    assert (out[0, :2] == -1).all() and (out[0, :, :, 3] == -1).all()
    src, dst = mask_inputs.crop_window((100, 2, 2), (4, 4, 4), (6, 5, 4))  # fully outside on one axis
    assert src[0].stop - src[0].start == 0 and dst[0].stop - dst[0].start == 0


def test_lesion_inputs_from_label_and_organ_map():
    label = torch.zeros(1, 20, 20, 20)
    label[0, 4:16, 4:16, 4:16] = 1
    label[0, 6:9, 7:12, 5:7] = 2
    label[0, 10, 10, 10] = 2  # a second lesion voxel widens the box
    seg = torch.zeros_like(label)
    seg[0, 4:16, 4:16, 4:16] = 5
    out = mask_inputs.LesionInputsd(box_weight=100.0)({"label": MetaTensor(label), "organ_seg": MetaTensor(seg)})
    assert out["organ_id"] == 5
    assert torch.equal(out["lesion"], (label == 2).float())
    assert torch.equal(out["organ_mask"], (label >= 1).float())
    box = torch.zeros_like(label)
    box[0, 6:11, 7:12, 5:11] = 1
    assert torch.equal(out["box"], box)
    assert torch.equal(out["weight"], 1 + 99 * box)
    assert torch.allclose(out["organ_channel"], seg / 104)
    cropped = mask_inputs.CropAroundBoxd(["box", "lesion"], spatial_size=(8, 8, 8))(out)
    assert cropped["box"].shape == (1, 8, 8, 8) and cropped["box"].sum() == box.sum()
    empty = MetaTensor(torch.zeros_like(label), meta={"filename_or_obj": "/data/case/label.nii.gz"})
    with pytest.raises(InputError, match="label.nii.gz: the label map has no lesion voxels"):
        mask_inputs.LesionInputsd()({"label": empty, "organ_seg": MetaTensor(seg)})


def test_split_datalist(tmp_path):
    import json

    for i in range(4):
        for key in ("label", "organ_seg"):
            (tmp_path / f"{key}{i}.nii.gz").write_text("")
        (tmp_path / f"r{i}.json").write_text("{}")
    cases = [
        {
            "image": f"label{i}.nii.gz",
            "label": f"label{i}.nii.gz",
            "report": f"r{i}.json",
            "organ_seg": f"organ_seg{i}.nii.gz",
        }
        for i in range(4)
    ]
    (tmp_path / "dl.json").write_text(json.dumps({"training": cases}))
    train, val = split_datalist(tmp_path / "dl.json", LMNET_NEEDS, "LMNet", val_fraction=0.25, seed=5)
    (held,) = holdout_indices(4, 0.25, 5)[1]  # the one hold-out rule, with the training seed
    assert len(train) == 3 and len(val) == 1 and val[0]["label"] == str(tmp_path / f"label{held}.nii.gz")
    assert split_datalist(tmp_path / "dl.json", LMNET_NEEDS, "LMNet", val_fraction=0.25, seed=5) == (train, val)
    assert split_datalist(tmp_path / "dl.json", LMNET_NEEDS, "LMNet")[1] == []
    (tmp_path / "bad.json").write_text(json.dumps({"training": [{"image": "label0.nii.gz"}]}))
    with pytest.raises(
        InputError,
        match="bad.json: entry training\\[0\\] lacks label, report, organ_seg \\(LMNet needs label, report, organ_seg\\)",
    ):
        split_datalist(tmp_path / "bad.json", LMNET_NEEDS, "LMNet")


# ---- drawing one lesion: retries and the gap to lesions already drawn -------------------------------
class ScriptedSampler:
    """Stands in for the DDIM sampler: returns the given fields in turn and records the seeds asked for."""

    def __init__(self, *fields: np.ndarray) -> None:
        self.fields, self.seeds = list(fields), []

    def __call__(self, network, shape, condition=None, extra=None, seed=None, device=None):
        self.seeds.append(seed)
        field = self.fields[min(len(self.seeds), len(self.fields)) - 1]
        assert tuple(shape[2:]) == field.shape and extra.shape[1] == 3  # organ map, organ mask, box
        return torch.as_tensor(field, dtype=torch.float32)[None, None]


class BoxSampler(ScriptedSampler):
    """A :class:`ScriptedSampler` that also records the size (voxels) of the box channel the network is given."""

    def __init__(self, *fields: np.ndarray) -> None:
        super().__init__(*fields)
        self.boxes: list[int] = []

    def __call__(self, network, shape, condition=None, extra=None, seed=None, device=None):
        self.boxes.append(int(extra[0, 2].sum()))
        return super().__call__(network, shape, condition, extra, seed, device)


def synthesiser(sampler: ScriptedSampler, retries: int = 2):
    return inference.LesionMaskSynthesiser(
        network=torch.nn.Identity(), sampler=sampler, crop=(24, 24, 24), retries=retries
    )


def liver_lesion(tmp_path: Path, centre, size=(8, 8, 8)):
    from lesiondiffusion.manifest import LesionEntry
    from lesiondiffusion.placement import Box
    from lesiondiffusion.report import LesionReport, Report, write_report

    report = tmp_path / f"lesion_{centre[0]}.json"
    write_report(report, Report((LesionReport(5, {"shape": "round-like,", "lesion location": "5"}),)))
    return LesionEntry(5, "within the parenchymal organ", report, Box(centre, size))


def test_a_failed_sample_is_retried_with_a_new_seed(tmp_path):
    organ_seg = np.zeros((24, 24, 24), np.int16)
    organ_seg[2:22, 2:22, 2:22] = 5
    empty, good = -np.ones((24, 24, 24)), blob((24, 24, 24), (12, 12, 12), 4.0)
    sampler = ScriptedSampler(empty, good)
    mask = synthesiser(sampler).draw(
        organ_seg, liver_lesion(tmp_path, (12, 12, 12)), np.zeros(organ_seg.shape, bool), seed=5
    )
    assert len(sampler.seeds) == 2 and sampler.seeds[0] != sampler.seeds[1]
    assert mask.any() and ndi.label(mask)[1] == 1

    never = ScriptedSampler(empty)
    with pytest.raises(
        LesionDiffusionError, match=r"no lesion mask of at least \d+ voxels after 3 attempts \(organ 5\)"
    ):
        synthesiser(never, retries=2).draw(
            organ_seg, liver_lesion(tmp_path, (12, 12, 12)), np.zeros(organ_seg.shape, bool), seed=5
        )
    assert len(never.seeds) == 3


def test_a_box_beyond_the_networks_window_is_drawn_shrunk_and_scaled_up_not_cut_flat(tmp_path):
    organ_seg = np.zeros((40, 40, 40), np.int16)
    organ_seg[2:38, 2:38, 2:38] = 5
    grid = np.indices((24, 24, 24)) - 11.5
    ellipsoid = np.clip(1.0 - ((grid / np.array([5.0, 5.0, 9.0])[:, None, None, None]) ** 2).sum(axis=0), -1, 1)
    lesion = liver_lesion(tmp_path, (20, 20, 20), (16, 16, 30))  # 30 voxels along z: beyond the 24-voxel window
    sampler = BoxSampler(ellipsoid)
    synth = synthesiser(sampler)
    assert synth.box_scale(lesion.box) == pytest.approx(0.75 * 24 / 30)
    mask = synth.draw(organ_seg, lesion, np.zeros(organ_seg.shape, bool), seed=0)
    assert sampler.boxes == [10 * 10 * 18]  # drawn for the box shrunk to 3/4 of the window
    lo, hi = mask_bounds(mask)
    extent = hi - lo + 1
    assert extent[2] > 24 and extent[2] <= 30  # scaled back up, beyond the window, within the box
    assert mask.sum() / np.prod(extent) < 0.6  # round, not a cuboid cut by the window's faces


def test_a_new_lesion_keeps_a_gap_to_the_lesions_already_drawn(tmp_path):
    organ_seg = np.zeros((24, 24, 24), np.int16)
    organ_seg[2:22, 2:22, 2:22] = 5
    occupied = np.zeros(organ_seg.shape, bool)
    occupied[8:16, 8:16, 4:12] = True  # a lesion already drawn, overlapping the new box
    sampler = ScriptedSampler(blob((24, 24, 24), (12, 12, 12), 7.0))  # a sample that runs over it
    mask = synthesiser(sampler).draw(organ_seg, liver_lesion(tmp_path, (12, 12, 14), (10, 10, 10)), occupied, seed=0)
    assert mask.any()
    assert not (mask & ndi.binary_dilation(occupied)).any()  # not touching, not even face to face
    assert ndi.label(mask | occupied)[1] == 2


def test_a_box_below_the_networks_resolution_is_drawn_enlarged_and_scaled_back(tmp_path):
    organ_seg = np.zeros((24, 24, 24), np.int16)
    organ_seg[2:22, 2:22, 2:22] = 5
    # the network answers with a ball filling whatever box it is shown (here the 5^3 enlarged one)
    sampler = BoxSampler(blob((24, 24, 24), (12, 12, 12), 3.5))
    small = liver_lesion(tmp_path, (12, 12, 12), (4, 4, 4))
    mask = synthesiser(sampler).draw(organ_seg, small, np.zeros(organ_seg.shape, bool), seed=0)
    assert sampler.boxes == [5**3]  # 4 voxels < 5 network voxels: drawn in a box 5 wide
    lo, hi = np.argwhere(mask).min(0), np.argwhere(mask).max(0)
    assert (lo >= 10).all() and (hi <= 13).all()  # scaled back inside the 4^3 box asked for
    assert 20 <= mask.sum() <= 64 and ndi.label(mask)[1] == 1


def test_scale_mask_shrinks_a_ball_about_its_centre():
    ball = blob((40, 40, 40), (20, 20, 20), 10.0) > 0
    half = mask_postprocess.scale_mask(ball, (20, 20, 20), 0.5)
    assert abs(int(half.sum()) - 4 / 3 * np.pi * 5**3) < 0.1 * 4 / 3 * np.pi * 5**3  # a ball of radius 5
    assert np.allclose(np.argwhere(half).mean(0), 20, atol=0.5)
    assert not mask_postprocess.scale_mask(np.zeros((8, 8, 8), bool), (4, 4, 4), 0.5).any()
