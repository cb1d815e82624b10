"""The synthesis chain end to end: ``lesiondiffusion train`` on tiny networks, then ``synthesize``.

Real bundle runs in their own processes (as a user runs them), on the 2 mm demo phantoms. The networks
are tiny and barely trained: these tests prove the plumbing (files, geometry, preserved voxels,
provenance, failure handling), not the realism of the lesion (the shipped weights' evaluation does that).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from lesiondiffusion.io import file_sha256
from lesiondiffusion.labels import label_table
from lesiondiffusion.requests import SynthesisRequest, write_requests
from lesiondiffusion_tools.synthesize import OUTPUT_FILES, gather_requests, weights_paths

# the cpu VQ-GAN (LINet loads it by preset) on small crops; LMNet and LINet shrunk to a few channels
TINY = {
    "vqgan": {"crop_size": [24, 24, 24], "spacing": [2, 2, 2], "num_workers": 0},
    "lmnet": {
        "crop_size": [32, 32, 16], "channels": [8, 16, 16], "num_head_channels": 8,
        "condition_dim": 16,
    },
    "linet": {
        "crop_size": [32, 32, 32], "channels": [16, 16, 32], "norm_num_groups": 8,
        "num_head_channels": 8, "condition_dim": 16,
    },
}  # fmt: skip
MARGIN_MM = 3.0
ATTRIBUTES = {"organ type": "liver", "lesion type": "cyst", "density": "hypodense"}


def cli(*args: str, timeout: int = 900, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``lesiondiffusion ARGS`` in a child process, as a user runs it."""
    cmd = [sys.executable, "-m", "lesiondiffusion_tools.cli", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env={"PYTHONWARNINGS": "ignore", **os.environ}
    )


