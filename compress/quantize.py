"""``quantize(source, config, out)``: the quantization verb, from a float model to a guarded variant.

One verb, one typed config per method (:mod:`compress.quant_config`). ``source`` is a torch
``StableDiffusionPipeline`` (not modified: a copy is quantized), a model spec (``builtin:NAME``,
a diffusers directory, a cached hub id) or, for the ONNX Runtime methods, an export directory
(``sdwb export onnx``). Steps:

1. Refuse what cannot run here (a GPU-only method on the CPU) before any work.
2. Render the guard's probe images with the float model (:mod:`compress.guard`).
3. torch methods: quantize the pipeline in place (:mod:`compress.quant_torch`). ONNX Runtime
   methods: export the float model if needed, record calibration trajectories for static int8
   (:mod:`compress.calibration`), quantize each component's graph (:mod:`compress.quant_ort`).
4. Probe again with the quantized model; NaN/inf or PSNR under the floor raises.
5. With ``out``: everything is built under ``atomic_dir(out)`` -- a diffusers pipeline (torch)
   or an export directory with a re-hashed manifest (ORT), plus ``sdwb.json``
   (:mod:`compress.variants`) -- and appears only when all of the above passed.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress import guard as guard_mod
from compress.quant_config import QuantConfig, backend_of, resolved
from compress.variants import build_record, hash_tree, read_record
from sdwb.errors import SdwbError

MB = 2**20


@dataclass
class Variant:
    """A quantized model: the torch pipeline (torch methods) and/or its directory, and its record."""

    method: str
    backend: str
    config: QuantConfig
    record: dict
    path: Path | None = None
    pipeline: object | None = None
    metrics: dict = field(default_factory=dict)

    def load(self, threads: int | None = None):
        """A runnable pipeline: the torch pipeline, or the ONNX Runtime pipeline of ``path``."""
        if self.pipeline is not None:
            return self.pipeline
        if self.path is None:
            raise SdwbError(f"{self.method} variant has no pipeline and no directory")
        from export.ort import OrtStableDiffusionPipeline

        self.pipeline = OrtStableDiffusionPipeline.from_export(self.path, threads=threads)
        return self.pipeline


def _pipe_device(pipe) -> str:
    return str(pipe.unet.device) if hasattr(pipe, "unet") else "cpu"


def _check_device(config: QuantConfig, device: str) -> None:
    """GPU-only methods on a CPU (and the reverse) fail here, before any work."""
    from compress.quant_torch import check_supported

    if backend_of(config) == "torch":
        check_supported(config, device)
    if config.method == "ort-fp16":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
            raise SdwbError(
                "ort-fp16: not supported on this device: needs an NVIDIA GPU and onnxruntime-gpu "
                f"(this onnxruntime offers {', '.join(ort.get_available_providers())})"
            )


def _float_source(source, backend: str):
    """(float torch pipeline or None, export dir or None, parent record)."""
    from export.onnx import is_export_dir
    from sdwb.loading import load_pipeline, resolve_spec

    if not isinstance(source, (str, Path)):
        return copy.deepcopy(source), None, {"spec": None, "class": type(source).__name__}
    spec = str(source)
    path = resolve_spec(spec, "pipeline")  # None for a model built in code (sd15-arch)
    record = read_record(path) if path is not None and path.is_dir() else None
    if record and record.get("stage") == "quantize":
        raise SdwbError(
            f"{spec}: already quantized ({record.get('method')}); quantize its parent "
            f"({record.get('parent', {}).get('spec')}) instead"
        )
    parent = {"spec": spec, "path": str(Path(path).resolve()) if path else None, "variant": record}
    if path is not None and is_export_dir(path):
        if backend != "onnxruntime":
            raise SdwbError(
                f"{spec}: an ONNX export; torch methods need a diffusers pipeline directory or builtin model"
            )
        return None, path, parent
    return load_pipeline(spec, device="cpu", dtype=torch.float32), None, parent


def quantize(
    source,
    config: QuantConfig,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Variant:
    """Quantize ``source`` with ``config``; save a guarded variant to ``out`` when given."""
    say = progress or (lambda _msg: None)
    backend = backend_of(config)
    if out is not None and Path(out).exists() and not overwrite:
        raise SdwbError(f"{out}: already exists (refusing to overwrite a finished variant; --overwrite)")
    if backend == "onnxruntime" and out is None:
        raise SdwbError(f"{config.method}: ONNX Runtime methods write an export directory: give an output")
    if not isinstance(source, (str, Path)):
        _check_device(config, _pipe_device(source))
    else:
        _check_device(config, "cpu")
    say("loading the float model")
    pipe, export_dir, parent = _float_source(source, backend)
    if backend == "torch":
        return _quantize_torch(pipe, config, out, overwrite, parent, say)
    from compress.ort_variant import quantize_ort

    return quantize_ort(pipe, export_dir, config, Path(out), overwrite, parent, say)


def _dir_mb(path: Path) -> float:
    from bench.memory import weight_files

    return round(sum(f.stat().st_size for f in weight_files(path)) / MB, 3)


def _quantize_torch(pipe, config, out, overwrite, parent, say) -> Variant:
    from compress.quant_torch import LOW_DTYPES, apply_torch_method
    from sdwb.runs import atomic_dir, atomic_write_json

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
        summary = apply_torch_method(pipe, config, device)
        state, calibration = summary.pop("state", None), summary.pop("calibration", None)
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
                from compress.quant_w8a8 import RANGES_FILE

                atomic_write_json(tmp / RANGES_FILE, state)
            metrics["size_mb"] = _dir_mb(tmp)
            if parent.get("path"):
                metrics["parent_size_mb"] = _dir_mb(Path(parent["path"]))
            weights = (
                "low precision (cast re-applied on load)"
                if stores_low
                else "float32 (quantization re-applied on load from config)"
            )
            record = build_record(
                method=config.method,
                backend="torch",
                config=resolved(config),
                parent=parent,
                metrics=metrics,
                calibration=calibration,
                weights=weights,
                files=hash_tree(tmp),
            )
            atomic_write_json(tmp / "sdwb.json", record)
    return Variant(
        config.method,
        "torch",
        config,
        record or {"metrics": metrics},
        Path(out) if out else None,
        pipe,
        metrics,
    )


def save_float(pipe, directory: Path) -> None:
    """``save_pretrained`` with each all-fp32 component stored in fp16 when that is lossless.

    Why: a parent shipped in fp16 (``builtin:tiny-shapes``) loads as fp32 whose values all fit
    fp16; storing them as fp32 would double the variant's size on disk for no information.
    """
    cast = []
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        floats = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        if floats and all(t.dtype == torch.float32 and torch.equal(t, t.half().float()) for t in floats):
            torch.nn.Module.to(module, dtype=torch.float16)
            cast.append(module)
    try:
        pipe.save_pretrained(directory, safe_serialization=True)
    finally:
        for module in cast:
            torch.nn.Module.to(module, dtype=torch.float32)


def scratch_dir(near: Path):
    """A temporary directory on the same filesystem as ``near`` (float exports can be GBs)."""
    near.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".{near.name}.work-", dir=near.parent)


def copy_export(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy an export tree except the files in ``skip`` (relative paths)."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src).as_posix()
        if p.is_file() and rel not in skip:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst / rel)
