"""The LINet bundle run as users run it: ``python -m monai.bundle run`` (and torchrun) in subprocesses.

A tiny configuration (32^3 crops, 16/16/32 channels, a randomly initialised ``cpu`` VQ-GAN saved to disk)
trains on the demo phantom, is killed and resumed, trains with two gloo processes, and inpaints lesions
through a manifest built directly from demo case files: the demo case as it is (LPS, 2 mm, int16), a case
in another orientation with anisotropic spacing stored as scaled uint16, and a float32 volume smaller
than the crop. Runs whose process is not what is checked (one of the two inference runs, error messages
after the first) go through the same configs in this process (``tests/in_process.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from in_process import error_line, overrides_of
from monai.data import MetaTensor
from PIL import Image

from lesiondiffusion import autoencoder as ae
from lesiondiffusion.geometry import record_geometry, standardise, write_geometry
from lesiondiffusion.manifest import CaseEntry, LesionEntry, Manifest, read_manifest, write_manifest
from lesiondiffusion.networks import linet as linet_net
from lesiondiffusion.paste import outside_margin
from lesiondiffusion.pipelines import linet as linet_pipeline
from lesiondiffusion.placement import Box
from lesiondiffusion.transforms import CTIntensityMap
from lesiondiffusion_tools.bundle_runner import run_bundle_in_process

from ddp_probe import check_ranks, probe_config, sharded_datalist

ROOT = Path(__file__).resolve().parents[2]
LINET = ROOT / "bundles" / "linet"
SCHEMA = ROOT / "lesiondiffusion" / "resources" / "meta_schema_20240725.json"
TINY = [
    "--crop_size", "[32,32,32]",
    "--channels", "[16,16,32]",
    "--norm_num_groups", "8",
    "--num_head_channels", "8",
    "--condition_dim", "16",
    # the noise objective: its loss does not scale with the sampled timestep as the velocity's does, so
    # that 24 iterations show the fall (the default v_prediction runs end to end in test_synthesize.py)
    "--prediction_type", "epsilon",
]  # fmt: skip
TRAIN = [*TINY, "--lr", "0.001", "--log_every", "1", "--num_workers", "0"]
LOSS = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- train_loss: ([0-9.]+)")
MARGIN_MM = 3.0
# one thread per process: two spinning OpenMP threads per run on a shared 2-core machine cost 10-20x
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


def command(config: str | list[str], *args: str, torchrun: bool = False) -> list[str]:
    configs = config if isinstance(config, str) else "[" + ",".join(f"'{c}'" for c in config) + "]"
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
        if torchrun
        else [sys.executable]
    )
    return [*launcher, "-m", "monai.bundle", "run", "--config_file", configs, *args]


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Run ``cmd`` in the bundle root in its own process group, so that a hung run can be ended whole."""
    return subprocess.Popen(cmd, cwd=LINET, env=ENV, text=True, start_new_session=True, **kwargs)


