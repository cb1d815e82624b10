"""``lesiondiffusion synthesize``: CT + description -> synthetic CT, through the three inference bundles.

The three bundles' inference configs run one after the other in this process (MONAI's ``ConfigWorkflow``;
``--isolate`` runs each in its own ``python -m monai.bundle run`` process instead, with the same outputs;
:mod:`lesiondiffusion_tools.bundle_runner`), handing on the
manifest (:mod:`lesiondiffusion.manifest`): preprocess (standardise, organ map, report, box) -> LMNet
(lesion mask) -> LINet (inpaint, paste back into the original CT). Case *i* of the manifest is request
*i* throughout, so a case that fails in one stage is reported and the others go on.

Per case ``<out>/<case>/`` receives ``image.nii.gz`` (synthetic CT in the input's grid and dtype),
``label.nii.gz`` (0/1/2), ``organ_seg.nii.gz`` (organ map on the input grid), ``report.json``,
``provenance.json`` and ``preview.png``; ``<out>/summary.json`` lists every case's status. The output
folder is built beside ``--out`` and renamed into place, so a run never leaves half an output.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lesiondiffusion import batch
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import (
    atomic_dir,
    check_inputs_outside,
    check_output_target,
    file_sha256,
    image_exists,
    image_stem,
    output_lock,
    read_json,
    read_nifti_array,
    read_stored,
    save_nifti,
    shared_reads,
    user_path,
    work_dir,
    write_json,
)
from lesiondiffusion.labels import VERSION_CHOICES
from lesiondiffusion.manifest import MANIFEST_NAME, CaseEntry, read_manifest
from lesiondiffusion.reports import providers as llm
from lesiondiffusion.requests import RESERVED_CASE_NAMES, SynthesisRequest, describe, read_requests, with_reading
from lesiondiffusion.sanity import check_device, check_requests
from lesiondiffusion.settings import default, flag
from lesiondiffusion.text import TextError, TextReading
from lesiondiffusion_tools.bundle_runner import (
    BUNDLES_DIR,
    BundleRunError,
    check_overrides,
    run_bundle,
    run_bundle_in_process,
)

logger = logging.getLogger(__name__)

NETWORKS = ("vqgan", "lmnet", "linet")
SAMPLERS = ("ddim", "rflow")
# report.json attributes (strings, beside the type.json fields) of a lesion described by a sentence
TEXT_ATTRIBUTE = "description text"
TEXT_READING_ATTRIBUTE = "description reading"
OUTPUT_FILES = ("image.nii.gz", "label.nii.gz", "organ_seg.nii.gz", "report.json", "provenance.json", "preview.png")


# ---- inputs -------------------------------------------------------------------------------------------
def weights_paths(weights: str | Path | None = None) -> dict[str, Path]:
    """The network weights to use: ``<weights>/<network>/model.pt``, by default the bundles' shipped ones.

    A missing file is an error that says how to get one.
    """
    if weights is None:
        paths = {n: BUNDLES_DIR / n / "models" / "model.pt" for n in NETWORKS}
        hint = "the repository's shipped weights are missing; pass --weights DIR (DIR/<network>/model.pt, as `lesiondiffusion train --out DIR` writes)"
    else:
        root = user_path(weights)
        if not root.is_dir():
            raise InputError(
                root, "weights folder not found (expected DIR/vqgan/model.pt, DIR/lmnet/model.pt, DIR/linet/model.pt)"
            )
        paths = {n: root / n / "model.pt" for n in NETWORKS}
        hint = f"train it with `lesiondiffusion train --stage all --datalist FILE --out {root}`"
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise LesionDiffusionError(f"weights not found: {', '.join(missing)}; {hint}")
    return paths


def case_names(images: Sequence[Path]) -> list[str]:
    """One folder-safe, unique name per image: the file name without .nii/.nii.gz, numbered on clashes."""
    stems = [re.sub(r"[^A-Za-z0-9._-]", "_", image_stem(p)).lstrip("._-") or "case" for p in images]
    stems = [f"case_{s}" if s in RESERVED_CASE_NAMES else s for s in stems]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i:04d}_{s}" for i, s in enumerate(stems)]


def json_object(value: Any, where: str) -> dict[str, Any]:
    """``--attributes``: a dict, JSON text, or a file holding one JSON object."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = str(value).strip()
    if not text.startswith("{"):
        path = user_path(text)
        try:  # a long JSON list or odd text is no file name the system takes
            exists = path.is_file()
        except (OSError, ValueError):
            exists = False
        if not exists:
            raise InputError(path, f"{where}: neither a JSON object nor an existing file")
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(path, f"{where}: unreadable ({type(e).__name__})") from None
        where = str(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(where, f"not a JSON object ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise InputError(where, "attributes must be a JSON object")
    return obj


def _list_lines(path: str | Path) -> list[str]:
    p = user_path(path)
    if not p.is_file():
        raise InputError(p, "list file not found")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line:
            raise InputError(p, "empty line inside the list (lists are aligned by line)", i)
    if not lines:
        raise InputError(p, "the list is empty")
    return lines


def _resolve(entry: str, base: Path) -> Path:
    p = user_path(entry)
    return p if p.is_absolute() else base / p


def gather_requests(
    image: str | None = None,
    image_list: str | None = None,
    requests: str | None = None,
    attributes: Any = None,
    attributes_list: str | None = None,
    organ: str | None = None,
    lesion_type: str | None = None,
    organ_seg: str | None = None,
    organ_seg_list: str | None = None,
    text: str | None = None,
) -> list[SynthesisRequest]:
    """The cases to synthesise, from exactly one of ``--image``, ``--image_list`` or ``--requests``.

    ``--organ`` / ``--lesion_type`` fill in (and override) ``organ type`` / ``lesion type`` of every case.
    ``--text`` describes the lesion in one sentence (read offline here, see :mod:`lesiondiffusion.text`);
    ``--attributes`` and those two win over what it says.
    """
    given = [name for name, v in (("--image", image), ("--image_list", image_list), ("--requests", requests)) if v]
    if len(given) != 1:
        raise LesionDiffusionError("give exactly one of --image CT, --image_list FILE or --requests FILE")
    overrides = {k: v for k, v in (("organ type", organ), ("lesion type", lesion_type)) if v}
    if requests:
        if attributes_list or organ_seg or organ_seg_list:
            raise LesionDiffusionError("--requests carries images, organ maps and attributes; drop the other inputs")
        if text:
            raise LesionDiffusionError(
                '--text goes with --image or --image_list; in a requests file give each entry its own "text"'
            )
        found = read_requests(requests)
        shared = {**_texts(json_object(attributes, "--attributes")), **overrides}
        return [
            replace(
                r,
                attributes={**r.attributes, **shared},
                given=None if r.text is None else {**(r.given or {}), **shared},
            )
            for r in found
        ]
    if image:
        if attributes_list or organ_seg_list:
            raise LesionDiffusionError("--attributes_list and --organ_seg_list go with --image_list")
        images = [user_path(image)]
        segs = [user_path(organ_seg) if organ_seg else None]
        attrs = [json_object(attributes, "--attributes")]
    else:
        list_path = user_path(str(image_list))
        images = [_resolve(line, list_path.parent) for line in _list_lines(list_path)]
        if organ_seg:
            raise LesionDiffusionError("--organ_seg goes with --image; with --image_list give --organ_seg_list")
        segs = [None] * len(images)
        if organ_seg_list:
            seg_path = user_path(organ_seg_list)
            segs = [_resolve(line, seg_path.parent) for line in _list_lines(seg_path)]
            if len(segs) != len(images):
                raise InputError(seg_path, f"{len(segs)} lines, but the image list has {len(images)}")
        if attributes_list:
            attr_path = user_path(attributes_list)
            lines = _list_lines(attr_path)
            if len(lines) != len(images):
                raise InputError(attr_path, f"{len(lines)} lines, but the image list has {len(images)}")
            attrs = [json_object(line, f"{attr_path}:{i}") for i, line in enumerate(lines, 1)]
        else:
            attrs = [json_object(attributes, "--attributes")] * len(images)
    out = []
    for name, img, seg, attr in zip(case_names(images), images, segs, attrs):
        merged = given = {**_texts(attr), **overrides}
        reading = None
        if text is not None:
            try:
                merged, reading = describe(str(text), given)
            except TextError as e:
                raise LesionDiffusionError(f"--text: {e}") from None
        missing = [k for k in ("organ type", "lesion type") if not merged.get(k, "").strip()]
        if missing:
            raise LesionDiffusionError(
                f"{img}: no {' and no '.join(repr(k) for k in missing)}; give --organ/--lesion_type or put them in --attributes"
            )
        only_text = text is not None and not given
        source = f"{attributes_list}:{len(out) + 1}" if attributes_list else ("--text" if only_text else "--attributes")
        out.append(SynthesisRequest(name, img, merged, seg, None if text is None else str(text), reading, None if text is None else given,
                                    source=source))  # fmt: skip
    return out


def stage_overrides(value: Any, stages: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--bundle_overrides``: a JSON object (text, dict or file) of config overrides by stage name."""
    obj = json_object(value, "--bundle_overrides")
    unknown = sorted(set(obj) - set(stages))
    if unknown:
        raise LesionDiffusionError(
            f"--bundle_overrides: unknown stage(s) {', '.join(unknown)}; use {', '.join(stages)}"
        )
    if any(not isinstance(v, dict) for v in obj.values()):
        raise LesionDiffusionError("--bundle_overrides: each stage's value must be a JSON object of config keys")
    return {stage: dict(obj.get(stage, {})) for stage in stages}


def _texts(obj: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in obj.items()}


def check_inputs(requests: Sequence[SynthesisRequest]) -> None:
    """Fail early on inputs that do not exist (the bundles check the rest, case by case)."""
    for r in requests:
        for path in (r.image, r.organ_seg):
            if path is not None and not image_exists(path):  # a DICOM series is a folder
                raise InputError(path, f"case {r.case}: file not found")
    with_seg = [r.organ_seg is not None for r in requests]
    if any(with_seg) and not all(with_seg):
        raise LesionDiffusionError(
            "give an organ map for every case or for none (the preprocess stage segments the rest as a batch)"
        )


def read_texts(
    requests: Sequence[SynthesisRequest], provider: str, preprocess: dict[str, Any], seed: int = 0
) -> list[SynthesisRequest]:
    """Requests given as sentences, read by the report provider: ``openai`` asks the endpoint the
    preprocess stage is configured with (``report_base_url``, ``report_model``, ... in ``preprocess``),
    falling back to the offline reading as its ``report_on_failure`` says; ``offline`` keeps the
    offline reading. Prints what was understood of each sentence."""
    out = list(requests)
    if str(provider).strip().lower() == "openai" and any(r.text is not None for r in out):
        keys = ("base_url", "model", "api_key_env", "timeout", "max_retries", "on_failure")
        reader = llm.make_provider("openai", **{k: preprocess.get(f"report_{k}") for k in keys})
        readings: dict[str, TextReading] = {}
        for i, r in enumerate(out):
            if r.text is None:
                continue
            need_organ = not (r.given or {}).get("organ type", "").strip()
            if r.text not in readings:
                try:
                    readings[r.text] = llm.read_text(reader, r.text, seed=int(seed), require_organ=need_organ)
                except TextError as e:
                    raise LesionDiffusionError(f"{r.case}: text: {e}") from None
            out[i] = with_reading(r, readings[r.text])
            if reader.fallbacks:  # what happened is kept with the request (provenance), not only logged
                out[i] = replace(out[i], warnings=(*out[i].warnings, *reader.fallbacks))
    for r in out:
        if r.reading is not None:
            print(f"{r.case}: {r.text!r} -> {r.reading.summary()}")
            logger.info("%s: read %r as %s", r.case, r.text, json.dumps(r.reading.attributes))
    return out


# ---- the run ------------------------------------------------------------------------------------------
@dataclass
class CaseState:
    """What is known about one request as the stages run."""

    request: SynthesisRequest
    entry: CaseEntry | None = None
    base: Path | None = None  # the folder of the manifest ``entry`` came from (its extra paths are relative)
    error: str | None = None
    stage: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class SynthesisSettings:
    """Everything that decides the output besides the inputs and weights (recorded in provenance)."""

    seed: int = 0
    num_lesions: int = 1
    steps: int | None = None  # None: each network's default for the preset (lesiondiffusion.settings.DEFAULTS)
    sampler: str = "ddim"
    guidance_scale: float | None = None  # None: each network's own default
    margin_mm: float = float(default("linet", "margin_mm"))
    feather_mm: float = float(default("linet", "feather_mm"))
    preset: str = "cpu"
    report_provider: str = "offline"
    organ_seg_version: str = "auto"
    device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Reject settings no stage could use, before anything runs."""
        if self.sampler not in SAMPLERS:
            raise LesionDiffusionError(f"--sampler must be one of {', '.join(SAMPLERS)}, not {self.sampler!r}")
        if self.steps is not None and int(self.steps) < 1:
            raise LesionDiffusionError(f"--steps must be at least 1, not {self.steps}")
        if int(self.num_lesions) < 1:
            raise LesionDiffusionError(f"--num_lesions must be at least 1, not {self.num_lesions}")
        if float(self.margin_mm) < 0 or float(self.feather_mm) < 0:
            raise LesionDiffusionError("--margin_mm and --feather_mm must not be negative")
        if self.organ_seg_version not in VERSION_CHOICES:
            raise LesionDiffusionError(
                f"--organ_seg_version must be one of {', '.join(VERSION_CHOICES)}, not {self.organ_seg_version!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        return {**out, **self.extra}


def _stage_overrides(stage: str, settings: SynthesisSettings, weights: dict[str, Path]) -> dict[str, Any]:
    common: dict[str, Any] = {"seed": int(settings.seed)}
    if settings.device:
        common["device"] = settings.device
    if stage == "preprocess":
        return {
            **common, "num_lesions": int(settings.num_lesions), "report_provider": settings.report_provider,
            "organ_seg_version": settings.organ_seg_version, "preset": settings.preset,
        }  # fmt: skip
    # steps and guidance only when given: otherwise each network keeps its own default (the defaults table)
    sampling: dict[str, Any] = {"sampler": settings.sampler, "preset": settings.preset}
    if settings.steps is not None:
        sampling["steps"] = int(settings.steps)
    if settings.guidance_scale is not None:
        sampling["guidance_scale"] = float(settings.guidance_scale)
    if stage == "lmnet":
        return {**common, **sampling, "weights": str(weights["lmnet"])}
    return {
        **common, **sampling, "weights": str(weights["linet"]), "vqgan_weights": str(weights["vqgan"]),
        "vqgan_preset": settings.preset, "margin_mm": float(settings.margin_mm), "feather_mm": float(settings.feather_mm),
    }  # fmt: skip


def _write_inputs(work: Path, states: Sequence[CaseState]) -> dict[str, str]:
    """The batch as the preprocess bundle's aligned list files."""
    images = work / "images.txt"
    attributes = work / "attributes.txt"
    images.write_text("".join(f"{s.request.image.absolute()}\n" for s in states), encoding="utf-8")
    attributes.write_text("".join(json.dumps(s.request.attributes) + "\n" for s in states), encoding="utf-8")
    names = work / "cases.txt"  # the case's name, not its place in the batch, seeds its boxes and lesions
    names.write_text("".join(f"{s.request.case}\n" for s in states), encoding="utf-8")
    lists = {"image_list": str(images), "attributes_list": str(attributes), "case_list": str(names)}
    if states[0].request.organ_seg is not None:
        segs = work / "organ_segs.txt"
        segs.write_text("".join(f"{s.request.organ_seg.absolute()}\n" for s in states), encoding="utf-8")  # type: ignore[union-attr]
        lists["organ_seg_list"] = str(segs)
    # declared by the requests file, else as the input checks read it (told once); an explicit flag still wins
    numbering = [s.request.organ_seg_version or s.request.organ_seg_numbering for s in states]
    if any(numbering):
        declared = work / "organ_seg_versions.txt"
        declared.write_text("".join(f"{v or 'auto'}\n" for v in numbering), encoding="utf-8")
        lists["organ_seg_version_list"] = str(declared)
    return lists


def _collect(stage: str, manifest: Path, states: Sequence[CaseState], failure: BundleRunError | None) -> None:
    """Update each case from the stage's manifest; without one, every pending case failed with the stage."""
    if not manifest.is_file():
        message = str(failure).removeprefix("error: ") if failure else f"the {stage} stage wrote no manifest"
        for s in states:
            if s.ok:
                s.error, s.stage = message, stage
        return
    cases = read_manifest(manifest).cases
    if len(cases) != len(states):
        raise LesionDiffusionError(f"{manifest}: {len(cases)} cases, but {len(states)} were requested")
    for s, entry in zip(states, cases):
        if not s.ok:
            continue
        if not entry.ok:
            s.error, s.stage = entry.error or "failed", stage
        else:
            s.entry, s.base = entry, manifest.parent


def _run_stage(
    stage: str, overrides: dict[str, Any], out_dir: Path, states: Sequence[CaseState], echo: bool, isolate: bool = False
) -> tuple[float, float | None]:
    """Run one bundle over the batch, in this process or (``isolate``) in its own; returns its wall-clock
    seconds and peak memory (MiB: the child's own, or this process's so far; None if it failed)."""
    t0 = time.perf_counter()
    failure, peak = None, None
    settings = {**overrides, "output_dir": str(out_dir)}
    try:
        run = (
            run_bundle(stage, settings, capture=True, echo=echo) if isolate else run_bundle_in_process(stage, settings)
        )
        peak = run.peak_rss_mib
    except BundleRunError as e:
        failure = e
        if not (out_dir / MANIFEST_NAME).is_file():  # else the failed cases are in it, and in the summary
            logger.error("%s stage: %s", stage, e)
    _collect(stage, out_dir / MANIFEST_NAME, states, failure)
    return time.perf_counter() - t0, peak


def versions() -> dict[str, str]:
    """Versions of this package, the libraries that shape the output, Python, and the bundles."""
    out = {"python": platform.python_version()}
    for dist in ("lesiondiffusion-monai", "monai", "torch", "numpy", "nibabel"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    for stage in ("preprocess", *NETWORKS):
        meta = BUNDLES_DIR / stage / "configs" / "metadata.json"
        out[f"bundle:{stage}"] = str(read_json(meta).get("version", "?")) if meta.is_file() else "missing"
    return out


def network_calls(entry: CaseEntry) -> dict[str, int]:
    """Network evaluations the LMNet and LINet stages made for a case, as their manifests count them."""
    return {stage: int((entry.extra.get(stage) or {}).get("network_calls", 0)) for stage in NETWORKS[1:]}


def _bundle_record(stage: str, overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    """What a stage ran: its config file, that file's SHA-256, and every setting passed to it.

    With the bundle's version these fix every parameter of the run, defaults included; paths inside
    the temporary work folder (gone after the run) are left out.
    """
    config = BUNDLES_DIR / stage / "configs" / "inference.json"
    inside = str(work)
    given = {k: v for k, v in overrides.items() if not (isinstance(v, str) and v.startswith(inside))}
    return {"config": str(config.resolve()), "config_sha256": file_sha256(config), "settings": given}


def _write_organ_map(path: Path, entry: CaseEntry, given: Path | None) -> None:
    """The case's organ map on the input grid, TotalSegmentator v1 ids.

    A map the user gave on the image's own voxel grid is written renumbered, whole and exact; otherwise
    (a computed map, or one on a permuted grid) the standardised map is resampled back onto the input grid.
    """
    import numpy as np

    from lesiondiffusion.geometry import read_geometry, save_on_input_grid  # imports MONAI: only when writing
    from lesiondiffusion.labels import to_v1_map

    geometry = read_geometry(entry.geometry)  # type: ignore[arg-type]
    version = entry.extra.get("organ_seg_version")
    if given is not None and version is not None:
        stored = read_stored(given, label=True)
        if stored.shape == tuple(geometry.shape) and np.allclose(stored.affine, geometry.input_affine, atol=1e-4):
            save_nifti(path, to_v1_map(stored.raw, version), geometry.input_affine, dtype=np.uint8)
            return
    seg, _ = read_nifti_array(entry.organ_seg)  # type: ignore[arg-type]
    save_on_input_grid(path, seg, geometry, mode="nearest", dtype="uint8")


def _write_case(
    folder: Path, state: CaseState, settings: SynthesisSettings, weights: dict[str, str], timings: dict[str, float], n_total: int,
    bundle_runs: dict[str, Any],
) -> None:  # fmt: skip
    """Write one case's outputs (see the module docstring) from its final manifest entry."""
    from lesiondiffusion.preview import write_case_preview

    entry = state.entry
    assert entry is not None and entry.synthetic_image is not None
    folder.mkdir(parents=True)
    shutil.copyfile(entry.synthetic_image, folder / "image.nii.gz")
    label_path = entry.label_original
    if label_path is None or not label_path.is_file():
        raise LesionDiffusionError(f"{state.request.case}: the LINet stage wrote no label map")
    shutil.copyfile(label_path, folder / "label.nii.gz")
    _write_organ_map(folder / "organ_seg.nii.gz", entry, state.request.organ_seg)
    drawn = entry.extra.get("preview")  # LINet's, captioned with the request's attributes
    if state.request.text is None and drawn and state.base is not None and (state.base / drawn).is_file():
        shutil.copyfile(state.base / drawn, folder / "preview.png")
    else:  # drawn again from the files to caption the request's sentence too
        write_case_preview(
            folder / "preview.png",
            entry.source_image,
            folder / "image.nii.gz",
            folder / "label.nii.gz",
            state.request.attributes,
            sentence=state.request.text,
        )  # type: ignore[arg-type]
    reports = [read_json(lesion.report) for lesion in entry.lesions]
    if state.request.reading is not None:  # extra string attributes: the report schema allows them
        for report in reports:
            for item in report.values():
                item[2].update(
                    {
                        TEXT_ATTRIBUTE: state.request.reading.text,
                        TEXT_READING_ATTRIBUTE: state.request.reading.summary(),
                    }
                )
    write_json(folder / "report.json", reports[0] if len(reports) == 1 else reports)
    n_lesions = max(len(entry.lesions), 1)
    write_json(folder / "provenance.json", {
        "case": state.request.case,
        "request": {
            "image": str(state.request.image.absolute()),
            "organ_seg": None if state.request.organ_seg is None else str(state.request.organ_seg.absolute()),
            "organ_seg_version": entry.extra.get("organ_seg_version"),  # the numbering the organ map came in
            "declared_organ_seg_version": state.request.organ_seg_version,  # what the requests file said, if anything
            **state.request.provenance(),
        },
        "scan": entry.extra.get("scan"),
        "report_provider": entry.extra.get("report_provider"),  # the endpoint used, and any fallback to offline  # the scan context preprocess measured (organ HU, contrast phase)
        "parameters": settings.as_dict(),
        "lesions": [{"organ_id": e.organ_id, "cavity": e.cavity, "box": e.box.to_json(), "report": r} for e, r in zip(entry.lesions, reports)],
        "weights": weights,
        "bundles": bundle_runs,
        "versions": versions(),
        "network_calls": network_calls(entry),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "seconds_per_lesion": round(timings["total"] / max(n_total, 1), 3),
        "lesions_in_case": n_lesions,
    })  # fmt: skip


def synthesize(
    image: str | None = None,
    image_list: str | None = None,
    requests: str | None = None,
    attributes: Any = None,
    attributes_list: str | None = None,
    organ: str | None = None,
    lesion_type: str | None = None,
    organ_seg: str | None = None,
    organ_seg_list: str | None = None,
    num_lesions: int = 1,
    seed: int = 0,
    steps: int | None = None,
    sampler: str = "ddim",
    guidance: float | None = None,
    margin_mm: float = float(default("linet", "margin_mm")),
    feather_mm: float = float(default("linet", "feather_mm")),
    preset: str = "cpu",
    report_provider: str = "offline",
    organ_seg_version: str = "auto",
    weights: str | None = None,
    out: str | None = None,
    overwrite: bool = False,
    device: str | None = None,
    keep_work: bool = False,
    isolate: bool = False,
    bundle_overrides: Any = None,
    verbose: bool = True,
    text: str | None = None,
    allow_unknown_values: bool = False,
    report_base_url: str | None = None,
    report_model: str | None = None,
    report_api_key_env: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Write a described lesion into each CT: preprocess -> LMNet -> LINet, outputs in ``out/<case>/``.

    Returns the summary (also written to ``out/summary.json``). Raises when any case failed, after the
    others were written. The stages run in this process; ``isolate`` runs each bundle in its own process
    (``python -m monai.bundle run``), with the same outputs for the same seed.
    ``steps`` and ``guidance`` left unset keep each network's own default for the ``preset``
    (:data:`lesiondiffusion.settings.DEFAULTS`: LMNet DDIM 25 on cpu, 200 on paper, guidance 1; LINet 25 and 2),
    exactly what a direct bundle run uses. ``bundle_overrides`` sets any other key of a stage's ``inference.json``, as a
    JSON object by stage, e.g. ``'{"linet": {"context_mm": 12}}'``. ``verbose``: show each stage's
    logs and progress as it runs (its errors are reported either way). ``text`` describes the lesion in
    one sentence ("a 25 mm hypodense, well-defined cyst in the liver"); ``attributes`` win over it.
    ``allow_unknown_values``: accept attribute values outside the vocabulary (a warning each) instead of refusing.
    Under ``torchrun``, or with ``resume`` (complete an existing ``out``), a ``requests`` file is sharded
    across the processes case by case (:mod:`lesiondiffusion.batch`).
    """
    params = dict(locals())
    started = time.perf_counter()
    if requests and batch.wanted(flag(resume)):
        if not out:
            raise LesionDiffusionError("give the output folder: --out DIR")
        given = {k: v for k, v in params.items() if k not in ("requests", "out", "resume", "overwrite")}

        def one_case(request_file: Path, case_out: Path, case_device: str | None) -> Any:
            return synthesize(
                **{**given, "device": device or case_device}, requests=str(request_file), out=str(case_out)
            )

        return batch.run_batch(Path(requests), Path(out), one_case, resume=flag(resume), overwrite=flag(overwrite))
    overwrite, keep_work, verbose = flag(overwrite), flag(keep_work), flag(verbose)  # "--overwrite false" is false
    isolate = flag(isolate)
    extra = stage_overrides(bundle_overrides, ("preprocess", *NETWORKS[1:]))
    # the endpoint options win over --bundle_overrides, which win over the environment, then the default
    endpoint = {
        "report_base_url": report_base_url,
        "report_model": report_model,
        "report_api_key_env": report_api_key_env,
    }
    extra["preprocess"].update({k: str(v) for k, v in endpoint.items() if v not in (None, "")})
    for stage, keys in extra.items():
        check_overrides(stage, ("inference.json",), keys, "--bundle_overrides: ")
    if not out:
        raise LesionDiffusionError("give the output folder: --out DIR")
    out_dir = user_path(out).absolute()  # the bundles run in their own folders
    if out_dir.exists() and not overwrite:
        raise LesionDiffusionError(f"{out_dir}: output folder exists; pass --overwrite to replace it")
    check_output_target(out_dir, overwrite)  # a file, or the current folder, is refused before any work
    settings = SynthesisSettings(
        seed=int(seed), num_lesions=int(num_lesions), steps=None if steps is None else int(steps), sampler=str(sampler),
        guidance_scale=None if guidance is None else float(guidance),
        margin_mm=float(margin_mm), feather_mm=float(feather_mm), preset=str(preset), report_provider=str(report_provider),
        organ_seg_version=str(organ_seg_version), device=None if device in (None, "", "auto") else str(device), extra={"bundle_overrides": extra},
    )  # fmt: skip
    settings.check()
    check_device(settings.device)
    if settings.report_provider.strip().lower() == "openai":  # printed and recorded; the key never is
        used = llm.endpoint_settings(*(extra["preprocess"].get(k) for k in endpoint))
        settings.extra["report_endpoint"] = used
        print(
            f"report provider: openai at {used['base_url']} (from {used['base_url_from']}), model {used['model']}, "
            f"key from ${used['api_key_env']}"
        )
    cases = gather_requests(
        image, image_list, requests, attributes, attributes_list, organ, lesion_type, organ_seg, organ_seg_list, text
    )
    check_inputs(cases)
    check_inputs_outside(out_dir, [p for r in cases for p in (r.image, r.organ_seg) if p is not None])
    weight_files = weights_paths(weights)
    # one decoding of a case's CT and organ map, from the input checks to the outputs
    with shared_reads():
        # bad values, CT and organ map are refused before any work
        cases, refused = check_requests(cases, organ_seg_version, flag(allow_unknown_values))
        cases = read_texts(cases, settings.report_provider, extra["preprocess"], settings.seed)
        weight_record = {n: {"path": str(p.resolve()), "sha256": file_sha256(p)} for n, p in weight_files.items()}
        # a batch case the input checks refuse fails in the preprocess stage (they open it); the others run
        all_states = [
            CaseState(r, error=refused.get(r.case), stage="preprocess" if r.case in refused else None) for r in cases
        ]
        states = [s for s in all_states if s.ok]

        timings: dict[str, float] = {}
        memory: dict[str, float | None] = {}
        # one writer per output: a second run refuses here; work folders go on every exit path
        with output_lock(out_dir, overwrite, "synthesize"), work_dir(out_dir) as tmp:
            work = Path(tmp)
            lists = _write_inputs(work, states)
            stages = (
                (
                    "preprocess",
                    {**_stage_overrides("preprocess", settings, weight_files), **lists, **extra["preprocess"]},
                ),
                ("lmnet", {**_stage_overrides("lmnet", settings, weight_files), **extra["lmnet"]}),
                ("linet", {**_stage_overrides("linet", settings, weight_files), **extra["linet"]}),
            )
            previous: Path | None = None
            bundle_runs: dict[str, Any] = {}
            with tqdm(total=len(stages), desc="synthesis", unit="stage") as bar:
                for stage, overrides in stages:
                    bar.set_postfix_str(stage)
                    bundle_runs[stage] = _bundle_record(stage, overrides, work)
                    if not any(s.ok for s in states):
                        timings[stage], memory[stage] = 0.0, None
                    else:
                        if previous is not None:
                            overrides = {**overrides, "manifest": str(previous)}
                        timings[stage], memory[stage] = _run_stage(
                            stage, overrides, work / stage, states, verbose, isolate
                        )
                        previous = work / stage / MANIFEST_NAME
                    bar.update()
            timings["total"] = sum(timings.values())
            n_lesions = sum(len(s.entry.lesions) for s in states if s.ok and s.entry is not None)

            summary_cases = []
            with atomic_dir(out_dir, overwrite=overwrite) as staging:
                for s in all_states:
                    if s.ok:
                        try:
                            _write_case(
                                staging / s.request.case, s, settings, weight_record, timings, n_lesions, bundle_runs
                            )
                        except (LesionDiffusionError, OSError) as e:
                            s.error, s.stage = " ".join(str(e).split()), "output"
                            shutil.rmtree(staging / s.request.case, ignore_errors=True)
                    item = {"case": s.request.case, "status": "ok" if s.ok else "error"}
                    if not s.ok:
                        item.update(error=" ".join(str(s.error).split()), stage=s.stage)  # one line, whatever the cause
                    summary_cases.append(item)
                summary = {
                    "cases": summary_cases,
                    "succeeded": sum(s.ok for s in all_states),
                    "failed": sum(not s.ok for s in all_states),
                    "lesions": n_lesions,
                    "network_calls": {
                        stage: sum(network_calls(s.entry)[stage] for s in states if s.ok and s.entry is not None)
                        for stage in NETWORKS[1:]
                    },
                    "timings_s": {k: round(v, 3) for k, v in timings.items()},
                    "seconds_per_lesion": round(timings["total"] / n_lesions, 3) if n_lesions else None,
                    "peak_rss_mib": {k: None if v is None else round(v, 1) for k, v in memory.items()},
                    "parameters": settings.as_dict(),
                }
                # the whole command: input checks, the stages and writing every output (the timings are the stages')
                summary["wall_s"] = round(time.perf_counter() - started, 3)
                write_json(staging / "summary.json", summary)
                if keep_work:
                    shutil.copytree(work, staging / "work")
    for s in states:  # a report proposed offline after the endpoint failed: a warning line, even from a quiet stage
        for fallback in (s.entry.extra.get("report_provider") or {}).get("fallbacks", []) if s.ok and s.entry else []:
            if not verbose:
                logger.warning("%s: %s", s.request.case, fallback)
    for item in summary_cases:
        if item["status"] == "ok":
            print(f"{item['case']}: {out_dir / item['case'] / 'image.nii.gz'}")
        else:
            print(f"{item['case']}: failed in {item['stage']}: {item['error']}")
    if n_lesions:
        print(
            f"{n_lesions} lesion(s) in {timings['total']:.1f} s ({summary['seconds_per_lesion']:.1f} s per lesion); summary: {out_dir / 'summary.json'}"
        )
    if summary["failed"]:
        raise LesionDiffusionError(
            f"{summary['failed']} of {len(all_states)} case(s) failed (see {out_dir / 'summary.json'})"
        )
    return summary
