"""``lesiondiffusion export-bundles``: zoo bundles that run on their own.

Each bundle is exported, verified with MONAI's ``verify_metadata`` and ``verify_net_in_out``, unzipped into
an empty folder and run with ``python -m monai.bundle run --config_file configs/inference.json`` in a
fresh virtual environment that holds ONLY the distributions its ``metadata.json`` names (monai, torch,
numpy and ``required_packages_version``) and what those need, linked from this environment (offline):
not this project, not openai. The chain preprocess -> LMNet -> LINet on the small real CT must
give the same files, voxel for voxel, as the same bundles run from the repository.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from packaging.requirements import Requirement

from lesiondiffusion import export
from lesiondiffusion.data_paths import BUNDLES, REPO_ROOT
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.export import STAGES, bundle_name, export_bundles
from lesiondiffusion_tools.bundle_runner import run_bundle_in_process

TS_SMALL = REPO_ROOT / "tests" / "data" / "ts_small"
ATTRIBUTES = {"organ type": "liver", "lesion type": "cyst", "density": "hypodense", "size": "15 mm"}


def distribution_closure(names: list[str]) -> set[str]:
    """``names`` and every distribution they require (markers evaluated here, no extras)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def only_required_env(dest: Path, metadata: dict) -> Path:
    """A venv whose only packages are links to the closure of what ``metadata`` requires."""
    names = ["monai", "torch", "numpy", *metadata["required_packages_version"]]
    site = dest / "site"
    site.mkdir(parents=True)
    for name in distribution_closure(names):
        dist = importlib.metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            source = Path(str(dist.locate_file(top)))
            if top != ".." and source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    venv = dest / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (purelib / "required.pth").write_text(f"{site}\n", encoding="utf-8")
    return venv / "bin" / "python"


