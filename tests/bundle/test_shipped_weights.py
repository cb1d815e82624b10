"""The weights the repository ships load, strictly, into the networks their bundles' ``cpu`` presets build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"

# parse the bundle's own inference.json in a child process (each bundle has its own ``scripts`` package),
# build ``network_def`` and load the shipped state dict into it with strict key and shape checks
CHECK = """
import json, sys, torch
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config(sys.argv[1])
parser["bundle_root"] = sys.argv[2]
net = parser.get_parsed_content("network_def")
state = torch.load(sys.argv[3], map_location="cpu", weights_only=True)
net.load_state_dict(state, strict=True)
print(json.dumps({"parameters": sum(p.numel() for p in net.parameters())}))
"""


@pytest.mark.parametrize("network", ["vqgan", "lmnet", "linet"])
def test_shipped_weights_fit_the_cpu_preset(network: str) -> None:
    root = BUNDLES / network
    weights = root / "models" / "model.pt"
    assert weights.is_file() and (root / "models" / "README.md").is_file(), "weights ship with a weights card"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()), "a plain state dict"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "ignore",
    }
    run = subprocess.run(
        [sys.executable, "-c", CHECK, str(root / "configs" / "inference.json"), str(root), str(weights)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (
        json.loads(run.stdout.strip().splitlines()[-1])["parameters"] > 500_000
    )  # the cpu preset, not a test-sized net