def error_lines(run: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def weights(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All three networks trained for a few iterations by ``lesiondiffusion train --stage all``."""
    out = tmp_path_factory.mktemp("weights")
    run = cli(
        "train", "--stage", "all", "--datalist", str(tiny_demo / "datalist.json"), "--out", str(out),
        "--max_epochs", "1", "--iter_num", "2", "--val_fraction", "0.5", "--bundle_overrides", json.dumps(TINY),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    for name in ("vqgan", "lmnet", "linet"):
        assert f"{name}: {out / name / 'model.pt'}" in run.stdout
    return out


def synthesize(weights: Path, out: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    tiny = json.dumps({k: TINY[k] for k in ("lmnet", "linet")})
    return cli(
        "synthesize", "--weights", str(weights), "--out", str(out), "--steps", "2", "--seed", "3",
        "--margin_mm", str(MARGIN_MM), "--bundle_overrides", tiny, *args, cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def synthesised(weights: Path, tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    case = tiny_demo / "cases" / "Liver_cancer"
    out = tmp_path_factory.mktemp("synth") / "out"
    run = synthesize(
        weights,
        out,
        "--image",
        str(case / "image.nii.gz"),
        "--organ_seg",
        str(case / "organ_seg.nii.gz"),
        "--attributes",
        json.dumps(ATTRIBUTES),
    )
    return {"run": run, "out": out, "case": case}


def test_synthesize_writes_every_output_file(synthesised: dict) -> None:
    run, out = synthesised["run"], synthesised["out"]
    assert run.returncode == 0, run.stderr[-4000:]
    folder = out / "image"  # the case is named after the input file
    assert sorted(p.name for p in folder.iterdir()) == sorted(OUTPUT_FILES)
    assert f"image: {folder / 'image.nii.gz'}" in run.stdout and "s per lesion" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded"] == 1 and summary["failed"] == 0 and summary["lesions"] == 1
    assert set(summary["timings_s"]) == {"preprocess", "lmnet", "linet", "total"}
    assert summary["wall_s"] > summary["timings_s"]["total"] > 0  # the command: the stages and the checks and outputs
    # each stage's own process: at least the Python + torch + MONAI it imports
    assert all(summary["peak_rss_mib"][stage] > 100 for stage in ("preprocess", "lmnet", "linet"))
    assert not list(out.parent.glob(".lesiondiffusion-work-*")), "the work folder is removed"


def test_output_keeps_the_input_geometry_and_far_voxels(synthesised: dict) -> None:
    src = nib.load(synthesised["case"] / "image.nii.gz")
    folder = synthesised["out"] / "image"
    img, label = nib.load(folder / "image.nii.gz"), nib.load(folder / "label.nii.gz")
    for out in (img, label, nib.load(folder / "organ_seg.nii.gz")):
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    assert img.get_data_dtype() == src.get_data_dtype()
    before, after = np.asarray(src.dataobj), np.asarray(img.dataobj)
    lab = np.asarray(label.dataobj)
    assert set(np.unique(lab)) <= {0, 1, 2} and (lab == 2).any()
    spacing = np.asarray(src.header.get_zooms()[:3], dtype=float)
    distance = ndi.distance_transform_edt(lab != 2, sampling=spacing)
    far = distance > MARGIN_MM
    assert np.array_equal(before[far], after[far]), "voxels beyond the margin must be bit-identical"
    assert not np.array_equal(before[lab == 2], after[lab == 2]), "the lesion was written"


def test_lesion_lies_in_the_requested_organ(synthesised: dict) -> None:
    folder = synthesised["out"] / "image"
    lab = np.asarray(nib.load(folder / "label.nii.gz").dataobj)
    seg = np.rint(np.asarray(nib.load(folder / "organ_seg.nii.gz").dataobj)).astype(int)
    liver = seg == label_table("v1").id("liver")
    assert liver[lab == 2].all()
    assert np.array_equal(lab == 1, liver & (lab != 2)), "label 1 is the lesion's organ"
    report = json.loads((folder / "report.json").read_text())
    assert list(report) == [str(label_table("v1").id("liver"))]


def test_provenance_records_inputs_parameters_weights_and_versions(synthesised: dict, weights: Path) -> None:
    prov = json.loads((synthesised["out"] / "image" / "provenance.json").read_text())
    assert prov["request"]["image"] == str((synthesised["case"] / "image.nii.gz").resolve())
    assert prov["request"]["attributes"] == ATTRIBUTES
    params = prov["parameters"]
    assert (params["seed"], params["steps"], params["sampler"], params["margin_mm"]) == (3, 2, "ddim", MARGIN_MM)
    assert params["bundle_overrides"]["linet"] == TINY["linet"]
    for name in ("vqgan", "lmnet", "linet"):
        assert prov["weights"][name] == {
            "path": str((weights / name / "model.pt").resolve()),
            "sha256": file_sha256(weights / name / "model.pt"),
        }
    assert {"monai", "torch", "python", "bundle:linet"} <= set(prov["versions"])
    assert prov["versions"]["lesiondiffusion-monai"] != "not installed"
    assert prov["lesions"][0]["cavity"] and prov["seconds_per_lesion"] > 0
    # the scan context preprocess measured: the liver's HU on the phantom, a phase, and its summary line
    assert (
        prov["scan"]["organ"] == "liver"
        and -50 < prov["scan"]["organ_hu"] < 200
        and prov["scan"]["phase"]
        and prov["scan"]["summary"]
    )
    assert prov["network_calls"]["linet"] == 2 and prov["network_calls"]["lmnet"] in (
        2,
        4,
        6,
        8,
    )  # 2 steps; LMNet may retry
    # every stage's config (with its hash) and the settings it was given: the run's every parameter
    assert list(prov["bundles"]) == ["preprocess", "lmnet", "linet"]
    for stage, run in prov["bundles"].items():
        config = Path(__file__).resolve().parents[2] / "bundles" / stage / "configs" / "inference.json"
        assert run["config"] == str(config.resolve()) and run["config_sha256"] == file_sha256(config)
    linet = prov["bundles"]["linet"]["settings"]
    assert (linet["steps"], linet["seed"], linet["sampler"]) == (2, 3, "ddim") and Path(linet["weights"]).resolve() == (
        weights / "linet" / "model.pt"
    ).resolve()
    assert {k: linet[k] for k in TINY["linet"]} == TINY["linet"]
    assert not any(
        str(v).startswith(str(synthesised["out"].parent / ".lesiondiffusion-work"))
        for run in prov["bundles"].values()
        for v in run["settings"].values()
    )


def test_rerun_refuses_an_existing_output_unless_overwrite(synthesised: dict, weights: Path) -> None:
    out, case = synthesised["out"], synthesised["case"]
    before = (out / "summary.json").read_bytes()
    args = [
        "--image",
        str(case / "image.nii.gz"),
        "--organ_seg",
        str(case / "organ_seg.nii.gz"),
        "--attributes",
        json.dumps(ATTRIBUTES),
    ]
    refused = synthesize(weights, out, *args)
    assert refused.returncode == 1 and error_lines(refused) == [
        f"error: {out}: output folder exists; pass --overwrite to replace it"
    ]
    said_no = synthesize(weights, out, *args, "--overwrite", "false")  # the word false means no
    assert said_no.returncode == 1 and error_lines(said_no) == error_lines(refused)
    assert (out / "summary.json").read_bytes() == before


def test_overwrite_replaces_the_whole_output_folder(weights: Path, tiny_demo: Path, tmp_path: Path) -> None:
    case = tiny_demo / "cases" / "Bladder_cancer"
    out = tmp_path / "out"
    (out / "old_case").mkdir(parents=True)
    (out / "old_case" / "image.nii.gz").write_bytes(b"an earlier run's output")
    args = ["--image", str(case / "image.nii.gz"), "--organ_seg", str(case / "organ_seg.nii.gz")]
    run = synthesize(
        weights,
        out,
        *args,
        "--attributes",
        json.dumps({"organ type": "bladder", "lesion type": "polyp"}),
        "--overwrite",
        "true",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["image", "summary.json"]  # nothing of the earlier run is left
    assert sorted(p.name for p in (out / "image").iterdir()) == sorted(OUTPUT_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no staging folder left beside it


def test_batch_with_a_broken_case_finishes_the_others(weights: Path, tiny_demo: Path, tmp_path: Path) -> None:
    good = tiny_demo / "cases" / "Bladder_cancer"
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes((good / "image.nii.gz").read_bytes()[:300])  # a truncated file
    requests = write_requests(tmp_path / "requests.json", [
        SynthesisRequest("broken", broken, {"organ type": "urinary bladder", "lesion type": "tumor"}, good / "organ_seg.nii.gz"),
        SynthesisRequest("bladder", good / "image.nii.gz", {"organ type": "urinary bladder", "lesion type": "tumor"}, good / "organ_seg.nii.gz"),
    ])  # fmt: skip
    inputs = {p: p.read_bytes() for p in (broken, good / "image.nii.gz", requests)}
    out = tmp_path / "out"
    # relative paths, as typed in a shell: the output folder and the requests file
    run = synthesize(weights, Path("out"), "--requests", "requests.json", "--device", "cpu", cwd=tmp_path)
    assert run.returncode == 1
    assert error_lines(run) == [f"error: 1 of 2 case(s) failed (see {out / 'summary.json'})"]
    summary = json.loads((out / "summary.json").read_text())
    assert [c["status"] for c in summary["cases"]] == ["error", "ok"]
    assert summary["cases"][0]["stage"] == "preprocess" and "broken.nii.gz" in summary["cases"][0]["error"]
    assert not (out / "broken").exists()
    assert sorted(p.name for p in (out / "bladder").iterdir()) == sorted(OUTPUT_FILES)
    assert json.loads((out / "bladder" / "provenance.json").read_text())["parameters"]["device"] == "cpu"
    assert all(p.read_bytes() == data for p, data in inputs.items()), "inputs are never modified"


# ---- inputs (no networks run) ---------------------------------------------------------------------
def test_requests_come_from_one_of_three_forms(tmp_path: Path) -> None:
    images = tmp_path / "images.txt"
    images.write_text("a/ct.nii.gz\nb/ct.nii.gz\n")
    attrs = tmp_path / "attrs.txt"
    attrs.write_text(
        '{"organ type": "liver", "lesion type": "cyst"}\n{"organ type": "kidney", "lesion type": "tumor"}\n'
    )
    batch = gather_requests(image_list=str(images), attributes_list=str(attrs), lesion_type="metastasis")
    assert [r.case for r in batch] == ["0000_ct", "0001_ct"]  # same file names: numbered
    assert batch[0].image == tmp_path / "a" / "ct.nii.gz"
    assert [r.attributes["lesion type"] for r in batch] == ["metastasis", "metastasis"]
    single = gather_requests(
        image=str(tmp_path / "x.nii"), organ="spleen", lesion_type="cyst", attributes={"density": "hyperdense"}
    )
    assert single[0].case == "x" and single[0].attributes == {
        "density": "hyperdense",
        "organ type": "spleen",
        "lesion type": "cyst",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give exactly one of --image CT, --image_list FILE or --requests FILE"),
        ({"image": "a.nii.gz", "requests": "r.json"}, "give exactly one of"),
        ({"image": "a.nii.gz", "organ": "liver"}, "no 'lesion type'"),
        ({"image": "a.nii.gz", "attributes": "{not json"}, "not a JSON object"),
        ({"image": "a.nii.gz", "attributes_list": "x.txt"}, "go with --image_list"),
    ],
)
def test_bad_request_options_are_one_line_errors(kwargs: dict, message: str) -> None:
    from lesiondiffusion.errors import LesionDiffusionError

    with pytest.raises(LesionDiffusionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gather_requests(**kwargs)


def test_missing_weights_say_what_to_do(tmp_path: Path) -> None:
    from lesiondiffusion.errors import LesionDiffusionError

    (tmp_path / "w" / "vqgan").mkdir(parents=True)
    (tmp_path / "w" / "vqgan" / "model.pt").write_bytes(b"x")
    with pytest.raises(
        LesionDiffusionError, match=r"weights not found: .*lmnet/model.pt.*lesiondiffusion train --stage all"
    ):
        weights_paths(tmp_path / "w")
    (tmp_path / "ct.nii.gz").write_bytes(b"x")
    run = cli(
        "synthesize",
        "--image",
        str(tmp_path / "ct.nii.gz"),
        "--organ",
        "liver",
        "--lesion_type",
        "cyst",
        "--weights",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "o"),
    )
    assert run.returncode == 1 and len(error_lines(run)) == 1 and "weights folder not found" in run.stderr
    assert not (tmp_path / "o").exists()


# ---- demo and benchmark (the same commands on the tiny networks) ----------------------------------------
def test_demo_synthesises_three_density_variants_and_evaluates_them(
    weights: Path, demo_src: Path, tmp_path: Path
) -> None:
    out = tmp_path / "demo"
    tiny = json.dumps({k: TINY[k] for k in ("lmnet", "linet")})
    # the phantom demo (the default, five organs in the real CT, is tests/cli/test_demo.py's)
    run = cli("demo", "--source", "phantom", "--out", str(out), "--src", str(demo_src), "--weights", str(weights), "--steps", "2",
              "--bundle_overrides", tiny)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    cases = [c["case"] for c in json.loads((out / "synthesis" / "summary.json").read_text())["cases"]]
    assert len(cases) == 3 and {c.rsplit("_", 1)[1] for c in cases} == {"hypo", "iso", "hyper"}
    # the phantom's small v1 crop is read in the numbering its requests file declares
    assert json.loads((out / "requests" / "requests.json").read_text())["organ_seg_version"] == "v1"
    for case in cases:
        assert (out / "synthesis" / case / "preview.png").is_file()
        request = json.loads((out / "synthesis" / case / "provenance.json").read_text())["request"]
        assert request["declared_organ_seg_version"] == request["organ_seg_version"] == "v1"
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert (report["totals"]["requested"], report["totals"]["evaluated"]) == (3, 3)
    lines = run.stdout.splitlines()
    assert any(line.startswith("seconds per lesion: ") for line in lines)
    assert any(line.startswith("evaluation: evaluated 3/3 case(s)") and "preserved 100.0%" in line for line in lines)


def test_benchmark_reports_stages_memory_and_network_evaluations(
    weights: Path, tiny_demo: Path, tmp_path: Path
) -> None:
    case = tiny_demo / "cases" / "Liver_cancer"
    tiny = json.dumps({k: TINY[k] for k in ("lmnet", "linet")})
    run = cli(
        "benchmark", "--image", str(case / "image.nii.gz"), "--organ_seg", str(case / "organ_seg.nii.gz"), "--weights", str(weights),
        "--steps", "2", "--guidance", "2.0", "--out", str(tmp_path / "bench"), "--bundle_overrides", tiny,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads((tmp_path / "bench" / "end_to_end.json").read_text())
    results = report["results"]
    calls = report["runs"][0]["network_calls"]  # counted by the bundles' samplers
    assert calls["linet"] == 2 and calls["lmnet"] >= 2 and calls["lmnet"] % 2 == 0  # 2 steps per attempt
    assert results["lesions"] == 1 and results["network_evaluations"] == calls["lmnet"] + calls["linet"]
    assert results["forward_passes"] == 2 * results["network_evaluations"]  # guidance: two passes per call, batched
    stages = results["seconds_per_lesion_by_stage"]
    assert set(stages) == {"preprocess", "lmnet", "linet"} and all(v > 0 for v in stages.values())
    assert results["seconds_per_lesion"] == pytest.approx(sum(stages.values()), abs=0.05)
    assert results["seconds_per_lesion_end_to_end"] > results["seconds_per_lesion"]  # checks and outputs on top
    assert all(v > 100 for v in results["peak_rss_mib"].values()) and results["startup_s"] > 0
    assert "| **total** |" in (tmp_path / "bench" / "end_to_end.md").read_text()


def test_clinical_grid_input_resamples_the_demo_phantom(demo_src: Path, tmp_path: Path) -> None:
    from lesiondiffusion_tools.benchmark import clinical_grid_case

    # 384 x 360 x 320 mm: wider than the 280 mm organ map, so the grid's corners lie beyond it
    image, seg = clinical_grid_case(tmp_path, shape=(96, 90, 40), spacing=(4.0, 4.0, 8.0), src=demo_src)
    img, organs = nib.load(image), nib.load(seg)
    assert img.shape == organs.shape == (96, 90, 40) and np.allclose(img.header.get_zooms(), (4, 4, 8))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S") and img.get_data_dtype() == np.int16
    ct, labels = np.asarray(img.dataobj), np.asarray(organs.dataobj)
    liver = labels == label_table("v1").id("liver")
    assert liver.any() and 20 < np.median(ct[liver]) < 120  # liver parenchyma HU
    assert ct[0, 0, 0] == -1000  # air beyond the phantom


def test_unknown_settings_are_refused_before_anything_runs(tmp_path: Path) -> None:
    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion_tools.synthesize import synthesize as run_synthesize
    from lesiondiffusion_tools.train import train

    datalist = tmp_path / "datalist.json"
    datalist.write_text('{"training": []}')
    with pytest.raises(
        LesionDiffusionError, match=r"unknown setting\(s\) 'max_epoch' for the vqgan bundle's train.json"
    ):
        train(datalist=str(datalist), out=str(tmp_path / "w"), max_epoch=3)
    with pytest.raises(
        LesionDiffusionError,
        match=r"--bundle_overrides: unknown setting\(s\) 'stepz' for the linet bundle's inference.json",
    ):
        run_synthesize(
            image="ct.nii.gz",
            organ="liver",
            lesion_type="cyst",
            out=str(tmp_path / "o"),
            bundle_overrides={"linet": {"stepz": 3}},
        )
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_a_given_organ_map_is_written_whole_and_renumbered(tmp_path: Path) -> None:
    """The output organ map is the user's own map in v1 ids, not the chain's neighbourhood crop resampled
    back; a map on a permuted grid of the image (allowed as input) is resampled from the chain's."""
    from lesiondiffusion.geometry import record_geometry, write_geometry
    from lesiondiffusion.labels import to_v1_map
    from lesiondiffusion.manifest import CaseEntry
    from lesiondiffusion_tools.synthesize import _write_organ_map

    affine = np.diag([-1.5, 1.5, 2.0, 1.0])
    given = np.zeros((12, 10, 8), dtype=np.uint8)
    given[1:4, 1:4, 1:4], given[8:11, 6:9, 4:7] = 5, 13  # v2: liver, and a right lung lobe far from it
    nib.save(nib.Nifti1Image(np.zeros(given.shape, np.int16), affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(given, affine), tmp_path / "seg.nii.gz")
    std = np.zeros((12, 10, 8), dtype=np.uint8)  # the chain's map: only the liver's neighbourhood
    std[1:4, 1:4, 1:4] = 5
    nib.save(nib.Nifti1Image(std, affine), tmp_path / "std_seg.nii.gz")
    geometry = write_geometry(tmp_path / "geometry.json", record_geometry(tmp_path / "ct.nii.gz", affine, std.shape))
    entry = CaseEntry("c", geometry=geometry, organ_seg=tmp_path / "std_seg.nii.gz", extra={"organ_seg_version": "v2"})

    _write_organ_map(tmp_path / "out.nii.gz", entry, tmp_path / "seg.nii.gz")
    written = nib.load(tmp_path / "out.nii.gz")
    assert np.array_equal(np.asarray(written.dataobj), to_v1_map(given, "v2")) and written.get_data_dtype() == np.uint8
    assert np.allclose(written.affine, affine)

    nib.save(nib.Nifti1Image(given.transpose(1, 0, 2), affine[:, [1, 0, 2, 3]]), tmp_path / "permuted.nii.gz")
    _write_organ_map(tmp_path / "fallback.nii.gz", entry, tmp_path / "permuted.nii.gz")
    assert np.array_equal(np.asarray(nib.load(tmp_path / "fallback.nii.gz").dataobj), std)
