"""Faults while writing: two runs into one ``--out``, SIGTERM and SIGKILL at random moments of ``synthesize``
and of training (each followed by a rerun), a full disk in the writer, and the output lock itself.

The runs are real ``lesiondiffusion`` processes on a 28 x 28 x 14 liver crop of ``tests/data/ts_small``
(about 20 s each with one sampling step); the kill moments are drawn from a seeded generator, as a fraction of
the length of a whole run measured first on the same machine, and printed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.io import OutputLock, atomic_dir, lock_file, output_lock, save_nifti, work_prefix, write_json

SMALL = Path(__file__).resolve().parents[1] / "data" / "ts_small"
ATTRIBUTES = json.dumps({"organ type": "liver", "lesion type": "cyst", "size": "12 mm"})
RNG = random.Random(int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000)))


@pytest.fixture(scope="module")
def crop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A liver-centred 28 x 28 x 14 crop of ts_small (3 mm) with its v2 organ map."""
    d = tmp_path_factory.mktemp("fault_inputs")
    ct, seg = nib.load(SMALL / "example_ct_sm.nii.gz"), nib.load(SMALL / "example_seg.nii.gz")
    hu, labels = np.asarray(ct.dataobj), np.asarray(seg.dataobj)
    centre = np.rint(ndimage.center_of_mass(labels == 5)).astype(int)
    box = tuple(slice(max(c - h, 0), c + h) for c, h in zip(centre, (14, 14, 7), strict=True))
    affine = ct.affine.copy()
    affine[:3, 3] = ct.affine[:3, :3] @ np.array([b.start for b in box]) + ct.affine[:3, 3]
    nib.save(nib.Nifti1Image(hu[box], affine), d / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels[box].astype(np.uint8), affine), d / "seg.nii.gz")
    return d


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def synthesize_args(crop: Path, out: Path) -> list[str]:
    """The ``lesiondiffusion`` arguments of the one-step synthesis every fault here interrupts."""
    return ["synthesize", "--image", str(crop / "ct.nii.gz"), "--organ_seg", str(crop / "seg.nii.gz"),
            "--attributes", ATTRIBUTES, "--steps", "1", "--verbose", "false", "--out", str(out)]  # fmt: skip