def bundle_run(
    config: str | list[str], *args: str, torchrun: bool = False, timeout: int = 300
) -> subprocess.CompletedProcess:
    cmd = command(config, *args, torchrun=torchrun)
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
        out, err = proc.communicate()
        raise AssertionError(f"no result after {timeout} s: {err[-2000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def losses(log: str) -> dict[int, float]:
    """{global iteration: train loss} from the StatsHandler lines."""
    return {(int(e) - 1) * int(n) + int(i): float(v) for e, i, n, v in LOSS.findall(log)}


def one_error_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr + run.stdout
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def vqgan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised ``cpu``-preset VQ-GAN state dict on disk (what ``vqgan_weights`` takes)."""
    path = tmp_path_factory.mktemp("vqgan") / "model.pt"
    torch.manual_seed(0)
    torch.save(ae.build_vqvae("cpu").state_dict(), path)
    return path


# ---- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_demo: Path, vqgan: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("linet") / "models"
    run = bundle_run(
        "configs/train.json", "--datalist", str(tiny_demo / "datalist.json"), "--vqgan_weights", str(vqgan),
        "--output_dir", str(out), "--iter_num", "12", "--max_epochs", "2", "--val_fraction", "0.5", *TRAIN,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return {"out": out, "log": run.stdout + run.stderr}


def test_the_trainer_carries_its_handlers_from_the_config(tiny_demo, vqgan, tmp_path):
    """EMA, progress bar and validation are train handlers declared in ``handlers`` (``_disabled_`` off
    rank 0), attached by the trainer itself; the checkpoint handlers are attached by ``run``."""
    from ignite.engine import Events
    from ignite.handlers import EMAHandler, ProgressBar
    from monai.bundle import ConfigParser

    def attached(trainer, kind):
        return {
            type(getattr(h, "__self__", h))
            for event in trainer._event_handlers
            for h, *_ in trainer._event_handlers[event]
        } & {kind}

    for rank0 in (True, False):
        parser = ConfigParser()
        parser.read_config(str(LINET / "configs" / "train.json"))
        parser.update({"bundle_root": str(LINET), "datalist": str(tiny_demo / "datalist.json"), "vqgan_weights": str(vqgan),
                       "output_dir": str(tmp_path), "num_workers": 0, "is_rank0": rank0, "crop_size": [32, 32, 32]})  # fmt: skip
        trainer = parser.get_parsed_content("train#trainer")
        assert attached(trainer, EMAHandler), "the EMA is updated on every rank"
        assert bool(attached(trainer, ProgressBar)) == rank0
        assert trainer.has_event_handler(parser.get_parsed_content("ema")._update_ema_model, Events.ITERATION_COMPLETED)
        # no checkpoint yet: no loader; the two savers on rank 0 only
        assert len(parser.get_parsed_content("checkpoint_handlers")) == (2 if rank0 else 0)


def test_training_runs_and_the_loss_falls(trained):
    record = losses(trained["log"])
    assert sorted(record) == list(range(1, 25))  # 2 epochs of iter_num=12, independent of the 1 training case
    values = [record[i] for i in range(1, 25)]
    assert np.mean(values[-6:]) < 0.9 * np.mean(values[:6]), values
    assert "val_loss" in trained["log"]  # validation ran on the held-out case
    state = torch.load(trained["out"] / "checkpoint_last.pt", weights_only=True)
    assert set(state) == {"network", "optimizer", "trainer", "ema"}
    assert state["trainer"]["iteration"] == 24 and state["trainer"]["epoch_length"] == 12
    # model.pt: the EMA network's plain state dict, the file inference's `weights` takes
    model = torch.load(trained["out"] / "model.pt", weights_only=True)
    assert set(model) == set(state["ema"]) and all(torch.equal(model[k], state["ema"][k]) for k in model)
    assert any(not torch.equal(model[k], state["network"][k]) for k in model if model[k].is_floating_point())
    assert not any(k.startswith("autoencoder") for k in model)  # the frozen VQ-GAN is not part of it
    assert set(torch.load(trained["out"] / "model_best.pt", weights_only=True)) == set(
        model
    )  # best EMA by val_loss, plain too
    assert list((trained["out"] / "tensorboard").glob("events.out.tfevents.*"))


def test_killed_training_resumes_from_its_last_checkpoint(tiny_demo, vqgan, tmp_path):
    out = tmp_path / "run"
    cmd = command(
        "configs/train.json", "--datalist", str(tiny_demo / "datalist.json"), "--vqgan_weights", str(vqgan),
        "--output_dir", str(out), "--iter_num", "6", "--max_epochs", "2", "--save_every", "3", *TRAIN,
    )  # fmt: skip
    proc = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for line in proc.stdout:
            m = LOSS.search(line)
            if m and (int(m[1]) - 1) * 6 + int(m[2]) >= 4:  # iteration 3's checkpoint is on disk
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no handler runs, nothing is flushed
        proc.wait(60)
    done = torch.load(out / "checkpoint_last.pt", weights_only=True)["trainer"]["iteration"]
    assert 3 <= done < 12 and done % 3 == 0

    resumed = bundle_run("configs/train.json", *cmd[cmd.index("configs/train.json") + 1 :])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"Restored all variables from {out / 'checkpoint_last.pt'}" in log
    assert sorted(losses(log)) == list(range(done + 1, 13))  # the iteration count goes on
    final = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 12
    assert {float(s["step"]) for s in final["optimizer"]["state"].values()} == {12.0}  # the optimiser was restored


def test_two_process_ddp_on_gloo(tiny_demo, vqgan, tmp_path):
    """Data-parallel training: both ranks end with the same weights, each trained on its own half of the cases."""
    out = tmp_path / "ddp"
    datalist = sharded_datalist(tiny_demo, tmp_path / "data")
    probe = probe_config(
        tmp_path / "probe.json", LINET / "configs" / "train.json", "@train#trainer", {"network": "@network"}
    )
    run = bundle_run(
        ["configs/train.json", "configs/multi_gpu_train.json", str(probe)],
        "--datalist", str(datalist), "--vqgan_weights", str(vqgan), "--output_dir", str(out),
        "--iter_num", "4", "--max_epochs", "1", "--batch_size", "1", *TRAIN, torchrun=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert len(losses(log)) == 4  # rank 0 logs; the other stays quiet
    assert log.count("SupervisedTrainer - INFO - Engine run finished") == 2  # both ranks trained
    check_ranks(out, iterations=4)
    state = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 4
    assert not any(k.startswith("module.") for k in state["network"])
    assert set(torch.load(out / "model.pt", weights_only=True)) == set(state["ema"])


def test_bad_training_inputs_are_one_line_errors(vqgan, tmp_path):
    args = {"datalist": str(tmp_path / "none.json"), "vqgan_weights": str(vqgan), "output_dir": str(tmp_path / "t")}
    line = error_line("linet", args, ("train.json",))
    assert "none.json" in line and "datalist" in line, line
    assert not (tmp_path / "t").exists()


# ---- inference -----------------------------------------------------------------------------------
def _save(
    path: Path, array: np.ndarray, affine: np.ndarray, slope: float | None = None, inter: float | None = None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


def make_case(
    folder: Path,
    name: str,
    stored: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    report: dict,
    organ_id: int,
    slope: float = 1.0,
    inter: float = 0.0,
    with_label_original: bool = True,
) -> CaseEntry:
    """What preprocess + LMNet leave for one case: the user's CT, its standardised copy, the label maps."""
    source = _save(folder / "inputs" / f"{name}.nii.gz", stored, affine, slope, inter)
    hu = stored.astype(np.float64) * slope + inter
    std = standardise(MetaTensor(torch.as_tensor(hu, dtype=torch.float32)[None], affine=torch.as_tensor(affine)))
    std_label = standardise(
        MetaTensor(torch.as_tensor(label, dtype=torch.float32)[None], affine=torch.as_tensor(affine)), mode="nearest"
    )
    std_affine = np.asarray(std.affine, dtype=np.float64)
    lesion = np.asarray(std_label[0]) == 2
    case = folder / name
    image = _save(case / "image.nii.gz", np.asarray(std[0], dtype=np.float32), std_affine)
    organ_seg = _save(case / "organ_seg.nii.gz", (np.asarray(std_label[0]) > 0).astype(np.uint8) * organ_id, std_affine)
    label_std = _save(case / "label.nii.gz", np.asarray(std_label[0]).astype(np.uint8), std_affine)
    label_original = (
        _save(case / "label_original.nii.gz", label.astype(np.uint8), affine) if with_label_original else None
    )
    geometry = write_geometry(case / "geometry.json", record_geometry(source, std_affine, lesion.shape))
    (case / "lesion_0.json").write_text(json.dumps(report))
    idx = np.argwhere(lesion)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    box = Box(tuple((lo + hi) // 2), tuple(hi - lo))
    lesion_entry = LesionEntry(organ_id, "within the parenchymal organ", case / "lesion_0.json", box)
    return CaseEntry(name, source_image=source, geometry=geometry, image=image, organ_seg=organ_seg, lesions=(lesion_entry,),
                     label=label_std, label_original=label_original)  # fmt: skip


def with_attributes(report: dict, **changes: str) -> dict:
    out = json.loads(json.dumps(report))
    for entry in out.values():
        entry[2].update(changes)
    return out


def build_manifest(folder: Path, demo: Path, report_changes: dict[str, str] | None = None) -> Path:
    """Three cases: the demo as it is, reoriented + anisotropic + scaled uint16, and smaller than the crop."""
    liver = demo / "cases" / "Liver_cancer"
    img = nib.load(liver / "image.nii.gz")
    report = json.loads((liver / "type.json").read_text())
    organ_id = int(next(iter(report)))
    demo_report = with_attributes(report, **(report_changes or {}))
    cases = [
        make_case(
            folder,
            "demo",
            np.asarray(img.dataobj).astype(np.int16),
            np.asarray(nib.load(liver / "label.nii.gz").dataobj),
            img.affine,
            demo_report,
            organ_id,
        )
    ]

    bladder = demo / "cases" / "Bladder_cancer"
    hu = np.asarray(nib.load(bladder / "image.nii.gz").dataobj).astype(np.int32)
    label = np.asarray(nib.load(bladder / "label.nii.gz").dataobj)
    # array axes (k, i, j) reversed along the first: axis 0 -> superior 3 mm, axis 1 -> left 1.5 mm, axis 2 -> anterior 2 mm
    hu, label = np.transpose(hu, (2, 0, 1))[::-1].copy(), np.transpose(label, (2, 0, 1))[::-1].copy()
    affine = np.array([[0.0, -1.5, 0.0, 30.0], [0.0, 0.0, 2.0, -50.0], [-3.0, 0.0, 0.0, 70.0], [0.0, 0.0, 0.0, 1.0]])
    b_report = json.loads((bladder / "type.json").read_text())
    stored = (hu + 1024).astype(np.uint16)  # HU = stored - 1024 through the NIfTI scaling
    cases.append(
        make_case(folder, "aniso", stored, label, affine, b_report, int(next(iter(b_report))), slope=1.0, inter=-1024.0)
    )

    rng = np.random.default_rng(0)
    small = (40.0 + rng.normal(0, 10, (20, 18, 16))).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in small.shape], indexing="ij"), axis=-1)
    ball = np.linalg.norm(grid - np.array([10, 9, 8]), axis=-1) <= 4
    small[ball] = 5.0
    small_label = np.where(ball, 2, 1).astype(np.uint8)
    cases.append(
        make_case(
            folder,
            "small",
            small,
            small_label,
            np.diag([1.0, 1.0, 1.0, 1.0]),
            report,
            organ_id,
            with_label_original=False,
        )
    )
    return write_manifest(folder / "manifest.json", Manifest(tuple(cases)))


