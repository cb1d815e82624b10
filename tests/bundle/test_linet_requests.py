"""LINet with the shipped weights honours the request: the density it is asked for, and other lesions.

In process, on the bundle's own ``inference.json`` (network, VQ-GAN, sampler and inpainter as the bundle
builds them) and the shipped ``cpu`` weights, on the 1 mm demo liver phantom (``small_demo``):

- the same lesion, case and seed painted hypo-, iso- and hyperdense comes back darker to brighter, each
  near the CT value its request carries (a request whose CT value never reached the intensity prior
  comes back at the tissue's own value whatever it asks);
- two lesions whose paste zones overlap: painting the second leaves every voxel of the first as a run
  with the first alone wrote it (the paste protects other lesions), and the paste itself never writes
  a protected voxel.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage
from test_linet_bundle import LINET

from lesiondiffusion import vocabulary as V
from lesiondiffusion.conditioning import lesion_attributes
from lesiondiffusion.geometry import record_geometry, standardise, write_geometry
from lesiondiffusion.io import read_stored
from lesiondiffusion.manifest import CaseEntry, LesionEntry
from lesiondiffusion.paste import paste
from lesiondiffusion.placement import Box
from lesiondiffusion.report import format_ct_value

pytestmark = pytest.mark.slow


def inpainter(steps: int):
    """The bundle's inpainter as its ``inference.json`` builds it: shipped weights, ``steps`` DDIM steps, CPU."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(LINET / "configs" / "inference.json")
    parser.update(
        {
            "bundle_root": str(LINET),
            "device": "$torch.device('cpu')",
            "steps": steps,
            "diffusion_sampler#progress": False,
        }
    )
    return parser.get_parsed_content("inpainter")


def ball(shape, centre, radius) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


@pytest.fixture(scope="module")
def liver(small_demo: Path) -> dict:
    """The 1 mm demo liver case: CT (HU), organ label, report, and the deepest point of the organ."""
    case = small_demo / "cases" / "Liver_cancer"
    img = nib.load(case / "image.nii.gz")
    label = np.asarray(nib.load(case / "label.nii.gz").dataobj)
    organ = label > 0
    depth = ndimage.distance_transform_edt(organ)
    return {
        "case": case, "image": np.asarray(img.dataobj).astype(np.float32), "affine": img.affine, "organ": organ,
        "centre": np.unravel_index(int(depth.argmax()), organ.shape), "depth": float(depth.max()),
        "organ_hu": float(np.median(np.asarray(img.dataobj)[label == 1])),
    }  # fmt: skip


def test_hyperdense_comes_back_brighter_than_hypodense(liver: dict) -> None:
    painter = inpainter(steps=5)
    lesion = ball(liver["image"].shape, liver["centre"], 6)
    assert liver["depth"] > 8 and liver["organ"][lesion].all()
    base = lesion_attributes(liver["case"] / "type.json")
    organ_hu = liver["organ_hu"]
    requests = {"hypodense lesion,": organ_hu - 40, "isodense lesion,": organ_hu, "hyperdense lesion,": organ_hu + 50}
    painted = {}
    for density, hu in requests.items():
        attributes = {**base, V.DENSITY: density, V.DENSITY_VARIATIONS: "homogeneous,", V.CT_VALUE: format_ct_value(hu)}
        condition = painter.spec.encode(attributes)[None]
        patch, patch_affine, _ = painter.inpaint_lesion(
            liver["image"], np.eye(4), lesion, condition, seed=7
        )  # same seed each time
        start = np.rint(patch_affine[:3, 3]).astype(int)
        inside = patch[tuple((np.argwhere(lesion) - start).T)]
        painted[density] = float(np.median(inside))
    hypo, iso, hyper = painted.values()
    assert hypo < iso - 20 and iso < hyper - 20, painted  # the order the request asks for, with room to spare
    assert hyper - hypo > 60, painted
    for (density, hu), got in zip(requests.items(), painted.values()):
        assert abs(got - hu) < 25, (density, hu, got)  # near the CT value each request carries


# ---- two lesions in one case ------------------------------------------------------------------
def test_paste_never_writes_a_protected_voxel(tmp_path: Path) -> None:
    shape = (40, 40, 40)
    rng = np.random.default_rng(0)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(rng.integers(0, 80, shape).astype(np.int16), np.eye(4)), str(path))
    original = read_stored(path)
    first, second = ball(shape, (16, 20, 20), 4), ball(shape, (25, 20, 20), 4)  # 1 voxel apart: zones overlap
    assert not (first & second).any()
    raw = paste(original, first, np.full(shape, 300.0), np.eye(4), margin_mm=3.0, feather_mm=2.0, noise_sigma_vox=0.0)
    assert (raw[first] == 300).all()
    after = paste(
        original,
        second,
        np.full(shape, -100.0),
        np.eye(4),
        3.0,
        2.0,
        raw=raw.copy(),
        protect=first,
        noise_sigma_vox=0.0,
    )
    assert np.array_equal(after[first], raw[first])  # the first lesion, untouched
    assert (after[second] == -100).all()
    zone = ndimage.distance_transform_edt(~second) < 3.0
    assert (after[zone & ~first & ~second] != raw[zone & ~first & ~second]).any()  # the second's blend zone was written
    unprotected = paste(
        original, second, np.full(shape, -100.0), np.eye(4), 3.0, 2.0, raw=raw.copy(), noise_sigma_vox=0.0
    )
    assert not np.array_equal(unprotected[first], raw[first])  # the overlap is real: without protect it is overwritten


