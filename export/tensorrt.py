"""TensorRT engines from an ONNX export, and a runner that generates images with them.

Build (``build_engines``), with the documented TensorRT Python API: ``trt.Builder`` ->
``create_network`` -> ``trt.OnnxParser.parse_from_file`` (reads external data beside the file) ->
``create_builder_config`` with one optimisation profile per component whose ``set_shape``
min/opt/max come from the export manifest (so the 2B guidance batch lies inside it), ``FP16`` on
request, ``INT8`` for components whose graph carries QuantizeLinear/DequantizeLinear nodes
(explicit quantization: the scales are in the graph, no calibrator), a timing cache loaded from
and saved back to a file (rebuilds reuse kernel timings), then ``build_serialized_network``.

Engines are specific to the TensorRT version and the GPU, so each is written as
``DIR/<component>/engine_<trt-version>_<gpu-name>.plan``; ``DIR/manifest.json`` lists them with
hashes, the profiles, flags and the ONNX export they came from. The output directory is built
atomically, like an ONNX export.

Run (:class:`TrtRunner`): ``trt.Runtime.deserialize_cuda_engine``, one execution context per
engine, ``set_input_shape`` + ``set_tensor_address`` on torch CUDA tensors and
``execute_async_v3`` on torch's current stream; the denoising loop is
:class:`sdwb.backends.onnxruntime.ExportedPipeline`'s, the same as the ONNX Runtime and torch backends.

Without ``tensorrt`` importable or without a CUDA GPU every entry point raises a one-line
:class:`SdwbError` (input checks that need neither run first).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sdwb.backends.tensorrt import ENGINE_FORMAT, engine_filename, require_tensorrt, sanitise
from sdwb.errors import SdwbError
from sdwb.runs import atomic_dir, atomic_write_bytes, atomic_write_json
from sdwb.variants.files import hash_files, library_versions, sha256_file
from sdwb.variants.manifest import MANIFEST, verify_manifest


def trt_profiles(manifest: dict, components: Sequence[str] | None = None) -> dict[str, dict[str, tuple]]:
    """``{component: {input: (min, opt, max)}}`` from an ONNX export manifest (no GPU needed).

    Every shape is checked: same rank and ``min <= opt <= max`` per dimension.
    """
    out = {}
    for name in components or list(manifest["components"]):
        if name not in manifest["components"]:
            raise SdwbError(f"component {name}: not in this export (has {', '.join(manifest['components'])})")
        profile = {}
        for tensor, p in manifest["components"][name]["profile"].items():
            lo, opt, hi = (tuple(int(d) for d in p[w]) for w in ("min", "opt", "max"))
            if not (len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))):
                raise SdwbError(f"{name}.{tensor}: bad profile min {lo} opt {opt} max {hi}")
            profile[tensor] = (lo, opt, hi)
        out[name] = profile
    return out


def has_qdq(onnx_path: Path) -> bool:
    """True when the graph holds QuantizeLinear/DequantizeLinear nodes (explicit quantization)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def default_timing_cache(trt_version: str, gpu_name: str) -> Path:
    """``~/.cache/sdwb/tensorrt/timing_<version>_<gpu>.cache``."""
    name = f"timing_{sanitise(trt_version)}_{sanitise(gpu_name)}.cache"
    return Path.home() / ".cache" / "sdwb" / "tensorrt" / name


# --------------------------------------------------------------------------- build


def _network_flags(trt, fp16: bool, int8: bool) -> int:
    """Explicit batch before TensorRT 10 (always on since); strongly typed where INT8 is gone.

    TensorRT releases that dropped the weakly typed FP16/INT8 builder flags take precision from
    the graph: QDQ int8 still works as a strongly typed network; fp16 then needs an fp16 ONNX.
    """
    flag = trt.NetworkDefinitionCreationFlag
    if int(trt.__version__.split(".")[0]) < 10:
        return 1 << int(flag.EXPLICIT_BATCH)
    if fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        raise SdwbError(f"--fp16: TensorRT {trt.__version__} has no FP16 builder flag (strongly typed "
                        "networks only); export an fp16 ONNX instead")
    if int8 and not hasattr(trt.BuilderFlag, "INT8"):
        return 1 << int(flag.STRONGLY_TYPED)
    return 0


