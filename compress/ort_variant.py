"""ONNX Runtime variants: quantize the graphs of a float export into a new, guarded export directory.

The variant is an ordinary export directory (``export/onnx.py`` layout, same manifest format,
so ``OrtStableDiffusionPipeline.from_export`` and ``sdwb bench --backend onnxruntime`` open it)
whose quantized components replace the float graphs. The manifest keeps the float export's
interfaces and adds, per quantized component, a ``quantization`` entry (method, excluded nodes,
quantize ops, size before/after, max error vs the float graph on recorded inputs) and, at the
top, ``quantization`` and ``source`` blocks; ``files`` is re-hashed. ``sdwb.json`` beside it is
the variant record (:mod:`sdwb.variants.requantize`), with the calibration's visited timesteps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from compress.variant_io import Variant, copy_export, scratch_dir
from sdwb.errors import SdwbError
from sdwb.quant.config import QuantConfig, resolved
from sdwb.variants.files import MB, hash_files
from sdwb.variants.record import RECORD

COMPARE_SAMPLES = 4


def _component_files(manifest: dict, name: str) -> list[str]:
    return [rel for rel in manifest["files"] if rel.startswith(name + "/")]


def _sample_feeds(entry: dict, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded random inputs at the manifest's opt point (when no calibration feeds exist)."""
    from sdwb.variants.manifest import resolve_dim

    point = {axis: v["opt"] for axis, v in entry["axes"].items()}
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in entry["inputs"]:
        shape = tuple(resolve_dim(d, point) for d in spec["shape"])
        if spec["name"] == "timestep":
            feeds[spec["name"]] = np.full(shape, 500.0, dtype=spec["dtype"])
        elif spec["dtype"].startswith("int"):
            feeds[spec["name"]] = rng.integers(0, 100, shape).astype(spec["dtype"])
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
    return [feeds]


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Why: ONNX Runtime sessions free their buffers on destruction, but glibc keeps the pages, so
    without this the float pipeline's ~11 GB (sd15-arch) and quantize_static's own peak stack up.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def spread(items: list, n: int) -> list:
    """At most ``n`` items, evenly spaced over ``items`` (first and last kept)."""
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n)]


def quantize_ort(
    pipe, export_dir: Path | None, config: QuantConfig, out: Path, overwrite: bool, parent: dict, say,
    exporter=None,
) -> Variant:
    """Export (if needed, with ``exporter``), calibrate, quantize, guard and write an ONNX Runtime
    variant to ``out``."""
    if export_dir is None and exporter is None:
        raise SdwbError(f"{config.method}: quantizes an ONNX export; give an export directory (`sdwb export "
                        "onnx`) or quantize through `sdwb compress quantize`, which exports first")
    from compress import graph_variant
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline
    from sdwb.runs import atomic_dir, atomic_write_json
    from sdwb.variants.manifest import MANIFEST, verify_manifest

    threads = torch.get_num_threads()
    with scratch_dir(out) as scratch:
        export_dir, parent, manifest = graph_variant.float_source(
            pipe, export_dir, exporter, scratch, parent, say, verify_manifest, config.components)
        del pipe
        float_pipe = OrtStableDiffusionPipeline.from_export(export_dir, threads=threads, verify=False)
        reference, calib = graph_variant.probe_and_calibrate(float_pipe, config,
                                                             config.method == "ort-int8-static", say)
        del float_pipe
        release_memory()  # sd15-arch: the float sessions held ~11 GB; quantize_static needs it back
        with atomic_dir(out, overwrite=overwrite) as tmp:
            skip = {MANIFEST, RECORD} | {
                f for c in config.components for f in _component_files(manifest, c)
            }
            copy_export(export_dir, tmp, skip)
            entries, started = {}, time.perf_counter()
            for name in config.components:
                say(f"quantizing {name} ({config.method})")
                entries[name] = _quantize_component(export_dir, tmp, name, manifest, config, calib)
            quantize_s = round(time.perf_counter() - started, 3)
            new_manifest = _manifest(manifest, entries, config, parent, hash_files(tmp, skip=(MANIFEST,)))
            atomic_write_json(tmp / MANIFEST, new_manifest)
            metrics = {
                "quantize_seconds": quantize_s,
                "components": entries,
                "size_mb": round(sum(e["size_mb"] for e in entries.values()), 3),
                "parent_size_mb": round(sum(e["float_size_mb"] for e in entries.values()), 3),
            }
            record = graph_variant.finish(
                tmp, new_manifest, metrics, config=config, backend="onnxruntime",
                weights="quantized ONNX graphs", parent=parent, calib=calib, reference=reference,
                open_quantized=lambda d: OrtStableDiffusionPipeline.from_export(d, threads=threads,
                                                                                verify=False),
                say=say)
    return Variant(config.method, "onnxruntime", config, record, out, None, metrics)


