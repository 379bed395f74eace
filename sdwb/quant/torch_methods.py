"""Applying a PyTorch quantization method to a diffusers pipeline, in place, by its registered name.

Why in place on the pipeline's own modules: the result is still a ``StableDiffusionPipeline``
(same loop, same scheduler, same ``generate``), so every stage and the benchmark use it as is.
The methods themselves live one module each under :mod:`sdwb.quant.methods`; this module checks
that the device can run the chosen one and calls its registered applier.
"""

from __future__ import annotations

from sdwb.errors import SdwbError
from sdwb.quant.config import METHOD_INFO, QuantConfig
from sdwb.quant.methods.cast import LOW_DTYPES  # noqa: F401  (methods that store a low dtype)
from sdwb.quant.registry import APPLIERS, REFUSALS, REQUIREMENTS


def check_supported(config: QuantConfig, device: str = "cpu") -> None:
    """Raise the method's one-line "not supported on this device" error before any work, and the
    missing-library error of a method whose optional library is absent."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if kind not in METHOD_INFO[config.method]["device"]:
        why = REFUSALS.get(config.method, f"it runs on {METHOD_INFO[config.method]['device']} only")
        raise SdwbError(f"{config.method}: not supported on this device ({kind}): {why}")
    needs = REQUIREMENTS.get(config.method)
    if needs is not None:
        needs()


def apply_torch_method(pipe, config: QuantConfig, device: str = "cpu", state: dict | None = None) -> dict:
    """Apply a torch method to ``pipe`` in place (``device``: where the pipeline runs).

    ``state``: what a calibrated method needs (torch-int8-static: the activation ranges, from
    ``compress.calibration.calibrate_w8a8`` or the variant's file). The summary returned carries it
    as ``state``.
    """
    check_supported(config, device)
    applier = APPLIERS.get(config.method)
    if applier is not None:
        return applier(pipe, config, device, state)
    raise SdwbError(f"{config.method}: not a PyTorch method")