def _build_one(trt, logger, onnx_path: Path, profile: dict, fp16: bool, int8: bool, strict_fp32: bool,
               cache_bytes: bytes, workspace: int | None) -> tuple[bytes, bytes]:
    """One serialized engine and the updated timing cache."""
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, fp16, int8))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SdwbError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    opt_profile = builder.create_optimization_profile()
    for tensor, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(tensor, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8 and hasattr(trt.BuilderFlag, "INT8"):
        config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ nodes give the scales: no calibrator
    if strict_fp32 and not fp16 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SdwbError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def build_engines(
    onnx_dir: str | Path,
    out_dir: str | Path,
    fp16: bool = False,
    int8: bool = False,
    timing_cache: str | Path | None = None,
    *,
    components: Sequence[str] | None = None,
    strict_fp32: bool = False,
    workspace: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Build one engine per component of a verified ONNX export into ``out_dir``; return its manifest.

    ``int8`` needs QDQ graphs (an export of a quantized variant); components without Q/DQ nodes are
    built without the INT8 flag. ``strict_fp32`` turns TF32 off for fp32 builds (exact-ish fp32).
    """
    say = progress or (lambda _msg: None)
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    manifest = verify_manifest(onnx_dir)
    from sdwb.families import FAMILIES, check_verb

    check_verb(FAMILIES[manifest["pipeline"].get("family", "sd1")], "export tensorrt")
    profiles = trt_profiles(manifest, components)
    if out_dir.exists() and not overwrite:
        raise SdwbError(f"{out_dir}: already exists (refusing to overwrite finished engines)")
    qdq = {name: has_qdq(onnx_dir / manifest["components"][name]["file"]) for name in profiles}
    if int8 and not any(qdq.values()):
        raise SdwbError(f"--int8: no component of {onnx_dir} has QuantizeLinear/DequantizeLinear nodes "
                        "(export a QDQ-quantized variant; TensorRT int8 here is explicit quantization only)")
    trt, gpu = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__, gpu)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    filename = engine_filename(trt.__version__, gpu)
    entries = {}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for name, profile in profiles.items():
            precision = ("fp16" if fp16 else "fp32") + (" + int8" if int8 and qdq[name] else "")
            say(f"building {name} engine ({precision})")
            started = time.perf_counter()
            onnx_entry = manifest["components"][name]
            plan, cache_bytes = _build_one(trt, logger, onnx_dir / onnx_entry["file"], profile, fp16,
                                           int8 and qdq[name], strict_fp32, cache_bytes, workspace)
            (tmp / name).mkdir()
            (tmp / name / filename).write_bytes(plan)
            entries[name] = {
                "file": f"{name}/{filename}",
                "inputs": onnx_entry["inputs"],
                "outputs": onnx_entry["outputs"],
                "axes": onnx_entry["axes"],
                "profile": onnx_entry["profile"],
                "precision": {"fp16": bool(fp16), "int8": bool(int8 and qdq[name]),
                              "tf32": not strict_fp32 and not fp16},
                "build_seconds": round(time.perf_counter() - started, 3),
                "onnx_sha256": manifest["files"][onnx_entry["file"]]["sha256"],
            }
        atomic_write_bytes(cache_path, cache_bytes)
        for extra in ("tokenizer", "scheduler", "sdwb.json"):
            src = onnx_dir / extra
            if src.is_dir():
                shutil.copytree(src, tmp / extra)
            elif src.is_file():
                shutil.copyfile(src, tmp / extra)
        engines = {
            "format": ENGINE_FORMAT,
            "version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tensorrt": trt.__version__,
            "gpu": gpu,
            "timing_cache": str(cache_path),
            "source": {"onnx_dir": str(onnx_dir.resolve()),
                       "manifest_sha256": sha256_file(onnx_dir / MANIFEST),
                       "model": manifest.get("source", {})},
            "pipeline": manifest["pipeline"],
            "libraries": library_versions(),
            "components": entries,
            "files": hash_files(tmp, skip=(MANIFEST,)),
        }
        atomic_write_json(tmp / MANIFEST, engines)
    return engines
