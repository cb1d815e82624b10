"""The last checkpoint every network's trainer writes (atomically, at intervals, epoch ends and the end) and
the resume switch every ``train.json`` reads it back through."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine
from torch import nn

from lesiondiffusion.training import LastCheckpointSaver, resume_path


def test_last_checkpoint_is_replaced_atomically(tmp_path):
    model = nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    saver = LastCheckpointSaver(tmp_path, {"network": model}, epoch_level=False)
    saver.attach(engine)
    engine.run([0, 1, 2], max_epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pt"]
    assert torch.equal(
        torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["network"]["weight"], model.weight
    )
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = model  # a wrapped network is saved as the bare network's state dict
    LastCheckpointSaver(tmp_path, ddp, filename="model.pt")(engine)
    assert list(torch.load(tmp_path / "model.pt", weights_only=True)) == ["weight", "bias"]


def test_saves_at_the_interval_each_epoch_end_and_once_per_iteration(tmp_path, caplog):
    net = nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    LastCheckpointSaver(tmp_path, {"network": net, "trainer": engine}, interval=2, epoch_level=False).attach(engine)
    assert resume_path(tmp_path / "checkpoint_last.pt", True) is None  # nothing to resume from yet
    with caplog.at_level(logging.INFO, logger="lesiondiffusion.training"):
        engine.run([0] * 5, max_epochs=2)  # iterations 2, 4, 5 (epoch end), 6, 8, 10 (epoch end and run end)
    saved = [int(r.getMessage().rsplit(" ", 1)[1]) for r in caplog.records if r.getMessage().startswith("saved ")]
    assert saved == [2, 4, 5, 6, 8, 10]
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 10 and torch.equal(state["network"]["weight"], net.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]  # no temporary files left


def test_resume_path_only_when_asked_and_present(tmp_path, caplog):
    path = tmp_path / "checkpoint_last.pt"
    assert resume_path(path, True) is None
    path.write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger="lesiondiffusion.training"):
        assert resume_path(path, True) == resume_path(path, "true") == str(path)
    assert f"resuming from {path}" in caplog.text
    assert resume_path(path, False) is None and resume_path(path, "false") is None
