"""LMNet bundle glue: the training data split. Inference and the input transforms live in the package
(:mod:`lesiondiffusion.pipelines.lmnet`, :mod:`lesiondiffusion.pipelines.mask_inputs`)."""

from . import data

__all__ = ["data"]
