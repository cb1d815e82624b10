"""``lesiondiffusion benchmark``: end-to-end seconds per lesion, by stage, peak memory, network evaluations.

Runs ``synthesize`` as a user does on a CT: by default the demo liver case's phantom (organ map from
``data/demo``) resliced onto a clinical grid (``--shape``, default 512 x 512 x 300 at 0.7 x 0.7 x 1 mm).
The chain runs in one process (each run in a fresh child, so its peak memory is its own), or with
``--isolate`` one bundle process per stage, each stage's wall time then including its process start
(importing MONAI, parsing the config, loading weights), which is also measured alone and reported.
``--baseline`` also times, in the same run, the chain as it was before the in-process chain and the
organ-neighbourhood preprocessing (one process per stage, the whole scan standardised). Network evaluations per lesion are the UNet calls: one
per sampling step and network (classifier-free guidance batches the conditional and unconditional pass
into one call of twice the batch, so the per-sample forward passes are reported too), against the
original's DDIM 200 + 200.
Writes ``<out>/end_to_end.json`` and ``.md``.
"""

from __future__ import annotations

import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lesiondiffusion.data_paths import DEMO_DATA
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.io import write_json, write_text
from lesiondiffusion.settings import default
from lesiondiffusion_tools.bundle_runner import BundleRunError, run_bundle
from lesiondiffusion_tools.synthesize import synthesize

logger = logging.getLogger(__name__)

ORIGINAL_EVALUATIONS = 400  # DDIM 200 steps for LMNet and for LINet


def clinical_grid_case(
    work: Path,
    shape: tuple[int, int, int] = (512, 512, 300),
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.0),
    src: Path = DEMO_DATA,
) -> tuple[Path, Path]:
    """Phantom CT (int16 HU, no lesion) + organ map of the demo liver case on an LPS grid of ``shape``.

    The 1 mm demo phantom is resampled onto the grid (air beyond it); returns (image, organ map) paths.
    """
    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from lesiondiffusion.phantom import axial_axis_of, make_phantom, read_organ_map

    seg, seg_img = read_organ_map(Path(src) / "Liver_cancer" / "totalseg_health.nii.gz")
    zooms = tuple(float(z) for z in seg_img.header.get_zooms()[:3])
    phantom = make_phantom(seg, spacing=zooms, seed=0, axial_axis=axial_axis_of(seg_img.affine))
    src_affine = np.asarray(seg_img.affine, dtype=np.float64)
    centre = (src_affine @ np.r_[(np.array(seg.shape) - 1) / 2, 1])[:3]
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    work.mkdir(parents=True, exist_ok=True)
    out = []
    # zero padding outside the phantom: shift HU so that zero is air (-1000 HU)
    for name, data, mode, dtype, offset in (
        ("image", phantom, "bilinear", np.int16, 1000.0),
        ("organ_seg", seg, "nearest", np.uint8, 0.0),
    ):
        src_t = MetaTensor(
            torch.as_tensor(np.asarray(data, dtype=np.float32) + offset)[None], affine=torch.as_tensor(src_affine)
        )
        moved = SpatialResample(mode=mode, padding_mode="zeros")(
            src_t, dst_affine=torch.as_tensor(affine), spatial_size=shape
        )
        path = work / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.rint(np.asarray(moved[0]) - offset).astype(dtype), affine), str(path))
        out.append(path)
    return out[0], out[1]


def _in_child(function: Any, *args: Any) -> Any:
    """Run ``function(*args)`` in a fresh process: a bundle process started later by this one would
    otherwise inherit this process's memory high-water mark, and its peak memory would be misreported."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def _call_synthesize(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``synthesize(**kwargs)``; run through :func:`_in_child`, so the stage peaks are a fresh process's own."""
    return synthesize(**kwargs)


