"""Dataset input: the original's four aligned list files per split, MONAI datalist JSON, validation.

A case is (CT image, label map 0/1/2, report ``type.json``, TotalSegmentator organ map). List files
hold one path per line, aligned by line across ``{split}_img_list.txt``, ``{split}_label_list.txt``,
``{split}_type_list.txt`` and ``{split}_seg_list.txt``. A datalist is MONAI's decathlon-style JSON
(``{"training": [{"image", "label", "report", "organ_seg"}], "validation": [...]}``) readable by
``monai.data.load_decathlon_datalist``; relative paths are relative to the file that names them.
A datalist may declare its organ maps' numbering beside the splits, ``"organ_seg_version": "v1"``
(:func:`datalist_version`): readers take it over telling each map's numbering from its anatomy, and an
explicit ``--organ_seg_version`` wins over it (:func:`lesiondiffusion.labels.choose_version`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import PathLike, load_nifti, read_json, user_path, write_json, write_text
from lesiondiffusion.labels import (
    AUTO,
    VERSION_CHOICES,
    VERSIONS,
    UnknownOrganError,
    label_table,
    resolve_version,
    to_v1_map,
)
from lesiondiffusion.report import read_report

logger = logging.getLogger(__name__)

KEYS = ("image", "label", "report", "organ_seg")
LIST_SUFFIXES = {"image": "img_list", "label": "label_list", "report": "type_list", "organ_seg": "seg_list"}
SPLITS = {"train": "training", "val": "validation"}  # list-file prefix -> datalist key
VERSION_KEY = "organ_seg_version"  # a datalist's declared organ-map numbering (top level, beside the splits)


@dataclass(frozen=True)
class Case:
    """One case's files; ``source`` says where it was listed (``file:line``) for error messages."""

    image: Path
    label: Path | None = None
    report: Path | None = None
    organ_seg: Path | None = None
    source: str | None = field(default=None, compare=False)

    def files(self) -> dict[str, Path]:
        """The case's files by datalist key, absent ones left out."""
        return {k: getattr(self, k) for k in KEYS if getattr(self, k) is not None}

    def to_dict(self, relative_to: PathLike | None = None) -> dict[str, str]:
        """Datalist entry; paths relative to ``relative_to`` when given."""
        return {k: _rel(p, relative_to) for k, p in self.files().items()}


def _rel(path: Path, base: PathLike | None) -> str:
    if base is None:
        return str(path)
    return os.path.relpath(Path(path).resolve(), Path(base).resolve())


def _resolve(entry: str, base: Path) -> Path:
    p = user_path(entry)
    return p if p.is_absolute() else base / p


