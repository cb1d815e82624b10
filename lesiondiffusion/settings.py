"""Bundle settings as they arrive from JSON or the command line."""

from __future__ import annotations

from lesiondiffusion.errors import LesionDiffusionError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "none", "null", "")


def flag(value: object) -> bool:
    """A boolean setting given as JSON or on the command line (``--resume false`` arrives as a string).

    Raises :class:`~lesiondiffusion.errors.LesionDiffusionError` for any other string, so a typo never
    reads as true.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise LesionDiffusionError(f"expected true or false, got {value!r}")
    return bool(value)


# One table of the synthesis defaults: the command line (``synthesize``, ``benchmark``, ``demo``) and the
# inference bundles (``$lesiondiffusion.settings.default(...)`` in their configs) read it, so a direct bundle
# run and the chain sample alike. Steps per preset: the paper preset keeps the original's DDIM 200 for LMNet.
DEFAULTS: dict[str, dict[str, object]] = {
    # standardised tissue kept around the organ's box: the widest window LMNet or LINet cuts around a lesion
    # inside the organ lies within it (cpu: LMNet 64 mm, LINet 64 mm plus context; paper: 152 mm, 128 mm)
    "preprocess": {"crop_margin_mm": {"cpu": 48.0, "paper": 88.0}},
    "lmnet": {"steps": {"cpu": 25, "paper": 200}, "guidance_scale": 1.0},
    "linet": {"steps": {"cpu": 25, "paper": 25}, "guidance_scale": 2.0, "margin_mm": 3.0, "feather_mm": 2.0},
}


def default(network: str, key: str, preset: str = "cpu") -> float | int:
    """The default ``key`` of ``network`` (``lmnet``, ``linet``) for ``preset``, from :data:`DEFAULTS`."""
    try:
        value = DEFAULTS[network][key]
    except KeyError:
        raise LesionDiffusionError(f"no default {key!r} for {network!r}") from None
    if isinstance(value, dict):
        if preset not in value:
            raise LesionDiffusionError(f"unknown preset {preset!r}; use one of {', '.join(value)}")
        return value[preset]  # type: ignore[return-value]
    return value  # type: ignore[return-value]
