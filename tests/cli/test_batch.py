"""Batch synthesis across processes (``torchrun -m lesiondiffusion synthesize --requests``, gloo on CPU).

Real runs of the whole chain with the shipped weights on the small real CT (one DDIM step per network):
two processes give the same files as one; a failed case on one rank does not stop the others; a batch
killed with SIGKILL mid-case, then rerun with ``--resume``, ends with every case complete, verified
against the hashes in ``summary.json``, and the finished case kept, not redone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lesiondiffusion.batch import Ranks, case_files
from lesiondiffusion.data_paths import REPO_ROOT

TS_SMALL = REPO_ROOT / "tests" / "data" / "ts_small"
COMPARED = ("image.nii.gz", "label.nii.gz", "organ_seg.nii.gz", "report.json")  # provenance holds timings


def requests_file(folder: Path, bad: bool) -> Path:
    common = {"image": str(TS_SMALL / "example_ct_sm.nii.gz"), "organ_seg": str(TS_SMALL / "example_seg.nii.gz")}
    entries = [
        {
            "case": "c0",
            **common,
            "attributes": {"organ type": "liver", "lesion type": "cyst", "density": "hypodense", "size": "15 mm"},
        },
        {
            "case": "c1",
            **common,
            "attributes": {"organ type": "liver", "lesion type": "tumor", "density": "hyperdense", "size": "12 mm"},
        },
    ]
    if bad:
        entries.append(
            {
                "case": "bad",
                "image": str(folder / "missing.nii.gz"),
                "attributes": {"organ type": "liver", "lesion type": "cyst"},
            }
        )
    path = folder / ("requests_bad.json" if bad else "requests.json")
    path.write_text(json.dumps({"organ_seg_version": "v2", "requests": entries}))
    return path


def command(requests: Path, out: Path, *extra: str, nproc: int | None = None) -> list[str]:
    synth = [
        "-m",
        "lesiondiffusion",
        "synthesize",
        "--requests",
        str(requests),
        "--out",
        str(out),
        "--steps",
        "1",
        *extra,
    ]
    if nproc is None:
        return [sys.executable, *synth]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(29500 + nproc + os.getpid() % 500),
        *synth,
    ]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def hashes(out: Path, case: str) -> dict[str, str]:
    files = case_files(out / case)
    return {k: files[k] for k in COMPARED}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("batch")
    out = tmp / "out2"
    run = subprocess.run(
        command(requests_file(tmp, bad=True), out, nproc=2), env=env(), capture_output=True, text=True, timeout=900
    )
    return {"tmp": tmp, "out": out, "run": run}


def test_shards_are_disjoint_and_cover_the_batch() -> None:
    items = list(range(7))
    shards = [Ranks(r, 3).shard(items) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]


def test_two_processes_write_every_case_and_a_failure_stays_alone(two_ranks: dict) -> None:
    run, out = two_ranks["run"], two_ranks["out"]
    assert run.returncode != 0  # the bad case fails the batch, after the others are written
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["c0", "c1", "bad"]
    assert summary["world_size"] == 2 and summary["succeeded"] == 2 and summary["failed"] == 1
    by_case = {c["case"]: c for c in summary["cases"]}
    assert {by_case["c0"]["rank"], by_case["bad"]["rank"], by_case["c1"]["rank"]} == {0, 1}
    assert "missing.nii.gz" in by_case["bad"]["error"] and not (out / "bad").exists()
    for case in ("c0", "c1"):
        assert case_files(out / case) == by_case[case]["files"]  # the recorded hashes are the files'
    assert sorted(p.name for p in out.iterdir()) == ["c0", "c1", "summary.json"]  # no work or rank records left


def test_one_process_then_sigkill_then_resume_matches_two(two_ranks: dict) -> None:
    tmp, reference = two_ranks["tmp"], two_ranks["out"]
    requests, out = requests_file(tmp, bad=False), tmp / "out1"
    proc = subprocess.Popen(
        command(requests, out), env=env(WORLD_SIZE="1", RANK="0"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while not (out / "c0").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # well inside the second case
    assert proc.poll() is None, "the batch ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "c0").is_dir() and not (out / "c1").exists() and not (out / "summary.json").exists()
    kept = case_files(out / "c0")
    (out / "c1").mkdir()  # what a half-written case would look like if it were not renamed into place whole
    (out / "c1" / "image.nii.gz").write_bytes(b"partial")

    refused = subprocess.run(
        command(requests, out), env=env(WORLD_SIZE="1", RANK="0"), capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1 and "--resume" in refused.stderr
    resumed = subprocess.run(
        command(requests, out, "--resume", "true", nproc=1), env=env(), capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    by_case = {c["case"]: c for c in summary["cases"]}
    assert summary["succeeded"] == 2 and by_case["c0"].get("skipped") and not by_case["c1"].get("skipped")
    assert case_files(out / "c0") == kept  # verified, not redone
    for case in ("c0", "c1"):
        assert case_files(out / case) == by_case[case]["files"]
        assert hashes(out, case) == hashes(reference, case)  # one process gives what two gave
