"""``lesiondiffusion export-bundles``: each bundle as a stand-alone MONAI model-zoo bundle, one zip each.

A zoo bundle must run after unzipping into an empty folder, in an environment holding only the packages
its ``metadata.json`` names. The configs import the shared package ``lesiondiffusion``, which no package
index serves, so the export VENDORS it: a copy of the package's code and resources (not the bundles or
the demo data) goes into the bundle's ``scripts/lesiondiffusion/``, and ``scripts/__init__.py`` puts
``scripts/`` first on the import path. Every exported config imports ``scripts`` first, so the configs
run unchanged against the vendored copy, and ``metadata.json`` names only public packages (those the
package itself needs, at the versions it was tested with). Naming this project's wheel instead would
leave the zip unusable until that wheel is published somewhere.

Layout per bundle (``<out>/lesiondiffusion_<stage>/`` and ``<out>/lesiondiffusion_<stage>.zip``):
``configs/``, ``models/`` (``model.pt``, ``model.ts`` where the network scripts cleanly,
``large_files.yml`` with each weight file's path and SHA-256), ``scripts/``, ``docs/README.md``,
``LICENSE``. LINet carries the VQ-GAN weights it decodes with as ``models/vqgan.pt``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from lesiondiffusion.data_paths import BUNDLES, PACKAGE_DIR
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.io import atomic_dir, atomic_path, file_sha256, write_json

logger = logging.getLogger(__name__)

STAGES = ("preprocess", "vqgan", "lmnet", "linet")
#: per network bundle: the config id its metadata's inputs/outputs describe (verify_net_in_out), whether it
#: takes (timesteps, context), and the id whose state dict models/model.pt is (ckpt_export)
NETWORKS = {
    "vqgan": ("network", False, "network_def"),  # Reconstructor: image in, image out
    "lmnet": ("network_def", True, "network_def"),
    "linet": ("network_def", True, "network_def"),
}
#: the config id of the attribute fields a conditioned network reads (its raw context is [n_fields, width])
CONTEXT_FIELDS = {"lmnet": "condition_fields", "linet": "condition_encoder_def#fields"}
#: public distributions the vendored package imports (beyond monai, torch and numpy, which metadata.json
#: names in fields of their own), and fire: ``python -m monai.bundle`` needs it and monai does not require it
VENDORED_NEEDS = (
    "nibabel", "pytorch-ignite", "scipy", "pillow", "tqdm", "tensorboard", "jsonschema", "einops", "pydicom", "pynrrd",
    "fire",
)  # fmt: skip
SCHEMA = PACKAGE_DIR / "resources" / "meta_schema_20240725.json"
NOT_VENDORED = {"bundles", "data", "__pycache__"}
SCRIPTS_INIT = """
# Exported bundle: the shared package is vendored beside this file (scripts/lesiondiffusion); every
# config imports ``scripts`` first, so ``import lesiondiffusion`` finds that copy.
import os as _os
import sys as _sys

_here = _os.path.dirname(_os.path.abspath(__file__))
if _here not in _sys.path:
    _sys.path.insert(0, _here)
"""


def bundle_name(stage: str) -> str:
    """The exported bundle's folder and zip name."""
    return f"lesiondiffusion_{stage}"


def required_packages() -> dict[str, str]:
    """``required_packages_version`` of every exported bundle: the vendored package's needs, installed versions."""
    return {name: importlib.metadata.version(name) for name in VENDORED_NEEDS}


def vendor_package(dest: Path) -> None:
    """Copy the ``lesiondiffusion`` package's code and resources (not the bundles or data) to ``dest``."""
    shutil.copytree(
        PACKAGE_DIR,
        dest,
        ignore=lambda d, names: [n for n in names if n in NOT_VENDORED or n.endswith((".pyc", ".whl"))],
    )


def _with_vendored_path(source: str) -> str:
    """``scripts/__init__.py`` with :data:`SCRIPTS_INIT` after its docstring and ``__future__`` imports
    (before any import of the package)."""
    body = ast.parse(source).body
    end = 0
    for node in body:
        is_doc = isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant)
        if not (is_doc or (isinstance(node, ast.ImportFrom) and node.module == "__future__")):
            break
        end = node.end_lineno or 0
    lines = source.splitlines(keepends=True)
    return "".join(lines[:end]) + SCRIPTS_INIT + "".join(lines[end:])