def infer(
    manifest: Path, weights: Path | None, vqgan: Path | None, out: Path | None, *extra: str
) -> subprocess.CompletedProcess:
    given = [*(["--weights", str(weights)] if weights else []), *(["--vqgan_weights", str(vqgan)] if vqgan else [])]
    where = ["--output_dir", str(out)] if out else []
    return bundle_run(
        "configs/inference.json",
        "--manifest",
        str(manifest),
        *given,
        *where,
        "--steps",
        "3",
        "--margin_mm",
        str(MARGIN_MM),
        *TINY,
        *extra,
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inferred(tiny_demo: Path, trained: dict, vqgan: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two runs with the same seed; the second manifest's demo report asks for a dense lesion."""
    root = tmp_path_factory.mktemp("linet_inf")
    a = build_manifest(root / "a", tiny_demo)
    b = build_manifest(
        root / "b",
        tiny_demo,
        {"density": "hyperdense lesion,", "CT value": "Mean density of the lesion region is approximately 190 HU,"},
    )
    # b also lists a case whose source image changed since preprocessing: it must fail alone
    cases = read_manifest(b).cases
    other = _save(root / "other.nii.gz", np.zeros((5, 5, 5), np.int16), np.eye(4))
    write_manifest(b, Manifest((*cases[:2], replace(cases[2], case="broken", source_image=other), cases[2])))
    sources = {p: digest(p) for p in (root / "a" / "inputs").iterdir()}
    # a in this process (the same config and overrides), b as its own process
    given = {
        "weights": str(trained["out"] / "model.pt"),
        "vqgan_weights": str(vqgan),
        "steps": 3,
        "margin_mm": MARGIN_MM,
    }
    run_bundle_in_process(
        "linet", {"manifest": str(a), "output_dir": str(root / "out_a"), **given, **overrides_of(TINY)}
    )
    run_b = infer(b, trained["out"] / "model.pt", vqgan, root / "out_b")
    runs = {name: read_manifest(root / f"out_{name}" / "manifest.json") for name in "ab"}
    return {
        "root": root,
        "sources": sources,
        "a": runs["a"],
        "b": runs["b"],
        "inputs": read_manifest(a),
        "run_b": run_b,
    }


def stored(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asarray(img.dataobj.get_unscaled()), img


def test_inference_changes_only_the_lesion_neighbourhood(inferred):
    for _source_case, case in zip(inferred["inputs"].cases, inferred["a"].cases):
        assert case.ok and case.synthetic_image == inferred["root"] / "out_a" / case.case / "synthetic.nii.gz"
        before, src = stored(case.source_image)
        after, out = stored(case.synthetic_image)
        # the input's own grid, dtype and scaling
        assert (
            after.shape == before.shape and after.dtype == before.dtype == src.get_data_dtype() == out.get_data_dtype()
        )
        assert np.array_equal(out.affine, src.affine) and nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
        assert np.allclose(out.header.get_zooms(), src.header.get_zooms())
        assert out.dataobj.slope == src.dataobj.slope and out.dataobj.inter == src.dataobj.inter
        lesion = np.asarray(nib.load(case.label_original).dataobj) == 2
        far = outside_margin(lesion, src.affine, MARGIN_MM)
        assert far.sum() > 0.5 * far.size
        assert np.array_equal(after[far], before[far])  # bit-identical beyond the margin
        changed = after[lesion] != before[lesion]
        assert changed.mean() > 0.5, (case.case, changed.mean())  # the lesion was repainted
    assert {p: digest(p) for p in inferred["sources"]} == inferred["sources"]  # inputs untouched


def test_inference_manifest_label_map_and_preview(inferred, vqgan):
    out = inferred["root"] / "out_a"
    by_name = {c.case: c for c in inferred["a"].cases}
    # LMNet's label map is kept; a manifest without one gets it written on the input grid
    assert by_name["demo"].label_original.resolve() == inferred["root"] / "a" / "demo" / "label_original.nii.gz"
    small = by_name["small"]
    assert small.label_original == out / "small" / "label_original.nii.gz"
    label = nib.load(small.label_original)
    assert label.shape == (20, 18, 16) and np.array_equal(label.affine, nib.load(small.source_image).affine)
    values = np.asarray(label.dataobj)
    assert set(np.unique(values)) == {1, 2} and (values == 2).sum() == np.count_nonzero(
        np.linalg.norm(
            np.stack(np.meshgrid(*[np.arange(n) for n in (20, 18, 16)], indexing="ij"), axis=-1) - [10, 9, 8], axis=-1
        )
        <= 4
    )
    raw = json.loads((out / "manifest.json").read_text())["testing"]
    for entry, case in zip(raw, inferred["a"].cases):
        preview = out / entry["preview"]
        assert preview == out / case.case / "preview.png"
        with Image.open(preview) as png:
            assert png.format == "PNG" and png.size == (
                4 * 192,
                3 * 192,
            )  # 3 planes x (overview, before, after, outline)
        assert entry["linet"]["settings"]["steps"] == 3 and entry["linet"]["settings"]["sampler"] == "ddim"
        assert entry["linet"]["network_calls"] == 3 * len(entry["lesions"])  # one call per step and lesion, counted
        assert set(entry["linet"]["weights"]) == {"weights", "vqgan_weights"}
        assert entry["linet"]["weights"]["vqgan_weights"]["sha256"] == digest(vqgan)


def test_same_seed_same_output(inferred):
    a = {c.case: c for c in inferred["a"].cases}
    b = {c.case: c for c in inferred["b"].cases}
    for name in ("aniso", "small"):  # identical inputs in both runs
        assert np.array_equal(stored(a[name].synthetic_image)[0], stored(b[name].synthetic_image)[0])


def test_the_text_reaches_the_network(inferred):
    a = {c.case: c for c in inferred["a"].cases}["demo"]
    b = {c.case: c for c in inferred["b"].cases}["demo"]
    before, _ = stored(a.source_image)
    lesion = np.asarray(nib.load(a.label_original).dataobj) == 2
    sa, sb = stored(a.synthetic_image)[0], stored(b.synthetic_image)[0]
    assert not np.array_equal(sa[lesion], sb[lesion])  # same seed, same image: only the report differs
    far = outside_margin(lesion, nib.load(a.source_image).affine, MARGIN_MM)
    assert np.array_equal(sa[far], before[far]) and np.array_equal(sb[far], before[far])


def test_bad_inputs_are_one_line_errors_without_output(inferred, trained, vqgan, tmp_path):
    manifest = inferred["root"] / "a" / "manifest.json"
    line = one_error_line(infer(manifest, tmp_path / "missing.pt", vqgan, tmp_path / "o1"))  # a real process
    assert "missing.pt: LINet weights not found; pass --weights" in line

    def error(weights, vqgan_weights, out, manifest=manifest, **extra) -> str:
        given = {"weights": weights and str(weights), "vqgan_weights": vqgan_weights and str(vqgan_weights)}
        args = {"manifest": str(manifest), **given, "output_dir": str(out), "steps": 3, "margin_mm": MARGIN_MM}
        return error_line("linet", {**args, **overrides_of(TINY), **extra})

    # the default: the shipped weights under models/ (cpu preset), which do not fit the tiny network
    assert "models/model.pt: LINet weights do not fit this network" in error(None, vqgan, tmp_path / "o5")
    assert "none.pt: VQ-GAN weights not found; pass --vqgan_weights" in error(
        trained["out"] / "model.pt", tmp_path / "none.pt", tmp_path / "o2"
    )
    line = error(trained["out"] / "model.pt", vqgan, tmp_path / "o3", manifest=tmp_path / "nothing.json")
    assert "nothing.json: manifest not found" in line
    assert "sampler must be one of" in error(trained["out"] / "model.pt", vqgan, tmp_path / "o4", sampler="euler")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_a_case_with_a_changed_source_fails_alone(inferred):
    line = one_error_line(inferred["run_b"])
    assert "1 of 4 case(s) failed (broken: " in line and "no longer matches its geometry record" in line
    assert line.endswith(f"the others are in {inferred['root'] / 'out_b' / 'manifest.json'}")
    assert [c.status for c in inferred["b"].cases] == ["ok", "ok", "error", "ok"]
    assert all(c.synthetic_image.is_file() for c in inferred["b"].cases if c.ok)
    assert not (inferred["root"] / "out_b" / "broken").exists()


def test_metadata_verifies():
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(LINET / "configs" / "metadata.json"), filepath=str(SCHEMA))  # raises on any error


# ---- pieces --------------------------------------------------------------------------------------
def test_loss_is_l1_inside_the_mask_normalised_per_sample():
    train = linet_net
    pred = torch.zeros(2, 4, 4, 4, 4)
    target = torch.ones(2, 4, 4, 4, 4)
    weight = torch.zeros(2, 1, 4, 4, 4)
    weight[0, :, :2] = 1  # 32 voxels
    weight[1, :, :1, :1, :1] = 1  # 1 voxel
    loss = train.LINetLoss()(pred, torch.cat([target, weight], dim=1))
    assert torch.isclose(loss, torch.tensor(4.0), atol=1e-4)  # 4 channels x |0 - 1| per masked voxel, either sample
    outside = pred.clone()
    outside[:, :, 3] = 7.0  # errors outside the mask do not count
    assert torch.isclose(train.LINetLoss()(outside, torch.cat([target, weight], dim=1)), loss)


def test_latent_mask_covers_every_lesion_voxel():
    train = linet_net
    mask = torch.zeros(1, 1, 16, 16, 16)
    mask[0, 0, 5, 6, 7] = 1
    m = train.latent_mask(mask, 4)
    assert m.shape == (1, 1, 4, 4, 4) and m.sum() == 1 and m[0, 0, 1, 1, 1] == 1


def test_crop_window_grows_for_large_lesions_and_pads_beyond_the_volume():
    inpaint = linet_pipeline
    mask = np.zeros((20, 18, 16), bool)
    mask[8:12, 7:11, 6:10] = True
    start, size = inpaint.crop_window(mask, (32, 32, 32), 3, 16)
    assert size.tolist() == [32, 32, 32] and (start < 0).all()
    crop = inpaint.crop_padded(np.ones(mask.shape, np.float32), start, size, fill=-5.0)
    assert crop.shape == (32, 32, 32) and (crop == 1).sum() == mask.size and (crop == -5).sum() == 32**3 - mask.size
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32)[:, None, None], mask.shape)
    edged = inpaint.crop_padded(ramp, start, size, edge=True)  # the image: nearest voxel beyond the scan, never air
    inside = tuple(slice(-a, -a + n) for a, n in zip(start, mask.shape))
    assert edged.shape == (32, 32, 32) and np.array_equal(edged[inside], ramp)
    assert (edged[: -start[0]] == 0).all() and (edged[-start[0] + 20 :] == 19).all()
    big = np.zeros((100, 100, 100), bool)
    big[10:60, 20:30, 30:35] = True
    start, size = inpaint.crop_window(big, (32, 32, 32), 8, 16)
    assert size.tolist() == [80, 32, 32] and start[0] <= 10 - 8 and start[0] + size[0] >= 60 + 8