# ---- list files ----------------------------------------------------------------------------------
def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(path, "list file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(path, "empty line inside the list (lists are aligned by line)", i)
    return [line.strip() for line in lines]


def read_list_files(
    image_list: PathLike,
    label_list: PathLike | None = None,
    type_list: PathLike | None = None,
    seg_list: PathLike | None = None,
) -> list[Case]:
    """Read aligned list files into cases; lists of different lengths are an error naming both files."""
    named = {"image": image_list, "label": label_list, "report": type_list, "organ_seg": seg_list}
    columns = {k: (Path(p), _read_lines(Path(p))) for k, p in named.items() if p is not None}
    ref_path, ref = columns["image"]
    for path, lines in columns.values():
        if len(lines) != len(ref):
            raise InputError(
                path, f"has {len(lines)} lines but {ref_path} has {len(ref)}; the lists must be aligned line by line"
            )
    cases = []
    for i in range(len(ref)):
        files = {k: _resolve(lines[i], path.parent) for k, (path, lines) in columns.items()}
        cases.append(Case(**files, source=f"{ref_path}:{i + 1}"))
    return cases


def holdout_indices(n: int, val_fraction: float, seed: int | Sequence[int]) -> tuple[list[int], list[int]]:
    """``(training, validation)`` indices of ``n`` cases: ``round(val_fraction * n)`` drawn at random with
    ``seed`` for validation; with a positive fraction and two or more cases, at least one case in each.

    The one hold-out rule of every dataset builder and training split.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise LesionDiffusionError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(float(val_fraction) * n))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n).tolist()
    val = sorted(order[:n_val])
    return [i for i in range(n) if i not in val], val


def list_file_names(split: str) -> dict[str, str]:
    """``{"image": "train_img_list.txt", ...}`` for a split prefix such as ``train`` or ``val``."""
    return {k: f"{split}_{suffix}.txt" for k, suffix in LIST_SUFFIXES.items()}


def read_split(folder: PathLike, split: str = "train") -> list[Case]:
    """Read the ``{split}_*_list.txt`` files of ``folder`` (absent optional lists are skipped)."""
    names = list_file_names(split)
    paths = {k: Path(folder) / n for k, n in names.items()}
    return read_list_files(
        paths["image"], *(paths[k] if paths[k].exists() else None for k in ("label", "report", "organ_seg"))
    )


def write_list_files(folder: PathLike, split: str, cases: Sequence[Case]) -> dict[str, Path]:
    """Write one aligned list file per key present in every case (absolute paths); returns them."""
    folder = Path(folder)
    written = {}
    for key, name in list_file_names(split).items():
        paths = [getattr(c, key) for c in cases]
        if not cases or any(p is None for p in paths):
            continue
        written[key] = write_text(folder / name, "".join(f"{Path(p).resolve()}\n" for p in paths))
    return written


# ---- datalist ------------------------------------------------------------------------------------
def read_datalist(path: PathLike) -> dict[str, list[Case]]:
    """Read a datalist JSON into ``{split key: [Case]}``; malformed entries name the file and entry."""
    path = Path(path)
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise InputError(path, "a datalist must be a JSON object with 'training'/'validation' lists")
    out: dict[str, list[Case]] = {}
    for split, entries in obj.items():
        if not isinstance(entries, list):
            continue  # decathlon files carry metadata keys ("name", "labels", ...)
        cases = []
        for i, entry in enumerate(entries):
            where = f"{path}:{split}[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise InputError(path, f"entry {split}[{i}] has no 'image' path")
            files = {k: _resolve(entry[k], path.parent) for k in KEYS if isinstance(entry.get(k), str)}
            cases.append(Case(**files, source=where))
        out[split] = cases
    if not out:
        raise InputError(path, "no case lists found (expected keys such as 'training' and 'validation')")
    return out


def datalist_version(path: PathLike) -> str | None:
    """The organ-map numbering a datalist declares (``"organ_seg_version": "v1"`` or ``"v2"``), None if none."""
    path = Path(path)
    obj = read_json(path)
    value = obj.get(VERSION_KEY) if isinstance(obj, dict) else None
    if value is None:
        return None
    if value not in VERSIONS:
        raise InputError(path, f"{VERSION_KEY!r} must be one of {', '.join(VERSIONS)}, got {value!r}")
    return str(value)


def write_datalist(path: PathLike, splits: dict[str, Sequence[Case]], organ_seg_version: str | None = None) -> Path:
    """Write a datalist JSON with paths relative to its own folder (movable with its data), declaring the
    organ maps' numbering when ``organ_seg_version`` is given."""
    path = Path(path)
    if organ_seg_version is not None and organ_seg_version not in VERSIONS:
        raise LesionDiffusionError(f"organ_seg_version must be one of {', '.join(VERSIONS)}, not {organ_seg_version!r}")
    obj: dict[str, Any] = {} if organ_seg_version is None else {VERSION_KEY: organ_seg_version}
    return write_json(path, {**obj, **{k: [c.to_dict(path.parent) for c in v] for k, v in splits.items()}})


def lists_to_datalist(folder: PathLike, out: PathLike, organ_seg_version: str | None = None) -> Path:
    """Convert the ``train_*``/``val_*`` list files of ``folder`` into a datalist JSON (declaring
    ``organ_seg_version``, "v1" or "v2", when the maps' numbering is known; list files cannot say it)."""
    splits = {
        key: read_split(folder, prefix)
        for prefix, key in SPLITS.items()
        if (Path(folder) / f"{prefix}_img_list.txt").exists()
    }
    if not splits:
        raise InputError(folder, "no train_img_list.txt or val_img_list.txt found")
    return write_datalist(out, splits, organ_seg_version)


def datalist_to_lists(datalist: PathLike, folder: PathLike) -> list[Path]:
    """Convert a datalist JSON into ``train_*``/``val_*`` list files in ``folder``."""
    splits = read_datalist(datalist)
    written = []
    for prefix, key in SPLITS.items():
        if splits.get(key):
            written += write_list_files(folder, prefix, splits[key]).values()
    return written


# ---- validation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One problem found in one case: where it was listed, which file, and what is wrong."""

    case: int
    where: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.file}: {self.message}"


