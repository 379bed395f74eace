"""OpenVINO variants: NNCF-quantize the graphs of a float export into a new, guarded IR directory.

Source: an ONNX export, an OpenVINO IR export or (with the ``exporter`` the application layer
hands in) a torch model exported to ONNX first; OpenVINO reads either graph format. Steps, as
for the ONNX Runtime variants (``compress.ort_variant``): the float pipeline on OpenVINO renders
the guard's probe images and, for the calibrated methods, records the UNet's inputs along real
denoising trajectories (``compress.calibration``, the same recorder and prompts as
``ort-int8-static``); each component is read, quantized by NNCF
(:mod:`sdwb.quant.ov_methods` says which scheme), saved as IR (``model.xml``/``model.bin``) and
compared with its float graph on recorded inputs (NaN/inf refused); components the method does
not touch are saved as float IR, so the variant is one OpenVINO IR export
(``sdwb-openvino-export`` manifest, re-hashed) that ``--backend openvino`` opens. The guard then
renders the probe with the quantized pipeline and refuses a PSNR under its floor.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from compress.variant_io import Variant, scratch_dir
from sdwb.errors import SdwbError
from sdwb.quant.config import QuantConfig, resolved
from sdwb.variants.files import MB, hash_files

COMPARE_SAMPLES = 4
XML, BIN = "model.xml", "model.bin"
KEEP = ("tokenizer", "tokenizer_2", "scheduler")
CALIBRATED = ("ov-int8-static", "ov-int8-hybrid")


def _source_manifest(export_dir: Path) -> dict:
    """The verified manifest of an ONNX or OpenVINO IR export."""
    from sdwb.backends.registry import manifest_format
    from sdwb.variants.manifest import EXPORT_FORMAT, OPENVINO_FORMAT, verify_manifest

    found = manifest_format(export_dir)
    if found not in (EXPORT_FORMAT, OPENVINO_FORMAT):
        raise SdwbError(f"{export_dir}: a {found} directory; the OpenVINO methods quantize a model, an ONNX "
                        "export or an OpenVINO IR export")
    return verify_manifest(export_dir, found)


def quantize_ov(pipe, export_dir: Path | None, config: QuantConfig, out: Path, overwrite: bool, parent: dict,
                say, exporter=None) -> Variant:
    """Export (if needed), calibrate, quantize with NNCF, guard and write an OpenVINO variant."""
    from compress import graph_variant
    from sdwb.backends.openvino import OvStableDiffusionPipeline
    from sdwb.runs import atomic_dir, atomic_write_json
    from sdwb.variants.manifest import MANIFEST

    if export_dir is None and exporter is None:
        raise SdwbError(f"{config.method}: quantizes an export; give an ONNX / OpenVINO export directory or "
                        "quantize through `sdwb compress quantize`, which exports first")
    threads = torch.get_num_threads()
    with scratch_dir(out) as scratch:
        export_dir, parent, manifest = graph_variant.float_source(
            pipe, export_dir, exporter, scratch, parent, say, _source_manifest, config.components)
        del pipe
        cache = Path(scratch) / "ov-cache"

        def open_pipe(directory: Path):
            return OvStableDiffusionPipeline.from_export(directory, threads=threads, cache_dir=cache,
                                                         verify=False)

        float_pipe = open_pipe(export_dir)
        reference, calib = graph_variant.probe_and_calibrate(float_pipe, config, config.method in CALIBRATED,
                                                             say)
        del float_pipe
        with atomic_dir(out, overwrite=overwrite) as tmp:
            entries, started = {}, time.perf_counter()
            for name, entry in manifest["components"].items():
                quantized = name in config.components
                say(f"quantizing {name} with NNCF ({config.method})" if quantized else f"converting {name}")
                entries[name] = _component(export_dir, tmp, name, entry, config if quantized else None, calib,
                                           say)
            quantize_s = round(time.perf_counter() - started, 3)
            for keep in KEEP:
                if (export_dir / keep).is_dir():
                    shutil.copytree(export_dir / keep, tmp / keep)
            new_manifest = _manifest(manifest, entries, config, parent, hash_files(tmp, skip=(MANIFEST,)))
            atomic_write_json(tmp / MANIFEST, new_manifest)
            done = {n: e["quantization"] for n, e in entries.items() if "quantization" in e}
            metrics = {
                "quantize_seconds": quantize_s,
                "components": done,
                "size_mb": round(sum(e["size_mb"] for e in done.values()), 3),
                "parent_size_mb": round(sum(e["float_size_mb"] for e in done.values()), 3),
            }
            record = graph_variant.finish(
                tmp, new_manifest, metrics, config=config, backend="openvino",
                weights="NNCF-quantized OpenVINO IR", parent=parent, calib=calib, reference=reference,
                open_quantized=open_pipe, say=say)
    return Variant(config.method, "openvino", config, record, out, None, metrics)


def _feeds(calib, name: str, entry: dict) -> list[dict[str, np.ndarray]]:
    """Recorded inputs of ``name`` (calibration) or seeded ones at the opt point."""
    from compress.ort_variant import _sample_feeds

    names = [s["name"] for s in entry["inputs"]]
    feeds = calib.feeds.get(name) if calib is not None else None
    feeds = feeds or _sample_feeds(entry)
    return [{k: v for k, v in f.items() if k in names} for f in feeds]


def _component(src_dir: Path, dst_dir: Path, name: str, entry: dict, config, calib, say=None) -> dict:
    """Read one graph, quantize it with ``config`` (None: keep it float), save IR, compare; ``say``
    hears when the comparison starts (NNCF's own progress bars are off: :mod:`compress.quant_ov`)."""
    import openvino as ov

    from compress.ort_variant import spread
    from compress.quant_ov import QUANTIZERS

    core = ov.Core()
    model = core.read_model(str(src_dir / entry["file"]))
    out = {k: v for k, v in entry.items() if k not in ("file", "external_data", "weights", "quantization")}
    info = None
    if config is not None:
        feeds = _feeds(calib, name, entry)
        float_model = model
        model, info = QUANTIZERS[config.method](model, config, name, feeds)
        if say is not None:
            say(f"quantizing {name} ({config.method}): comparing with the float graph")
        info["error_vs_float"] = _compare(core, float_model, model, spread(feeds, COMPARE_SAMPLES), entry)
        if not info["error_vs_float"]["finite"]:
            raise SdwbError(f"guard: {config.method} {name} graph outputs NaN/inf on recorded inputs; "
                            "refusing to save it, nothing was written")
    (dst_dir / name).mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(dst_dir / name / XML), compress_to_fp16=False)
    out.update({"file": f"{name}/{XML}", "weights": f"{name}/{BIN}"})
    if info is not None:
        size = sum(p.stat().st_size for p in (dst_dir / name).iterdir() if p.is_file())
        float_size = _graph_bytes(src_dir, entry)
        out["quantization"] = {"method": config.method, **info, "size_mb": round(size / MB, 3),
                               "float_size_mb": round(float_size / MB, 3),
                               "shrink": round(float_size / max(size, 1), 3)}
    return out


