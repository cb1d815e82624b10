"""The TotalSegmentator adapter with TotalSegmentator's API replaced at its boundary.

TotalSegmentator is not installed here. A stand-in package ``totalsegmentator`` (its ``python_api.
totalsegmentator`` with the real 2.x signature, and ``map_to_binary.class_map``) is written to a
temporary folder and put on the import path: it logs every call's arguments and input image to a JSON
lines file and returns a prepared label map as a NIfTI image, like the real one. The adapter's own
code (weights lookup, arguments, output checks, v2 -> v1 conversion) runs unchanged, in process and in
a real bundle run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.geometry import standardise
from lesiondiffusion.labels import convert_ids, label_table
from lesiondiffusion.pipelines import segment

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "preprocess"


FAKE_API = """
import json, os
import nibabel as nib
import numpy as np


def totalsegmentator(input, output=None, ml=False, nr_thr_resamp=1, nr_thr_saving=6, fast=False, nora_tag="None",
                     preview=False, task="total", roi_subset=None, statistics=False, radiomics=False, crop_path=None,
                     body_seg=False, force_split=False, output_type="nifti", quiet=False, verbose=False, test=0,
                     skip_saving=False, device="gpu", license_number=None, statistics_exclude_masks_at_border=True,
                     no_derived_masks=False, v1_order=False, fastest=False, roi_subset_robust=None):
    data = np.asanyarray(input.dataobj)
    record = {"input_type": type(input).__name__, "shape": list(input.shape), "affine": input.affine.tolist(),
              "mean": float(data.mean()), "output": None if output is None else str(output), "ml": ml, "fast": fast,
              "task": task, "device": device, "quiet": quiet, "v1_order": v1_order, "roi_subset": roi_subset}
    with open(os.environ["FAKE_TS_CALLS"], "a") as f:
        f.write(json.dumps(record) + "\\n")
    if os.environ.get("FAKE_TS_MISSING_WEIGHTS"):
        download_pretrained_weights(291)  # what the real one does when a weights folder is missing
    labels = np.load(os.environ["FAKE_TS_OUTPUT"])
    dtype = os.environ.get("FAKE_TS_DTYPE", "uint8")
    send_usage_stats({"send_usage_stats": True}, {"task": task})  # the real one posts after every prediction
    return nib.Nifti1Image(labels.astype(dtype), input.affine)


def send_usage_stats(config, params):
    with open(os.environ["FAKE_TS_CALLS"], "a") as f:
        f.write(json.dumps({"network": "usage statistics posted"}) + "\\n")


def download_pretrained_weights(task_id):
    with open(os.environ["FAKE_TS_CALLS"], "a") as f:
        f.write(json.dumps({"network": f"download of {task_id}"}) + "\\n")
