"""What a benchmarked variant is, read from its records: the ``method`` / ``precision`` / ``weights_dtype``
columns of a results row.

Why: a row's ``dtype`` is what the pipeline was loaded or run in (an ONNX Runtime int8 variant
runs an fp32 graph around its int8 UNet: dtype "fp32"), and its ``size_mb`` depends on the
precision its files are stored in (the shipped tiny-shapes is stored fp16, a pruned UNet fp32),
so neither says what was done to the model. These columns do, from what is already on disk and
without loading a model:

- ``method``: the chain of stages that made the variant, oldest first, from its ``sdwb.json``
  and its ancestors' records (:func:`sdwb.variants.record.ancestry`) and whether it is an export
  (``manifest.json``): ``"prune channels 0.3 → ONNX → ort-int8-static (UNet)"``; ``"none"`` for
  a model used as it was trained or built.
- ``precision``: what the variant computes in: ``"UNet int8 (W8A8 static), rest fp32"`` for a
  quantized variant (from the method and the components its recorded config names), else the
  row's dtype.
- ``weights_dtype``: the precision the weight files store (the files ``size_mb`` counts), read
  from safetensors headers, ONNX initializer types (graph only, no external data) or OpenVINO IR
  ``Const`` layers: ``"fp16"``, ``"fp32"``, ``"UNet int8+fp32, rest fp32"``. A dtype is named when
  it holds at least 10 % of a component's weight bytes (int8 weights come with fp32 scales and
  biases); "int8" is any 8-bit integer weight, signed or not (asymmetric NNCF weights are uint8).
  None when a file's format is not one of those.

Any failure to read returns None for that column: a description must never stop a benchmark.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

from sdwb.errors import SdwbError

COMPONENT_NAMES = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2",
                   "vae": "VAE", "vae_decoder": "VAE decoder"}
ALL_COMPONENTS = {"unet", "text_encoder", "vae_decoder"}  # what a quantization config can name
SHARE = 0.10  # a stored dtype is named when it holds this fraction of a component's weight bytes

# What each quantization method computes in, for the components it covers ({c}).
_PRECISION = {
    "torch-bf16": "{c} bf16{keep}",
    "torch-fp16": "{c} fp16{keep}",
    "torch-int8-dynamic": "{c} Linear int8 (W8, dynamic A8)",
    "torch-int8-static": "{c} Conv2d+Linear int8 (W8A8 static)",
    "torchao-int8-weight-only": "{c} Linear int8 weights (weight-only)",
    "torchao-int4-weight-only": "{c} Linear int4 weights (weight-only)",
    "ort-int8-dynamic": "{c} int8 (W8, dynamic A8)",
    "ort-int8-static": "{c} int8 (W8A8 static)",
    "ort-fp16": "{c} fp16",
    "ov-int8-weights": "{c} int8 weights (weight-only)",
    "ov-int8-static": "{c} int8 (W8A8 static)",
    "ov-int8-hybrid": "{c} int8 (W8A8 static, MatMul weights only)",  # the UNet; others: weight-only
}
_GRAPH_BACKENDS = ("onnxruntime", "openvino", "tensorrt")
_SAFETENSORS = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16", "I8": "int8", "U8": "int8",
                "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool", "F8_E4M3": "fp8",
                "F8_E5M2": "fp8"}
_OPENVINO = {"f64": "fp64", "f32": "fp32", "f16": "fp16", "bf16": "bf16", "i8": "int8", "u8": "int8",
             "i4": "int4", "u4": "int4", "i32": "int32", "i64": "int64", "boolean": "bool"}


def _components(names: Iterable[str]) -> str:
    names = [COMPONENT_NAMES.get(n, n) for n in names]
    return " + ".join(names) if names else "?"


# --------------------------------------------------------------------------- method / precision


def _records(directory: Path | None) -> list[dict]:
    """The variant's record and its ancestors', oldest first (empty without a record)."""
    from sdwb.variants.record import ancestry, read_record

    if directory is None or not directory.is_dir():
        return []
    return list(reversed(list(ancestry(read_record(directory)))))


def _step(record: dict) -> str | None:
    """One stage as words: "prune channels 0.3", "distill progressive (4 steps)", "torch-bf16 (UNet)"."""
    stage, method = record.get("stage"), record.get("method")
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    if stage == "prune":
        if method == "channels" and config.get("ratio") is not None:
            return f"prune channels {config['ratio']:g}"
        return f"prune {method}"
    if stage == "distill":
        steps = (record.get("inference") or {}).get("steps") or config.get("student_steps")
        guidance = " + guidance" if config.get("guidance_distill") else ""
        return f"distill {method}{guidance}" + (f" ({steps} steps)" if steps else "")
    if stage == "quantize":
        return f"{method} ({_components(config.get('components') or ['unet'])})"
    if stage == "cache" and method == "deepcache":
        return f"deepcache interval {config.get('interval')} (branch {config.get('branch')})"
    if stage == "cache" and method == "tomesd":
        return f"tomesd ratio {config.get('ratio')} (max_downsample {config.get('max_downsample')})"
    if stage in (None, "baseline"):
        return None
    return f"{stage} {method}" if method else str(stage)


def describe(directory: Path | None, *, backend: str, dtype: str, compile_mode: str | None = None
             ) -> dict[str, str | None]:
    """``{"method", "precision"}`` of the variant in ``directory`` (a diffusers model or export
    directory; None for a model built in code) run by ``backend`` in ``dtype``."""
    from sdwb.variants.manifest import ENGINE_FORMAT, EXPORT_FORMAT, OPENVINO_FORMAT, manifest_format

    records = _records(directory)
    steps: list[str] = []
    for record in records:
        step = _step(record)
        if step is None:
            continue
        graph = record.get("stage") == "quantize" and record.get("backend") in _GRAPH_BACKENDS
        if graph and "ONNX" not in steps:
            steps.append("ONNX")  # graph methods quantize an ONNX export of the float model
        steps.append(step)
    fmt = manifest_format(directory) if directory is not None else None
    top_is_graph = bool(records) and records[-1].get("stage") == "quantize" and \
        records[-1].get("backend") in _GRAPH_BACKENDS
    if fmt in (EXPORT_FORMAT, OPENVINO_FORMAT) and not top_is_graph:
        steps.append("ONNX" if fmt == EXPORT_FORMAT else "OpenVINO IR")
    elif fmt == ENGINE_FORMAT:
        steps.append(f"TensorRT engines ({dtype})")
    if backend == "torch" and compile_mode is not None:
        steps.append("torch.compile" + ("" if compile_mode == "default" else f" ({compile_mode})"))
    quantized = [r for r in records if r.get("stage") == "quantize"]
    precision = dtype
    if quantized:
        config = quantized[-1].get("config") if isinstance(quantized[-1].get("config"), dict) else {}
        method = str(quantized[-1].get("method"))
        covered = list(config.get("components") or ["unet"])
        keep = config.get("keep_fp32") or []
        if method == "ov-int8-hybrid" and "unet" in covered and len(covered) > 1:  # optimum-intel's scheme
            text = (_PRECISION[method].format(c="UNet") + ", "
                    + _PRECISION["ov-int8-weights"].format(c=_components(c for c in covered if c != "unet")))
        else:
            text = _PRECISION.get(method, "{c} " + method).format(
                c=_components(covered), keep=f" ({', '.join(map(str, keep))} kept fp32)" if keep else "")
        rest = "fp32" if backend != "torch" else dtype
        precision = text if set(covered) >= ALL_COMPONENTS else f"{text}, rest {rest}"
    return {"method": " → ".join(steps) or "none", "precision": precision}


# --------------------------------------------------------------------------- stored precision


def _safetensors_bytes(path: Path) -> dict[str, int]:
    """Bytes per dtype of a safetensors file, from its header only."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 * 2**20:
            raise ValueError(f"{path}: implausible safetensors header")
        header = json.loads(f.read(length))
    out: dict[str, int] = {}
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        start, end = entry["data_offsets"]
        kind = _SAFETENSORS.get(entry["dtype"], entry["dtype"].lower())
        out[kind] = out.get(kind, 0) + end - start
    return out


