"""Running TensorRT engines (``sdwb export tensorrt``) with the shared denoising loop.

The engine directory's manifest (format ``sdwb-tensorrt-engines``) names one serialized plan per
component, built for one TensorRT version and one GPU; :class:`TrtRunner` verifies the hashes,
refuses engines built for another TensorRT or GPU, and runs each component through an execution
context on torch CUDA tensors. Building the engines is the export stage's job (``export.tensorrt``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from sdwb.backends.onnxruntime import ExportedPipeline, load_tokenizers_and_scheduler
from sdwb.errors import SdwbError
from sdwb.variants.manifest import ENGINE_FORMAT, read_manifest, verify_manifest

NEEDS = "TensorRT needs an NVIDIA GPU and the tensorrt package"


def sanitise(name: str) -> str:
    """A GPU name / version as a file-name part: ``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-") or "unknown"


def engine_filename(trt_version: str, gpu_name: str) -> str:
    """``engine_<trt-version>_<gpu-name-sanitised>.plan``."""
    return f"engine_{sanitise(trt_version)}_{sanitise(gpu_name)}.plan"


def require_tensorrt():
    """``(tensorrt module, GPU name)``, or a one-line :class:`SdwbError` saying what is missing."""
    missing = []
    try:
        import tensorrt as trt
    except ImportError as exc:
        trt = None
        missing.append(f"tensorrt is not importable ({exc.msg}; pip install 'sd-workbench[tensorrt]')")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible to torch")
    if missing:
        raise SdwbError(f"{NEEDS}: {'; '.join(missing)}")
    return trt, torch.cuda.get_device_name(torch.cuda.current_device())


def profile_covers(profile: dict[str, tuple], shapes: dict[str, Sequence[int]]) -> str | None:
    """None when every shape lies in its profile range, else a one-line reason."""
    for tensor, shape in shapes.items():
        lo, _, hi = profile[tensor]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return f"{tensor} shape {tuple(shape)} outside the engine profile [{lo} .. {hi}]"
    return None


# --------------------------------------------------------------------------- run


class TrtComponent:
    """One engine + execution context as a runner: ``runner(**torch CUDA tensors) -> tensor``."""

    def __init__(self, trt, name: str, engine, entry: dict, device: torch.device):
        self.name, self.engine, self.entry, self.device = name, engine, entry, device
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        to_torch = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                    trt.int8: torch.int8, trt.bool: torch.bool}
        if hasattr(trt, "int64"):
            to_torch[trt.int64] = torch.int64
        self.dtypes = {n: to_torch[engine.get_tensor_dtype(n)] for n in names}
        self.profile = {t: tuple(tuple(p[w]) for w in ("min", "opt", "max"))
                        for t, p in entry["profile"].items()}

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        reason = profile_covers(self.profile, {k: tuple(v.shape) for k, v in inputs.items()})
        if reason:
            raise SdwbError(f"{self.name}: {reason} (rebuild the export with a larger range)")
        stream = torch.cuda.current_stream(self.device)
        keep = []
        for name in self.inputs:
            tensor = inputs[name].to(self.device, self.dtypes[name]).contiguous()
            keep.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise SdwbError(f"TensorRT execution of {self.name} failed")
        return outs[0]


class TrtRunner(ExportedPipeline):
    """Generates images from a directory of engines (``build_engines``) with the shared loop."""

    @classmethod
    def from_engines(cls, directory: str | Path, device: str = "cuda", verify: bool = True):
        """Verify hashes, check the engines were built for this TensorRT + GPU, load them."""

        directory = Path(directory)
        check = verify_manifest if verify else read_manifest
        manifest = check(directory, ENGINE_FORMAT)
        trt, gpu = require_tensorrt()
        if (manifest["tensorrt"], sanitise(manifest["gpu"])) != (trt.__version__, sanitise(gpu)):
            raise SdwbError(f"{directory}: engines were built with TensorRT {manifest['tensorrt']} on "
                            f"{manifest['gpu']}, this is TensorRT {trt.__version__} on {gpu}: rebuild them")
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        dev = torch.device(device)
        components = {}
        for name, entry in manifest["components"].items():
            engine = runtime.deserialize_cuda_engine((directory / entry["file"]).read_bytes())
            if engine is None:
                raise SdwbError(f"TensorRT could not deserialize {directory / entry['file']}")
            components[name] = TrtComponent(trt, name, engine, entry, dev)
        tokenizer, _, scheduler = load_tokenizers_and_scheduler(directory)
        info = {"backend": "tensorrt", "tensorrt": trt.__version__, "gpu": gpu, "engines": str(directory),
                "source": manifest.get("source", {})}
        runner = cls(components, tokenizer, scheduler, manifest["pipeline"], str(dev), info)
        runner.manifest, runner.runtime, runner.logger = manifest, runtime, logger
        return runner
