"""LesionDiffusion-MONAI: shared core used by every bundle (labels, reports, transforms, data, I/O)."""

from lesiondiffusion.errors import InputError, LesionDiffusionError

__version__ = "0.2.0"
__all__ = ["InputError", "LesionDiffusionError", "__version__"]