def _edit_config(path: Path, stage: str) -> None:
    """Import ``scripts`` (the vendored package's path) first; LINet's VQ-GAN weights from its own models/."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if "imports" in config:
        config["imports"] = ["$import scripts"] + [i for i in config["imports"] if i != "$import scripts"]
    if stage == "linet" and "vqgan_weights" in config:
        config["vqgan_weights"] = "$os.path.join(@bundle_root, 'models', 'vqgan.pt')"
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def _large_files(models: Path) -> str:
    """``models/large_files.yml``: every weight file with its SHA-256 (no download URL: the files are in the zip)."""
    lines = ["large_files:"]
    for f in sorted(models.iterdir()):
        if f.suffix in (".pt", ".ts"):
            lines += [f'  - path: "models/{f.name}"', f'    hash_val: "{file_sha256(f)}"', '    hash_type: "sha256"']
    return "\n".join(lines) + "\n"


#: the program :func:`check_bundle` runs in the bundle's folder, in a child process (the bundle's ``scripts``
#: package must not meet another bundle's): TorchScript tries in order, then MONAI's verifications; it prints
#: ``TORCHSCRIPT <how>``, ``NOT <how>: <reason>`` and ``VERIFIED <check>`` lines, or ``FAILED <check>: <reason>``
#: and exits 1
_CHECK_PROGRAM = """
import json, sys
from pathlib import Path
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out
task = json.loads(sys.argv[1])


def reason(e):
    where = getattr(e.__cause__, "json_path", "")  # a schema violation: the field at fault
    text = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}" + (f" (at {where})" if where else "")
    return text[:300]


def verify_net(net):
    import scripts
    from lesiondiffusion.conditioning import ConditionSpec
    args = {}
    if net[1]:
        parser = ConfigParser(); parser.read_config("configs/inference.json")
        fields = parser.get_parsed_content(net[2])
        args = {"timesteps": torch.zeros(1, dtype=torch.long), "context": torch.zeros(1, *ConditionSpec(fields).shape)}
    verify_net_in_out(net_id=net[0], meta_file="configs/metadata.json", config_file="configs/inference.json",
                      device="cpu", n=16, extra_forward_args=args)


for how, extra in task["torchscript"]:
    try:
        ckpt_export(net_id=task["net_id"], filepath="models/model.ts", ckpt_file="models/model.pt",
                    meta_file="configs/metadata.json", config_file="configs/inference.json", bundle_root=".", **extra)
        print("TORCHSCRIPT", how, flush=True)
        break
    except Exception as e:
        Path("models/model.ts").unlink(missing_ok=True)
        print("NOT", how + ":", reason(e), flush=True)
checks = [("verify_metadata", lambda: verify_metadata(meta_file="configs/metadata.json", filepath=task["schema"]))]
if task["net"]:
    checks.append(("verify_net_in_out", lambda: verify_net(task["net"])))
for name, check in checks if task["verify"] else []:
    try:
        check()
    except Exception as e:
        print("FAILED", name + ":", reason(e), flush=True)
        sys.exit(1)
    print("VERIFIED", name, flush=True)
