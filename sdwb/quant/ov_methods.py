"""The OpenVINO (NNCF) quantization methods' configs (their quantizers: ``compress.ov_variant``).

Why NNCF: it is how OpenVINO users quantize Stable Diffusion (optimum-intel calls it), so these
rows say whether the workbench's own ONNX Runtime int8 path is the best CPU choice or not. A
variant is an OpenVINO IR export (``sdwb export openvino`` layout) whose components NNCF changed:

- ``ov-int8-weights``: ``nncf.compress_weights`` (int8 weights, float activations) -- smaller
  files, and on CPUs with VNNI/AMX faster MatMuls; no calibration.
- ``ov-int8-static``: ``nncf.quantize`` of the UNet (weights and activations int8), calibrated on
  the same denoising trajectories the ONNX Runtime method records (``calibration``), with NNCF's
  transformer model type (attention MatMuls handled as NNCF recommends for transformers).
- ``ov-int8-hybrid``: optimum-intel's scheme for diffusion models: every weighted MatMul of every
  component gets int8 weights only, while the UNet's other operations (convolutions, ...) are
  fully quantized with calibrated activations; the text encoder and VAE are weight-compressed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sdwb.errors import SdwbError
from sdwb.quant.registry import COMPONENTS, CalibrationConfig, Component, MethodConfig, register

WHY = "OpenVINO's CPU plugin runs these variants (the openvino backend)"


def require_nncf() -> None:
    """One-line error when ``openvino`` or ``nncf`` is missing (the ``openvino`` extra)."""
    missing = []
    for name in ("openvino", "nncf"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SdwbError(f"the OpenVINO quantization methods need {' and '.join(missing)} "
                        "(pip install 'sd-workbench[openvino]')")


def _all_components() -> list[Component]:
    return list(COMPONENTS)


@register(backend="openvino", device="cpu", why=WHY, needs=require_nncf)
class OvInt8WeightsConfig(MethodConfig):
    """NNCF weight compression: int8 weights of MatMuls/convolutions/embeddings, float activations."""

    method: Literal["ov-int8-weights"] = "ov-int8-weights"
    components: list[Component] = Field(default_factory=_all_components, min_length=1)
    mode: Literal["int8_asym", "int8_sym"] = "int8_asym"


@register(backend="openvino", device="cpu", why=WHY, needs=require_nncf)
class OvInt8StaticConfig(MethodConfig):
    """NNCF post-training quantization of the UNet: int8 weights and activations, calibrated."""

    method: Literal["ov-int8-static"] = "ov-int8-static"
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    subset_size: int = Field(300, ge=1, le=100_000, description="recorded UNet calls NNCF calibrates on")
    model_type: Literal["transformer", "default"] = Field(
        "transformer", description="NNCF's model type: transformer keeps attention Softmax inputs float"
    )
    preset: Literal["performance", "mixed"] = Field(
        "mixed", description="mixed: asymmetric activations (NNCF's choice for transformers)"
    )
    fast_bias_correction: bool = True


@register(backend="openvino", device="cpu", why=WHY, needs=require_nncf)
class OvInt8HybridConfig(MethodConfig):
    """optimum-intel's hybrid scheme: int8 MatMul weights everywhere, UNet activations int8 elsewhere."""

    method: Literal["ov-int8-hybrid"] = "ov-int8-hybrid"
    components: list[Component] = Field(default_factory=_all_components, min_length=1)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    subset_size: int = Field(300, ge=1, le=100_000, description="recorded UNet calls NNCF calibrates on")
