"""``lesiondiffusion train`` through the command line: ``--resume true`` after a killed run, ``--prepare``.

A tiny VQ-GAN (8/16 channels, 24^3 crops of the 2 mm demo phantom, real NIfTI files) trains for 2 epochs
of 6 iterations with a checkpoint every 3; the whole command is SIGKILLed once the first checkpoint is
written. The same command run again takes the dead run's lock over, restores the checkpoint and goes on
counting iterations from it; a fresh start of the same command (``--resume false``) counts from 1 and
ends with other weights.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lesiondiffusion.dataset import read_datalist
from lesiondiffusion.io import file_sha256, lock_file
from lesiondiffusion.report import read_report

from training_logs import loss_log

TINY_VQGAN = json.dumps({"vqgan": {
    "network_def#channels": [8, 16], "network_def#num_res_channels": [8, 16], "discriminator_def#channels": 8,
    "spacing": [2, 2, 2], "crop_size": [24, 24, 24], "num_workers": 0, "val_fraction": 0.5,
    "save_every": 3, "log_every": 1, "progress": False, "adv_start": 2,
}})  # fmt: skip
TOTAL = 12  # 2 epochs x 6 iterations


def train_cmd(datalist: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "lesiondiffusion_tools.cli", "train", "--stage", "vqgan", "--datalist", str(datalist),
            "--out", str(out), "--max_epochs", "2", "--iter_num", "6", "--seed", "0", "--resume", str(resume).lower(),
            "--bundle_overrides", TINY_VQGAN]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), timeout=600)


def kill_after_first_checkpoint(cmd: list[str]) -> str:
    """Run ``cmd`` in its own session; SIGKILL it and its bundle child once iteration 3 is saved."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(), start_new_session=True
    )
    seen = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if re.search(r"saved .*checkpoint_last\.pt at iteration 3\b", line):
                os.killpg(proc.pid, signal.SIGKILL)  # no handler runs, nothing is flushed or unlocked
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    return "".join(seen)


@pytest.mark.slow
def test_train_resume_true_after_a_kill_continues_from_the_last_checkpoint(tiny_demo: Path, tmp_path: Path) -> None:
    datalist = tiny_demo / "datalist.json"
    out = tmp_path / "weights"
    killed_log = kill_after_first_checkpoint(train_cmd(datalist, out, resume=True))
    assert sorted(loss_log(killed_log))[0] == 1
    saved = torch.load(out / "vqgan" / "checkpoint_last.pt", weights_only=True)
    done = saved["trainer"]["iteration"]
    assert 3 <= done < TOTAL and lock_file(out).exists()  # the dead run left its lock

    resumed = run(train_cmd(datalist, out, resume=True))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    log = resumed.stdout
    assert "taking over the lock" in log and f"resuming from {out / 'vqgan' / 'checkpoint_last.pt'}" in log
    assert sorted(loss_log(log)) == list(range(done + 1, TOTAL + 1))  # the iteration count goes on
    final = torch.load(out / "vqgan" / "checkpoint_last.pt", weights_only=True)
    assert final["trainer"]["iteration"] == TOTAL
    # the optimisers came back with the checkpoint: Adam counted the steps of both runs
    assert {float(s["step"]) for s in final["optimizer"]["state"].values()} == {float(TOTAL)}
    assert {float(s["step"]) for s in final["d_optimizer"]["state"].values()} == {float(TOTAL - 2)}
    model = torch.load(out / "vqgan" / "model.pt", weights_only=True)
    assert set(model) == set(final["autoencoder"])
    assert all(torch.equal(model[k], final["autoencoder"][k]) for k in model)
    assert any(not torch.equal(model[k], saved["autoencoder"][k]) for k in model)  # it trained on after the checkpoint
    assert not lock_file(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["weights"]

    # the same command without --resume starts over: iterations from 1, other weights at the end
    fresh_out = tmp_path / "fresh"
    fresh = run(train_cmd(datalist, fresh_out, resume=False))
    assert fresh.returncode == 0, fresh.stdout[-3000:]
    assert f"resuming from {fresh_out / 'vqgan' / 'checkpoint_last.pt'}" not in fresh.stdout
    assert sorted(loss_log(fresh.stdout)) == list(range(1, TOTAL + 1))
    fresh_model = torch.load(fresh_out / "vqgan" / "model.pt", weights_only=True)
    assert any(not torch.equal(model[k], fresh_model[k]) for k in model)


@pytest.mark.slow
def test_train_prepare_standardises_the_raw_cases_then_trains_on_them(tiny_demo: Path, tmp_path: Path) -> None:
    """``--prepare``: the preprocess bundle's train.json writes ``<out>/prepared`` (standardised cases, an
    extracted report each, a train/validation split), and the network trains on that datalist."""
    inputs = sorted(p for p in tiny_demo.rglob("*") if p.is_file())
    before = {p: file_sha256(p) for p in inputs}
    out = tmp_path / "weights"
    cmd = train_cmd(tiny_demo / "datalist.json", out, resume=False) + ["--prepare", "true"]
    cmd[cmd.index("--max_epochs") + 1], cmd[cmd.index("--iter_num") + 1] = "1", "2"
    done = run(cmd)
    assert done.returncode == 0, done.stdout[-3000:]
    prepared = read_datalist(out / "prepared" / "datalist.json")
    cases = prepared["training"] + prepared["validation"]
    assert [len(prepared["training"]), len(prepared["validation"])] == [1, 1]
    assert {c.image.parent.name for c in cases} == {"Bladder_cancer", "Liver_cancer"}
    for case in cases:
        assert case.image.is_relative_to(out / "prepared") and read_report(case.report).organ_ids
    assert sorted(loss_log(done.stdout)) == [1, 2]
    assert set(torch.load(out / "vqgan" / "model.pt", weights_only=True)) == set(
        torch.load(out / "vqgan" / "checkpoint_last.pt", weights_only=True)["autoencoder"]
    )
    assert {p: file_sha256(p) for p in inputs} == before  # the raw cases are only read
