"""PyTorch quantization of a diffusers pipeline, in place: bf16/fp16 casts, dynamic int8, torchao.

Why in place on the pipeline's own modules: the result is still a ``StableDiffusionPipeline``
(same loop, same scheduler, same ``generate``), so every stage and the benchmark use it as is.

Casts (``torch-bf16``/``torch-fp16``): a component's modules are cast to the low dtype, except
those matching a keep-rule, which stay fp32 (a rule is a class name such as ``GroupNorm`` or a
glob over the module path such as ``conv_out`` / ``*.norm*``). Dtypes meet at module borders:
every low-precision module with weights casts its floating inputs to the low dtype, every kept
module casts its inputs to fp32, and the component returns fp32 so the scheduler's arithmetic
stays fp32 (diffusers draws the latents in the text encoder's dtype, so the text encoder's
embeddings always stay fp32). A hook is a dtype check on tensors that are mostly already right.

``torch-int8-dynamic``: ``torch.ao.quantization.quantize_dynamic`` of ``nn.Linear`` only. In a
Stable Diffusion UNet that is the attention projections, feed-forwards and time-embedding
projections; every convolution (most of the UNet's MACs) stays fp32: :func:`linear_share` says
how much of the weights the method reached. ``torchao-*`` use ``torchao.quantization.quantize_``
on ``nn.Linear`` (same coverage); int4 weight-only has no CPU kernel in torchao 0.18.
"""

from __future__ import annotations

import fnmatch
import warnings

import torch

from sdwb.errors import SdwbError
from sdwb.quant.config import QuantConfig

LOW_DTYPES = {"torch-bf16": torch.bfloat16, "torch-fp16": torch.float16}
# The appliers of the torch methods registered in sdwb.quant.config: method name -> function
# ``(pipe, config, device, state) -> summary`` (see :func:`applies`).
APPLIERS: dict[str, object] = {}


def applies(*methods: str):
    """Function decorator: register the applier of torch quantization ``methods``."""

    def add(fn):
        for name in methods:
            APPLIERS[name] = fn
        return fn

    return add
ALWAYS_FP32 = {"text_encoder": ["text_model.embeddings", "embeddings"]}


def component_modules(pipe, name: str) -> list[tuple[str, torch.nn.Module]]:
    """The torch modules a component name covers: ``vae_decoder`` is post_quant_conv + decoder."""
    if name == "unet":
        return [("unet", pipe.unet)]
    if name == "text_encoder":
        return [("text_encoder", pipe.text_encoder)]
    if name == "vae_decoder":
        mods = [
            ("vae.post_quant_conv", getattr(pipe.vae, "post_quant_conv", None)),
            ("vae.decoder", pipe.vae.decoder),
        ]
        return [(n, m) for n, m in mods if m is not None]
    raise SdwbError(f"component {name!r}: expected one of unet, text_encoder, vae_decoder")


def _matches(rules: list[str], path: str, module: torch.nn.Module) -> bool:
    cls = type(module).__name__
    return any(
        rule == cls
        or fnmatch.fnmatchcase(path, rule)
        or path == rule
        or path.startswith(rule + ".")
        or fnmatch.fnmatchcase(path, f"*.{rule}")
        for rule in rules
    )