def _stage_results(runs: list[dict[str, Any]], guidance: float | None, preset: str) -> dict[str, Any]:
    """Seconds per lesion by stage (median over runs), peak memory, network evaluations and forward passes."""
    lesions = runs[0]["lesions"]
    by_stage = {
        s: float(np.median([r["timings_s"][s] for r in runs])) / lesions for s in ("preprocess", "lmnet", "linet")
    }
    # as the bundles counted them (an LMNet retry after a rejected mask costs its steps again)
    by_net = {k: float(np.median([r["network_calls"][k] / r["lesions"] for r in runs])) for k in ("lmnet", "linet")}
    scale = {k: float(default(k, "guidance_scale", preset) if guidance is None else guidance) for k in by_net}
    passes = sum(v * (2 if scale[k] not in (0.0, 1.0) else 1) for k, v in by_net.items())  # guidance: two, batched
    return {
        "lesions": lesions,
        "seconds_per_lesion_by_stage": {k: round(v, 2) for k, v in by_stage.items()},
        "seconds_per_lesion": round(sum(by_stage.values()), 2),
        # the whole command per lesion: input checks and writing the outputs too
        "seconds_per_lesion_end_to_end": round(float(np.median([r["wall_s"] for r in runs])) / lesions, 2),
        "seconds_per_lesion_networks": round(by_stage["lmnet"] + by_stage["linet"], 2),
        "peak_rss_mib": {s: max(r["peak_rss_mib"][s] for r in runs) for s in ("preprocess", "lmnet", "linet")},
        "network_evaluations": float(sum(by_net.values())),
        "network_evaluations_by_stage": by_net,
        "forward_passes": passes,
    }


def startup_seconds(work: Path) -> float:
    """Wall time of a LINet bundle run that stops right after start-up (a manifest that does not exist)."""
    t0 = time.perf_counter()
    try:
        run_bundle("linet", {"manifest": str(work / "missing.json"), "output_dir": str(work / "none")}, capture=True)
    except BundleRunError:
        pass
    return time.perf_counter() - t0


def _markdown(report: dict[str, Any]) -> str:
    p, r = report["parameters"], report["results"]
    steps = "each network's default" if p["steps"] is None else p["steps"]
    guidance = "each network's default" if p["guidance"] is None else p["guidance"]
    chain = "one bundle process per stage" if p["isolate"] else "the three stages in one process"
    lines = [
        "# End-to-end synthesis benchmark",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}. Input: {report['input']}.",
        f"Preset `{p['preset']}`, sampler `{p['sampler']}`, steps {steps}, guidance {guidance}, {r['lesions']} lesion(s) per run, "
        f"{p['repeats']} run(s), {chain}.",
        "",
        "| stage | seconds per lesion (median) | peak memory (MiB) |",
        "| --- | --- | --- |",
    ]
    for stage in ("preprocess", "lmnet", "linet"):
        lines.append(f"| {stage} | {r['seconds_per_lesion_by_stage'][stage]:.1f} | {r['peak_rss_mib'][stage]:.0f} |")
    lines += [
        f"| **total** | **{r['seconds_per_lesion']:.1f}** | **{max(r['peak_rss_mib'].values()):.0f}** |",
        f"| whole command (input checks and writing the outputs too) | {r['seconds_per_lesion_end_to_end']:.1f} | |",
        "",
        f"- LMNet + LINet (preprocessing excluded): {r['seconds_per_lesion_networks']:.1f} s per lesion; "
        + (
            f"of which process start-up (import, config, no work) is about {r['startup_s']:.1f} s per bundle process."
            if p["isolate"]
            else f"no bundle process is started (one `python -m monai.bundle run` start alone takes about {r['startup_s']:.1f} s)."
        ),
        f"- Network evaluations (UNet calls) per lesion, as the bundles counted them: {r['network_evaluations']:g} "
        f"(LMNet {r['network_evaluations_by_stage']['lmnet']:g}, LINet {r['network_evaluations_by_stage']['linet']:g}; an LMNet "
        f"retry after a rejected mask counts its steps again), i.e. {r['forward_passes']:g} per-sample forward passes with guidance "
        f"batched; the original: {ORIGINAL_EVALUATIONS} calls.",
        "",
    ]
    b = report.get("baseline")
    if b:
        lines += [
            "## Before: one process per stage, the whole scan standardised (same run, same input)",
            "",
            "| stage | seconds per lesion | peak memory (MiB) |",
            "| --- | --- | --- |",
        ]
        for stage in ("preprocess", "lmnet", "linet"):
            lines.append(
                f"| {stage} | {b['seconds_per_lesion_by_stage'][stage]:.1f} | {b['peak_rss_mib'][stage]:.0f} |"
            )
        lines += [
            f"| **total** | **{b['seconds_per_lesion']:.1f}** | **{max(b['peak_rss_mib'].values()):.0f}** |",
            f"| whole command | {b['seconds_per_lesion_end_to_end']:.1f} | |",
            "",
        ]
    return "\n".join(lines)


