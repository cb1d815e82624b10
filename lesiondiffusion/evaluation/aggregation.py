"""Measures across cases: rates, accuracies, medians, density ordering, and the targets they are held to."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from lesiondiffusion import realism as R
from lesiondiffusion import vocabulary as V
from lesiondiffusion.evaluation.metrics import density_of
from lesiondiffusion.requests import SynthesisRequest

# Density classes in the order their mean HU must follow (density ordering).
ORDERED_DENSITIES = ("hypodense lesion", "isodense lesion", "hyperdense lesion")
# What the shipped weights must reach on held-out requests: (summary key, comparison, threshold).
TARGETS: dict[str, tuple[str, str, float]] = {
    "masks inside the allowed region": ("inside_rate", ">=", 1.0),
    "voxels beyond the margin unchanged": ("preserved_rate", ">=", 1.0),
    "density-class accuracy": ("density_accuracy", ">=", 0.9),
    "median size error": ("median_volume_error", "<=", 0.3),
    "density ordering": ("density_ordering", ">=", 0.9),
}


# ---- across cases -------------------------------------------------------------------------------------
def density_ordering(requests: Sequence[SynthesisRequest], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Groups of requests that share image and seed and differ only in density; pairs in HU order.

    Only cases whose request itself names hypo-, iso- or hyperdense and that were measured take part. A
    pair of different classes is ordered when the darker class has the lower measured mean lesion HU.
    """
    groups: dict[tuple, list[tuple[int, str, float]]] = {}
    for r in requests:
        rec = records.get(r.case)
        density = density_of(r.attributes.get(V.DENSITY))
        hu = (rec or {}).get("appearance", {}).get("lesion_mean_hu")
        if rec is None or density not in ORDERED_DENSITIES or hu is None:
            continue
        rest = tuple(sorted((k, v) for k, v in r.attributes.items() if k != V.DENSITY))
        key = (str(r.image.resolve()), str(rec.get("seed")), rest)
        groups.setdefault(key, []).append((ORDERED_DENSITIES.index(density), r.case, float(hu)))
    details, pairs, ordered = [], 0, 0
    for members in groups.values():
        group_pairs = group_ordered = 0
        for i, (rank_a, _, hu_a) in enumerate(members):
            for rank_b, _, hu_b in members[i + 1 :]:
                if rank_a == rank_b:
                    continue
                group_pairs += 1
                group_ordered += (hu_a < hu_b) == (rank_a < rank_b) and hu_a != hu_b
        if group_pairs:
            details.append({
                "cases": {case: {"density": ORDERED_DENSITIES[rank], "mean_hu": hu} for rank, case, hu in members},
                "pairs": group_pairs,
                "ordered_pairs": group_ordered,
            })  # fmt: skip
            pairs += group_pairs
            ordered += group_ordered
    return {
        "groups": len(details),
        "pairs": pairs,
        "ordered_pairs": ordered,
        "fraction": ordered / pairs if pairs else None,
        "details": details,
    }


def _rate(values: Iterable[bool | None]) -> tuple[float | None, int]:
    known = [bool(v) for v in values if v is not None]
    return (sum(known) / len(known) if known else None), len(known)


def _median(values: Iterable[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return statistics.median(known) if known else None


def totals(
    records: Sequence[dict[str, Any]],
    missing: list[dict],
    invalid: list[dict],
    ordering: dict[str, Any],
    pool: Sequence[R.ReferenceLesion] | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Rates, accuracies and medians over the evaluated cases (see the module notes); ``realism`` holds
    :func:`lesiondiffusion.realism.realism_totals` (beside ``pool``, the reference lesions, when given)."""
    masks = [r["mask"] for r in records]
    looks = [r["appearance"] for r in records]
    kept = [r["preservation"] for r in records]
    inside = [m["inside_fraction"] for m in masks]
    per_class: dict[str, dict[str, Any]] = {}
    for a in looks:
        if a.get("density_match") is None:
            continue
        c = per_class.setdefault(a["requested_density"], {"cases": 0, "correct": 0})
        c["cases"] += 1
        c["correct"] += int(a["density_match"])
    for c in per_class.values():
        c["accuracy"] = c["correct"] / c["cases"]
    density_accuracy, density_cases = _rate(a.get("density_match") for a in looks)
    direction_accuracy, _ = _rate(a.get("direction_match") for a in looks)
    homogeneity_accuracy, homogeneity_cases = _rate(a.get("homogeneity_match") for a in looks)
    n = len(records)
    out = {
        "requested": n + len(missing) + len(invalid),
        "evaluated": n,
        "missing": len(missing),
        "invalid": len(invalid),
        "inside_rate": sum(1 for v in inside if v is not None and v >= 1.0) / n if n else None,
        "mean_inside_fraction": statistics.fmean(v or 0.0 for v in inside) if n else None,
        "min_inside_fraction": min((v or 0.0 for v in inside), default=None),
        "connected_rate": sum(bool(m["connected"]) for m in masks) / n if n else None,
        "median_volume_error": _median(None if m["volume_error"] is None else abs(m["volume_error"]) for m in masks),
        "median_diameter_error": _median(
            None if m["diameter_error"] is None else abs(m["diameter_error"]) for m in masks
        ),
        "density_accuracy": density_accuracy,
        "density_cases": density_cases,
        "density_per_class": dict(sorted(per_class.items())),
        "direction_accuracy": direction_accuracy,
        "homogeneity_accuracy": homogeneity_accuracy,
        "homogeneity_cases": homogeneity_cases,
        "median_abs_ct_value_error_hu": _median(
            None if a.get("ct_value_error_hu") is None else abs(a["ct_value_error_hu"]) for a in looks
        ),
        "preserved_rate": sum(bool(k["preserved"]) for k in kept) / n if n else None,
        "far_voxels_changed": sum(k["far_changed"] for k in kept),
        "grid_match_rate": sum(bool(k["grid_matches"]) for k in kept) / n if n else None,
        "min_preserved_fraction": min((k["preserved_fraction"] for k in kept), default=None),
        "median_blend_zone_psnr_db": _median(k["blend_zone_psnr_db"] for k in kept),
        "density_ordering": ordering["fraction"],
        "density_ordering_pairs": ordering["pairs"],
        "realism": R.realism_totals([r["realism"] for r in records if r.get("realism")], pool, reference),
    }
    out["targets"] = {}
    for name, (key, op, threshold) in TARGETS.items():
        value = out[key]
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out["targets"][name] = {"value": value, "target": f"{op} {threshold:g}", "met": met}
    return out
