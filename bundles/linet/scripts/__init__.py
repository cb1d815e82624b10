"""The LINet bundle's own code (latent prepare-batch and loss, lesion inpainting)."""

from . import inpaint, train

__all__ = ["inpaint", "train"]