def benchmark(
    image: str | None = None,
    organ_seg: str | None = None,
    organ: str = "liver",
    lesion_type: str = "cyst",
    shape: tuple[int, int, int] = (512, 512, 300),
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.0),
    preset: str = "cpu",
    steps: int | None = None,
    sampler: str = "ddim",
    guidance: float | None = None,
    repeats: int = 1,
    weights: str | None = None,
    out: str = "benchmarks/results",
    device: str | None = None,
    bundle_overrides: Any = None,
    isolate: bool = False,
    baseline: bool = False,
) -> dict[str, Any]:
    """Time ``synthesize`` end to end; writes ``<out>/end_to_end.{json,md}`` and returns the report.

    ``steps`` and ``guidance`` unset: each network's default (:data:`lesiondiffusion.settings.DEFAULTS`).
    ``isolate``: one bundle process per stage. ``baseline``: also time the chain as it was before (one
    process per stage, the whole scan standardised) on the same input.
    """
    import sys

    from lesiondiffusion.settings import flag

    command = (
        "lesiondiffusion benchmark " + " ".join(sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "benchmark"
        else "lesiondiffusion benchmark"
    )
    if int(repeats) < 1:
        raise LesionDiffusionError(f"--repeats must be at least 1, not {repeats}")
    with tempfile.TemporaryDirectory(prefix="lesiondiffusion-bench-") as tmp:
        work = Path(tmp)
        if image is None:
            t0 = time.perf_counter()
            ct, seg = _in_child(
                clinical_grid_case, work / "input", tuple(int(v) for v in shape), tuple(float(v) for v in spacing)
            )
            logger.info(
                "input built in %.1f s: %s voxels at %s mm", time.perf_counter() - t0, tuple(shape), tuple(spacing)
            )
            described = f"demo liver phantom on a {'x'.join(map(str, shape))} grid at {'x'.join(map(str, spacing))} mm"
        else:
            ct, seg = Path(image), (Path(organ_seg) if organ_seg else None)
            described = str(ct)
        isolate, baseline = flag(isolate), flag(baseline)
        common = dict(
            image=str(ct), organ_seg=None if seg is None else str(seg), organ=organ, lesion_type=lesion_type, steps=steps,
            sampler=sampler, guidance=guidance, preset=preset, weights=weights, device=device, verbose=False,
        )  # fmt: skip

        def repeated(name: str, overrides: Any, isolated: bool) -> list[dict[str, Any]]:
            """``repeats`` runs, seeds 0, 1, ...; an in-process chain in a fresh child (its own peak memory)."""
            out = []
            for i in range(int(repeats)):
                kwargs = {**common, "seed": i, "out": str(work / f"{name}_{i}"), "bundle_overrides": overrides,
                          "isolate": isolated}  # fmt: skip
                out.append(synthesize(**kwargs) if isolated else _in_child(_call_synthesize, kwargs))
            return out

        runs = repeated("run", bundle_overrides, isolate)
        before = []
        if baseline:
            from lesiondiffusion_tools.synthesize import stage_overrides

            overrides = stage_overrides(bundle_overrides, ("preprocess", "lmnet", "linet"))
            overrides["preprocess"] = {**overrides["preprocess"], "crop_margin_mm": ""}  # the whole scan
            before = repeated("before", overrides, True)
        startup = startup_seconds(work)
    results = _stage_results(runs, None if guidance is None else float(guidance), preset)
    report = {
        "command": command,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores, {device or 'auto'} device, "
        f"load average {__import__('os').getloadavg()[0]:.1f} at the end (a shared machine inflates every figure), "
        f"NUMPY_MADVISE_HUGEPAGE={__import__('os').environ.get('NUMPY_MADVISE_HUGEPAGE', 'unset')}",
        "input": described,
        "parameters": {
            "preset": preset, "steps": None if steps is None else int(steps), "sampler": sampler,
            "guidance": None if guidance is None else float(guidance), "repeats": int(repeats), "isolate": isolate,
        },
        "results": {**results, "startup_s": round(startup, 2), "original_network_evaluations": ORIGINAL_EVALUATIONS},
        "runs": runs,
    }  # fmt: skip
    if before:
        report["baseline"] = _stage_results(before, None if guidance is None else float(guidance), preset)
        report["baseline_runs"] = before
    out_dir = Path(out)
    write_json(out_dir / "end_to_end.json", report)
    write_text(out_dir / "end_to_end.md", _markdown(report))
    print(_markdown(report))
    print(f"written: {out_dir / 'end_to_end.json'}, {out_dir / 'end_to_end.md'}")
    return report
