"""Measuring synthesis outputs against their requests (``lesiondiffusion evaluate``).

:mod:`.metrics` measures one case, :mod:`.aggregation` sums the cases up, :mod:`.rendering` writes the
markdown and draws the contact sheet, and :mod:`.outputs` runs them over a synthesis output folder.

Input: a synthesis output folder (``<pred>/<case>/{image,label,organ_seg}.nii.gz, report.json,
provenance.json``, see :mod:`lesiondiffusion_tools.synthesize`) and the requests file that produced it
(:mod:`lesiondiffusion.requests`). Per case, on the input CT's own grid:

- **mask**: the fraction of lesion voxels (label 2) inside the allowed region (the requested organ in
  ``organ_seg.nii.gz``; for a lesion whose report cavity is *protruding*, the organ dilated by the
  lesion's requested radius, i.e. half its largest requested extent); the number of 6-connected
  (face-connected) components against the number of lesions (diagonal contact does not join pieces:
  under 26-connectivity a checkerboard speckle is "one" lesion; the 26-connected count is kept too);
  the label-2 volume (mm^3) against the ellipsoid of the report's ``size`` (``[[a b c]] pixel`` on the standardised 1 mm grid, i.e. mm), as a relative error
  (the "size error"; also given as the equivalent diameter's relative error). With several lesions in a
  case the volumes are summed and the protruding allowance is the largest lesion's;
- **appearance**: the lesion measured as a report would be (:func:`lesiondiffusion.reports.extraction.measure_lesion`):
  core HU minus the organ's parenchyma (sign and magnitude), the density class that gives
  (:func:`~lesiondiffusion.reports.extraction.density_class`) against the requested one, and homogeneity
  (smoothed spread) against the requested one;
- **realism** (:mod:`lesiondiffusion.lesion_metrics`, :mod:`lesiondiffusion.realism`): fill ratio,
  interior fraction, solidity, sphericity; lesion-minus-organ median HU against the report's CT value;
  interior high-pass noise against the host organ's; edge width. With a reference dataset
  (``reference``: ground-truth lesions, e.g. ``make-dataset``'s), each beside the matched real lesions'
  values, and a radiomics-style realism distance to them, with a flat-fill and a copy-paste baseline;
- **preservation**: every voxel at least ``margin_mm`` (the run's ``parameters.margin_mm``) from the
  lesion must hold the input CT's stored value bit for bit; the blend zone (within the margin, outside
  the lesion) is scored by its PSNR in HU against the input.

Across cases: rates and accuracies, per-class density accuracy, median volume error, and *density
ordering*: requests that share image and seed and whose attributes differ only in ``density`` form a
group, and each pair of them with different classes among hypo-, iso- and hyperdense must have its
measured mean lesion HU in that order.

A requested case without a folder (failed synthesis) is listed as missing; a folder whose files are
absent, unreadable or off the input's grid is listed as invalid with a one-line reason. Problems with
what the user gives (the requests file, an input CT) are :class:`~lesiondiffusion.errors.InputError`.
"""

from lesiondiffusion.evaluation.aggregation import TARGETS, density_ordering, totals
from lesiondiffusion.evaluation.metrics import (
    CaseError,
    density_matches,
    density_of,
    evaluate_case,
    homogeneity_of,
    inside_fraction,
    preservation,
)
from lesiondiffusion.evaluation.outputs import REPORT_FILES, evaluate_outputs
from lesiondiffusion.evaluation.rendering import case_tile, contact_sheet, markdown, summary_line

__all__ = [
    "REPORT_FILES", "TARGETS", "CaseError", "case_tile", "contact_sheet", "density_matches", "density_of",
    "density_ordering", "evaluate_case", "evaluate_outputs", "homogeneity_of", "inside_fraction", "markdown",
    "preservation", "summary_line", "totals",
]  # fmt: skip
