"""``quantize(source, config, out)``: the quantization verb, from a float model to a guarded variant.

One verb, one typed config per method (:mod:`sdwb.quant.config`). ``source`` is a torch
``StableDiffusionPipeline`` (not modified: a copy is quantized), a model spec (``builtin:NAME``,
a diffusers directory, a cached hub id) or, for the ONNX Runtime methods, an export directory
(``sdwb export onnx``). Steps:

1. Refuse what cannot run here (a GPU-only method on the CPU) before any work.
2. Render the guard's probe images with the float model (:mod:`compress.guard`).
3. torch methods: quantize the pipeline in place (:mod:`sdwb.quant.torch_methods`). ONNX Runtime
   methods: export the float model if needed, record calibration trajectories for static int8
   (:mod:`compress.calibration`), quantize each component's graph (:mod:`compress.quant_ort`).
4. Probe again with the quantized model; NaN/inf or PSNR under the floor raises.
5. With ``out``: everything is built under ``atomic_dir(out)`` -- a diffusers pipeline (torch)
   or an export directory with a re-hashed manifest (ORT), plus ``sdwb.json``
   (:mod:`sdwb.variants.requantize`) -- and appears only when all of the above passed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch

from compress import guard as guard_mod
from compress.variant_io import Variant
from sdwb.errors import SdwbError
from sdwb.quant.config import QuantConfig, backend_of, resolved


def _pipe_device(pipe) -> str:
    return str(pipe.unet.device) if hasattr(pipe, "unet") else "cpu"


def _check_device(config: QuantConfig, device: str) -> None:
    """GPU-only methods on a CPU (and the reverse) fail here, before any work."""
    from sdwb.quant.torch_methods import check_supported

    if backend_of(config) == "torch":
        check_supported(config, device)
    else:  # a graph method's optional library (openvino + nncf): named before any work
        from sdwb.quant.registry import REQUIREMENTS

        if config.method in REQUIREMENTS:
            REQUIREMENTS[config.method]()
    if config.method == "ort-fp16":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
            raise SdwbError(
                "ort-fp16: not supported on this device: needs an NVIDIA GPU and onnxruntime-gpu "
                f"(this onnxruntime offers {', '.join(ort.get_available_providers())})"
            )


def _float_source(source, backend: str):
    """(float torch pipeline or None, export dir or None, parent record)."""
    from compress.variant_io import load_source
    from sdwb.loading import require_family

    require_family(source, f"quantize ({backend})")
    src = load_source(source, refuse={
        "quantize": "{spec}: already quantized ({method}); quantize its parent ({parent}) instead",
    }, export_error=None)
    if src.export_dir is not None and backend == "torch":
        raise SdwbError(f"{src.parent['spec']}: an ONNX export; torch methods need a diffusers pipeline "
                        "directory or builtin model")
    return src.pipe, src.export_dir, src.parent


def quantize(
    source,
    config: QuantConfig,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    exporter: Callable | None = None,
) -> Variant:
    """Quantize ``source`` with ``config``; save a guarded variant to ``out`` when given.

    ``exporter`` (``export.onnx.export_onnx``, passed by the application layer: compression does
    not import the export stage) exports a torch source for an ONNX Runtime method; without it
    such a method takes an export directory only."""
    say = progress or (lambda _msg: None)
    backend = backend_of(config)
    if out is not None and Path(out).exists() and not overwrite:
        raise SdwbError(f"{out}: already exists (refusing to overwrite a finished variant; --overwrite)")
    if backend != "torch" and out is None:
        raise SdwbError(f"{config.method}: {backend} methods write an export directory: give an output")
    if not isinstance(source, (str, Path)):
        _check_device(config, _pipe_device(source))
    else:
        _check_device(config, "cpu")
    say("loading the float model")
    pipe, export_dir, parent = _float_source(source, backend)
    if backend == "torch":
        return _quantize_torch(pipe, config, out, overwrite, parent, say)
    if backend == "openvino":
        from compress.ov_variant import quantize_ov

        return quantize_ov(pipe, export_dir, config, Path(out), overwrite, parent, say, exporter)
    from compress.ort_variant import quantize_ort

    return quantize_ort(pipe, export_dir, config, Path(out), overwrite, parent, say, exporter)


def _quantize_torch(pipe, config, out, overwrite, parent, say) -> Variant:
    from compress.variant_io import finish_record, save_float
    from sdwb.quant.torch_methods import LOW_DTYPES, apply_torch_method
    from sdwb.runs import atomic_dir, atomic_write_json
    from sdwb.variants.record import new_record

    device = _pipe_device(pipe)
    reference = None
    if config.guard.enabled:
        say("guard: probe images with the float model")
        reference = guard_mod.render(pipe, config.guard)
    stores_low = config.method in LOW_DTYPES
    context = atomic_dir(out, overwrite=overwrite) if out is not None else contextlib.nullcontext(None)
    with context as tmp:
        if tmp is not None and not stores_low:  # packed int8 modules cannot go to safetensors
            say("saving the float weights (re-quantized on load)")
            save_float(pipe, tmp)
        say(f"applying {config.method}")
        started = time.perf_counter()
        state = calibration = None
        if config.method == "torch-int8-static":
            from compress.calibration import calibrate_w8a8

            state, calibration = calibrate_w8a8(pipe, config)
        summary = apply_torch_method(pipe, config, device, state)
        state = summary.pop("state", None)
        metrics = {"quantize_seconds": round(time.perf_counter() - started, 3), "summary": summary}
        if config.guard.enabled:
            say("guard: probe images with the quantized model")
            metrics["guard"] = guard_mod.check(config.method, reference, pipe, config.guard)
        else:
            metrics["guard"] = "disabled"
        record = None
        if tmp is not None:
            if stores_low:
                say("saving the low-precision weights")
                save_float(pipe, tmp)
            if state is not None:  # what re-applying needs besides the config (torch-int8-static ranges)
                from sdwb.quant.w8a8 import RANGES_FILE

                atomic_write_json(tmp / RANGES_FILE, state)
            weights = (
                "low precision (cast re-applied on load)"
                if stores_low
                else "float32 (quantization re-applied on load from config)"
            )
            record = finish_record(tmp, new_record(
                stage="quantize", method=config.method, backend="torch", weights=weights, parent=parent,
                config=resolved(config), calibration=calibration, metrics=metrics,
            ))
    return Variant(
        config.method,
        "torch",
        config,
        record or {"metrics": metrics},
        Path(out) if out else None,
        pipe,
        metrics,
    )