def two_lesion_case(folder: Path, liver: dict, second_is_lesion: bool) -> CaseEntry:
    """The demo liver with two lesions 2 mm apart (each within the other's paste zone); without ``second_is_lesion``
    the second ball is organ and only the first is listed."""
    image, affine = liver["image"], liver["affine"]
    c = np.asarray(liver["centre"])
    first, second = (
        ball(image.shape, c - [0, 0, 5], 4),
        ball(image.shape, c + [0, 0, 5], 4),
    )  # 2 mm apart, within the 3 mm margin
    assert not (first & second).any() and liver["organ"][first | second].all()
    label = liver["organ"].astype(np.uint8)
    label[first] = 2
    if second_is_lesion:
        label[second] = 2
    folder.mkdir(parents=True)
    source = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(image).astype(np.int16), affine), str(source))
    std = standardise(MetaTensor(torch.as_tensor(image)[None], affine=torch.as_tensor(affine)))
    std_label = np.rint(
        np.asarray(
            standardise(
                MetaTensor(torch.as_tensor(label, dtype=torch.float32)[None], affine=torch.as_tensor(affine)),
                mode="nearest",
            )[0]
        )
    ).astype(np.uint8)
    std_affine = np.asarray(std.affine, dtype=np.float64)
    nib.save(nib.Nifti1Image(np.asarray(std[0], dtype=np.float32), std_affine), str(folder / "image.nii.gz"))
    nib.save(nib.Nifti1Image(std_label, std_affine), str(folder / "label.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(folder / "label_original.nii.gz"))
    geometry = write_geometry(folder / "geometry.json", record_geometry(source, std_affine, std_label.shape))
    report = json.loads((liver["case"] / "type.json").read_text())
    organ_id = int(next(iter(report)))
    lesions = []
    for j, mask in enumerate((first, second) if second_is_lesion else (first,)):
        std_mask = (
            np.asarray(
                standardise(
                    MetaTensor(torch.as_tensor(mask, dtype=torch.float32)[None], affine=torch.as_tensor(affine)),
                    mode="nearest",
                )[0]
            )
            > 0.5
        )
        idx = np.argwhere(std_mask)
        lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
        (folder / f"lesion_{j}.json").write_text(json.dumps(report))
        lesions.append(
            LesionEntry(
                organ_id,
                "within the parenchymal organ",
                folder / f"lesion_{j}.json",
                Box(tuple((lo + hi) // 2), tuple(hi - lo)),
            )
        )
    return CaseEntry("case", source_image=source, geometry=geometry, image=folder / "image.nii.gz", organ_seg=folder / "label.nii.gz",
                     lesions=tuple(lesions), label=folder / "label.nii.gz", label_original=folder / "label_original.nii.gz")  # fmt: skip


def test_a_second_lesion_leaves_the_first_as_it_was(liver: dict, tmp_path: Path) -> None:
    painter = inpainter(steps=2)
    both = two_lesion_case(tmp_path / "both", liver, second_is_lesion=True)
    alone = two_lesion_case(tmp_path / "alone", liver, second_is_lesion=False)
    assert len(both.lesions) == 2 and len(alone.lesions) == 1
    out_both = painter.process_case(both, tmp_path / "out_both")["synthetic_image"]
    out_alone = painter.process_case(alone, tmp_path / "out_alone")["synthetic_image"]
    label = np.asarray(nib.load(both.label_original).dataobj)
    first = np.asarray(nib.load(alone.label_original).dataobj) == 2
    second = (label == 2) & ~first
    before = np.asarray(nib.load(both.source_image).dataobj)
    a, b = np.asarray(nib.load(out_alone).dataobj), np.asarray(nib.load(out_both).dataobj)
    assert not np.array_equal(a[first], before[first])  # the first lesion was painted
    assert np.array_equal(b[first], a[first])  # and painting the second changed none of its voxels
    assert not np.array_equal(b[second], before[second])  # the second was painted too
    assert (
        ndimage.distance_transform_edt(~second)[first] < painter.margin_mm
    ).any()  # the first lies in the second's zone
