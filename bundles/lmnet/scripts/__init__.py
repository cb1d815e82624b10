"""LMNet bundle code: training inputs from label maps, crops around the box, inference and post-processing."""

from . import data, postprocess, transforms

__all__ = ["data", "postprocess", "transforms"]
