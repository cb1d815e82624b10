"""``synthesize`` runs the three bundles in one process by default and in one process each with ``isolate``:
the same request and seed give the same synthetic CT and label map either way (shipped weights, real CT crop)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import lesiondiffusion_tools.synthesize as S
from lesiondiffusion import io
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion_tools.bundle_runner import BundleRunError, run_bundle_in_process
from lesiondiffusion_tools.synthesize import synthesize

SMALL = Path(__file__).resolve().parents[1] / "data" / "ts_small"
REQUEST = {"organ type": "liver", "lesion type": "cyst", "density": "hypodense", "size": "14 mm"}


def run(out: Path, isolate: bool) -> dict:
    return synthesize(
        image=str(SMALL / "example_ct_sm.nii.gz"), organ_seg=str(SMALL / "example_seg.nii.gz"), attributes=json.dumps(REQUEST),
        out=str(out), steps=2, seed=5, isolate=isolate, verbose=False,
    )  # fmt: skip


def test_in_process_chain_gives_the_isolated_chains_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"in_process": 0, "child": 0}
    for name, key in (("run_bundle_in_process", "in_process"), ("run_bundle", "child")):
        real = getattr(S, name)
        monkeypatch.setattr(
            S, name, lambda *a, _real=real, _key=key, **k: calls.__setitem__(_key, calls[_key] + 1) or _real(*a, **k)
        )
    decoded: list[str] = []
    real_decode = io.stored_image
    monkeypatch.setattr(io, "stored_image", lambda img, path=None: decoded.append(str(path)) or real_decode(img, path))
    inside = run(tmp_path / "inside", False)
    assert calls == {"in_process": 3, "child": 0}
    # the input checks, preprocess, LINet and the outputs share one decoding of the CT and of its organ map
    for given in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
        assert [Path(d).name for d in decoded].count(given) == 1, decoded
    isolated = run(tmp_path / "isolated", True)
    assert calls == {"in_process": 3, "child": 3}
    assert inside["succeeded"] == isolated["succeeded"] == 1 and inside["lesions"] == 1
    case = inside["cases"][0]["case"]
    for name in ("image.nii.gz", "label.nii.gz", "organ_seg.nii.gz"):
        a, b = nib.load(tmp_path / "inside" / case / name), nib.load(tmp_path / "isolated" / case / name)
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), name
        assert np.array_equal(a.affine, b.affine)
    label = np.asanyarray(nib.load(tmp_path / "inside" / case / "label.nii.gz").dataobj)
    assert (label == 2).sum() > 0
    image = np.asanyarray(nib.load(tmp_path / "inside" / case / "image.nii.gz").dataobj)
    source = np.asanyarray(nib.load(SMALL / "example_ct_sm.nii.gz").dataobj)
    assert not np.array_equal(image, source)  # a lesion was written, the same one both ways
    reports = [json.loads((tmp_path / d / case / "report.json").read_text()) for d in ("inside", "isolated")]
    assert reports[0] == reports[1]


def test_in_process_user_error_is_one_line_and_the_process_goes_on(tmp_path: Path) -> None:
    with pytest.raises(
        BundleRunError,
        match=r"^error: .*missing.json: manifest not found; set manifest to the manifest.json written by the preprocess stage \(--manifest FILE\)$",
    ) as info:
        run_bundle_in_process("lmnet", {"manifest": str(tmp_path / "missing.json"), "output_dir": str(tmp_path / "o")})
    assert isinstance(info.value, LesionDiffusionError) and "\n" not in str(info.value)