def _onnx_bytes(path: Path) -> dict[str, int]:
    """Bytes per dtype of an ONNX graph's initializers (the graph only; external data not read)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    out: dict[str, int] = {}
    for t in graph.initializer:
        np_type = helper.tensor_dtype_to_np_dtype(t.data_type)
        kind = _numpy_name(np_type)
        out[kind] = out.get(kind, 0) + math.prod(t.dims) * np_type.itemsize
    return out


def _numpy_name(np_type) -> str:
    name = str(np_type)
    return {"float32": "fp32", "float16": "fp16", "float64": "fp64", "bfloat16": "bf16", "uint8": "int8",
            "uint4": "int4"}.get(name, name.replace("float", "fp"))


def _openvino_bytes(path: Path) -> dict[str, int]:
    """Bytes per dtype of an OpenVINO IR's ``Const`` layers (read from the .xml, not the .bin)."""
    from xml.etree import ElementTree as ET

    out: dict[str, int] = {}
    for layer in ET.parse(path).getroot().iter("layer"):
        if layer.get("type") != "Const":
            continue
        data = layer.find("data")
        if data is None or data.get("size") is None:
            continue
        kind = _OPENVINO.get(data.get("element_type", ""), data.get("element_type", "?"))
        out[kind] = out.get(kind, 0) + int(data.get("size"))
    return out


