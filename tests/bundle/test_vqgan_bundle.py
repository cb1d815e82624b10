"""The VQ-GAN bundle: real `python -m monai.bundle run` trainings (single process, killed and resumed,
two gloo processes), tiled whole-CT inference, one-line input errors, metadata, and its scripts."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from lesiondiffusion import autoencoder as ae
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.transforms import hu_to_unit

from ddp_probe import check_ranks, probe_config, sharded_datalist
from training_logs import loss_log

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "vqgan"
CONFIGS = BUNDLE / "configs"
SCHEMA = ROOT / "lesiondiffusion" / "resources" / "meta_schema_20240725.json"
BIN = Path(sys.executable).parent

# a tiny network on 24^3 crops of the 2 mm demo cases: seconds per run on a 2-core CPU
TINY_NET = ["--network_def#channels", "[8,16]", "--network_def#num_res_channels", "[8,16]"]
TINY_TRAIN = [
    *TINY_NET,
    "--discriminator_def#channels",
    "8",
    "--spacing",
    "[2,2,2]",
    "--crop_size",
    "[24,24,24]",
    "--num_workers",
    "0",
    "--val_fraction",
    "0.5",
]


def load_scripts() -> ModuleType:
    """The bundle's ``scripts`` package under its own name (other bundles also have a ``scripts``)."""
    name = "vqgan_bundle_scripts"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, BUNDLE / "scripts" / "__init__.py", submodule_search_locations=[str(BUNDLE / "scripts")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def bundle_cmd(configs: list[str], *args: str) -> list[str]:
    files = [str(CONFIGS / c) for c in configs]
    config = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    return [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE), "--config_file", config, *args]