def test_intensity_prior_fills_the_lesion_flat_at_its_mean_or_the_asked_value():
    train = linet_net
    to_unit, to_hu = CTIntensityMap(), CTIntensityMap(inverse=True)
    image = torch.as_tensor(to_unit(torch.linspace(-100, 100, 2 * 8**3).reshape(2, 1, 8, 8, 8)))
    mask = torch.zeros(2, 1, 8, 8, 8)
    mask[0, :, 2:5, 2:5, 2:5] = 1
    mask[1, :, 4:7, 1:3, 0:8] = 1
    own = train.intensity_prior(image, mask)
    asked = train.intensity_prior(image, mask, torch.tensor([30.0, -60.0]))
    for prior, values in ((own, [to_hu(image[i][mask[i] > 0]).mean() for i in range(2)]), (asked, [30.0, -60.0])):
        assert type(prior) is torch.Tensor and prior.shape == image.shape
        assert torch.equal(prior[mask == 0], image[mask == 0])  # nothing outside the mask changes
        for i, hu in enumerate(values):
            inside = torch.as_tensor(to_hu(prior[i][mask[i] > 0]))
            assert torch.allclose(inside, torch.full_like(inside, float(hu)), atol=1e-3)  # flat, at the value


def test_prepare_batch_diffuses_the_residual_over_the_prior_inside_the_mask(vqgan):
    train = linet_net
    from lesiondiffusion.diffusion import training_scheduler

    torch.manual_seed(0)
    autoencoder = train.frozen_autoencoder(str(vqgan), "cpu", "cpu")
    image = torch.rand(2, 1, 32, 32, 32) * 0.2 + 0.4
    mask = torch.zeros(2, 1, 32, 32, 32)
    mask[:, :, 10:20, 12:22, 8:18] = 1
    condition = torch.zeros(2, 10, 4)
    prepare = train.LatentPrepareBatch(training_scheduler("v_prediction"), autoencoder)
    x0, target, _, kwargs = prepare({"image": image, "label": mask, "condition": condition})
    z, prior = ae.encode(autoencoder, image), ae.encode(autoencoder, train.intensity_prior(image, mask))
    m = train.latent_mask(mask, 4)
    assert torch.allclose(x0, z - prior, atol=1e-5)  # what is diffused: the residual over the prior
    assert torch.allclose(kwargs["extra"], torch.cat([m, prior], dim=1), atol=1e-5)  # mask, then the prior latent
    assert torch.equal(kwargs["noise_mask"], m) and torch.equal(target[:, -1:], m)  # noised and weighted inside only
    assert torch.allclose(
        target[:, :-1], prepare.scheduler.get_velocity(x0, kwargs["noise"], kwargs["timesteps"]), atol=1e-5
    )


