"""ONNX Runtime quantization of exported graphs: dynamic int8, static int8 (QDQ), fp16 (GPU).

Why on the exported graph: ONNX Runtime runs what its quantizer writes (ConvInteger/MatInteger
for dynamic, QuantizeLinear/DequantizeLinear pairs that its CPU provider fuses into QLinearConv /
QLinearMatMul for static), and the QDQ format is also what TensorRT reads for explicit int8.

Exclusions (``exclude_nodes``): node-name globs (``/unet/conv_in/*``), plus ``first_conv`` and
``last_conv`` for the graph's first and last ``Conv`` node (the UNet's conv_in / conv_out: the
layers nearest the latent, where int8 error goes straight into the noise prediction).
``exclude_op_types`` drops whole op types (Softmax, normalisations) and, unless
``quantize_activation_matmuls``, MatMuls whose both inputs are activations (attention scores and
attention-times-values) are left in float: their ranges move with the timestep far more than
weights do. Weights are symmetric int8, per output channel by default for static.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import re
import warnings
from pathlib import Path

import numpy as np

from sdwb.errors import SdwbError
from sdwb.quant.config import QuantConfig

TWO_GB = 2**31 - 1
# ONNX Runtime's quantizer logs this advice (twice per call, on the root logger) for any graph not
# run through its pre-processing example script: nothing a user of sdwb can act on (the variant's
# guard checks the result), so that message is dropped, and nothing else.
_PREPROCESS_ADVICE = re.compile(r"Please consider (to run )?pre-processing before quantization")


class _DropPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _PREPROCESS_ADVICE.search(record.getMessage())


@contextlib.contextmanager
def _ort_quantizer_quiet():
    """Around an ONNX Runtime quantizer call: no Python warnings, and no pre-processing advice
    (a filter on the root logger, which ``logging.warning`` in the quantizer logs to). The
    handler that ``logging.warning`` installs on a handler-less root logger (``basicConfig``)
    is taken away again, so the process logs as it did before the call."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    advice = _DropPreprocessAdvice()
    root.addFilter(advice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(advice)
        if not handlers:
            for handler in [h for h in root.handlers if h not in handlers]:
                root.removeHandler(handler)


def _load(path: Path, data: bool = False):
    import onnx

    return onnx.load(str(path), load_external_data=data)


def conv_endpoints(model) -> tuple[str | None, str | None]:
    """Names of the first and last ``Conv`` nodes in graph (topological) order."""
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    return (convs[0], convs[-1]) if convs else (None, None)


def activation_matmuls(model) -> list[str]:
    """MatMul nodes with no initializer (weight) input: products of two activations."""
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and not any(i in inits or i in consts for i in n.input)
    ]


def resolve_exclusions(model, config: QuantConfig) -> list[str]:
    """Node names to leave in float: globs, first/last conv, excluded op types, activation MatMuls."""
    first, last = conv_endpoints(model)
    names = [n.name for n in model.graph.node if n.name]
    out: list[str] = []
    for pattern in config.exclude_nodes:
        if pattern == "first_conv":
            out += [first] if first else []
        elif pattern == "last_conv":
            out += [last] if last else []
        else:
            out += [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    for op in getattr(config, "exclude_op_types", []):
        out += [n.name for n in model.graph.node if n.op_type == op and n.name]
    if not getattr(config, "quantize_activation_matmuls", True):
        out += activation_matmuls(model)
    return sorted(set(out))


def has_external_data(path: Path) -> bool:
    """Whether ``path`` (an ONNX file) keeps, or must keep, its weights in an external data file."""
    return path.stat().st_size > TWO_GB or path.with_name(path.name + ".data").exists()


def quantize_dynamic_file(src: Path, dst: Path, config: QuantConfig) -> dict:
    """``quantize_dynamic`` of ``src`` into ``dst`` (int8 weights); returns what was done."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = _load(src)
    exclude = resolve_exclusions(model, config)
    with _ort_quantizer_quiet():
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=list(config.op_types),
            per_channel=config.per_channel,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=has_external_data(src),
            extra_options={"MatMulConstBOnly": True},
        )
    return {"excluded_nodes": exclude, "op_types": list(config.op_types), **_op_counts(dst)}


def quantize_static_file(src: Path, dst: Path, config: QuantConfig, reader) -> dict:
    """``quantize_static`` of ``src`` into ``dst`` in QDQ format with ``reader``'s calibration feeds."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = _load(src)
    exclude = resolve_exclusions(model, config)
    ops = [op for op in config.op_types if op not in config.exclude_op_types]
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[config.calibration.method]
    act = QuantType.QInt8 if config.activation_type == "int8" else QuantType.QUInt8
    extra = {"ActivationSymmetric": config.activation_symmetric, "WeightSymmetric": True}
    flush = _flush_every(len(reader))
    if flush:
        extra["CalibMaxIntermediateOutputs"] = flush
    with _ort_quantizer_quiet():
        quantize_static(
            src,
            dst,
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=ops,
            per_channel=config.per_channel,
            activation_type=act,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=method,
            use_external_data_format=has_external_data(src),
            extra_options=extra,
        )
    return {"excluded_nodes": exclude, "op_types": ops, "format": "QDQ", **_op_counts(dst)}


def _flush_every(samples: int) -> int | None:
    """How many calibration outputs ORT may hold before folding them into ranges (bounds memory).

    None for small sets. Never a divisor of ``samples``: ORT 1.2x raises "No data is collected"
    when the last flush leaves nothing behind.
    """
    if samples <= 32:
        return None
    return next(v for v in range(16, samples) if samples % v)


def fp16_file(src: Path, dst: Path, config: QuantConfig) -> dict:
    """float16 graph for the CUDA execution provider; refused where ONNX Runtime has no GPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SdwbError(
            "ort-fp16: not supported on this device: this onnxruntime has no CUDA execution "
            f"provider (available: {', '.join(ort.get_available_providers())}); install "
            "onnxruntime-gpu on a machine with an NVIDIA GPU"
        )
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = _load(src, data=True)
    half = convert_float_to_float16(
        model, keep_io_types=config.keep_io_types, op_block_list=list(config.op_block_list)
    )
    onnx.save_model(half, str(dst), save_as_external_data=half.ByteSize() > TWO_GB)
    return {"op_block_list": list(config.op_block_list), **_op_counts(dst)}


def _op_counts(path: Path) -> dict:
    model = _load(path)
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    keys = (
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "QLinearConv",
        "QLinearMatMul",
        "Cast",
    )
    return {"quant_ops": {k: ops[k] for k in keys if k in ops}}


def compare_graphs(
    float_path: Path,
    quant_path: Path,
    feeds: list[dict[str, np.ndarray]],
    providers=("CPUExecutionProvider",),
) -> dict:
    """Max abs and relative (to the float output's max magnitude) error of the quantized graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(float_path), so, providers=list(providers))
    quant = ort.InferenceSession(str(quant_path), so, providers=list(providers))
    worst_abs, worst_rel = 0.0, 0.0
    for feed in feeds:
        a = ref.run(None, feed)[0].astype(np.float64)
        b = quant.run(None, feed)[0].astype(np.float64)
        if not np.isfinite(b).all():
            return {"max_abs": float("inf"), "rel": float("inf"), "samples": len(feeds), "finite": False}
        err = float(np.abs(a - b).max())
        worst_abs = max(worst_abs, err)
        worst_rel = max(worst_rel, err / max(float(np.abs(a).max()), 1e-6))
    return {"max_abs": worst_abs, "rel": worst_rel, "samples": len(feeds), "finite": True}