def run_bundle(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_vqvae() -> torch.nn.Module:
    return ae.build_vqvae("cpu", channels=(8, 16), num_res_channels=(8, 16))


# ---- training ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_loss_falls_with_adversarial_warm_up(tiny_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = bundle_cmd(
        ["train.json"],
        "--datalist",
        str(tiny_demo / "datalist.json"),
        "--output_dir",
        str(out),
        *TINY_TRAIN,
        "--iter_num",
        "12",
        "--max_epochs",
        "2",
        "--lr",
        "0.001",
        "--adv_start",
        "16",
        "--log_every",
        "1",
    )
    proc = run_bundle(cmd, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = loss_log(proc.stdout)
    assert sorted(log) == list(range(1, 25))
    first = np.mean([log[i]["recon_loss"] for i in range(1, 5)])
    last = np.mean([log[i]["recon_loss"] for i in range(21, 25)])
    assert last < 0.7 * first, (first, last)
    # the adversarial terms and discriminator updates start after iteration adv_start only
    assert all("d_loss" not in log[i] and "g_adv_loss" not in log[i] for i in range(1, 17))
    assert all("d_loss" in log[i] and "g_adv_loss" in log[i] for i in range(17, 25))
    assert re.search(r"val_psnr: [\d.]+ val_ssim: [-\d.]+", proc.stdout)
    # final weights (model.pt, plain state dict), best by validation PSNR, and the last checkpoint
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert set(ckpt) == {"autoencoder", "discriminator", "optimizer", "d_optimizer", "trainer"}
    assert ckpt["trainer"]["iteration"] == 24
    final = torch.load(out / "model.pt", weights_only=True)
    assert set(final) == set(ckpt["autoencoder"]) and all(torch.equal(final[k], ckpt["autoencoder"][k]) for k in final)
    for name in ("model.pt", "model_best.pt"):
        model = ae.load_vqvae(out / name, "cpu", channels=(8, 16), num_res_channels=(8, 16))
        saved, loaded = torch.load(out / name, weights_only=True), model.state_dict()
        assert set(loaded) == set(saved) and all(
            torch.equal(loaded[k], saved[k]) for k in saved
        )  # every tensor, as saved
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tiny_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = bundle_cmd(
        ["train.json"],
        "--datalist",
        str(tiny_demo / "datalist.json"),
        "--output_dir",
        str(out),
        *TINY_TRAIN,
        "--iter_num",
        "6",
        "--max_epochs",
        "2",
        "--save_every",
        "3",
        "--adv_start",
        "2",
        "--progress",
        "false",
        "--log_every",
        "1",
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if "checkpoint_last.pt at iteration 3" in line:
                proc.kill()  # SIGKILL: no handler runs, nothing is flushed
                break
    finally:
        proc.kill()
        proc.wait(60)
    saved = torch.load(out / "checkpoint_last.pt", weights_only=True)
    done = saved["trainer"]["iteration"]
    assert 3 <= done < 12

    resumed = run_bundle(cmd, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restored all variables from {out / 'checkpoint_last.pt'}" in resumed.stdout
    assert sorted(loss_log(resumed.stdout)) == list(range(done + 1, 13))  # the iteration count goes on
    final = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 12
    # the optimisers were restored too: Adam counted every step of both runs
    assert {float(s["step"]) for s in final["optimizer"]["state"].values()} == {12.0}
    assert {float(s["step"]) for s in final["d_optimizer"]["state"].values()} == {10.0}  # from iteration 3 on


@pytest.mark.slow
def test_multi_gpu_config_trains_with_two_gloo_processes(tiny_demo: Path, tmp_path: Path) -> None:
    """Data-parallel training: both ranks end with the same weights, each trained on its own half of the cases."""
    out = tmp_path / "ddp"
    datalist = sharded_datalist(tiny_demo, tmp_path / "data")
    probe = probe_config(
        tmp_path / "probe.json",
        CONFIGS / "train.json",
        "@train#trainer",
        {"network": "@network", "discriminator": "@discriminator"},
    )
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json"), str(probe)]
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "monai.bundle",
        "run",
        "--bundle_root",
        str(BUNDLE),
        "--config_file",
        "[" + ",".join(f"'{f}'" for f in files) + "]",
        "--datalist",
        str(datalist),
        "--output_dir",
        str(out),
        *TINY_TRAIN,
        "--iter_num",
        "4",
        "--max_epochs",
        "1",
        "--adv_start",
        "1",
        "--batch_size",
        "1",
        "--progress",
        "false",
        "--save_every",
        "4",
    ]
    proc = run_bundle(cmd, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert text.count("VQGANTrainer - INFO - Engine run finished") == 2  # both ranks trained
    assert text.count("checkpoint_last.pt at iteration 4") == 1  # only rank 0 writes
    check_ranks(out, iterations=4, networks=("network", "discriminator"))
    assert torch.load(out / "checkpoint_last.pt", weights_only=True)["trainer"]["iteration"] == 4
    assert (out / "model.pt").is_file()


# ---- inference -----------------------------------------------------------------------------------
def odd_ct(path: Path) -> Path:
    """A 67 x 70 x 45 int16 CT in LPS orientation with an offset origin."""
    rng = np.random.default_rng(0)
    hu = np.full((67, 70, 45), -1000.0)
    hu[8:60, 10:62, 4:42] = 40 + rng.normal(0, 15, (52, 52, 38))
    hu[25:40, 30:45, 15:30] = 150
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [33.0, 41.0, -20.0]
    nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), affine), str(path))
    return path


