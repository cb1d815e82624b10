"""The VQ-GAN bundle's own code: data lists, the VQ-GAN trainer and inference output.

Everything shared with other bundles lives in :mod:`lesiondiffusion` (the autoencoder API is
:mod:`lesiondiffusion.autoencoder`; checkpoints and resuming :mod:`lesiondiffusion.training`; one-line
user errors :mod:`lesiondiffusion.errors`; boolean settings :func:`lesiondiffusion.settings.flag`).
"""

from __future__ import annotations

from . import data, inference, trainer  # configs reach them as scripts.<module>

__all__ = ["data", "inference", "trainer"]