def test_prior_fill_meets_the_target_through_a_lossy_autoencoder(vqgan, monkeypatch):
    inpaint = linet_pipeline
    from lesiondiffusion.diffusion import DiffusionSampler

    inpainter = inpaint.LesionInpainter(
        torch.nn.Identity(), ae.load_vqvae(str(vqgan)), DiffusionSampler("ddim", 1, progress=False)
    )
    renders = []

    def lossy(image, lesion, fill):  # an autoencoder that gives back half the contrast to a 40 HU surrounding
        renders.append(fill)
        return 40.0 + 0.5 * (fill - 40.0)

    monkeypatch.setattr(inpainter, "_rendered_hu", lossy)
    image, lesion = torch.zeros(1, 1, 8, 8, 8), torch.ones(1, 1, 8, 8, 8)
    inpainter.calibration_rounds = 2
    fill = inpainter.prior_fill(image, lesion, 70.0)
    assert renders == [70.0, 85.0]  # two rounds: two encode-decode renders
    assert lossy(None, None, fill) == pytest.approx(70.0) and fill == pytest.approx(
        100.0
    )  # the response measured, then met
    inpainter.calibration_rounds = 1
    assert inpainter.prior_fill(image, lesion, 70.0) == pytest.approx(85.0)  # one step, one for one
    inpainter.calibration_rounds, inpainter.calibration_limit_hu = 2, 20.0
    assert inpainter.prior_fill(image, lesion, 70.0) == pytest.approx(90.0)  # never further than the limit
    inpainter.calibration_rounds = 0
    assert inpainter.prior_fill(image, lesion, 70.0) == 70.0 and inpainter.prior_fill(image, lesion, None) is None


