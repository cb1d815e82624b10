"""Quality figures for a set of trained weights on held-out phantom requests (after ``lesiondiffusion synthesize``).

    python tools/check_demo_weights.py --requests runs/phantom_requests/requests.json \
        --synth runs/synth_check --out runs/synth_check/quality.json

For each synthesised case: lesion voxels and how many lie inside the requested organ, the lesion's
equivalent diameter against the requested size, the measured density class (``extract_report`` on the
output CT) against the requested one, and the lesion's mean HU (output) against the same voxels of the
input CT. For each density group (same image, only the density differs): whether the mean HU goes
hypo < iso < hyper. Prints a summary line and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from lesiondiffusion import vocabulary as V
from lesiondiffusion.attributes import extract_report
from lesiondiffusion.io import read_nifti_array, write_json
from lesiondiffusion.labels import label_table
from lesiondiffusion.requests import read_requests


def check(requests_path: Path, synth: Path) -> dict:
    """Per-case and summary figures (see the module notes)."""
    table = label_table("v1")
    cases = []
    for req in read_requests(requests_path):
        folder = synth / req.case
        row: dict = {"case": req.case, "requested_density": req.attributes[V.DENSITY], "ok": folder.is_dir()}
        if not folder.is_dir():
            cases.append(row)
            continue
        out, img = read_nifti_array(folder / "image.nii.gz")
        src, _ = read_nifti_array(req.image)
        label, _ = read_nifti_array(folder / "label.nii.gz")
        seg, _ = read_nifti_array(req.organ_seg)
        label, seg = np.rint(label).astype(np.uint8), np.rint(seg).astype(np.int32)
        organ_id = table.id(req.attributes["organ type"])
        lesion = label == 2
        spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
        n = int(lesion.sum())
        row.update(lesion_voxels=n, inside_organ=int((lesion & (seg == organ_id)).sum()))
        requested_mm = float(re.match(r"\s*([\d.]+)", req.attributes[V.SIZE]).group(1))
        diameter = (6.0 * n * float(np.prod(spacing)) / np.pi) ** (1 / 3) if n else 0.0
        row.update(requested_mm=requested_mm, diameter_mm=round(diameter, 1),
                   size_error=round(abs(diameter - requested_mm) / requested_mm, 3))  # fmt: skip
        if n:
            row.update(mean_hu_out=round(float(out[lesion].mean()), 1), mean_hu_in=round(float(src[lesion].mean()), 1))
            try:
                measured = extract_report(out, label, seg, spacing, organ_id, version="v1")
                row["measured_density"] = (measured.classes(V.DENSITY) or [""])[0]
            except Exception as e:  # a degenerate mask: report it, do not stop
                row["measured_density"] = f"error: {e}"
        cases.append(row)
    by_case = {c["case"]: c for c in cases}
    groups = {}
    for c in cases:
        base = c["case"].rsplit("_", 1)[0]
        groups.setdefault(base, []).append(c["case"])
    ordered = []
    for base, names in groups.items():
        hu = [by_case[n].get("mean_hu_out") for n in sorted(names, key=lambda s: ["hypo", "iso", "hyper"].index(s.rsplit("_", 1)[1]))]
        if None not in hu and len(hu) == 3:
            ordered.append({"group": base, "hu": hu, "ordered": bool(hu[0] < hu[1] < hu[2])})
    done = [c for c in cases if c.get("lesion_voxels")]
    summary = {
        "requests": len(cases),
        "synthesised": len(done),
        "masks_inside_organ": sum(c["inside_organ"] == c["lesion_voxels"] for c in done),
        "median_size_error": float(np.median([c["size_error"] for c in done])) if done else None,
        "density_accuracy": float(np.mean([c["measured_density"] == c["requested_density"] for c in done])) if done else None,
        "density_groups_ordered": f"{sum(g['ordered'] for g in ordered)}/{len(ordered)}",
        "mean_hu_shift_by_density": {
            d: round(float(np.mean([c["mean_hu_out"] - c["mean_hu_in"] for c in done if c["requested_density"] == d])), 1)
            for d in sorted({c["requested_density"] for c in done})
        },
    }
    return {"summary": summary, "groups": ordered, "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", required=True, type=Path)
    parser.add_argument("--synth", required=True, type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = check(args.requests, args.synth)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
