"""LMNet bundle code: training inputs from label maps, crops around the box, inference and post-processing."""

from . import common, data, postprocess, transforms

__all__ = ["common", "data", "postprocess", "transforms"]