@pytest.mark.slow
def test_inference_reconstructs_an_odd_sized_ct_tile_by_tile(tmp_path: Path) -> None:
    ct = odd_ct(tmp_path / "ct.nii.gz")
    before = hashlib.sha256(ct.read_bytes()).hexdigest()
    torch.manual_seed(0)
    torch.save(tiny_vqvae().state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    cmd = bundle_cmd(
        ["inference.json"],
        "--image",
        str(ct),
        "--weights",
        str(tmp_path / "model.pt"),
        "--output_dir",
        str(out),
        *TINY_NET,
        "--roi_size",
        "[48,48,48]",
        "--ssim_slab",
        "8",
    )
    proc = run_bundle(cmd, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hashlib.sha256(ct.read_bytes()).hexdigest() == before  # input untouched

    src, rec = nib.load(str(ct)), nib.load(str(out / "ct_recon.nii.gz"))
    assert rec.shape == (67, 70, 45)
    assert np.allclose(rec.affine, src.affine) and rec.get_data_dtype() == np.int16

    report = json.loads((out / "report.json").read_text())
    (case,) = report["cases"]
    assert case["case"] == "ct" and Path(case["reconstruction"]) == out / "ct_recon.nii.gz"
    # the report's metrics are those of the written reconstruction (1 mm input: same voxels, reoriented)
    x = torch.as_tensor(hu_to_unit(src.get_fdata().astype(np.float32)))[None, None]
    y = torch.as_tensor(hu_to_unit(rec.get_fdata().astype(np.float32)))[None, None]
    assert case["psnr"] == pytest.approx(float(PSNRMetric(1.0)(y, x)), abs=0.05)
    assert case["ssim"] == pytest.approx(float(SSIMMetric(3, data_range=1.0)(y, x)), abs=0.01)
    assert report["mean"] == {"psnr": case["psnr"], "ssim": case["ssim"]}


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors_without_output(tmp_path: Path) -> None:
    ct = odd_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    missing_weights = run_bundle(
        bundle_cmd(
            ["inference.json"], "--image", str(ct), "--weights", str(tmp_path / "none.pt"), "--output_dir", str(out)
        ),
        tmp_path,
    )
    assert missing_weights.returncode == 1
    assert (
        missing_weights.stderr.strip().splitlines()[-1]
        == f"error: {tmp_path / 'none.pt'}: VQ-GAN weights file not found; set weights to a trained model.pt "
        "(each training run writes <output_dir>/model.pt)"
    )
    assert "Traceback" not in missing_weights.stderr and not out.exists()

    missing_list = run_bundle(
        bundle_cmd(["train.json"], "--datalist", str(tmp_path / "none.json"), "--output_dir", str(out)), tmp_path
    )
    assert missing_list.returncode == 1
    assert missing_list.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'none.json'}: file not found"
    assert "Traceback" not in missing_list.stderr and not out.exists()


def test_metadata_verifies_against_the_monai_schema() -> None:
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))  # raises on any error
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    bad = dict(meta, version=None)
    bad_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"vqgan_bad_meta_{os.getpid()}.json"
    bad_file.write_text(json.dumps(bad))
    try:
        with pytest.raises(ValueError, match=r"None is not of type 'string'[\s\S]*Failed validating"):
            verify_metadata(meta_file=str(bad_file), filepath=str(SCHEMA))
    finally:
        bad_file.unlink()


def test_configs_select_presets_by_one_key() -> None:
    from monai.bundle import ConfigParser

    for preset, crop, channels in (("cpu", [64, 64, 64], (32, 64)), ("paper", [128, 128, 128], (96, 96))):
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "train.json"))
        parser["preset"] = preset
        assert parser.get_parsed_content("crop_size") == crop
        assert parser.get_parsed_content("network_def").channels == channels
        assert parser.get_parsed_content("iter_num") == {"cpu": 100, "paper": 1000}[preset]


def test_configs_use_the_shared_setting_names() -> None:
    from monai.bundle import ConfigParser

    train = ConfigParser()
    train.read_config(str(CONFIGS / "train.json"))
    for key in ("datalist", "output_dir", "preset", "seed", "device", "max_epochs", "iter_num", "val_interval", "save_every",
                "finetune_from", "resume", "num_workers"):  # fmt: skip
        assert key in train.config, key
    inference = ConfigParser()
    inference.read_config(str(CONFIGS / "inference.json"))
    for key in ("output_dir", "weights", "device", "preset"):
        assert key in inference.config, key
    assert inference.get_parsed_content("weights") == "./models/model.pt"  # where shipped weights live


# ---- the bundle's scripts ------------------------------------------------------------------------
def test_chunked_ssim_equals_monai_ssim() -> None:
    scripts = load_scripts()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 20, 24, 70, generator=g)
    y = (x + 0.2 * torch.rand(x.shape, generator=g)).clamp(0, 1)
    expected = SSIMMetric(3, data_range=1.0)(y, x)
    got = scripts.inference.ChunkedSSIMMetric(3, data_range=1.0, slab=16)(y, x)
    assert torch.allclose(got, expected, atol=1e-5)


def _batches(n: int, size: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.rand(1, 1, size, size, size, generator=g)} for _ in range(n)]


