"""The LMNet bundle run as users run it: ``python -m monai.bundle run`` (and torchrun) in subprocesses.

A tiny configuration (32x32x16 crops, 8/16/16 channels) trains on the 2 mm demo cases, resumes, runs
two-process DDP on gloo, and draws lesions for a preprocess manifest of the demo phantom. Runs whose
process is not what is checked (the preprocess manifest, repeated inference, error messages after the
first) go through the same configs in this process (``tests/in_process.py``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from in_process import error_line, overrides_of
from scipy import ndimage as ndi

from lesiondiffusion import vocabulary as V
from lesiondiffusion.conditioning import ConditionSpec, lesion_attributes
from lesiondiffusion.data_paths import DEMO_DATA
from lesiondiffusion.diffusion import DiffusionSampler
from lesiondiffusion.manifest import read_manifest
from lesiondiffusion.networks.weights import load_weights
from lesiondiffusion.placement import allowed_region
from lesiondiffusion_tools.bundle_runner import run_bundle_in_process

from ddp_probe import check_ranks, probe_config, sharded_datalist

ROOT = Path(__file__).resolve().parents[2]
LMNET = ROOT / "bundles" / "lmnet"
TINY = [
    "--crop_size", "[32,32,16]",
    "--channels", "[8,16,16]",
    "--num_head_channels", "8",
    "--condition_dim", "16",
    "--lr", "0.0005",
]  # fmt: skip
LOSS = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- train_loss: ([0-9.]+)")

pytestmark = pytest.mark.slow


def bundle_run(
    bundle: Path, config: str | list[str], *args: str, torchrun: bool = False, timeout: int = 900
) -> subprocess.CompletedProcess:
    configs = config if isinstance(config, str) else "[" + ",".join(f"'{c}'" for c in config) + "]"
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
        if torchrun
        else [sys.executable]
    )
    cmd = [*launcher, "-m", "monai.bundle", "run", "--config_file", configs, *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=timeout, env=env)


def losses(log: str) -> list[tuple[int, int, float]]:
    return [(int(e), int(i), float(v)) for e, i, v in LOSS.findall(log)]


@pytest.fixture(scope="module")
def trained(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("lmnet") / "models"
    args = [
        "--datalist",
        str(tiny_demo / "datalist.json"),
        "--output_dir",
        str(out),
        "--iter_num",
        "10",
        "--val_fraction",
        "0.5",
        *TINY,
    ]
    first = bundle_run(LMNET, "configs/train.json", *args, "--max_epochs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    return {"out": out, "args": args, "log": first.stdout + first.stderr}


def test_training_runs_and_the_loss_falls(trained):
    record = losses(trained["log"])
    assert len(record) == 20  # 2 epochs of iter_num=10, independent of the 1 training case
    values = [v for _, _, v in record]
    assert np.mean(values[-5:]) < np.mean(values[:5]), values
    assert "val_loss" in trained["log"]  # validation ran on the held-out case
    state = torch.load(trained["out"] / "checkpoint_last.pt", weights_only=True)
    assert set(state) == {"network", "optimizer", "trainer", "ema"}
    assert state["trainer"]["iteration"] == 20 and state["trainer"]["epoch_length"] == 10
    # model.pt: the EMA network's plain state dict, the file inference's `weights` takes
    model = torch.load(trained["out"] / "model.pt", weights_only=True)
    assert set(model) == set(state["ema"]) and all(torch.equal(model[k], state["ema"][k]) for k in model)
    assert any(not torch.equal(model[k], state["network"][k]) for k in model if model[k].is_floating_point())
    best = torch.load(trained["out"] / "model_best.pt", weights_only=True)
    assert set(best) == set(model)
    assert list((trained["out"] / "tensorboard").glob("events.out.tfevents.*"))


def test_training_resumes_from_the_last_checkpoint(trained, tmp_path):
    resumed = bundle_run(LMNET, "configs/train.json", *trained["args"], "--max_epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Restored all variables from" in log
    record = losses(log)
    assert [e for e, _, _ in record] == [3] * 10  # only the third epoch ran
    state = torch.load(trained["out"] / "checkpoint_last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 30


def test_finetune_starts_from_given_weights(trained, tiny_demo, tmp_path):
    out = tmp_path / "ft"
    source = trained["out"] / "model.pt"
    run = bundle_run(
        LMNET, "configs/train.json", "--datalist", str(tiny_demo / "datalist.json"), "--output_dir", str(out), *TINY,
        "--finetune_from", str(source), "--iter_num", "2", "--max_epochs", "1", "--lr", "0.0",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(losses(run.stdout + run.stderr)) == 2  # a new run: its own iteration count
    before, after = torch.load(source, weights_only=True), torch.load(out / "model.pt", weights_only=True)
    # lr 0: the fine-tuned network is the source (up to the EMA update's rounding, (1 - m) x + m x)
    assert all(torch.allclose(before[k], after[k], rtol=1e-5, atol=1e-7) for k in before)
    args = {"datalist": str(tiny_demo / "datalist.json"), "output_dir": str(tmp_path / "x"), **overrides_of(TINY)}
    line = error_line("lmnet", {**args, "finetune_from": str(tmp_path / "none.pt")}, ("train.json",))
    assert f"{tmp_path / 'none.pt'}: LMNet weights file not found; set finetune_from" in line
    assert not (tmp_path / "x").exists()


def test_two_process_ddp_on_gloo(tiny_demo, tmp_path):
    """Data-parallel training: both ranks end with the same weights, each trained on its own half of the cases."""
    out = tmp_path / "ddp"
    datalist = sharded_datalist(tiny_demo, tmp_path / "data")
    probe = probe_config(
        tmp_path / "probe.json", LMNET / "configs" / "train.json", "@train#trainer", {"network": "@network"}
    )
    run = bundle_run(
        LMNET, ["configs/train.json", "configs/multi_gpu_train.json", str(probe)],
        "--datalist", str(datalist), "--output_dir", str(out), "--iter_num", "4", "--max_epochs", "1",
        "--batch_size", "1", *TINY, torchrun=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(losses(run.stdout + run.stderr)) == 4  # rank 0 logs; the others stay quiet
    check_ranks(out, iterations=4)
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 4
    assert not any(k.startswith("module.") for k in state["network"])


@pytest.fixture(scope="module")
def manifest(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = tiny_demo / "cases" / "Liver_cancer"
    out = tmp_path_factory.mktemp("pre") / "prepared"
    run_bundle_in_process("preprocess", {
        "image": str(case / "image.nii.gz"), "organ_seg": str(case / "organ_seg.nii.gz"),
        "attributes": json.dumps({"organ type": "liver", "lesion type": "cyst"}), "num_lesions": 2, "output_dir": str(out),
    })  # fmt: skip
    return out / "manifest.json"


INFER_STEPS = "4"


def infer(manifest: Path, weights: Path | None, out: Path, *extra: str) -> subprocess.CompletedProcess:
    given = ["--weights", str(weights)] if weights is not None else []
    return bundle_run(
        LMNET, "configs/inference.json", "--manifest", str(manifest), *given, "--output_dir", str(out),
        "--steps", INFER_STEPS, *TINY, *extra,
    )  # fmt: skip


def infer_here(manifest: Path, weights: Path, out: Path, **extra) -> None:
    """:func:`infer` in this process (the same config and overrides)."""
    args = {"manifest": str(manifest), "weights": str(weights), "output_dir": str(out), "steps": int(INFER_STEPS)}
    run_bundle_in_process("lmnet", {**args, **overrides_of(TINY), **extra})


@pytest.fixture(scope="module")
def inferred(manifest: Path, trained: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lmnet_inf") / "a"
    run = infer(manifest, trained["out"] / "model.pt", out)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_inference_writes_valid_lesions(manifest, inferred):
    source = read_manifest(manifest).cases[0]
    case = read_manifest(inferred / "manifest.json").cases[0]
    assert case.ok and case.label == inferred / "case_000" / "label.nii.gz"
    assert (
        case.image.resolve() == source.image.resolve() and case.organ_seg.resolve() == source.organ_seg.resolve()
    )  # rebased, not copied
    label_img = nib.load(case.label)
    label = np.asarray(label_img.dataobj)
    organ_seg_img = nib.load(case.organ_seg)
    organ_seg = np.asarray(organ_seg_img.dataobj).astype(int)
    assert label.shape == organ_seg.shape and np.allclose(label_img.affine, organ_seg_img.affine)
    assert set(np.unique(label)) == {0, 1, 2}
    lesions = label == 2
    components, n = ndi.label(lesions)
    assert n == len(case.lesions) == 2  # one component per box, none touching another
    steps = int(INFER_STEPS)
    calls = case.extra["lmnet"]["network_calls"]  # counted by the sampler, retries included
    assert calls >= steps * len(case.lesions) and calls % steps == 0
    for lesion in case.lesions:
        region = allowed_region(organ_seg == lesion.organ_id, lesion.cavity, lesion.box)
        inside = components[region]
        ids = set(np.unique(inside[inside > 0]).tolist())
        assert len(ids) == 1  # exactly one lesion lies in this box's allowed region
        assert not ((components == ids.pop()) & ~region).any()  # and none of it outside
    assert (label[(organ_seg == 5) & ~lesions] == 1).all()


def test_inference_label_has_the_input_geometry(manifest, inferred):
    case = read_manifest(inferred / "manifest.json").cases[0]
    original = nib.load(case.label_original)
    source = nib.load(case.source_image)
    assert original.shape == source.shape
    assert np.allclose(original.affine, source.affine, atol=1e-4)
    values = np.asarray(original.dataobj)
    assert set(np.unique(values)) == {0, 1, 2}
    assert (values == 2).sum() > 0


def test_inference_is_deterministic_for_a_seed(manifest, trained, inferred, tmp_path):
    infer_here(manifest, trained["out"] / "model.pt", tmp_path / "b")  # in this process, the first in its own
    a = np.asarray(nib.load(inferred / "case_000" / "label.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "b" / "case_000" / "label.nii.gz").dataobj)
    assert np.array_equal(a, b)


def test_rectified_flow_sampler_with_guidance(manifest, trained, inferred, tmp_path):
    infer_here(manifest, trained["out"] / "model.pt", tmp_path / "rf", sampler="rflow", guidance_scale=2.0)
    case = read_manifest(tmp_path / "rf" / "manifest.json").cases[0]
    assert case.ok
    label = np.asarray(nib.load(case.label).dataobj)
    organ_seg = np.asarray(nib.load(case.organ_seg).dataobj).astype(int)
    lesions = label == 2
    assert ndi.label(lesions)[1] == 2
    allowed = np.zeros_like(lesions)
    for lesion in case.lesions:
        allowed |= allowed_region(organ_seg == lesion.organ_id, lesion.cavity, lesion.box)
    assert not (lesions & ~allowed).any()
    ddim = np.asarray(nib.load(inferred / "case_000" / "label.nii.gz").dataobj)
    assert not np.array_equal(label, ddim)  # another sampler, another sample


def test_attribute_changes_the_sample_of_the_trained_model(trained):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(LMNET / "configs" / "inference.json")
    parser["imports"] = [i for i in parser["imports"] if "scripts" not in i]
    for flag, value in zip(TINY[::2], TINY[1::2]):
        parser[flag[2:]] = json.loads(value)
    network = load_weights(parser.get_parsed_content("network_def"), trained["out"] / "model.pt").eval()
    spec = network.encoder.spec
    attributes = lesion_attributes(DEMO_DATA / "Liver_cancer" / "type.json")
    a = spec.encode(attributes)[None]
    b = spec.encode({**attributes, V.SHAPE: "punctate,", V.SURFACE: "well-defined margin,"})[None]
    assert not torch.equal(a, b)
    sampler = DiffusionSampler("ddim", steps=3, progress=False)
    extra = torch.zeros(1, 3, 32, 32, 16)
    extra[:, 2, 8:24, 8:24, 4:12] = 1
    sa = sampler(network, (1, 1, 32, 32, 16), condition=a, extra=extra, seed=0)
    sb = sampler(network, (1, 1, 32, 32, 16), condition=b, extra=extra, seed=0)
    assert not torch.allclose(sa, sb)
    assert ConditionSpec().shape == tuple(a.shape[1:])


def test_bad_inputs_are_one_line_errors_without_output(manifest, trained, tmp_path):
    run = infer(manifest, tmp_path / "missing.pt", tmp_path / "out")
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.pt: LMNet weights not found; pass --weights" in errors[0]
    assert not (tmp_path / "out").exists()
    # the default: the shipped weights under models/ (cpu preset), which do not fit the tiny network
    args = {"manifest": str(manifest), "output_dir": str(tmp_path / "out"), "steps": int(INFER_STEPS)}
    line = error_line("lmnet", {**args, **overrides_of(TINY)})
    assert "models/model.pt: LMNet weights do not fit this network" in line
    assert not (tmp_path / "out").exists()
    line = error_line(
        "lmnet", {"datalist": str(tmp_path / "none.json"), "output_dir": str(tmp_path / "t")}, ("train.json",)
    )
    assert "none.json: file not found" in line
    assert not (tmp_path / "t").exists()


def test_metadata_verifies():
    from monai.bundle import verify_metadata

    schema = ROOT / "lesiondiffusion" / "resources" / "meta_schema_20240725.json"
    verify_metadata(meta_file=str(LMNET / "configs" / "metadata.json"), filepath=str(schema))  # raises on any error


def parsed(config: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(LMNET / "configs" / config)
    parser["imports"] = [i for i in parser["imports"] if "scripts" not in i]
    for k, v in overrides.items():
        parser[k] = v
    return parser


def test_configs_use_the_shared_setting_names():
    train = parsed("train.json")
    for key in ("datalist", "output_dir", "preset", "seed", "device", "max_epochs", "iter_num", "val_interval", "save_every",
                "finetune_from", "resume", "attribute_dropout", "condition_dropout", "condition_encoder", "num_workers"):  # fmt: skip
        assert key in train.config, key
    assert train["condition_encoder"] == "vocab" and train["resume"] is True and train["finetune_from"] is None
    inference = parsed("inference.json")
    for key in ("manifest", "output_dir", "weights", "seed", "steps", "sampler", "guidance_scale", "device"):
        assert key in inference.config, key
    assert inference.get_parsed_content("weights") == "./models/model.pt"  # where shipped weights live
    assert inference["sampler"] == "ddim"


def test_presets_switch_by_one_key():
    for preset, crop, dim in (("cpu", [32, 32, 16], 64), ("paper", [152, 152, 64], 512)):
        for config in ("train.json", "inference.json"):
            parser = parsed(config, preset=preset)
            assert parser.get_parsed_content("crop_size") == crop
            state = parser.get_parsed_content("network_def").state_dict()
            keys = [k for k in state if k.endswith("to_k.weight") and "attn2" in k]  # cross-attention keys
            assert keys and all(state[k].shape[1] == dim for k in keys)
            assert state["unet.conv_in.conv.weight"].shape[:2] == (16, 4)  # 16 channels; mask + 3 known inputs