"""
FAKE_CLASS_MAP = 'class_map = {"total_mr": {1: "spleen", 2: "kidney_right", 5: "liver", 9: "urinary_bladder", 40: "no_such_organ"}}\n'
V2_BLADDER = label_table("v2").id("urinary bladder")


@pytest.fixture
def fake_totalseg(tmp_path, monkeypatch):
    """Stand-in ``totalsegmentator`` package on sys.path (and in PYTHONPATH for child processes)."""
    root = tmp_path / "fake_site"
    pkg = root / "totalsegmentator"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "python_api.py").write_text(FAKE_API)
    (pkg / "map_to_binary.py").write_text(FAKE_CLASS_MAP)
    for name in [m for m in sys.modules if m.split(".")[0] == "totalsegmentator"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("FAKE_TS_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_TS_OUTPUT", str(tmp_path / "labels.npy"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "ts_home"))
    yield root
    for name in [m for m in sys.modules if m.split(".")[0] == "totalsegmentator"]:
        del sys.modules[name]


def add_weights(home: Path, ids) -> Path:
    folder = home / "nnunet" / "results"
    for i in ids:
        (folder / f"Dataset{i}_TotalSegmentator_part").mkdir(parents=True, exist_ok=True)
    return folder


def calls(tmp_path) -> list[dict]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ct_image(shape=(12, 10, 8)) -> nib.Nifti1Image:
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-5, 7, 30)
    return nib.Nifti1Image(rng.normal(40, 10, shape).astype(np.float32), affine)


def test_absent_package_is_reported_with_the_install_hint(monkeypatch):
    other = importlib.util.find_spec("lesiondiffusion")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "totalsegmentator" else other)
    reason = segment.TotalSegmentatorAdapter().unavailable_reason()
    assert "not installed" in reason and "pip install '.[totalseg]'" in reason


def test_weights_are_looked_up_offline_per_task_and_mode(fake_totalseg, tmp_path, monkeypatch):
    home = tmp_path / "ts_home"
    adapter = segment.TotalSegmentatorAdapter(task="total", fast=False)
    reason = adapter.unavailable_reason()
    assert str(home / "nnunet" / "results") in reason and "Dataset291_*" in reason and "TOTALSEG_HOME_DIR" in reason
    add_weights(home, [297])  # the fast model alone does not serve the normal mode
    assert "Dataset295_*" in adapter.unavailable_reason()
    assert segment.TotalSegmentatorAdapter(task="total", fast=True).unavailable_reason() is None
    assert segment.TotalSegmentatorAdapter(fast="false").fast is False  # "--totalseg_fast false" from the command line
    assert segment.TotalSegmentatorAdapter(fast="true").fast is True
    add_weights(home, [291, 292, 293, 294, 295])
    assert adapter.unavailable_reason() is None
    # TOTALSEG_WEIGHTS_PATH takes precedence, as in TotalSegmentator
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "elsewhere"))
    assert str(tmp_path / "elsewhere") in adapter.unavailable_reason()
    assert calls(tmp_path) == []  # checking availability never runs (or downloads) anything


def test_unknown_task_and_numbering_are_errors():
    with pytest.raises(LesionDiffusionError, match="unknown TotalSegmentator task 'organs'"):
        segment.TotalSegmentatorAdapter(task="organs")
    with pytest.raises(LesionDiffusionError, match="numbering"):
        segment.TotalSegmentatorAdapter(numbering="v3")


@pytest.mark.parametrize(
    "device, expected",
    [("cpu", "cpu"), (torch.device("cpu"), "cpu"), ("cuda", "gpu"), (torch.device("cuda", 1), "gpu:1"), ("mps", "mps")],
)
def test_device_is_translated_to_totalsegmentator_words(device, expected):
    assert segment.totalseg_device(device) == expected


def test_auto_device_follows_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert segment.totalseg_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert segment.totalseg_device("auto") == "gpu"


@pytest.mark.parametrize("fast", [False, True])
def test_call_arguments_and_v2_output_converted_to_v1(fake_totalseg, tmp_path, fast):
    image = ct_image()
    v2 = np.zeros(image.shape, np.uint8)
    v2[2:5, 2:5, 2:5] = V2_BLADDER
    v2[6:9, 3:6, 1:4] = 5  # liver: 5 in both numberings
    np.save(tmp_path / "labels.npy", v2)
    adapter = segment.TotalSegmentatorAdapter(task="total", fast=fast, device=torch.device("cpu"))
    out = adapter(image)

    (call,) = calls(tmp_path)
    assert call == {
        "input_type": "Nifti1Image",
        "shape": list(image.shape),
        "affine": image.affine.tolist(),
        "mean": pytest.approx(float(image.get_fdata().mean()), rel=1e-5),
        "output": None,  # in memory: nothing written beside the input
        "ml": True,  # one multi-label image
        "fast": fast,
        "task": "total",
        "device": "cpu",
        "quiet": True,
        "v1_order": False,
        "roi_subset": None,
    }
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert set(np.unique(out)) == {0, 5, 104}
    assert (out == 104).sum() == 27 and (out == 5).sum() == 27
    assert np.array_equal(out == 104, v2 == V2_BLADDER)


def test_the_run_stays_local_no_statistics_posted_no_weights_downloaded(fake_totalseg, tmp_path, monkeypatch):
    image = ct_image()
    np.save(tmp_path / "labels.npy", np.zeros(image.shape, np.uint8))
    segment.TotalSegmentatorAdapter()(image)
    assert [c for c in calls(tmp_path) if "network" in c] == []  # its statistics call was replaced
    monkeypatch.setenv("FAKE_TS_MISSING_WEIGHTS", "1")
    with pytest.raises(LesionDiffusionError, match="wanted to download weights; put them in .*nnunet/results first"):
        segment.TotalSegmentatorAdapter()(image)
    assert [c for c in calls(tmp_path) if "network" in c] == []
    from totalsegmentator import python_api

    python_api.send_usage_stats({}, {})  # the module's own functions are back after each run
    assert calls(tmp_path)[-1] == {"network": "usage statistics posted"}


def test_float_output_is_rounded_and_labels_without_v1_counterpart_dropped(fake_totalseg, tmp_path, monkeypatch):
    image = ct_image()
    mapping = convert_ids("v2", "v1")
    no_v1 = next(i for i in label_table("v2").names if i not in mapping)
    v2 = np.zeros(image.shape, np.float32)
    v2[:3] = V2_BLADDER - 1e-4  # float noise from resampling must not change a label
    v2[5:7] = no_v1
    np.save(tmp_path / "labels.npy", v2)
    monkeypatch.setenv("FAKE_TS_DTYPE", "float32")
    out = segment.TotalSegmentatorAdapter()(image)
    assert np.array_equal(out[:3], np.full_like(out[:3], 104))
    assert not out[5:7].any()


def test_output_on_another_grid_is_rejected(fake_totalseg, tmp_path):
    image = ct_image()
    np.save(tmp_path / "labels.npy", np.zeros((12, 10, 7), np.uint8))
    with pytest.raises(
        LesionDiffusionError, match=r"TotalSegmentator returned shape \(12, 10, 7\), expected the input's \(12, 10, 8\)"
    ):
        segment.TotalSegmentatorAdapter()(image)
    adapter = segment.TotalSegmentatorAdapter()
    moved = image.affine.copy()
    moved[:3, 3] += 1.0  # one voxel off
    shifted = nib.Nifti1Image(np.zeros(image.shape, np.uint8), moved)
    with pytest.raises(LesionDiffusionError, match="different affine"):
        adapter._labels(shifted, image)
    with pytest.raises(LesionDiffusionError, match="not a NIfTI image"):
        adapter._labels(np.zeros(image.shape), image)


def test_other_task_is_mapped_onto_v1_by_organ_name(fake_totalseg, tmp_path):
    image = ct_image()
    mr = np.zeros(image.shape, np.uint8)
    mr[0], mr[1], mr[2], mr[3] = 5, 9, 2, 40
    np.save(tmp_path / "labels.npy", mr)
    out = segment.TotalSegmentatorAdapter(task="total_mr")(image)
    assert calls(tmp_path)[0]["task"] == "total_mr"
    v1 = label_table("v1")
    assert (out[0] == v1.id("liver")).all() and (out[1] == v1.id("urinary bladder")).all()
    assert (out[2] == v1.id("kidney right")).all() and not out[3].any()


def test_segmenter_prefers_the_given_map_then_totalsegmentator_then_errors(fake_totalseg, tmp_path):
    image = ct_image()
    hu, affine = image.get_fdata().astype(np.float32), image.affine
    ts_map = np.zeros(image.shape, np.uint8)
    ts_map[:4] = 5
    np.save(tmp_path / "labels.npy", ts_map)
    given = np.zeros(image.shape, np.float32)
    given[4:] = 104
    adapter = segment.TotalSegmentatorAdapter()

    # no weights: the given map, and without one a single error naming both options
    seg, source = segment.OrganSegmenter(adapter, given_version="v1")(
        hu, affine, given, Path("ct.nii.gz"), Path("seg.nii.gz")
    )
    assert source == "given" and np.array_equal(seg, given.astype(np.uint8))
    with pytest.raises(InputError) as err:
        segment.OrganSegmenter(adapter)(hu, affine, None, Path("ct.nii.gz"), None)
    message = str(err.value)
    assert message.startswith("ct.nii.gz: no organ segmentation") and "--organ_seg" in message
    assert "TotalSegmentator weights for task total" in message and "\n" not in message

    add_weights(tmp_path / "ts_home", [291, 292, 293, 294, 295])
    seg, source = segment.OrganSegmenter(adapter, given_version="v1")(
        hu, affine, given, Path("ct.nii.gz"), Path("seg.nii.gz")
    )
    assert source == "given" and calls(tmp_path) == []  # an explicit map wins
    seg, source = segment.OrganSegmenter(adapter)(hu, affine, None, Path("ct.nii.gz"), None)
    assert source == "totalsegmentator" and np.array_equal(seg, ts_map)
    (call,) = calls(tmp_path)
    assert call["affine"] == affine.tolist() and call["mean"] == pytest.approx(float(hu.mean()), rel=1e-5)
    seg, source = segment.OrganSegmenter(adapter, prefer_totalseg=True)(hu, affine, given, Path("ct.nii.gz"), None)
    assert source == "totalsegmentator" and len(calls(tmp_path)) == 2


def test_given_maps_in_v2_are_converted_and_bad_v1_maps_rejected():
    v2 = np.zeros((4, 4, 4), np.float32)
    v2[0] = V2_BLADDER
    seg, _ = segment.OrganSegmenter(None, given_version="v2")(v2, np.eye(4), v2, Path("ct"), Path("seg.nii.gz"))
    assert (seg[0] == 104).all() and not seg[1:].any()
    v1 = np.full((4, 4, 4), 105.0, np.float32)  # 105 is no v1 label
    with pytest.raises(InputError, match=r"seg.nii.gz: labels \[105\] are not TotalSegmentator v1 ids"):
        segment.OrganSegmenter(None, given_version="v1")(v1, np.eye(4), v1, Path("ct"), Path("seg.nii.gz"))
    # auto (the default): a lone blob of an id the numberings read differently is one line asking for the flag
    blob = np.full((4, 4, 4), float(V2_BLADDER), np.float32)
    with pytest.raises(InputError, match=r"seg.nii.gz: cannot tell whether .* set --organ_seg_version v1 or v2"):
        segment.OrganSegmenter(None).segment(blob, np.eye(4), blob, Path("ct"), Path("seg.nii.gz"))
    seg, source, version = segment.OrganSegmenter(None).segment(v1, np.eye(4), v1, Path("ct"), Path("seg.nii.gz"))
    assert version == "v2" and source == "given"  # 105 exists only in v2 (rib right 2 -> v1 71)
    assert (seg == label_table("v1").id("rib right 2")).all()
    with pytest.raises(LesionDiffusionError, match="organ_seg_version"):
        segment.OrganSegmenter(None, given_version="v9")


@pytest.mark.slow
def test_bundle_segments_the_standardised_image_with_totalsegmentator(fake_totalseg, small_demo, tmp_path):
    """A real bundle run, no organ map given: TotalSegmentator (the stand-in) runs on the RAS 1 mm image."""
    case = small_demo / "cases" / "Liver_cancer"
    std_seg = standardise(
        LoadImage(image_only=True, ensure_channel_first=True)(str(case / "organ_seg.nii.gz")), mode="nearest"
    )
    v1 = std_seg[0].numpy().astype(np.int64)
    to_v2 = np.zeros(256, np.uint8)
    for a, b in convert_ids("v2", "v1").items():
        to_v2[b] = a
    v2 = to_v2[v1]
    np.save(tmp_path / "labels.npy", v2)
    add_weights(tmp_path / "ts_home", [297])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_totalseg), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--image", str(case / "image.nii.gz"), "--attributes", '{"organ type": "liver", "lesion type": "cyst"}',
         "--output_dir", str(out), "--totalseg_fast", "true", "--device", "cpu"],
        cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (call,) = calls(tmp_path)
    assert call["fast"] is True and call["task"] == "total" and call["device"] == "cpu" and call["ml"] is True
    assert nib.aff2axcodes(np.array(call["affine"])) == ("R", "A", "S")  # the standardised image, not the LPS input
    assert call["shape"] == list(v1.shape)
    ct = LoadImage(image_only=True)(str(case / "image.nii.gz"))
    assert call["mean"] == pytest.approx(float(ct.mean()), abs=0.5)  # a flip: same voxels (int16-rounded)
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["testing"][0]
    assert entry["organ_seg_source"] == "totalsegmentator"
    seg = nib.load(str(out / entry["organ_seg"]))
    assert np.array_equal(np.asanyarray(seg.dataobj), v1.astype(np.uint8))  # v2 output back in v1 ids
    assert np.allclose(seg.affine, np.array(call["affine"]))