def _cast_tree(obj, dtype):
    """``obj`` with every floating tensor cast to ``dtype`` (tuples, lists, dicts, ModelOutputs)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, dict):  # also diffusers/transformers ModelOutput (an OrderedDict)
        for key in list(obj.keys()):
            obj[key] = _cast_tree(obj[key], dtype)
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_tree(x, dtype) for x in obj)
    return obj


def _input_caster(dtype):
    def hook(_module, args, kwargs):
        return _cast_tree(args, dtype), _cast_tree(kwargs, dtype)

    return hook


def _output_caster(dtype):
    def hook(_module, _args, output):
        return _cast_tree(output, dtype)

    return hook


@applies("torch-bf16", "torch-fp16")
def apply_cast(pipe, config: QuantConfig, device: str = "cpu", state: dict | None = None) -> dict:
    """Cast the configured components to bf16/fp16 with fp32 keep-rules; returns a summary."""
    dtype = LOW_DTYPES[config.method]
    kept, low, handles = [], 0, []
    for comp in config.components:
        rules = list(config.keep_fp32) + ALWAYS_FP32.get(comp, [])
        for root_name, root in component_modules(pipe, comp):
            keep_roots = [n for n, m in root.named_modules() if n and _matches(rules, n, m)]
            keep_roots = [
                n for n in keep_roots if not any(n.startswith(k + ".") for k in keep_roots if k != n)
            ]
            kept += [f"{root_name}.{n}" for n in keep_roots]
            kept_set = set(keep_roots)
            for name, module in root.named_modules():
                inside_kept = any(name == k or name.startswith(k + ".") for k in kept_set)
                if name in kept_set:
                    handles.append(
                        module.register_forward_pre_hook(_input_caster(torch.float32), with_kwargs=True)
                    )
                    continue
                if inside_kept:
                    continue
                own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
                own += [b for b in module.buffers(recurse=False) if b.is_floating_point()]
                if own:
                    for t in own:
                        t.data = t.data.to(dtype)
                    low += sum(t.numel() for t in own)
                    handles.append(module.register_forward_pre_hook(_input_caster(dtype), with_kwargs=True))
            handles.append(root.register_forward_hook(_output_caster(torch.float32)))
    return {
        "low_precision_params": low,
        "kept_fp32_modules": kept,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _linears(root: torch.nn.Module, exclude: list[str]) -> list[str]:
    return [
        n
        for n, m in root.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]


def linear_share(pipe, components) -> dict:
    """How much of each component's weights sits in ``nn.Linear`` (what Linear-only methods reach)."""
    out = {}
    for comp in components:
        total = linear = 0
        for _, root in component_modules(pipe, comp):
            for m in root.modules():
                n = sum(p.numel() for p in m.parameters(recurse=False))
                total += n
                linear += n if isinstance(m, torch.nn.Linear) else 0
        out[comp] = round(linear / max(total, 1), 4)
    return out


@applies("torch-int8-dynamic")
def apply_int8_dynamic(pipe, config: QuantConfig, device: str = "cpu", state: dict | None = None) -> dict:
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
            names = _linears(root, config.exclude)
            count += len(names)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao deprecation notices
                quantize_dynamic(
                    root, {n: default_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True
                )
    return {"quantized_linear_layers": count, "linear_weight_share": share, "engine": config.engine}


def _torchao():
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


@applies("torchao-int8-weight-only", "torchao-int4-weight-only")
def apply_torchao(pipe, config: QuantConfig, device: str = "cpu", state: dict | None = None) -> dict:
    """torchao weight-only int8 (CPU and CUDA) or int4 (CUDA only in torchao 0.18) of ``nn.Linear``."""
    quantize_ = _torchao()
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
            names = set(_linears(root, config.exclude))
            count += len(names)
            paths = {id(m): n for n, m in root.named_modules()}

            def selected(module, fqn=None, paths=paths, names=names):
                return paths.get(id(module)) in names

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_(root, ao_config, filter_fn=selected)
    return {"quantized_linear_layers": count, "linear_weight_share": share}


def check_supported(config: QuantConfig, device: str = "cpu") -> None:
    """Raise the method's one-line "not supported on this device" error before any work."""
    cuda = str(device).startswith("cuda")
    if config.method == "torch-fp16" and not cuda:
        raise SdwbError(
            "torch-fp16: not supported on this device (cpu): float16 needs a CUDA GPU "
            "(CPU fp16 kernels are emulated and slow); use torch-bf16 on the CPU"
        )
    if config.method in ("torch-int8-dynamic", "torch-int8-static") and cuda:
        raise SdwbError(
            f"{config.method}: not supported on this device (cuda): torch.ao int8 kernels (fbgemm, "
            "oneDNN) run on the CPU only"
        )
    if config.method == "torchao-int4-weight-only" and not cuda:
        raise SdwbError(
            "torchao-int4-weight-only: not supported on this device (cpu): torchao's int4 "
            "weight-only kernels (tinygemm / mslk) need a CUDA GPU; use torchao-int8-weight-only"
        )
    if config.method.startswith("torchao-"):
        _torchao()


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


@applies("torch-int8-static")
def apply_int8_static(pipe, config: QuantConfig, device: str = "cpu", ranges: dict | None = None) -> dict:
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