def test_a_lesion_below_the_latent_resolution_is_painted_from_its_prior_without_the_networks(vqgan, monkeypatch):
    from lesiondiffusion.diffusion import DiffusionSampler

    inpainter = linet_pipeline.LesionInpainter(
        torch.nn.Identity(),
        ae.load_vqvae(str(vqgan)),
        DiffusionSampler("ddim", 1, progress=False),
        crop_size=(32, 32, 32),
    )
    f = inpainter.factor
    hu = np.random.default_rng(0).normal(40.0, 10.0, (48, 48, 48))
    small, large = np.zeros(hu.shape, bool), np.zeros(hu.shape, bool)
    small[20 : 20 + 2 * f - 1, 16:32, 16:32] = True  # one voxel short of two latent voxels along axis 0
    large[20 : 20 + 2 * f, 16:32, 16:32] = True
    assert inpainter.below_latent_resolution(small) and not inpainter.below_latent_resolution(large)
    assert not inpainter.below_latent_resolution(np.zeros(hu.shape, bool))

    def networks(*args, **kwargs):
        raise AssertionError("the networks ran")

    monkeypatch.setattr(inpainter, "inpaint_crop", networks)
    monkeypatch.setattr(inpainter, "ct_value", lambda condition: 95.0)
    patch, affine, _ = inpainter.inpaint_lesion(hu, np.eye(4), small.astype(np.float32), None, 0)
    start = np.rint(affine[:3, 3]).astype(int)
    window = tuple(slice(a, a + n) for a, n in zip(start, patch.shape))
    to_hu, to_unit = CTIntensityMap(inverse=True), CTIntensityMap()
    assert np.allclose(
        patch[small[window]], float(to_hu(to_unit(np.array([95.0], np.float32)))[0]), atol=0.05
    )  # the report's value
    assert np.allclose(patch[~small[window]], to_hu(to_unit(hu[window].astype(np.float32)))[~small[window]], atol=0.05)
    with pytest.raises(AssertionError, match="the networks ran"):
        inpainter.inpaint_lesion(hu, np.eye(4), large.astype(np.float32), None, 0)
    inpainter.min_latent_width = 0  # 0: always the networks
    with pytest.raises(AssertionError, match="the networks ran"):
        inpainter.inpaint_lesion(hu, np.eye(4), small.astype(np.float32), None, 0)


