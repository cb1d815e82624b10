"""Atomic outputs: all or nothing, with the usual file modes; file hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion.io import atomic_dir, atomic_path, file_sha256, read_stored, shared_reads, write_json


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_file_appears_whole_with_the_usual_mode(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert path.read_text() == '{\n  "k": 1\n}\n'
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    with pytest.raises(RuntimeError, match="^writer failed$"):
        with atomic_path(tmp_path / "a" / "y.nii.gz") as tmp:
            assert tmp.name.endswith(".nii.gz")  # writers that read the suffix still work
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json"]


def test_a_failed_overwrite_leaves_the_old_file_whole(tmp_path: Path) -> None:
    old = write_json(tmp_path / "x.json", {"k": 1}).read_bytes()
    with pytest.raises(RuntimeError, match="^writer failed$"):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text('{"k": ')  # half a new file, then the writer dies
            raise RuntimeError("writer failed")
    assert (tmp_path / "x.json").read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    write_json(tmp_path / "x.json", {"k": 2})  # a successful overwrite replaces it
    assert (tmp_path / "x.json").read_text() == '{\n  "k": 2\n}\n' and [p.name for p in tmp_path.iterdir()] == [
        "x.json"
    ]


def test_atomic_folder_appears_whole_with_the_usual_mode(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f.txt").write_text("x")
    assert (tmp_path / "out" / "f.txt").read_text() == "x"
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~_umask()
    with pytest.raises(RuntimeError, match="^failed$"):
        with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "g.txt").write_text("y")
            raise RuntimeError("failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["f.txt"] and (
        tmp_path / "out" / "f.txt"
    ).read_text() == "x"


def test_file_sha256(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # more than one read block
    (tmp_path / "w.pt").write_bytes(data)
    assert file_sha256(tmp_path / "w.pt") == hashlib.sha256(data).hexdigest()


def _volume(path: Path, value: int) -> Path:
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), value, np.int16), np.eye(4)), str(path))
    return path


def test_shared_reads_decode_an_unchanged_file_once_and_hand_out_read_only_voxels(tmp_path: Path) -> None:
    a, b, c = (_volume(tmp_path / f"{n}.nii.gz", i) for i, n in enumerate("abc"))
    assert read_stored(a) is not read_stored(a)  # outside the block every read decodes
    with shared_reads(max_files=2):
        first = read_stored(a)
        assert read_stored(str(a)) is first and not first.raw.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            first.raw[0, 0, 0] = 7
        with shared_reads(max_files=5):  # nested: the outer block's files and bound
            assert read_stored(a) is first
        read_stored(b), read_stored(c)  # a third file: the oldest goes
        assert read_stored(c) is read_stored(c) and read_stored(a) is not first
        _volume(c, 9)  # rewritten meanwhile: read again
        os.utime(c, ns=(1, 1))
        assert int(read_stored(c).raw[0, 0, 0]) == 9
    assert read_stored(a).raw.flags.writeable
