"""``torch-int8-static``: W8A8 Conv2d + Linear of the UNet with trajectory-calibrated activation ranges.

The kernels and module swap are :mod:`sdwb.quant.w8a8`; the ranges come from
``compress.calibration.calibrate_w8a8`` when quantizing, and from the variant's file when a
stored variant is loaded (the re-application needs them as ``state``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sdwb.errors import SdwbError
from sdwb.quant.modules import linear_share
from sdwb.quant.registry import CalibrationConfig, MethodConfig, applies, register


@register(backend="torch", device="cpu", why="torch.ao int8 kernels (fbgemm, oneDNN) run on the CPU only")
class TorchInt8StaticConfig(MethodConfig):
    """W8A8 static int8 Conv2d + Linear of the UNet (torch.ao quantized kernels, CPU), calibrated on
    denoising trajectories; ``attention: bf16-sliced`` also moves the attention core to bf16."""

    method: Literal["torch-int8-static"] = "torch-int8-static"
    components: list[Literal["unet"]] = Field(default_factory=lambda: ["unet"], min_length=1)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    engine: Literal["fbgemm", "x86", "onednn"] = "fbgemm"
    channels_last: bool = True
    exclude: list[str] = Field(
        default_factory=lambda: ["conv_in", "conv_out"], description="module-path globs left in float"
    )
    attention: Literal["sdpa", "bf16-sliced"] = Field(
        "sdpa", description="sdpa: diffusers' default (fp32 flash); bf16-sliced: sdwb.quant.attention"
    )


@applies(TorchInt8StaticConfig)
def apply_int8_static(pipe, config, device: str = "cpu", ranges: dict | None = None) -> dict:
    """W8A8 Conv2d/Linear of the UNet with calibrated activation ranges (``compress.calibration.
    calibrate_w8a8`` makes them when quantizing; a variant stores them for re-applying)."""
    from sdwb.quant import w8a8 as quant_w8a8

    if ranges is None:
        raise SdwbError("torch-int8-static: no calibrated activation ranges (quantize with `sdwb compress "
                        f"quantize`, which calibrates; a variant stores them in {quant_w8a8.RANGES_FILE})")
    share = linear_share(pipe, ["unet"])
    count = quant_w8a8.apply_w8a8(pipe.unet, ranges, config.engine, config.channels_last)
    if config.attention == "bf16-sliced":
        from sdwb.quant.attention import SlicedBf16AttnProcessor

        pipe.unet.set_attn_processor(SlicedBf16AttnProcessor())
    return {
        "quantized_layers": count,
        "linear_weight_share": share,
        "engine": config.engine,
        "attention": config.attention,
        "state": ranges,
    }