def _case_problems(index: int, case: Case, organ_seg_version: str = AUTO) -> list[Problem]:
    where = case.source or f"case {index}"
    problems: list[Problem] = []

    def add(path: PathLike, message: str) -> None:
        problems.append(Problem(index, where, str(path), message))

    images = {}
    for key in ("image", "label", "organ_seg"):
        path = getattr(case, key)
        if path is None:
            continue
        if not Path(path).is_file():
            add(path, f"{key} file not found")
            continue
        try:
            images[key] = load_nifti(path)
            images[key].get_fdata(dtype=np.float32)  # decode now: truncated gzip fails only here
        except InputError as e:
            add(path, e.problem)
            images.pop(key, None)
        except Exception as e:
            add(path, f"unreadable NIfTI ({type(e).__name__}: {e})")
            images.pop(key, None)
    ref_key = "image" if "image" in images else next(iter(images), None)
    for key, img in images.items():
        if key == ref_key:
            continue
        ref = images[ref_key]
        if img.shape[:3] != ref.shape[:3]:
            add(case.files()[key], f"shape {img.shape[:3]} differs from the {ref_key}'s {ref.shape[:3]}")
        elif not np.allclose(img.affine, ref.affine, atol=1e-3):
            add(case.files()[key], f"affine differs from the {ref_key}'s")
    seg_v1 = None
    if "organ_seg" in images:
        seg_v1 = _organ_map_v1(images["organ_seg"], case.organ_seg, organ_seg_version, add)  # type: ignore[arg-type]
    label = None
    if "label" in images:
        label = np.rint(np.asanyarray(images["label"].dataobj)).astype(np.int16)
        bad = sorted(set(np.unique(label).tolist()) - {0, 1, 2})
        if bad:
            add(case.label, f"label values {bad[:5]} outside 0 (background), 1 (organ), 2 (lesion)")
    if case.report is not None:
        try:
            report = read_report(case.report)
        except InputError as e:
            add(case.report, e.problem)
        else:
            for organ_id in report.organ_ids:
                try:
                    label_table().name(organ_id)
                except UnknownOrganError as e:
                    add(case.report, str(e))
            organ = _case_organ(seg_v1, label)
            if organ is not None and organ not in report:
                add(
                    case.report,
                    f"no entry for the case's organ {organ} ({_organ_name(organ)}); has {list(report.organ_ids)}",
                )
    return problems


def _organ_name(organ_id: int) -> str:
    try:
        return label_table().name(organ_id)
    except UnknownOrganError:
        return "unknown"


def _organ_map_v1(img, path: Path, organ_seg_version: str, add) -> np.ndarray | None:
    """The organ map in v1 ids, its numbering given or told from its anatomy; None (and a problem) if unclear."""
    data = np.asanyarray(img.dataobj)
    data = data.reshape(data.shape[:3])
    try:
        version = resolve_version(organ_seg_version, data, img.affine, path)
    except LesionDiffusionError as e:
        add(path, e.problem if isinstance(e, InputError) else str(e))
        return None
    ids = np.unique(np.rint(data).astype(np.int64))
    unknown = sorted(set(ids[ids != 0].tolist()) - set(label_table(version).names))
    if unknown:
        add(path, f"labels {unknown[:5]} are not TotalSegmentator {version} ids")
        return None
    logger.info("%s: TotalSegmentator %s numbering", path, version)
    return to_v1_map(data, version)


def _case_organ(seg: np.ndarray | None, label: np.ndarray | None) -> int | None:
    """The (v1) organ-map label most common under the label map's organ+lesion voxels."""
    if seg is None or label is None or seg.shape[:3] != label.shape[:3]:
        return None
    seg = seg.astype(np.int32).reshape(label.shape)
    ids = seg[(label > 0) & (seg > 0)]
    return int(np.bincount(ids).argmax()) if ids.size else None


def validate_cases(cases: Iterable[Case], organ_seg_version: str = AUTO) -> list[Problem]:
    """Every problem of every case (missing/unreadable files, geometry, label values, reports).

    Organ maps are read in ``organ_seg_version`` numbering ("v1", "v2"), or with "auto" the one told
    from each map's labels and anatomy; a map that fits neither clearly is a problem asking for the flag.
    """
    if organ_seg_version not in VERSION_CHOICES:
        raise LesionDiffusionError(
            f"--organ_seg_version must be one of {', '.join(VERSION_CHOICES)}, not {organ_seg_version!r}"
        )
    problems: list[Problem] = []
    for i, case in enumerate(cases):
        problems += _case_problems(i, case, organ_seg_version)
    return problems


def load_cases(
    datalist: PathLike | None = None,
    image_list: PathLike | None = None,
    label_list: PathLike | None = None,
    type_list: PathLike | None = None,
    seg_list: PathLike | None = None,
) -> list[Case]:
    """Cases from a datalist (all splits, in order) or from list files; exactly one form is required."""
    if (datalist is None) == (image_list is None):
        raise LesionDiffusionError("give either a datalist or an image list (with label/type/seg lists)")
    if datalist is not None:
        return [c for cases in read_datalist(datalist).values() for c in cases]
    return read_list_files(image_list, label_list, type_list, seg_list)  # type: ignore[arg-type]
