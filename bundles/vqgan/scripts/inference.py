"""Whole-CT reconstruction output: the reconstruction on the input's own grid, a PSNR/SSIM report, and an
SSIM metric whose memory does not grow with the volume."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.metrics import SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.transforms import MapTransform

from lesiondiffusion.geometry import record_geometry, save_on_input_grid
from lesiondiffusion.io import write_json
from lesiondiffusion.transforms import unit_to_hu

logger = logging.getLogger(__name__)


class SaveReconstructiond(MapTransform):
    """Write ``d[key]`` (intensity map [0, 1] on the standardised grid) as HU on the input's grid.

    The output is ``<output_dir>/<case><postfix>.nii.gz`` with the input's affine, shape, header and
    dtype (integers rounded and clipped), written atomically; its path is stored under ``<key>_path``.
    The tensor itself is left as it is (metrics are computed on it afterwards).
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        output_dir: str | Path,
        postfix: str = "_recon",
        source_key: str = "source",
        case_key: str = "case",
    ) -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.postfix = postfix
        self.source_key = source_key
        self.case_key = case_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            source = d[self.source_key]
            geometry = record_geometry(source, standard_affine=pred.affine, standard_shape=pred.shape[1:])
            hu = unit_to_hu(pred[0].detach().float().cpu())
            out = self.output_dir / f"{d[self.case_key]}{self.postfix}.nii.gz"
            save_on_input_grid(out, hu.numpy(), geometry, mode="linear")
            logger.info("wrote %s", out)
            d[f"{key}_path"] = str(out)
        return d


class ReconstructionReport:
    """At the end of the run, write ``path`` (JSON): per case PSNR/SSIM and output file, their means, the settings.

    Metric values come from the evaluator's metric handlers (``save_details``), in case order.
    """

    def __init__(
        self,
        path: str | Path,
        metric_names: Sequence[str] = ("psnr", "ssim"),
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.metric_names = tuple(metric_names)
        self.settings = dict(settings or {})
        self.cases: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        for b, o in zip(
            batch if isinstance(batch, list) else [batch], output if isinstance(output, list) else [output]
        ):
            self.cases.append({"case": b["case"], "image": b["source"], "reconstruction": o.get("pred_path")})

    def write(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", {})
        means: dict[str, float] = {}
        for name in self.metric_names:
            values = torch.as_tensor(details[name]).reshape(len(self.cases), -1).mean(1).tolist()
            for case, v in zip(self.cases, values):
                case[name] = float(v)
            means[name] = float(sum(values) / len(values))
        report = {
            "space": "intensity map [0, 1] of the standardised grid (RAS, 1 mm by default), data range 1",
            "settings": self.settings,
            "mean": means,
            "cases": self.cases,
        }
        write_json(self.path, report)
        logger.info("wrote %s: %s", self.path, ", ".join(f"{k} {v:.4f}" for k, v in means.items()))


class ChunkedSSIMMetric(SSIMMetric):
    """MONAI's ``SSIMMetric``, computed slab by slab along the last axis: same value, bounded memory.

    The SSIM map is a valid-mode convolution, so slabs overlapping by ``win_size - 1`` slices tile it
    exactly; the mean over the tiles, weighted by their sizes, is the mean over the whole map.
    """

    def __init__(self, spatial_dims: int = 3, data_range: float = 1.0, slab: int = 32, **kwargs: Any) -> None:
        super().__init__(spatial_dims=spatial_dims, data_range=data_range, **kwargs)
        self.slab = int(slab)

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = int(self.kernel_size[-1])
        n_out = y.shape[-1] - w + 1
        if n_out <= self.slab:
            return super()._compute_metric(y_pred, y)
        total = torch.zeros(y.shape[0], device=y.device, dtype=torch.float64)
        count = 0
        for start in range(0, n_out, self.slab):
            n = min(self.slab, n_out - start)
            ssim_map, _ = compute_ssim_and_cs(
                y_pred=y_pred[..., start : start + n + w - 1],
                y=y[..., start : start + n + w - 1],
                spatial_dims=self.spatial_dims,
                data_range=self.data_range,
                kernel_type=self.kernel_type,
                kernel_size=self.kernel_size,
                kernel_sigma=self.kernel_sigma,
                k1=self.k1,
                k2=self.k2,
            )
            total += ssim_map.reshape(ssim_map.shape[0], -1).double().sum(1)
            count += ssim_map[0].numel()
        return (total / count).float()[:, None]