def bundle_run(python: Path, root: Path, args: dict) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file configs/inference.json`` from the bundle's root."""
    args_file = Path(args["output_dir"]).parent / f"{root.name}_args.json"  # beside the outputs, never in the bundle
    args_file.parent.mkdir(parents=True, exist_ok=True)
    args_file.write_text(json.dumps(args), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [
        str(python),
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/inference.json",
        "--args_file",
        str(args_file),
    ]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


def chain(out: Path, python: Path | None = None, roots: dict[str, Path] | None = None) -> Path:
    """preprocess -> LMNet -> LINet on the small real CT; returns LINet's manifest. With ``python`` and
    ``roots`` each stage is ``python -m monai.bundle run`` in its unzipped bundle; else the repository's
    bundles run in this process (the same configs: ``tests/bundle/test_chain_in_process.py``)."""
    steps = [
        ("preprocess", {"image": str(TS_SMALL / "example_ct_sm.nii.gz"), "organ_seg": str(TS_SMALL / "example_seg.nii.gz"),
                        "attributes": ATTRIBUTES, "output_dir": str(out / "pre")}),
        ("lmnet", {"manifest": str(out / "pre" / "manifest.json"), "output_dir": str(out / "lm"), "steps": 2}),
        ("linet", {"manifest": str(out / "lm" / "manifest.json"), "output_dir": str(out / "li"), "steps": 2}),
    ]  # fmt: skip
    for stage, args in steps:
        if python is None or roots is None:
            run_bundle_in_process(stage, args)
            continue
        run = bundle_run(python, roots[stage], args)
        assert run.returncode == 0, f"{stage}: {run.stderr[-3000:]}"
    return out / "li" / "manifest.json"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("export")
    results = export_bundles(out / "zoo")
    unzipped = out / "unzipped"
    for r in results:
        zipfile.ZipFile(r["zip"]).extractall(unzipped)
    return {"results": results, "roots": {s: unzipped / bundle_name(s) for s in STAGES}, "tmp": out}


def test_every_bundle_has_the_zoo_layout_and_verifies(exported: dict) -> None:
    by_stage = {r["stage"]: r for r in exported["results"]}
    for stage, root in exported["roots"].items():
        for part in (
            "configs/inference.json",
            "configs/metadata.json",
            "docs/README.md",
            "LICENSE",
            "models/large_files.yml",
        ):
            assert (root / part).is_file(), f"{stage}: {part}"
        meta = json.loads((root / "configs" / "metadata.json").read_text())
        assert "lesiondiffusion-monai" not in json.dumps(meta)
        assert (root / "scripts" / "lesiondiffusion" / "__init__.py").is_file()
        assert not (root / "scripts" / "lesiondiffusion" / "bundles").exists()
        expected = ["verify_metadata"] + (["verify_net_in_out"] if stage != "preprocess" else [])
        assert by_stage[stage]["verified"] == expected
        large = (root / "models" / "large_files.yml").read_text()
        for name, digest in by_stage[stage]["weights"].items():
            assert f'path: "models/{name}"' in large and digest in large
    # LINet decodes with the VQ-GAN weights it carries, not with a sibling bundle's
    linet = exported["roots"]["linet"]
    config = json.loads((linet / "configs" / "inference.json").read_text())
    assert config["vqgan_weights"] == "$os.path.join(@bundle_root, 'models', 'vqgan.pt')"
    assert (linet / "models" / "vqgan.pt").read_bytes() == (BUNDLES / "vqgan" / "models" / "model.pt").read_bytes()
    # TorchScript where the network allows it: the VQ-GAN traces and loads back; the diffusion UNets say why not
    assert by_stage["vqgan"]["torchscript"] == "models/model.ts (traced)"
    for stage in ("lmnet", "linet"):
        assert by_stage[stage]["torchscript"].startswith("not scripted: RuntimeError: "), by_stage[stage]
        assert not (exported["roots"][stage] / "models" / "model.ts").exists()
    assert list((exported["tmp"] / "zoo").rglob("__pycache__")) == []  # the checks import scripts, writing none
    import torch

    ts = torch.jit.load(str(exported["roots"]["vqgan"] / "models" / "model.ts"))
    assert ts(torch.rand(1, 1, 32, 32, 32))[0].shape == (1, 1, 32, 32, 32)


def test_unzipped_bundles_run_alone_and_match_the_repository(exported: dict) -> None:
    roots = exported["roots"]
    metas = [json.loads((roots[s] / "configs" / "metadata.json").read_text()) for s in ("preprocess", "lmnet", "linet")]
    assert (
        metas[0]["required_packages_version"]
        == metas[1]["required_packages_version"]
        == metas[2]["required_packages_version"]
    )
    python = only_required_env(exported["tmp"] / "env", metas[0])
    alone = subprocess.run(
        [str(python), "-c", "import lesiondiffusion"], capture_output=True, text=True, cwd=exported["tmp"]
    )
    assert alone.returncode != 0 and "No module named 'lesiondiffusion'" in alone.stderr  # the environment is bare
    zoo = chain(exported["tmp"] / "zoo_run", python, roots)
    repo = chain(exported["tmp"] / "repo_run")
    (a,), (b,) = json.loads(zoo.read_text())["testing"], json.loads(repo.read_text())["testing"]
    assert a["status"] == b["status"] == "ok", (a, b)
    for key in ("synthetic_image", "label_original"):
        x, y = nib.load(zoo.parent / a[key]), nib.load(repo.parent / b[key])
        assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj)) and np.array_equal(x.affine, y.affine), key
    lesion = np.asarray(nib.load(zoo.parent / a["label_original"]).dataobj) == 2
    assert lesion.sum() > 0


def test_a_bundle_failing_verification_is_one_line_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(export, "required_packages", lambda: ["not", "a", "mapping"])  # the schema wants an object
    with pytest.raises(LesionDiffusionError) as err:
        export_bundles(tmp_path, stages=("preprocess",))
    message = str(err.value)
    assert message.startswith("preprocess: bundle verification failed: ") and "\n" not in message, message
    assert message.endswith(
        "verify_metadata: ValueError: ['not', 'a', 'mapping'] is not of type 'object' "
        "(at $.required_packages_version)"
    ), message
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its zip nor export.json


def test_without_verification_the_bundle_is_written_unchecked(tmp_path) -> None:
    (result,) = export_bundles(tmp_path, stages=("preprocess",), verify=False)
    assert "verified" not in result and Path(result["zip"]).is_file()
    assert json.loads((tmp_path / "export.json").read_text())["bundles"][0]["bundle"] == "lesiondiffusion_preprocess"
    assert (tmp_path / "lesiondiffusion_preprocess" / "configs" / "metadata.json").is_file()
