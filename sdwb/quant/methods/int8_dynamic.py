"""``torch-int8-dynamic``: torch.ao dynamic int8 of ``nn.Linear`` (weights int8, activations per call).

In a Stable Diffusion UNet the Linears are the attention projections, feed-forwards and
time-embedding projections; every convolution (most of the UNet's MACs) stays fp32, and the
summary's ``linear_weight_share`` says how much of the weights the method reached.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import Field

from sdwb.errors import SdwbError
from sdwb.quant.modules import component_modules, linear_share, linears
from sdwb.quant.registry import MethodConfig, applies, register


@register(backend="torch", device="cpu", why="torch.ao int8 kernels (fbgemm, oneDNN) run on the CPU only")
class TorchInt8DynamicConfig(MethodConfig):
    """torch.ao dynamic int8: ``nn.Linear`` weights int8, activations quantized per call (CPU)."""

    method: Literal["torch-int8-dynamic"] = "torch-int8-dynamic"
    engine: Literal["x86", "fbgemm", "onednn"] = "x86"
    exclude: list[str] = Field(default_factory=list, description="module-path globs left in fp32")


@applies(TorchInt8DynamicConfig)
def apply_int8_dynamic(pipe, config, device: str = "cpu", state: dict | None = None) -> dict:
    """torch.ao dynamic int8 of every ``nn.Linear`` in the configured components (CPU only)."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    engines = torch.backends.quantized.supported_engines
    if config.engine not in engines:
        raise SdwbError(
            f"torch-int8-dynamic: engine {config.engine!r} not supported on this device "
            f"(this torch has {', '.join(engines)})"
        )
    torch.backends.quantized.engine = config.engine
    count = 0
    share = linear_share(pipe, config.components)
    for comp in config.components:
        for _, root in component_modules(pipe, comp):
            names = linears(root, config.exclude)
            count += len(names)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao deprecation notices
                quantize_dynamic(
                    root, {n: default_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True
                )
    return {"quantized_linear_layers": count, "linear_weight_share": share, "engine": config.engine}
