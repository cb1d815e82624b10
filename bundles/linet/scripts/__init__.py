"""The LINet bundle's own code (latent prepare-batch and loss, lesion inpainting, preview)."""

from . import common, inpaint, preview, train

__all__ = ["common", "inpaint", "preview", "train"]
