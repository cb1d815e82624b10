"""The example recipe ``examples/segmentation_with_synthesis``: its train.json runs with ``monai.bundle run`` on a
tiny real-CT datalist (the ts_small crop of TotalSegmentator's example, v2 organ map) and its training
samples carry synthetic lesions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "segmentation_with_synthesis"
DATA = ROOT / "tests" / "data" / "ts_small"
LIVER_V2 = 5
# small enough for one core: the 3 mm crop as it is, a tiny network, one sample per batch
OVERRIDES = {
    "pixdim": [3.0, 3.0, 3.0], "roi_size": [48, 48, 32], "patch_size": [32, 32, 32], "features": [4, 4, 8, 16, 32, 4],
    "batch_size": 1, "max_epochs": 1, "epoch_length": 2, "synthesis_prob": 1.0, "cache_rate": 1.0, "device": "cpu",
    "distribution#size_mm": [12.0, 18.0], "distribution#num_lesions": [1, 1],
}  # fmt: skip


def _datalist(folder: Path) -> Path:
    """image, label (liver = 1, no lesion) and organ map of the real-CT crop, listed twice."""
    seg = nib.load(DATA / "example_seg.nii.gz")
    label = (np.asarray(seg.dataobj) == LIVER_V2).astype(np.uint8)
    nib.save(nib.Nifti1Image(label, seg.affine), folder / "label.nii.gz")
    entry = {"image": str(DATA / "example_ct_sm.nii.gz"), "label": "label.nii.gz",
             "organ_seg": str(DATA / "example_seg.nii.gz")}  # fmt: skip
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": [entry, entry]}))
    return path


def test_training_samples_get_synthetic_lesions(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(RECIPE / "configs" / "train.json"))
    parser["bundle_root"] = str(RECIPE)
    parser["datalist"] = str(_datalist(tmp_path))
    parser["output_dir"] = str(tmp_path / "models")
    for key, value in OVERRIDES.items():
        parser[key] = value
    parser.get_parsed_content("initialize")
    load = Compose(parser.get_parsed_content("deterministic_transforms"))
    sample = load(parser.get_parsed_content("data")[0])
    assert tuple(sample["image"].shape[1:]) == (48, 48, 32)
    assert not (sample["label"] == 2).any()
    out = parser.get_parsed_content("synthesis")(dict(sample))
    lesion = (out["label"][0] == 2).numpy()
    assert lesion.sum() >= 8
    assert (sample["organ_seg"][0].numpy()[lesion] == LIVER_V2).all()
    changed = (out["image"] - sample["image"]).abs()[0].numpy()
    assert changed[lesion].mean() > 5.0  # HU: the lesion was painted, not only labelled
    records = json.loads(out["image"].meta["lesion_synthesis"])
    assert len(records) == 1 and records[0]["organ"] == "liver"


def test_bundle_run_trains_two_iterations(tmp_path):
    datalist = _datalist(tmp_path)
    out = tmp_path / "models"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(RECIPE / "configs" / "train.json"),
           "--bundle_root", str(RECIPE), "--datalist", str(datalist), "--output_dir", str(out)]  # fmt: skip
    for key, value in OVERRIDES.items():
        cmd += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"train_loss: ([-0-9.e]+)", proc.stdout + proc.stderr)]
    assert len(losses) == 2 and all(np.isfinite(losses)), (proc.stdout + proc.stderr)[-3000:]
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert state["final_conv.weight"].shape[0] == 3  # background, organ, lesion
    assert not (RECIPE / "models").exists()
    # the transform ran inside the training loop (prob 1: it built its networks for the first sample)
    assert "lesion synthesis networks loaded" in proc.stdout + proc.stderr
