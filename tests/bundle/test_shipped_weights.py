"""The weights the repository ships load, strictly, into the networks their bundles' ``cpu`` presets build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


@pytest.mark.parametrize("network", ["vqgan", "lmnet", "linet"])
def test_shipped_weights_fit_the_cpu_preset(network: str) -> None:
    """Parse the bundle's own inference.json, build ``network_def`` and load the shipped state dict into it
    with strict key and shape checks."""
    root = BUNDLES / network
    weights = root / "models" / "model.pt"
    assert weights.is_file() and (root / "models" / "README.md").is_file(), "weights ship with a weights card"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()), "a plain state dict"
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    parser["imports"] = [i for i in parser["imports"] if "scripts" not in i]  # the network needs only the package
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in net.parameters()) > 500_000  # the cpu preset, not a test-sized net