def _graph_bytes(directory: Path, entry: dict) -> int:
    files = [entry.get(k) for k in ("file", "external_data", "weights")]
    return sum((directory / f).stat().st_size for f in files if f and (directory / f).is_file())


def _compare(core, float_model, quant_model, feeds: list[dict], entry: dict) -> dict:
    """Max abs / relative error of the first output, quantized vs float, on ``feeds`` (f32 plugin)."""
    from sdwb.backends.openvino import run_f32

    name = entry["outputs"][0]["name"]
    max_abs, scale, finite = 0.0, 0.0, True
    for feed in feeds:
        ref, got = (run_f32(core, model, feed, [name])[0].astype(np.float64)
                    for model in (float_model, quant_model))
        finite = finite and bool(np.isfinite(got).all())
        if finite:
            max_abs = max(max_abs, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return {"finite": finite, "max_abs": max_abs if finite else None,
            "max_rel": max_abs / max(scale, 1e-6) if finite else None, "samples": len(feeds)}


def _manifest(manifest: dict, entries: dict, config: QuantConfig, parent: dict, files: dict) -> dict:
    from sdwb.variants.manifest import OPENVINO_FORMAT

    out = json.loads(json.dumps(manifest))
    out["format"] = OPENVINO_FORMAT
    out["components"] = entries
    out["quantization"] = {"method": config.method, "components": list(config.components),
                           "config": resolved(config)}
    out["source"] = {**out.get("source", {}), "quantized_from": parent}
    out["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out["files"] = files
    return out
