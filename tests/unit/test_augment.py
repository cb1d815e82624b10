"""RandLesionSynthesisd on a 32^3 crop of a real CT (TotalSegmentator's example, v2 organ map), shipped weights."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, SpatialCropd, SpatialPadd
from monai.utils import set_determinism

from lesiondiffusion.augment import LesionDistribution, RandLesionSynthesisd
from lesiondiffusion.errors import LesionDiffusionError

DATA = Path(__file__).resolve().parents[1] / "data" / "ts_small"
LIVER_V2 = 5
DIST = {
    "size_mm": (12.0, 18.0),
    "lesion_types": ["tumor"],
    "densities": ["hypodense"],
    "cavity": "within the parenchymal organ",
}


def _sample() -> dict:
    keys = ["image", "organ_seg"]
    load = Compose([
        LoadImaged(keys), EnsureChannelFirstd(keys),
        SpatialCropd(keys, roi_center=(73, 55, 15), roi_size=(32, 32, 32)),
        SpatialPadd(keys, (32, 32, 32), mode="edge"),
    ])  # fmt: skip
    d = load({"image": str(DATA / "example_ct_sm.nii.gz"), "organ_seg": str(DATA / "example_seg.nii.gz")})
    d["label"] = (d["organ_seg"] == LIVER_V2).to(torch.uint8)
    return d


@pytest.fixture(scope="module")
def sample() -> dict:
    return _sample()


@pytest.fixture(scope="module")
def transform() -> RandLesionSynthesisd:
    return RandLesionSynthesisd(prob=1.0, distribution=DIST, organ_label=1)


def _run(t: RandLesionSynthesisd, sample: dict, seed: int) -> dict:
    t.set_random_state(seed)
    return t(dict(sample))


def test_writes_a_lesion_updates_the_label_and_keeps_meta(transform, sample):
    out = _run(transform, sample, 0)
    image, label = out["image"], out["label"]
    lesion = (label[0] == 2).numpy()
    assert lesion.sum() >= 8
    assert not (sample["label"][0].numpy() == 2).any()
    # the lesion lies in the liver, and only its neighbourhood changed
    assert (sample["organ_seg"][0].numpy()[lesion] == LIVER_V2).all()
    changed = (image[0] != sample["image"][0]).numpy()
    assert changed[lesion].mean() > 0.9
    from scipy import ndimage

    near = ndimage.binary_dilation(lesion, iterations=2)  # margin 3 mm = one 3 mm voxel, plus rounding
    assert not changed[~near].any()
    # meta-data, affine, dtype and the record of what was drawn
    assert torch.equal(image.affine, sample["image"].affine) and torch.equal(label.affine, sample["label"].affine)
    assert image.meta["filename_or_obj"] == sample["image"].meta["filename_or_obj"]
    assert image.dtype == sample["image"].dtype and label.dtype == sample["label"].dtype
    records = json.loads(image.meta["lesion_synthesis"])
    assert records == json.loads(label.meta["lesion_synthesis"]) and len(records) == 1
    r = records[0]
    assert r["organ"] == "liver" and r["voxels"] == int(lesion.sum())
    assert r["requested"]["lesion type"] == "tumor" and "hypodense" in r["attributes"]["density"]
    # a hypodense lesion on a non-contrast liver: darker than the liver around it
    liver = (sample["organ_seg"][0] == LIVER_V2).numpy() & ~near
    assert float(image[0].numpy()[lesion].mean()) < float(sample["image"][0].numpy()[liver].mean()) - 5
    # the input sample is never modified
    assert not (sample["label"][0] == 2).any()


def test_same_random_state_same_lesion_other_state_other_lesion(transform, sample):
    a, b, c = _run(transform, sample, 3), _run(transform, sample, 3), _run(transform, sample, 4)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])

    def drawn(x: dict) -> list:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(x["image"].meta["lesion_synthesis"])]

    assert drawn(a) == drawn(b)
    assert not torch.equal(a["label"], c["label"])
    set_determinism(seed=7)
    d = RandLesionSynthesisd(prob=1.0, distribution=DIST)(dict(sample))
    set_determinism(seed=7)
    e = RandLesionSynthesisd(prob=1.0, distribution=DIST)(dict(sample))
    set_determinism(seed=None)
    assert torch.equal(d["image"], e["image"])


def test_prob_zero_is_identity_with_an_empty_record(sample):
    t = RandLesionSynthesisd(prob=0.0, distribution=DIST)
    out = _run(t, sample, 0)
    assert torch.equal(out["image"], sample["image"]) and torch.equal(out["label"], sample["label"])
    assert json.loads(out["image"].meta["lesion_synthesis"]) == []
    assert t._engine is None  # nothing loaded when nothing is drawn


def test_dataloader_workers_build_their_own_networks(transform, sample):
    assert transform.engine is not None  # built here: it must not travel to the workers
    assert len(pickle.dumps(transform)) < 100_000
    data = [dict(sample) for _ in range(4)]
    loader = DataLoader(Dataset(data, Compose([transform])), batch_size=2, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch["image"].shape == (2, 1, 32, 32, 32)
        assert ((batch["label"] == 2).flatten(1).sum(1) >= 8).all()
        records = [json.loads(r) for r in batch["image"].meta["lesion_synthesis"]]
        assert all(len(r) == 1 for r in records)


def test_bad_distribution_is_one_clear_error():
    with pytest.raises(LesionDiffusionError, match="density"):
        LesionDistribution(densities=["glowing"])
    with pytest.raises(LesionDiffusionError, match="size_mm"):
        LesionDistribution(size_mm=(20, 10))
    with pytest.raises(LesionDiffusionError, match="unknown organ"):
        LesionDistribution(organs=["livre-x"])


def test_an_absent_organ_leaves_the_sample_as_it_is(sample):
    t = RandLesionSynthesisd(prob=1.0, distribution={**DIST, "organs": ["urinary bladder"]})
    out = _run(t, sample, 0)
    assert torch.equal(out["image"], sample["image"])
    assert np.array_equal(out["label"].numpy(), sample["label"].numpy())