# The graph quantizers of the ONNX Runtime methods registered in sdwb.quant.config: method name ->
# ``(src, dst, config, component name, its input names, calibration) -> summary``.
GRAPH_QUANTIZERS: dict[str, object] = {}


def quantizes(*methods: str):
    """Function decorator: register the graph quantizer of ONNX Runtime ``methods``."""

    def add(fn):
        for method in methods:
            GRAPH_QUANTIZERS[method] = fn
        return fn

    return add


@quantizes("ort-int8-dynamic")
def _int8_dynamic(src: Path, dst: Path, config, name: str, names: list[str], calib) -> dict:
    from compress.quant_ort import quantize_dynamic_file

    return quantize_dynamic_file(src, dst, config)


@quantizes("ort-int8-static")
def _int8_static(src: Path, dst: Path, config, name: str, names: list[str], calib) -> dict:
    from compress.calibration import calibration_reader
    from compress.quant_ort import quantize_static_file

    if not calib.feeds.get(name):
        raise SdwbError(f"calibration recorded no inputs for {name}")
    reader = calibration_reader(calib, name, names)
    if config.fuse_attention and name == "unet":
        return _quantize_fused(src, dst, config, reader)
    return quantize_static_file(src, dst, config, reader)


@quantizes("ort-fp16")
def _fp16(src: Path, dst: Path, config, name: str, names: list[str], calib) -> dict:
    from compress.quant_ort import fp16_file

    return fp16_file(src, dst, config)


def _quantize_component(
    src_dir: Path, dst_dir: Path, name: str, manifest: dict, config: QuantConfig, calib
) -> dict:
    from compress.quant_ort import compare_graphs

    entry = manifest["components"][name]
    src, dst = src_dir / entry["file"], dst_dir / entry["file"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    names = [s["name"] for s in entry["inputs"]]
    if config.method not in GRAPH_QUANTIZERS:
        raise SdwbError(f"{config.method}: no ONNX Runtime graph quantizer is registered for it")
    info = GRAPH_QUANTIZERS[config.method](src, dst, config, name, names, calib)
    feeds = (
        spread(calib.feeds[name], COMPARE_SAMPLES)
        if calib and calib.feeds.get(name)
        else _sample_feeds(entry)
    )
    feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
    error = compare_graphs(src, dst, feeds)
    if not error["finite"]:
        raise SdwbError(
            f"guard: {config.method} {name} graph outputs NaN/inf on recorded inputs; "
            "refusing to save it, nothing was written"
        )
    size = sum(p.stat().st_size for p in dst.parent.iterdir() if p.is_file())
    float_size = sum(manifest["files"][rel]["size"] for rel in _component_files(manifest, name))
    return {
        **info,
        "size_mb": round(size / MB, 3),
        "float_size_mb": round(float_size / MB, 3),
        "shrink": round(float_size / max(size, 1), 3),
        "error_vs_float": error,
    }


def _quantize_fused(src: Path, dst: Path, config: QuantConfig, reader) -> dict:
    """Fuse ``src``'s attention (compress.ort_fusion), then quantize the fused graph into ``dst``."""
    import shutil
    import tempfile

    from compress.ort_fusion import fuse_attention
    from compress.quant_ort import quantize_static_file

    work = Path(tempfile.mkdtemp(prefix=".fused-", dir=dst.parent.parent))
    try:
        fused = work / src.name
        fusion = fuse_attention(src, fused)
        info = quantize_static_file(fused, dst, config, reader)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**info, "attention_fusion": fusion}


def _manifest(manifest: dict, entries: dict, config: QuantConfig, parent: dict, files: dict) -> dict:
    out = json.loads(json.dumps(manifest))
    for name, info in entries.items():
        out["components"][name]["quantization"] = {"method": config.method, **info}
        out["components"][name]["external_data"] = None
    out["quantization"] = {"method": config.method, "components": list(entries), "config": resolved(config)}
    out["source"] = {**out.get("source", {}), "quantized_from": parent}
    out["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out["files"] = files
    return out