def _file_bytes(path: Path) -> dict[str, int] | None:
    if path.suffix == ".safetensors":
        return _safetensors_bytes(path)
    if path.suffix == ".onnx":
        return _onnx_bytes(path)
    if path.suffix == ".xml":
        return _openvino_bytes(path)
    if path.suffix in (".onnx_data", ".data", ".bin") and (
            path.with_suffix(".onnx").is_file() or path.with_suffix(".xml").is_file()
            or path.name.endswith(".onnx.data")):
        return {}  # external data of a graph counted above: its dtypes are in the graph
    return None  # .bin / .pt / .ckpt / .plan: not readable without loading


def _label(counts: dict[str, int]) -> str | None:
    total = sum(counts.values())
    if total <= 0:
        return None
    kinds = sorted(counts, key=lambda k: -counts[k])
    return "+".join(k for k in kinds if counts[k] >= SHARE * total)


def stored_dtypes(files: Iterable[Path], root: Path) -> dict[str, str] | None:
    """``{component: "fp16" | "int8+fp32" | ...}`` over ``files`` (grouped by their first folder
    under ``root``); None when a file's format cannot be read cheaply."""
    per: dict[str, dict[str, int]] = {}
    for path in files:
        counts = _file_bytes(Path(path))
        if counts is None:
            return None
        try:
            component = Path(path).relative_to(root).parts[0]
        except (ValueError, IndexError):
            component = Path(path).parent.name
        bucket = per.setdefault(component, {})
        for kind, n in counts.items():
            bucket[kind] = bucket.get(kind, 0) + n
    labels = {c: _label(counts) for c, counts in per.items()}
    return {c: lab for c, lab in labels.items() if lab} or None


def dtype_summary(labels: dict[str, str] | None) -> str | None:
    """One string for a row: "fp16" when every component stores the same, else the UNet (or the
    component that differs) first: "UNet fp32, rest fp16"; "UNet int8+fp32, text encoder fp32, ..."."""
    if not labels:
        return None
    values = set(labels.values())
    if len(values) == 1:
        return values.pop()
    ordered = sorted(labels, key=lambda c: (c != "unet", c))
    first, others = ordered[0], ordered[1:]
    if len({labels[c] for c in others}) == 1:
        return f"{COMPONENT_NAMES.get(first, first)} {labels[first]}, rest {labels[others[0]]}"
    return ", ".join(f"{COMPONENT_NAMES.get(c, c)} {labels[c]}" for c in ordered)


def weights_dtype(files: Iterable[Path], root: Path) -> str | None:
    """:func:`dtype_summary` of :func:`stored_dtypes`; None when unreadable."""
    try:
        return dtype_summary(stored_dtypes(list(files), root))
    except (OSError, ValueError, KeyError, TypeError, struct.error, ImportError):
        return None
    except Exception:  # onnx's DecodeError and friends: a description never stops a benchmark
        return None


def row_fields(directory: Path | None, files: Iterable[Path] | None, *, backend: str, dtype: str,
               compile_mode: str | None = None) -> dict[str, str | None]:
    """The ``method``, ``precision`` and ``weights_dtype`` columns of one results row."""
    try:
        out = describe(directory, backend=backend, dtype=dtype, compile_mode=compile_mode)
    except (SdwbError, OSError, ValueError, TypeError, AttributeError):
        out = {"method": None, "precision": None}
    out["weights_dtype"] = weights_dtype(files, directory) if files is not None and directory is not None \
        else None
    return out
