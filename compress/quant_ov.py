"""NNCF on one OpenVINO graph: the quantizers of the methods in :mod:`sdwb.quant.ov_methods`.

Each quantizer takes the float ``ov.Model``, the method's config, the component's name and its
recorded inputs (a list of ``{input name: array}``), and returns the quantized model and a summary
(what NNCF was asked to do, how many weight constants became 8-bit). NNCF's own logging is quieted
to warnings and its rich progress bars ("Statistics collection", "Applying Smooth Quant") are off
while a quantizer runs: they redraw in place, which garbles a log file and interleaves with sdwb's
own status line (the caller says which component is being quantized, see ``compress.ov_variant``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

from sdwb.errors import SdwbError

QUANTIZERS: dict[str, Callable] = {}


def quantizes(method: str):
    """Function decorator: register the NNCF quantizer of ``method`` (run without NNCF's bars)."""

    def add(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def quiet(*args, **kwargs):
            with no_nncf_progress_bars():
                return fn(*args, **kwargs)

        QUANTIZERS[method] = quiet
        return fn

    return add


@contextlib.contextmanager
def no_nncf_progress_bars():
    """NNCF draws no progress bars inside this block.

    NNCF (3.x) draws them with ``nncf.common.logging.track_progress.track``, a class its
    algorithms import by name; it has a ``disable`` argument but no global switch (neither
    ``nncf.set_log_level`` nor an environment variable turns it off). So ``track.__init__`` is
    wrapped for the duration to pass ``disable=True``; the class is restored afterwards.
    """
    try:
        from nncf.common.logging.track_progress import track
    except ImportError:  # another NNCF layout: its bars stay, nothing else changes
        yield
        return
    original = track.__init__

    @functools.wraps(original)
    def silent(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    track.__init__ = silent
    try:
        yield
    finally:
        track.__init__ = original


def _nncf():
    import logging

    import nncf

    logging.getLogger("nncf").setLevel(logging.WARNING)
    return nncf


def int8_weight_count(model) -> int:
    """How many 8-bit weight constants (2-D or more) the graph holds."""
    return sum(1 for op in model.get_ops() if op.get_type_name() == "Constant"
               and op.get_output_element_type(0).get_type_name() in ("i8", "u8")
               and len(op.get_output_shape(0)) >= 2)


def weighted_matmuls(model) -> list[str]:
    """Friendly names of the MatMuls with a constant (weight) input: the ops hybrid quantization
    compresses weight-only and leaves out of activation quantization (optimum-intel's rule)."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        for port in range(2):
            node = op.input_value(port).get_node()
            while node.get_type_name() in ("Convert", "Reshape", "Transpose") and node.get_input_size():
                node = node.input_value(0).get_node()
            if node.get_type_name() == "Constant":
                names.append(op.get_friendly_name())
                break
    return names


def _dataset(nncf, feeds: list[dict], what: str):
    if not feeds:
        raise SdwbError(f"calibration recorded no inputs for {what}")
    return nncf.Dataset(feeds)


@quantizes("ov-int8-weights")
def _weights(model, config, name: str, feeds: list[dict]):
    nncf = _nncf()
    mode = {"int8_asym": nncf.CompressWeightsMode.INT8_ASYM, "int8_sym": nncf.CompressWeightsMode.INT8_SYM}
    out = nncf.compress_weights(model, mode=mode[config.mode])
    return out, {"nncf": nncf.__version__, "scheme": f"weights {config.mode}",
                 "int8_weights": int8_weight_count(out)}


@quantizes("ov-int8-static")
def _static(model, config, name: str, feeds: list[dict]):
    nncf = _nncf()
    if name != "unet":  # activations of the text encoder / VAE are not calibrated: weights only
        out = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        return out, {"nncf": nncf.__version__, "scheme": "weights int8_asym (not the UNet)",
                     "int8_weights": int8_weight_count(out)}
    preset = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if config.model_type == "transformer" else {}
    out = nncf.quantize(model, _dataset(nncf, feeds, name), subset_size=min(config.subset_size, len(feeds)),
                        preset=preset[config.preset], fast_bias_correction=config.fast_bias_correction,
                        **kwargs)
    return out, {"nncf": nncf.__version__, "scheme": f"static int8 ({config.model_type}, {config.preset})",
                 "calibration_samples": min(config.subset_size, len(feeds)),
                 "int8_weights": int8_weight_count(out)}


@quantizes("ov-int8-hybrid")
def _hybrid(model, config, name: str, feeds: list[dict]):
    nncf = _nncf()
    if name != "unet":
        out = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        return out, {"nncf": nncf.__version__, "scheme": "weights int8_asym",
                     "int8_weights": int8_weight_count(out)}
    matmuls = weighted_matmuls(model)
    has_conv = any(op.get_type_name() == "Convolution" for op in model.get_ops())
    ignored = nncf.IgnoredScope(types=["Convolution"]) if has_conv else None
    compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=ignored)
    advanced = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))
    out = nncf.quantize(compressed, _dataset(nncf, feeds, name), model_type=nncf.ModelType.TRANSFORMER,
                        subset_size=min(config.subset_size, len(feeds)),
                        ignored_scope=nncf.IgnoredScope(names=matmuls, validate=False),
                        advanced_parameters=advanced)
    return out, {"nncf": nncf.__version__,
                 "scheme": "hybrid: MatMul weights int8, other ops int8 activations",
                 "weight_only_matmuls": len(matmuls),
                 "calibration_samples": min(config.subset_size, len(feeds)),
                 "int8_weights": int8_weight_count(out)}
