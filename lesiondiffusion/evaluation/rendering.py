"""The evaluation report as markdown and one line, and the contact sheet of case tiles."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from lesiondiffusion import attributes as A
from lesiondiffusion import realism as R
from lesiondiffusion.io import (
    StoredImage,
)
from lesiondiffusion.preview import before_after, caption_band


# ---- the report ---------------------------------------------------------------------------------------
def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100.0 * v:.{digits}f}%"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _short(density: str | None) -> str:
    return "-" if not density else density.replace(" lesion", "").replace("hypoattenuating ", "")


def _yes(v: bool | None) -> str:
    return "-" if v is None else "yes" if v else "**no**"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a row per case, totals, targets, missing/invalid cases, density groups."""
    t = report["totals"]
    lines = [
        "# Synthesis evaluation", "",
        f"Outputs: `{report['pred']}`  ", f"Requests: `{report['requests']}`", "",
        "## Cases", "",
        "| case | organ | inside | components | volume error | density requested -> measured (lesion - organ HU) | density ok "
        "| homogeneity requested -> measured | far voxels changed | preserved | blend-zone PSNR (dB) | problems |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for c in report["cases"]:
        if c["status"] != "ok":
            lines.append(f"| {c['case']} | {c['status']}: {c.get('error', '')} |" + " |" * 10)
            continue
        m, a, p = c["mask"], c["appearance"], c["preservation"]
        psnr = "inf" if p["blend_zone_rmse_hu"] == 0 else _num(p["blend_zone_psnr_db"])
        error = "-" if m["volume_error"] is None else f"{100 * m['volume_error']:+.1f}%"
        lines.append(
            f"| {c['case']} | {c['organ']} | {_pct(m['inside_fraction'])} | {m['components']}/{m['lesions']} "
            f"| {error} "
            f"| {_short(a.get('requested_density'))} -> {_short(a.get('measured_density'))} ({_num(a.get('delta_hu'), '+.1f')}) "
            f"| {_yes(a.get('density_match'))} | {a.get('requested_homogeneity') or '-'} -> {a.get('measured_homogeneity') or '-'} "
            f"| {p['far_changed']} of {p['far_voxels']} | {_pct(p['preserved_fraction'], 4)} | {psnr} | {'; '.join(c['problems'])} |"
        )
    lines += [
        "", "## Totals", "", "| measure | value |", "| --- | --- |",
        f"| cases requested / evaluated / missing / invalid | {t['requested']} / {t['evaluated']} / {t['missing']} / {t['invalid']} |",
        f"| masks fully inside the allowed region | {_pct(t['inside_rate'])} (mean fraction {_pct(t['mean_inside_fraction'])}, min {_pct(t['min_inside_fraction'])}) |",
        f"| one 6-connected component per lesion | {_pct(t['connected_rate'])} |",
        f"| median size error: volume (equivalent diameter) | {_pct(t['median_volume_error'])} ({_pct(t['median_diameter_error'])}) |",
        f"| density-class accuracy | {_pct(t['density_accuracy'])} of {t['density_cases']} |",
        f"| density direction (sign beyond +-{A.ISO_HU:g} HU) accuracy | {_pct(t['direction_accuracy'])} |",
        f"| homogeneity accuracy | {_pct(t['homogeneity_accuracy'])} of {t['homogeneity_cases']} |",
        f"| median CT-value error | {_num(t['median_abs_ct_value_error_hu'])} HU |",
        f"| cases with every voxel beyond the margin unchanged | {_pct(t['preserved_rate'])} ({t['far_voxels_changed']} voxel(s) changed in all) |",
        f"| synthetic CT on the input's grid, dtype and scaling | {_pct(t['grid_match_rate'])} |",
        f"| median blend-zone PSNR (peak {report['psnr_range_hu']:g} HU) | {_num(t['median_blend_zone_psnr_db'])} dB |",
        f"| density ordering (hypo < iso < hyper mean HU) | {_pct(t['density_ordering'])} of {t['density_ordering_pairs']} pairs |",
        "", "### Density accuracy per requested class", "", "| class | cases | correct | accuracy |", "| --- | --- | --- | --- |",
    ]  # fmt: skip
    for cls, c in t["density_per_class"].items():
        lines.append(f"| {cls} | {c['cases']} | {c['correct']} | {_pct(c['accuracy'])} |")
    lines += ["", "### Targets", "", "| target | value | required | met |", "| --- | --- | --- | --- |"]
    for name, g in t["targets"].items():
        op, threshold = g["target"].split()  # e.g. ">= 0.9"
        lines.append(f"| {name} | {_pct(g['value'])} | {op} {_pct(float(threshold), 0)} | {_yes(g['met'])} |")
    lines += realism_markdown(report)
    unmeasured = [c for c in report["cases"] if c["status"] != "ok"]
    if unmeasured:
        lines += ["", "## Cases not evaluated", ""]
        lines += [f"- `{c['case']}` ({c['status']}): {c.get('error', '')}" for c in unmeasured]
    ordering = report["density_ordering"]
    if ordering["details"]:
        lines += ["", "## Density groups (same image, seed and attributes but density)", ""]
        for g in ordering["details"]:
            members = ", ".join(
                f"{case} {_short(v['density'])} {v['mean_hu']:.1f} HU" for case, v in g["cases"].items()
            )
            lines.append(f"- {members}: {g['ordered_pairs']} of {g['pairs']} pairs ordered")
    return "\n".join(lines) + "\n"


def _beside(value: float | None, truth: float | None, fmt: str = ".2f") -> str:
    """``value (ground truth)``, the ground truth left out when there is none."""
    return _num(value, fmt) if truth is None else f"{_num(value, fmt)} ({_num(truth, fmt)})"


def realism_markdown(report: dict[str, Any]) -> list[str]:
    """The realism sections: a row per case beside the matched ground-truth lesions, totals, the distance."""
    t = report["totals"]["realism"]
    has_ref = report.get("reference") is not None
    note = (
        "ground-truth lesions of the same organ and density class in brackets"
        if has_ref
        else "no reference dataset given"
    )
    lines = [
        "", "## Realism", "", f"Reference: `{report.get('reference') or '-'}` ({note}).", "",
        "| case | fill ratio | interior fraction | solidity | sphericity | pieces (6 / 26-conn.) "
        "| lesion - organ HU: measured / report | noise std ratio | edge width (mm) | matched by | checks failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    checks = (("solid", "fill"), ("interior_ok", "interior"), ("delta_ok", "HU vs report"),
              ("delta_in_reference_range", "HU vs real"), ("noise_ok", "noise"), ("not_cuboid", "cuboid"))  # fmt: skip
    for c in report["cases"]:
        m = c.get("realism")
        if c["status"] != "ok" or not m:
            continue
        ref = m.get("reference") or {}
        failed = [name for key, name in checks if m.get(key) is False]
        lines.append(
            f"| {c['case']} | {_beside(m['fill_ratio'], ref.get('fill_ratio'))} "
            f"| {_beside(m['interior_fraction'], ref.get('interior_fraction'))} | {_beside(m['solidity'], ref.get('solidity'))} "
            f"| {_beside(m['sphericity'], ref.get('sphericity'))} | {m['components_6']} / {m['components_26']} "
            f"| {_num(m['median_delta_hu'], '+.1f')} / {_num(m['report_delta_hu'], '+.1f')}"
            f"{'' if ref.get('median_delta_hu') is None else ' (' + _num(ref['median_delta_hu'], '+.1f') + ')'} "
            f"| {_beside(m['noise_std_ratio'], ref.get('noise_std_ratio'))} "
            f"| {_beside(m['edge_width_mm'], ref.get('edge_width_mm'), '.1f')} {m.get('margin_class') or ''} "
            f"| {ref.get('match', '-')} ({ref.get('lesions', 0)}) | {', '.join(failed) or '-'} |"
        )
    syn, truth = t["synthetic"], t["ground_truth"] or {}
    lines += [
        "", "### Realism totals", "",
        f"Medians over {t['cases']} synthetic lesion(s) and {t['matched_reference_lesions']} matched ground-truth lesion(s) "
        f"(of {t['reference_lesions']}).", "",
        "| measure | synthetic | ground truth |", "| --- | --- | --- |",
    ]  # fmt: skip
    for key, name, fmt in (("fill_ratio", "fill ratio", ".3f"), ("interior_fraction", "interior fraction", ".3f"),
                           ("solidity", "solidity", ".3f"), ("sphericity", "sphericity", ".3f"),
                           ("box_fill", "share of its bounding box filled", ".3f"),
                           ("median_delta_hu", "lesion - organ median HU", "+.1f"),
                           ("noise_std_ratio", "noise std ratio (lesion / organ)", ".2f"),
                           ("edge_width_mm", "edge width (mm)", ".2f")):  # fmt: skip
        lines.append(f"| {name} | {_num(syn.get(key), fmt)} | {_num(truth.get(key), fmt)} |")
    for cls, v in t["delta_by_density"].items():
        lines.append(f"| lesion - organ median HU, {_short(cls)} ({v['cases']} / {v['reference_lesions']}) "
                     f"| {_num(v['synthetic'], '+.1f')} | {_num(v['ground_truth'], '+.1f')} |")  # fmt: skip
    for cls, v in t["edge_width_by_margin"].items():
        lines.append(f"| edge width (mm), {cls} ({v['cases']} / {v['reference_lesions']}) "
                     f"| {_num(v['synthetic'], '.2f')} | {_num(v['ground_truth'], '.2f')} |")  # fmt: skip
    lines += [
        "", "| check | rate |", "| --- | --- |",
        f"| one 6-connected piece per lesion | {_pct(t['one_piece_rate'])} |",
        f"| solid: fill ratio >= {R.MIN_FILL_RATIO:g} | {_pct(t['solid_rate'])} |",
        f"| interior fraction within {R.INTERIOR_TOLERANCE:g} of real lesions of that size | {_pct(t['interior_ok_rate'])} |",
        f"| lesion - organ HU of the report's sign and within {R.DELTA_TOLERANCE_HU:g} HU of it | {_pct(t['delta_ok_rate'])} |",
        f"| lesion - organ HU within real lesions' 10th-90th percentiles +-{A.ISO_HU:g} HU | {_pct(t['delta_in_reference_range_rate'])} |",
        f"| noise std {R.NOISE_RATIO_RANGE[0]:g}-{R.NOISE_RATIO_RANGE[1]:g}x the host organ's | {_pct(t['noise_ok_rate'])} |",
        f"| not a cuboid: fills <= {R.MAX_BOX_FILL:.0%} of its bounding box | {_pct(t['not_cuboid_rate'])} |",
    ]  # fmt: skip
    d = t["realism_distance"]
    n = d["cases_with_features"]
    lines += [
        "", "### Realism distance to the ground-truth lesions", "",
        f"Fréchet-style distance on {len(d['features'])} radiomics-style features (diagonal covariance, features scaled "
        f"by the ground truth's spread; in-house, not certified against IBSI/pyradiomics), {d['reference_lesions']} "
        "ground-truth lesion(s). Lower is closer. Baselines: the same masks filled flat at the report's CT value, and "
        "a ground-truth lesion's HU offsets copied into each mask.", "",
        "| lesions | distance | cases |", "| --- | --- | --- |",
        f"| synthetic | {_num(d['synthetic'], '.3f')} | {n['synthetic']} |",
        f"| flat fill (baseline) | {_num(d['flat'], '.3f')} | {n['flat']} |",
        f"| copy-paste (baseline) | {_num(d['copy_paste'], '.3f')} | {n['copy_paste']} |",
    ]  # fmt: skip
    return lines


def summary_line(report: dict[str, Any]) -> str:
    """One line: case counts and the headline figures."""
    t = report["totals"]
    r = t["realism"]
    d = r["realism_distance"]
    return (
        f"evaluated {t['evaluated']}/{t['requested']} case(s) ({t['missing']} missing, {t['invalid']} invalid): "
        f"inside {_pct(t['inside_rate'])}, connected {_pct(t['connected_rate'])}, preserved {_pct(t['preserved_rate'])}, "
        f"density {_pct(t['density_accuracy'])}, homogeneity {_pct(t['homogeneity_accuracy'])}, "
        f"median size error {_pct(t['median_volume_error'])}, density order {_pct(t['density_ordering'])} of "
        f"{t['density_ordering_pairs']} pair(s); realism: solid {_pct(r['solid_rate'])}, "
        f"fill {_num(r['synthetic']['fill_ratio'], '.2f')}, interior {_num(r['synthetic']['interior_fraction'], '.2f')}, "
        f"HU vs report {_pct(r['delta_ok_rate'])}, not cuboid {_pct(r['not_cuboid_rate'])}, noise ratio {_num(r['synthetic']['noise_std_ratio'], '.2f')}"
        + (
            "" if d["synthetic"] is None
            else f", distance {d['synthetic']:.2f} (flat {_num(d['flat'], '.2f')}, copy-paste {_num(d['copy_paste'], '.2f')})"
        )
    )  # fmt: skip


def case_caption(record: dict[str, Any]) -> str:
    """A case tile's caption: inside fraction, requested -> measured density, voxels changed far away."""
    m, a, p = record["mask"], record["appearance"], record["preservation"]
    return (f"inside {_pct(m['inside_fraction'], 0)}, {_short(a.get('requested_density'))}->"
            f"{_short(a.get('measured_density'))}, far changed {p['far_changed']}")  # fmt: skip


# ---- contact sheet ------------------------------------------------------------------------------------
def case_tile(
    before: StoredImage,
    after: StoredImage,
    lesion: np.ndarray,
    window: Sequence[float],
    size: int = 160,
    caption: str | None = None,
) -> Image.Image:
    """The preview's axial row for one case: overview with the zoom box, zoomed before, after, and the
    lesion outline (radiological orientation, physical aspect), under a one-line ``caption``."""
    return before_after(
        before.raw, after.raw, lesion, before.affine, planes=("axial",), window=window, size=size,
        before_scaling=(before.slope, before.inter), after_scaling=(after.slope, after.inter), caption=caption, caption_lines=1,
    )  # fmt: skip


def contact_sheet(tiles: Sequence[tuple[str, str, Image.Image | None]], size: int = 160) -> Image.Image:
    """One row per case ``(case, caption, image)``: a ``case: caption`` line over its :func:`case_tile`;
    a case without an image gets a grey block."""
    heads = [caption_band(f"{case}: {caption}", 4 * size, size, max_lines=1) for case, caption, _ in tiles]
    row = max((h.height for h in heads if h is not None), default=0) + max(
        [size] + [im.height for _, _, im in tiles if im is not None]
    )
    sheet = Image.new("RGB", (4 * size, max(1, len(tiles)) * row), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, ((_, _, image), head) in enumerate(zip(tiles, heads)):
        y = i * row
        if head is not None:
            sheet.paste(head, (0, y))
        if image is None:
            draw.rectangle((1, y + row - size, 4 * size - 2, y + row - 2), fill=(70, 70, 70))
        else:
            sheet.paste(image, (0, y + row - image.height))  # panels at the bottom: rows line up
    return sheet