def test_a_lesion_painted_from_its_prior_gets_the_scans_noise_in_full(vqgan, tmp_path):
    from lesiondiffusion.diffusion import DiffusionSampler
    from lesiondiffusion.io import read_stored

    inpainter = linet_pipeline.LesionInpainter(
        torch.nn.Identity(), ae.load_vqvae(str(vqgan)), DiffusionSampler("ddim", 1, progress=False)
    )
    rng = np.random.default_rng(5)
    hu = 50.0 + 12.0 * rng.standard_normal((32, 32, 32))
    nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    original = read_stored(tmp_path / "ct.nii.gz")
    lesion = np.zeros(hu.shape, bool)
    lesion[12:19, 12:19, 12:19] = True
    patch = np.where(lesion, 90.0, hu)  # flat at the report's value, as a prior
    small = np.zeros(hu.shape, bool)
    small[12:17, 12:17, 12:17] = True  # narrower than two latent voxels on the networks' grid
    large = np.ones(hu.shape, bool)
    outs = [
        inpainter.paste_lesion(original, lesion, patch, np.eye(4), "well-defined margin", net, original.raw.copy())
        for net in (small, large)
    ]
    inner = np.zeros(hu.shape, bool)
    inner[14:17, 14:17, 14:17] = True
    spread = [float(np.std(out[inner].astype(float))) for out in outs]
    assert spread[0] > 0.6 * np.std(hu[inner])  # the prior's lesion carries the scan's noise
    assert spread[0] > 1.2 * spread[1]  # a network patch's flat edge would have read as noise already
    assert abs(np.median(outs[0][lesion].astype(float)) - 90.0) < 5.0