"""


def check_bundle(root: Path, stage: str, script: bool = True, verify: bool = True) -> dict[str, Any]:
    """In one child process run in ``root``: ``ckpt_export`` the network to ``models/model.ts`` (scripted, else
    traced where it takes one image, the VQ-GAN), then MONAI's ``verify_metadata`` and ``verify_net_in_out``.
    Returns ``torchscript`` (which way worked, or why none did) and ``verified`` (the checks that passed);
    raises when a verification fails."""
    tries: list[tuple[str, dict[str, Any]]] = []
    if stage in NETWORKS and script:
        tries.append(("scripted", {}))
        if not NETWORKS[stage][1]:  # one image in: tracing on a crop of the training size is faithful
            tries.append(("traced", {"use_trace": True, "input_shape": [1, 1, 64, 64, 64]}))
    if not tries and not verify:
        return {}
    net = [*NETWORKS[stage][:2], CONTEXT_FIELDS.get(stage)] if stage in NETWORKS else None
    task = {"torchscript": tries, "net_id": NETWORKS.get(stage, ("", False, ""))[2], "verify": verify,
            "schema": str(SCHEMA), "net": net}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-c", _CHECK_PROGRAM, json.dumps(task)],
        cwd=root,
        capture_output=True,
        text=True,
        env=_child_env(),
    )
    lines = run.stdout.splitlines()
    result: dict[str, Any] = {}
    if tries:
        done = [line.split(maxsplit=1)[1] for line in lines if line.startswith("TORCHSCRIPT ")]
        failed = [f"not {line.split(maxsplit=1)[1]}" for line in lines if line.startswith("NOT ")]
        result["torchscript"] = f"models/model.ts ({done[0]})" if done else "; ".join(failed) or "not run"
    if run.returncode != 0:
        failed = [line.split(maxsplit=1)[1] for line in lines if line.startswith("FAILED ")]
        last = failed or run.stderr.strip().splitlines()[-1:] or [f"exit status {run.returncode}"]
        raise LesionDiffusionError(f"{stage}: bundle verification failed: {last[0]}")
    if verify:
        result["verified"] = [line.split()[1] for line in lines if line.startswith("VERIFIED ")]
    return result


def _child_env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the check imports the bundle's scripts: no __pycache__ in the bundle
    return env


def export_bundle(
    stage: str, out: Path, weights: Path | None = None, script: bool = True, verify: bool = True
) -> dict[str, Any]:
    """Write ``out/lesiondiffusion_<stage>/`` and its zip, checked (:func:`check_bundle`) before either appears;
    return what was written (weights hashes, TorchScript, verifications)."""
    if stage not in STAGES:
        raise LesionDiffusionError(f"unknown bundle {stage!r}; use one of {', '.join(STAGES)}")
    src = BUNDLES / stage
    name = bundle_name(stage)
    result: dict[str, Any] = {"bundle": name, "stage": stage}
    with atomic_dir(out / name) as root:
        for part in ("configs", "docs", "LICENSE"):
            (shutil.copytree if (src / part).is_dir() else shutil.copy2)(src / part, root / part)
        (root / "models").mkdir()
        if (src / "models" / "README.md").is_file():
            shutil.copy2(src / "models" / "README.md", root / "models" / "README.md")
        for network, target in ((stage, "model.pt"), ("vqgan", "vqgan.pt") if stage == "linet" else (None, None)):
            if network in NETWORKS:
                chosen = (weights / network / "model.pt") if weights else (BUNDLES / network / "models" / "model.pt")
                if not chosen.is_file():
                    raise LesionDiffusionError(f"{chosen}: {network} weights not found")
                shutil.copy2(chosen, root / "models" / target)
        shutil.copytree(src / "scripts", root / "scripts", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        init = root / "scripts" / "__init__.py"
        init.write_text(_with_vendored_path(init.read_text(encoding="utf-8")), encoding="utf-8")
        vendor_package(root / "scripts" / "lesiondiffusion")
        for config in (root / "configs").glob("*.json"):
            if config.name != "metadata.json":
                _edit_config(config, stage)
        meta_path = root / "configs" / "metadata.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        meta["required_packages_version"] = required_packages()
        meta.pop("optional_packages_version", None)  # MONAI reads it as a deprecated alias of the above
        write_json(meta_path, meta)
        result.update(check_bundle(root, stage, script, verify))
        (root / "models" / "large_files.yml").write_text(_large_files(root / "models"), encoding="utf-8")
        result["weights"] = {f.name: file_sha256(f) for f in sorted((root / "models").glob("*.pt"))}
    with atomic_path(out / f"{name}.zip") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted((out / name).rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                z.write(f, f.relative_to(out).as_posix())
    result["zip"] = str(out / f"{name}.zip")
    return result


def export_bundles(
    out: Path, stages: tuple[str, ...] = STAGES, weights: Path | None = None, verify: bool = True
) -> list[dict[str, Any]]:
    """Export ``stages`` into ``out`` (created; an existing bundle folder or zip is refused), verify each."""
    out.mkdir(parents=True, exist_ok=True)
    taken = [p for s in stages for p in (out / bundle_name(s), out / f"{bundle_name(s)}.zip") if p.exists()]
    if taken:
        raise LesionDiffusionError(f"{taken[0]}: already exists (choose an empty --out)")
    results = []
    for stage in stages:
        result = export_bundle(stage, out, weights, verify=verify)
        logger.info("%s: %s", stage, result)
        results.append(result)
    write_json(out / "export.json", {"bundles": results})
    return results
