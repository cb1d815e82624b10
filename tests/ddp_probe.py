"""What each rank of a two-process training run trained on and ended with (the bundles' DDP tests).

Two halves. In the test: :func:`probe_config` writes an extra bundle config that makes every rank
load this file (by path) and call :func:`attach` before training; :func:`sharded_datalist` builds a
datalist of four distinct training cases; :func:`check_ranks` reads what the ranks left and asserts
data-parallel training: every rank ends with the same parameters (DistributedDataParallel averaged the
gradients; without it each rank would drift on its own data) and the ranks saw disjoint cases (the
distributed sampler shards the data; without it every rank draws from every case).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

PROBE = Path(__file__).resolve()
CASE_KEYS = ("image", "label", "report", "organ_seg")


# ---- inside the training processes ---------------------------------------------------------------
def attach(trainer: Any, networks: dict[str, Any], output_dir: str) -> None:
    """Record the cases this rank's data loader draws; at the end save them and this rank's parameters."""
    import torch
    import torch.distributed as dist
    from ignite.engine import Events

    rank = dist.get_rank()
    loader = trainer.data_loader
    sampler, data = loader.sampler, loader.dataset.data
    drawn: list[str] = []
    base = type(sampler)

    def recording_iter(self: Any) -> Any:
        for index in base.__iter__(self):
            drawn.append(Path(data[int(index)]["image"]).parent.name)
            yield index

    # the loader's batch sampler holds this very object: give it a class that notes every index it yields
    sampler.__class__ = type(f"Recording{base.__name__}", (base,), {"__iter__": recording_iter})

    @trainer.on(Events.COMPLETED)
    def save(engine: Any) -> None:
        states = {}
        for name, net in networks.items():
            module = getattr(net, "module", net)
            # parameters only: DDP averages gradients; buffers (norm statistics) follow each rank's last batch
            states[name] = {k: v.detach().cpu().clone() for k, v in module.named_parameters()}
        wrapped = {name: type(net).__name__ for name, net in networks.items()}
        record = {
            "drawn": drawn,
            "iterations": engine.state.iteration,
            "states": states,
            "wrapped": wrapped,
            "world": dist.get_world_size(),
        }
        os.makedirs(output_dir, exist_ok=True)
        torch.save(record, os.path.join(output_dir, f"probe_rank{rank}.pt"))


# ---- in the test ---------------------------------------------------------------------------------
def probe_config(path: Path, train_json: Path, trainer: str, networks: dict[str, str]) -> Path:
    """An extra config (given last) that attaches the probe before the bundle's own ``run`` steps.

    ``trainer`` and ``networks`` are config references (``"@train#trainer"``, ``{"network": "@network"}``).
    """
    config = json.loads(train_json.read_text())
    nets = "{" + ", ".join(f"{name!r}: {ref}" for name, ref in networks.items()) + "}"
    attach_step = f"$runpy.run_path({str(PROBE)!r})['attach']({trainer}, {nets}, @output_dir)"
    path.write_text(
        json.dumps({"imports": [*config["imports"], "$import runpy"], "run": [attach_step, *config["run"]]})
    )
    return path


def sharded_datalist(demo: Path, folder: Path) -> Path:
    """A datalist of four distinct training cases (the two demo cases, each twice under its own folder)
    and one validation case: two cases per rank, so the ranks' shards can be told apart."""
    training = []
    for copy in ("a", "b"):
        for case in ("Bladder_cancer", "Liver_cancer"):
            dst = folder / f"{case}_{copy}"
            shutil.copytree(demo / "cases" / case, dst)
            training.append({k: str(dst / Path(demo_file).name) for k, demo_file in _case_files(demo, case).items()})
    validation = [dict(training[0])]
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": training, "validation": validation}, indent=1))
    return path


def _case_files(demo: Path, case: str) -> dict[str, str]:
    datalist = json.loads((demo / "datalist.json").read_text())
    entry = next(e for e in datalist["training"] if f"/{case}/" in f"/{e['image']}")
    return {k: entry[k] for k in CASE_KEYS if k in entry}


def check_ranks(output_dir: Path, iterations: int, networks: tuple[str, ...] = ("network",)) -> list[dict[str, Any]]:
    """Assert identical weights on both ranks, every network wrapped in DDP, and disjoint data shards."""
    import torch

    ranks = [torch.load(output_dir / f"probe_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    for name in networks:
        a, b = ranks[0]["states"][name], ranks[1]["states"][name]
        assert set(a) == set(b)
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: ranks ended with different weights ({len(different)} of {len(a)} tensors)"
        assert all(r["wrapped"][name] == "DistributedDataParallel" for r in ranks), ranks[0]["wrapped"]
    cases = []
    for r in ranks:
        assert r["iterations"] == iterations and len(r["drawn"]) >= iterations, r["drawn"]
        cases.append(set(r["drawn"]))
    assert not cases[0] & cases[1], f"both ranks trained on {cases[0] & cases[1]}"
    assert all(1 <= len(c) <= 2 for c in cases), cases  # each rank draws from its own half of the four cases
    return ranks
