"""``torch-int8-static``: W8A8 convolutions and linears in PyTorch, calibrated on trajectories.

Why: on CPUs without AMX (this machine: AVX-512 BF16 + VNNI), bf16 only doubles convolution and
GEMM throughput while int8 dot products (VNNI) give ~3-4x; and dynamic int8 of ``nn.Linear``
leaves the convolutions, most of a UNet's time, in fp32. Here every ``Conv2d`` and ``Linear`` of
the UNet (except ``exclude``, by default conv_in and conv_out) becomes a quantized module of
``torch.ao.nn.quantized`` (fbgemm/x86 kernels): weights symmetric int8 per output channel,
inputs and outputs asymmetric uint8 per tensor with ranges calibrated by replaying the UNet
inputs recorded along real denoising trajectories (:mod:`compress.calibration`); outputs are
dequantized at once, so everything between (norms, SiLU, residuals, attention) stays float.

The ranges are the method's state: a variant stores them in ``quantization_ranges.json`` next to
the float weights, and loading re-applies the method from them without re-calibrating.
``torch.ao`` quantized tensors are deprecated upstream (still shipped in torch 2.13); the int8
CPU kernels behind them (fbgemm, oneDNN) are the same that ``torch.compile`` PT2E flows use.
"""

from __future__ import annotations

import fnmatch
import warnings

import torch

from sdwb.errors import SdwbError

RANGES_FILE = "quantization_ranges.json"


def targets(unet: torch.nn.Module, exclude: list[str]) -> list[str]:
    """Module paths of the Conv2d/Linear layers to quantize (``exclude`` globs left float)."""
    out = []
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            if not any(fnmatch.fnmatchcase(name, p) or name == p for p in exclude):
                out.append(name)
    return out


# SDXL's micro-conditioning inputs of the UNet (``added_cond_kwargs``), recorded with each call.
ADDED_CONDITIONS = ("text_embeds", "time_ids")


def calibrate_ranges(unet: torch.nn.Module, names: list[str], feeds: list[dict]) -> dict[str, dict]:
    """Replay recorded UNet inputs; min/max of every target's input and output over all calls."""
    ranges: dict[str, dict] = {n: {"in": [0.0, 0.0], "out": [0.0, 0.0]} for n in names}
    modules = dict(unet.named_modules())
    handles = []

    def hook(name):
        def record(_module, args, output):
            r = ranges[name]
            for key, t in (("in", args[0]), ("out", output)):
                r[key][0] = min(r[key][0], float(t.min()))
                r[key][1] = max(r[key][1], float(t.max()))

        return record

    for name in names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            for feed in feeds:
                added = {k: torch.from_numpy(feed[k]) for k in ADDED_CONDITIONS if k in feed}
                unet(
                    torch.from_numpy(feed["sample"]),
                    torch.from_numpy(feed["timestep"])[0],
                    torch.from_numpy(feed["encoder_hidden_states"]),
                    added_cond_kwargs=added or None,
                )
    finally:
        for h in handles:
            h.remove()
    return ranges


def _qparams(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric uint8 scale and zero point covering ``[min(lo, 0), max(hi, 0)]``."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    return scale, int(min(255, max(0, round(-lo / scale))))


class W8A8(torch.nn.Module):
    """float in -> uint8 (calibrated) -> int8-weight conv/linear -> uint8 -> float out."""

    # The float module's shape attributes, kept: callers read them (SDXL's pipeline checks
    # ``unet.add_embedding.linear_1.in_features`` against its micro-conditioning size).
    SHAPE_ATTRIBUTES = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size")

    def __init__(self, qmodule: torch.nn.Module, in_range, channels_last: bool, float_module=None):
        super().__init__()
        self.q = qmodule
        for name in self.SHAPE_ATTRIBUTES:
            if hasattr(float_module, name):
                setattr(self, name, getattr(float_module, name))
        self.in_scale, self.in_zero = _qparams(*in_range)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        xq = torch.quantize_per_tensor(x, self.in_scale, self.in_zero, torch.quint8)
        return self.q(xq).dequantize()


def _quantized(module: torch.nn.Module, out_range) -> torch.nn.Module:
    w = module.weight.detach().float()
    dims = tuple(range(1, w.dim()))
    scale = (w.abs().amax(dim=dims) / 127.0).clamp(min=1e-8).double()
    wq = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    bias = None if module.bias is None else module.bias.detach().float()
    if isinstance(module, torch.nn.Conv2d):
        q = torch.ao.nn.quantized.Conv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            bias is not None,
            module.padding_mode,
        )
    else:
        q = torch.ao.nn.quantized.Linear(module.in_features, module.out_features, bias is not None)
    q.set_weight_bias(wq, bias)
    q.scale, q.zero_point = _qparams(*out_range)
    return q


def apply_w8a8(unet: torch.nn.Module, ranges: dict[str, dict], engine: str, channels_last: bool) -> int:
    """Replace every module named in ``ranges`` by its W8A8 version, in place; returns the count."""
    engines = torch.backends.quantized.supported_engines
    if engine not in engines:
        raise SdwbError(
            f"torch-int8-static: engine {engine!r} not supported on this device "
            f"(this torch has {', '.join(engines)})"
        )
    torch.backends.quantized.engine = engine
    modules = dict(unet.named_modules())
    missing = [n for n in ranges if n not in modules]
    if missing:
        raise SdwbError(f"torch-int8-static: the recorded ranges name modules this UNet lacks: {missing[:3]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao quantized-tensor deprecation notices
        for name, r in ranges.items():
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else unet
            float_module = modules[name]
            quantized = W8A8(_quantized(float_module, r["out"]), r["in"], channels_last, float_module)
            setattr(parent, child, quantized)
    return len(ranges)
