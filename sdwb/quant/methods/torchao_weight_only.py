"""``torchao-int8-weight-only`` / ``torchao-int4-weight-only``: torchao's ``quantize_`` on ``nn.Linear``.

Needs the optional ``[torchao]`` extra; int4 weight-only has no CPU kernel in torchao 0.18.
"""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field

from sdwb.errors import SdwbError
from sdwb.quant.modules import component_modules, linear_share, linears
from sdwb.quant.registry import MethodConfig, applies, register


def load_torchao():
    """``torchao.quantization.quantize_``, imported without its load-time chatter on stderr.

    torchao 0.18 logs a warning per CUDA-only extension it cannot load and torch logs pytree
    deprecations while it imports; on a CPU build neither is actionable.
    """
    import logging

    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # also warns when first used
    loggers = [logging.getLogger("torchao")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise SdwbError(
            f"torchao is not installed ({exc}); install the extra: pip install 'sd-workbench[torchao]'"
        ) from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return quantize_


@register(backend="torch", device="cpu or cuda", needs=load_torchao)
class TorchaoInt8WeightOnlyConfig(MethodConfig):
    """torchao int8 weight-only quantization of ``nn.Linear`` (needs the ``[torchao]`` extra)."""

    method: Literal["torchao-int8-weight-only"] = "torchao-int8-weight-only"
    exclude: list[str] = Field(default_factory=list, description="module-path globs left in fp32")


@register(
    backend="torch",
    device="cuda",
    needs=load_torchao,
    why="torchao's int4 weight-only kernels (tinygemm / mslk) need a CUDA GPU; use torchao-int8-weight-only",
)
class TorchaoInt4WeightOnlyConfig(MethodConfig):
    """torchao int4 weight-only (grouped) quantization of ``nn.Linear``; needs a CUDA kernel."""

    method: Literal["torchao-int4-weight-only"] = "torchao-int4-weight-only"
    group_size: Literal[32, 64, 128, 256] = 128
    exclude: list[str] = Field(default_factory=list)


@applies(TorchaoInt8WeightOnlyConfig, TorchaoInt4WeightOnlyConfig)
def apply_torchao(pipe, config, device: str = "cpu", state: dict | None = None) -> dict:
    """torchao weight-only int8 (CPU and CUDA) or int4 (CUDA only in torchao 0.18) of ``nn.Linear``."""
    quantize_ = load_torchao()
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if config.method == "torchao-int8-weight-only":
        ao_config = Int8WeightOnlyConfig()
    else:
        ao_config = Int4WeightOnlyConfig(
            group_size=config.group_size, int4_packing_format="tile_packed_to_4d"
        )
    count = 0
    share = linear_share(pipe, config.components)
    for comp in config.components:
        for _, root in component_modules(pipe, comp):
            names = set(linears(root, config.exclude))
            count += len(names)
            paths = {id(m): n for n, m in root.named_modules()}

            def selected(module, fqn=None, paths=paths, names=names):
                return paths.get(id(module)) in names

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_(root, ao_config, filter_fn=selected)
    return {"quantized_linear_layers": count, "linear_weight_share": share}