def test_trainer_switches_the_adversarial_terms_on_after_warm_up() -> None:
    from ignite.engine import Events

    scripts = load_scripts()
    torch.manual_seed(0)
    net = tiny_vqvae()
    disc = ae.build_discriminator("cpu", channels=8)
    d_opt = torch.optim.Adam(disc.parameters(), 1e-3)
    outputs, d_weights = [], []

    class Record:
        def attach(self, engine):
            engine.add_event_handler(
                Events.ITERATION_COMPLETED,
                lambda e: (
                    outputs.append(dict(e.state.output)),
                    d_weights.append([p.detach().clone() for p in disc.parameters()]),
                ),
            )

    trainer = scripts.trainer.VQGANTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=_batches(4),
        epoch_length=4,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        loss_function=torch.nn.L1Loss(),
        discriminator=disc,
        d_optimizer=d_opt,
        adv_weight=0.1,
        adv_start=2,
        perceptual_loss=torch.nn.MSELoss(),
        perceptual_weight=0.5,
        train_handlers=[Record()],
    )
    initial = [p.detach().clone() for p in disc.parameters()]
    trainer.run()
    assert [("g_adv_loss" in o, "d_loss" in o) for o in outputs] == [(False, False)] * 2 + [(True, True)] * 2
    assert all(torch.equal(a, b) for a, b in zip(initial, d_weights[1]))  # no discriminator update yet
    assert not all(torch.equal(a, b) for a, b in zip(d_weights[1], d_weights[3]))
    for o in outputs:  # the total is the weighted sum of the logged terms
        expected = o["recon_loss"] + o["quant_loss"] + 0.5 * o["perceptual_loss"] + 0.1 * o.get("g_adv_loss", 0.0)
        assert o["loss"] == pytest.approx(expected, rel=1e-5)
        assert set(scripts.trainer.loss_terms(o)) <= set(scripts.trainer.LOSS_TERMS)


def test_perceptual_loss_only_from_local_weights(tmp_path: Path) -> None:
    scripts = load_scripts()
    assert scripts.trainer.perceptual_loss(None) is None
    with pytest.raises(InputError, match=r"resnet\.pt: perceptual loss weights not found; set perceptual_weights"):
        scripts.trainer.perceptual_loss(tmp_path / "resnet.pt")
    weights = tmp_path / "resnet50.pt"
    if importlib.util.find_spec("torchvision") is None:
        weights.write_bytes(b"")
        with pytest.raises(LesionDiffusionError, match="needs torchvision"):
            scripts.trainer.perceptual_loss(weights)
    else:
        import torchvision

        torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
        loss = scripts.trainer.perceptual_loss(weights)
        x = torch.rand(1, 1, 16, 16, 16)
        assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)


def test_training_cases_hold_out_validation_and_check_files(tiny_demo: Path, tmp_path: Path, write_nifti) -> None:
    scripts = load_scripts()
    train, val = scripts.data.training_cases(tiny_demo / "datalist.json", val_fraction=0.5, seed=0)
    assert len(train) == len(val) == 1 and train != val
    assert set(train[0]) == {"image", "label"} and Path(train[0]["image"]).is_file()
    # the original's list files work the same way
    assert scripts.data.training_cases(tiny_demo, val_fraction=0.5, seed=0) == (train, val)

    image = write_nifti("a/image.nii.gz", np.zeros((8, 8, 8), np.int16))
    label = write_nifti("a/label.nii.gz", np.zeros((8, 8, 6), np.uint8))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": str(image), "label": str(label)}]}))
    with pytest.raises(
        InputError, match=r"label\.nii\.gz: label shape \(8, 8, 6\) differs from the image's \(8, 8, 8\)"
    ):
        scripts.data.training_cases(datalist)
    datalist.write_text(json.dumps({"training": [{"image": str(image)}]}))
    with pytest.raises(InputError, match="case has no 'label'"):
        scripts.data.training_cases(datalist)


def test_inference_cases_name_outputs_uniquely(tiny_demo: Path) -> None:
    scripts = load_scripts()
    datalist = tiny_demo / "datalist.json"
    items = scripts.data.inference_cases(datalist=datalist, split="training")
    assert [i["case"] for i in items] == ["Bladder_cancer_image", "Liver_cancer_image"]
    assert all(i["source"] == i["image"] for i in items)
    with pytest.raises(LesionDiffusionError, match="either --image"):
        scripts.data.inference_cases()
    with pytest.raises(InputError, match="no cases under 'testing'"):
        scripts.data.inference_cases(datalist=datalist)
