"""Which cases the VQ-GAN trains, validates and reconstructs, read from a datalist or the original's list files."""

from __future__ import annotations

import logging
from pathlib import Path

from lesiondiffusion.dataset import Case, holdout_indices, read_datalist, read_split
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import PathLike, load_nifti

logger = logging.getLogger(__name__)


def _read(datalist: PathLike) -> dict[str, list[Case]]:
    """Splits of a datalist JSON, or of a folder of ``train_*``/``val_*`` list files."""
    path = Path(datalist)
    if path.is_dir():
        splits = {"training": read_split(path, "train")}
        if (path / "val_img_list.txt").is_file():
            splits["validation"] = read_split(path, "val")
        return splits
    return read_datalist(path)


def _check(case: Case, need_label: bool) -> dict[str, str]:
    """The case as a MONAI data dict; missing/unreadable files or mismatched shapes name the file."""
    where = case.source or str(case.image)
    if need_label and case.label is None:
        raise InputError(where, "case has no 'label' (lesion-centred crops need the 0/1/2 label map)")
    image = load_nifti(case.image)
    item = {"image": str(case.image)}
    if need_label:
        label = load_nifti(case.label)
        if label.shape[:3] != image.shape[:3]:
            raise InputError(
                case.label, f"label shape {label.shape[:3]} differs from the image's {image.shape[:3]} ({case.image})"
            )
        item["label"] = str(case.label)
    return item


def training_cases(
    datalist: PathLike, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(training, validation) data dicts with ``image`` and ``label`` paths, every file checked first.

    Validation cases come from the datalist's ``validation`` list (or ``val_*`` list files); without
    one, ``val_fraction`` of the training cases are held out (:func:`lesiondiffusion.dataset.holdout_indices`
    with ``seed``). A single case, or a fraction of 0, validates on the training cases, with a warning.
    """
    splits = _read(datalist)
    train = splits.get("training", [])
    if not train:
        raise InputError(datalist, "no training cases (expected a non-empty 'training' list)")
    val = splits.get("validation", [])
    if not val:
        kept, held = holdout_indices(len(train), val_fraction, seed)
        train, val = [train[i] for i in kept], [train[i] for i in held]
        if not val:
            logger.warning("%s: no case held out for validation: validating on the training cases", datalist)
            val = train
    logger.info("VQ-GAN data: %d training and %d validation cases", len(train), len(val))
    return [_check(c, True) for c in train], [_check(c, True) for c in val]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def inference_cases(
    image: PathLike | None = None, datalist: PathLike | None = None, split: str = "testing"
) -> list[dict[str, str]]:
    """Data dicts for one image path or a datalist split, every file checked first.

    Each has ``image`` and ``source`` (the path) and ``case``: the file name without extension, prefixed
    with its folder name when two inputs share a file name (``cases/A/image.nii.gz`` -> ``A_image``).
    """
    if (image is None) == (datalist is None):
        raise LesionDiffusionError("give either --image (one CT) or --datalist (with --split)")
    if image is not None:
        cases = [Case(image=Path(image), source=str(image))]
    else:
        splits = _read(datalist)
        if not splits.get(split):
            raise InputError(datalist, f"no cases under {split!r} (has {sorted(splits)})")
        cases = splits[split]
    items = [_check(c, False) for c in cases]
    stems = [_stem(c.image) for c in cases]
    for item, case, stem in zip(items, cases, stems):
        item["source"] = item["image"]
        item["case"] = stem if stems.count(stem) == 1 else f"{case.image.parent.name}_{stem}"
    if len({item["case"] for item in items}) != len(items):
        raise InputError(
            datalist, "two inputs would write the same output name; give them distinct file or folder names"
        )
    return items