def test_mask_head_adds_a_dice_term_on_the_lesion_fraction_and_is_dropped_for_sampling(vqgan):
    train = linet_net
    from lesiondiffusion.diffusion import training_scheduler

    pred = torch.zeros(1, 5, 4, 4, 4)  # 4 latent channels + a mask logit
    target = torch.zeros(1, 4, 4, 4, 4)
    weight = torch.ones(1, 1, 4, 4, 4)
    fraction = torch.zeros(1, 1, 4, 4, 4)
    fraction[..., :2] = 1.0
    plain = train.LINetLoss()(pred[:, :4], torch.cat([target, weight], 1))
    with_head = train.LINetLoss(mask_head=True, dice_weight=2.0)(pred, torch.cat([target, weight, fraction], 1))
    expected_dice = train.dice_loss(torch.sigmoid(pred[:, 4:]), fraction)  # sigmoid(0) = 0.5 everywhere
    assert torch.isclose(expected_dice, torch.tensor(1.0 - 2 * 0.5 * 32 / (0.5 * 64 + 32)), atol=1e-5)
    assert torch.isclose(with_head, plain + 2.0 * expected_dice, atol=1e-6)
    # the prepare-batch appends the lesion's fraction per latent cell as the head's target
    autoencoder = train.frozen_autoencoder(str(vqgan), "cpu", "cpu")
    mask = torch.zeros(1, 1, 32, 32, 32)
    mask[..., 4:6, 4:8, 4:8] = 1  # half of one 4^3 cell's depth, one cell across
    prepare = train.LatentPrepareBatch(training_scheduler("v_prediction"), autoencoder, mask_head=True)
    _, target, _, _ = prepare(
        {"image": torch.rand(1, 1, 32, 32, 32), "label": mask, "condition": torch.zeros(1, 10, 4)}
    )
    assert target.shape[1] == 4 + 1 + 1 and torch.allclose(target[:, -1:], train.latent_fraction(mask, 4))
    assert target[0, -1, 1, 1, 1] == 0.5 and target[0, -1].sum() == 0.5
    # sampling sees the noise (velocity) channels only
    head = train.NoiseOnly(lambda x, timesteps, context=None, extra=None: torch.cat([x, x[:, :1] + 1], 1), 4)
    x = torch.randn(1, 4, 2, 2, 2)
    assert torch.equal(head(x, torch.tensor([1])), x)


def test_presets_switch_network_and_crop_by_one_key():
    from monai.bundle import ConfigParser

    for config in ("train.json", "inference.json"):
        sizes = {}
        for preset in ("cpu", "paper"):
            parser = ConfigParser()
            parser.read_config(str(LINET / "configs" / config))
            parser["preset"] = preset
            sizes[preset] = (
                parser.get_parsed_content("unet#channels"),
                parser.get_parsed_content("crop_size"),
                parser.get_parsed_content("unet#num_res_blocks"),
            )
        assert sizes["cpu"] == ([32, 64, 64], [64, 64, 64], 1)
        assert sizes["paper"] == ([128, 256, 512], [128, 128, 128], 2)  # the original's LINet