def start(crop: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lesiondiffusion_tools.cli", *synthesize_args(crop, out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def leftovers(out: Path) -> list[str]:
    """What a run left beside ``out`` besides ``out`` itself: work folders, lock files."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.05)


def seconds_after_lock(proc: subprocess.Popen, out: Path) -> float:
    """How long a run holds its output lock: from the lock appearing to its release (not to the process's
    exit, whose teardown can take a good part of a short run); the run must then exit 0."""
    wait_for(lambda: lock_file(out).exists())
    t0 = time.monotonic()
    done: dict[str, tuple[int, str, str]] = {}
    reader = threading.Thread(target=lambda: done.update(run=finish(proc)))  # drains the pipes meanwhile
    reader.start()
    wait_for(lambda: not lock_file(out).exists() or not reader.is_alive(), 600)
    seconds = time.monotonic() - t0
    reader.join()
    code, _, err = done["run"]
    assert code == 0, err[-3000:]
    return seconds


def stop_mid_run(proc: subprocess.Popen, sig: signal.Signals, seconds: float) -> list[int]:
    """Send ``sig`` at a random moment within the first 60% of a run of ``seconds`` (measured on this machine,
    so the moment falls inside the run however fast the machine is); returns the children it had."""
    delay = RNG.uniform(0.05, 0.6) * seconds
    print(f"{sig.name} after {delay:.2f} s of a {seconds:.1f} s run")
    time.sleep(delay)
    kids = children(proc.pid)
    assert proc.poll() is None, "the run ended before the signal: the moment was drawn too late"
    proc.send_signal(sig)
    return kids


@pytest.fixture(scope="module")
def synthesis_seconds(crop: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    # the shorter of two runs: the first pays for cold caches, and a moment drawn from it could fall after
    # a warm run's end
    outs = [tmp_path_factory.mktemp("timing") / "out" for _ in range(2)]
    return min(seconds_after_lock(start(crop, out), out) for out in outs)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_sigterm_then_two_runs_into_one_out(crop, synthesis_seconds, tmp_path):
    """SIGTERM mid-run: exit 143, one line, nothing left (its bundle child stopped too). Then two runs
    started together into that ``--out``: one writes it, the other refuses at start in one line."""
    before = digest(crop)
    out = tmp_path / "out"
    proc = start(crop, out)
    wait_for(lambda: lock_file(out).exists())
    kids = stop_mid_run(proc, signal.SIGTERM, synthesis_seconds)
    code, _, err = finish(proc, 60)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    assert error_lines(err) == ["error: stopped by SIGTERM"]
    wait_for(lambda: all(gone(k) for k in kids), 10)
    time.sleep(1.0)  # a stray child would recreate its output folder now
    assert not out.exists() and leftovers(out) == []

    first, second = start(crop, out), start(crop, out)
    (code1, _, err1), (code2, _, err2) = finish(first), finish(second)
    assert sorted([code1, code2]) == [0, 1], (err1[-2000:], err2[-2000:])
    loser = err2 if code2 else err1
    assert len(error_lines(loser)) == 1 and "another run is writing this output" in error_lines(loser)[0], loser[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded"] == 1 and (out / "ct" / "image.nii.gz").is_file()
    assert leftovers(out) == [] and digest(crop) == before


def test_sigkill_then_rerun(crop, synthesis_seconds, tmp_path):
    """SIGKILL mid-run leaves its lock and work folder; its bundle child dies with it. The rerun takes
    over the stale lock, removes the work folder with --overwrite, names it, and writes the output."""
    before = digest(crop)
    out = tmp_path / "out"
    proc = start(crop, out)
    wait_for(lambda: any(p.name.startswith(work_prefix(out)) for p in tmp_path.iterdir()))
    kids = stop_mid_run(proc, signal.SIGKILL, synthesis_seconds)
    finish(proc, 30)
    wait_for(lambda: all(gone(k) for k in kids), 10)
    left = leftovers(out)
    assert lock_file(out).name in left and any(n.startswith(work_prefix(out)) for n in left), left
    assert not out.exists()

    code, _, err = finish(start(crop, out, "--overwrite"))
    assert code == 0, err[-3000:]
    assert "taking over the lock of a run that is gone" in err
    assert any("removed" in line and work_prefix(out) in line for line in err.splitlines())
    assert leftovers(out) == [] and json.loads((out / "summary.json").read_text())["succeeded"] == 1
    assert digest(crop) == before


def test_full_disk_while_writing_the_output(crop, tmp_path, monkeypatch, capsys):
    """ENOSPC in the writer at the end of a run: one error line naming the output, nothing left."""
    from lesiondiffusion_tools import cli, synthesize

    def full(path, obj, indent=2):
        with open(Path(path).parent / "partial.json", "w") as f:
            f.write("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(synthesize, "write_json", full)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    out = tmp_path / "out"
    try:
        with pytest.raises(SystemExit) as stop:
            cli.main(synthesize_args(crop, out))
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err
    assert error_lines(err) == [f"error: {out}: cannot write the output (No space left on device)"]
    assert not out.exists() and leftovers(out) == []


def test_full_disk_in_file_writers(tmp_path, monkeypatch):
    """ENOSPC inside ``save_nifti``/``write_json``: one line naming the target; no temporary file, no target."""
    import nibabel

    real_save = nibabel.save

    def half_save(img, filename):
        Path(filename).write_bytes(b"\x1f\x8b partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nibabel, "save", half_save)
    with pytest.raises(LesionDiffusionError) as err:
        save_nifti(tmp_path / "a.nii.gz", np.zeros((3, 3, 3), np.int16), np.eye(4))
    assert str(err.value) == f"{tmp_path / 'a.nii.gz'}: cannot write the output (No space left on device)"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(nibabel, "save", real_save)
    with pytest.raises(LesionDiffusionError, match="No space left"):
        with atomic_dir(tmp_path / "d") as staging:
            write_json(staging / "x.json", {"a": 1})
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    out = tmp_path / "out"
    with OutputLock(out, "first"):
        record = json.loads(lock_file(out).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(LesionDiffusionError, match=f"another run is writing this output \\(pid {os.getpid()} on"):
            OutputLock(out).acquire()
    assert not lock_file(out).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_file(out).write_text(
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "start": "1", "since": 0})
    )
    (tmp_path / f"{work_prefix(out)}abc").mkdir()
    with output_lock(out, overwrite=False):
        assert (tmp_path / f"{work_prefix(out)}abc").is_dir()  # named, kept without --overwrite
    assert "taking over the lock" in caplog.text and f"{work_prefix(out)}abc is a work folder left" in caplog.text
    with output_lock(out, overwrite=True):
        pass
    assert leftovers(out) == []
    # another host's lock cannot be judged from here: refused
    lock_file(out).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": 0}))
    with pytest.raises(LesionDiffusionError, match="elsewhere"):
        OutputLock(out).acquire()


def test_commit_never_replaces_what_it_was_not_told_to(tmp_path):
    """A folder that appears while a run writes is kept (no --overwrite), or replaced only after success."""
    target = tmp_path / "out"
    with pytest.raises(LesionDiffusionError, match="appeared while this run was writing"):
        with atomic_dir(target) as staging:
            (staging / "new.txt").write_text("new")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert (target / "theirs.txt").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(LesionDiffusionError, match="not a folder"):
        with atomic_dir(tmp_path / "file", overwrite=True):
            pass
    assert (tmp_path / "file").read_text() == "x"


TINY_VQGAN = json.dumps(
    {
        "vqgan": {
            "network_def#channels": [8, 16],
            "network_def#num_res_channels": [8, 16],
            "discriminator_def#channels": 8,
            "spacing": [2, 2, 2],
            "crop_size": [24, 24, 24],
            "num_workers": 0,
            "val_fraction": 0.5,
        }
    }
)


def start_training(datalist: Path, out: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "lesiondiffusion_tools.cli",
        "train",
        "--stage",
        "vqgan",
        "--datalist",
        str(datalist),
        "--out",
        str(out),
        "--max_epochs",
        "3",
        "--iter_num",
        "12",
        "--resume",
        "true",
        "--bundle_overrides",
        TINY_VQGAN,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def training_seconds(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    outs = [tmp_path_factory.mktemp("timing") / "weights" for _ in range(2)]  # the shorter of two, as above
    return min(seconds_after_lock(start_training(tiny_demo / "datalist.json", out), out) for out in outs)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_training_stopped_then_rerun(sig, tiny_demo, training_seconds, tmp_path):
    """A training run stopped at a random moment; the rerun (same command) takes the lock, resumes from the
    last checkpoint when there is one, and writes the weights."""
    out = tmp_path / "weights"
    proc = start_training(tiny_demo / "datalist.json", out)
    wait_for(lambda: lock_file(out).exists())
    kids = stop_mid_run(proc, sig, training_seconds)
    code, _, err = finish(proc, 60)
    wait_for(lambda: all(gone(k) for k in kids), 10)
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM and error_lines(err) == ["error: stopped by SIGTERM"], err[-2000:]
        assert not lock_file(out).exists()
    else:
        assert code == -signal.SIGKILL and lock_file(out).exists()
    checkpoint = (out / "vqgan" / "checkpoint_last.pt").is_file()
    code, _, err = finish(start_training(tiny_demo / "datalist.json", out))
    assert code == 0, err[-3000:]
    assert (out / "vqgan" / "model.pt").is_file() and not lock_file(out).exists()
    assert ("resuming from" in err) == checkpoint
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]
