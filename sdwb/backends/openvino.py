"""Stable Diffusion on OpenVINO: one compiled model per component, the shared denoising loop.

OpenVINO (Intel's inference runtime, how optimum-intel serves Stable Diffusion on x86 CPUs) runs
either an OpenVINO IR export (``sdwb export openvino``: ``model.xml`` + ``model.bin`` per
component, manifest format ``sdwb-openvino-export``, NNCF int8 variants included) or an ONNX
export directly (OpenVINO reads ONNX; the benchmark uses that to put OpenVINO beside ONNX Runtime
on the very same graphs). The loop is :class:`sdwb.backends.onnxruntime.ExportedPipeline`'s, so
images match the torch and ONNX Runtime backends for the same seed.

Settings that decide the numbers, fixed and recorded in ``pipe.info``:

- ``INFERENCE_NUM_THREADS``: the row's thread count (None: OpenVINO's default, one per core);
- ``PERFORMANCE_HINT=LATENCY`` and one stream: one image at a time, as every other backend runs;
- ``INFERENCE_PRECISION_HINT``: ``f32`` for fp32 rows. OpenVINO's CPU plugin otherwise *silently*
  runs float models in bf16 on CPUs with AVX-512 BF16 or AMX (the Zen 4 and Sapphire Rapids
  machines of this kind), which would make an "fp32" row a bf16 one; ``bf16`` is asked for
  explicitly by a bf16 row.
- static shapes: a component is compiled for each distinct input-shape set it is called with
  (reshaped from the export's dynamic axes, as optimum-intel does for SD), because OpenVINO's CPU
  plugin is faster on static shapes; compiled models are cached on disk (``CACHE_DIR``), so a
  second run does not recompile.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from sdwb.backends.onnxruntime import ExportedPipeline, load_tokenizers_and_scheduler
from sdwb.errors import SdwbError
from sdwb.variants.manifest import (
    EXPORT_FORMAT,
    OPENVINO_FORMAT,
    manifest_format,
    read_manifest,
    verify_manifest,
)

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
NEEDS = "the openvino backend needs the openvino package (pip install 'sd-workbench[openvino]')"


def require_openvino():
    """The ``openvino`` module, or a one-line :class:`SdwbError` naming the extra to install."""
    try:
        import openvino
    except ImportError as exc:
        raise SdwbError(f"{NEEDS}: {exc.msg}") from None
    return openvino


def default_cache_dir() -> Path:
    """Where compiled models are cached (``SDWB_OPENVINO_CACHE`` or ``~/.cache/sdwb/openvino``)."""
    return Path(os.environ.get("SDWB_OPENVINO_CACHE", Path.home() / ".cache" / "sdwb" / "openvino"))


def compile_config(threads: int | None, precision: str, cache_dir: Path | None) -> dict:
    """The CPU plugin properties every compiled component gets (see the module doc)."""
    if precision not in PRECISIONS:
        raise SdwbError(f"openvino precision {precision!r}: expected {' or '.join(PRECISIONS)}")
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
              "INFERENCE_PRECISION_HINT": PRECISIONS[precision]}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


def run_f32(core, model, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    """``model``'s outputs ``names`` for ``feeds``, compiled for exactly these shapes in f32: what
    validation (``export.openvino``) and quantization error (``compress.ov_variant``) compare."""
    model = model.clone()
    model.reshape({k: list(v.shape) for k, v in feeds.items()})
    config = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": "1"}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    request.infer(feeds)
    return [np.array(request.get_tensor(n).data, copy=True) for n in names]


class OvComponent:
    """One OpenVINO model as a runner: ``runner(**torch tensors) -> torch tensor`` (or a tuple).

    Compiled per input-shape set on first use (static shapes); ``compile_seconds`` sums the
    compile times, so the benchmark can tell compiling from running.
    """

    def __init__(self, name: str, core, model, entry: dict, config: dict):
        self.name, self.core, self.model, self.entry, self.config = name, core, model, entry, config
        self.dtypes = {s["name"]: s["dtype"] for s in entry["inputs"]}
        self.output_names = [o["name"] for o in entry["outputs"]]
        self.compiled: dict[tuple, object] = {}
        self.compile_seconds = 0.0

    def _request(self, feeds: dict[str, np.ndarray]):
        import time

        key = tuple((k, v.shape) for k, v in feeds.items())
        request = self.compiled.get(key)
        if request is None:
            started = time.perf_counter()
            model = self.model.clone()
            model.reshape({k: list(v.shape) for k, v in feeds.items()})
            try:
                compiled = self.core.compile_model(model, "CPU", self.config)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SdwbError(f"OpenVINO could not compile {self.name} for shapes "
                                f"{dict((k, s) for k, s in key)}: {first}") from None
            request = self.compiled[key] = compiled.create_infer_request()
            self.compile_seconds += time.perf_counter() - started
        return request

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feeds = {k: v.detach().cpu().numpy().astype(self.dtypes[k], copy=False) for k, v in inputs.items()}
        request = self._request(feeds)
        request.infer(feeds)
        outs = [torch.from_numpy(np.array(request.get_tensor(n).data, copy=True)) for n in self.output_names]
        return outs[0] if len(outs) == 1 else tuple(outs)


class OvStableDiffusionPipeline(ExportedPipeline):
    """An OpenVINO IR export or an ONNX export run by OpenVINO's CPU plugin."""

    @classmethod
    def from_export(cls, directory: str | Path, threads: int | None = None, precision: str = "fp32",
                    cache_dir: str | Path | None = None, verify: bool = True):
        """Verify the manifest's hashes, then read every component (compiled lazily per shape).

        ``directory``: ``sdwb export openvino`` output or an ``sdwb export onnx`` directory.
        ``cache_dir``: compiled-model cache (None: :func:`default_cache_dir`).
        """
        ov = require_openvino()
        directory = Path(directory)
        manifest = _manifest(directory, verify)
        tokenizer, tokenizer_2, scheduler = load_tokenizers_and_scheduler(directory)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        config = compile_config(threads, precision, cache)
        core = ov.Core()
        components = {}
        for name, entry in manifest["components"].items():
            path = directory / entry["file"]
            try:
                model = core.read_model(str(path))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SdwbError(f"OpenVINO could not read {path}: {first}") from None
            components[name] = OvComponent(name, core, model, entry, config)
        info = {"backend": "openvino", "openvino": ov.__version__, "format": manifest["format"],
                "inference_num_threads": threads or 0, "precision": PRECISIONS[precision],
                "performance_hint": "LATENCY", "cache_dir": str(cache), "export": str(directory),
                "source": manifest.get("source", {})}
        pipe = cls(components, tokenizer, scheduler, manifest["pipeline"], "cpu", info, tokenizer_2)
        pipe.manifest = manifest
        return pipe

    def compile_seconds(self) -> float:
        """Seconds spent compiling so far (all components, all shapes)."""
        return sum(c.compile_seconds for c in self.components.values())


def _manifest(directory: Path, verify: bool) -> dict:
    """The manifest of an OpenVINO IR export, or of an ONNX export, hashes checked when ``verify``."""
    fmt = EXPORT_FORMAT if manifest_format(directory) == EXPORT_FORMAT else OPENVINO_FORMAT
    return verify_manifest(directory, fmt) if verify else read_manifest(directory, fmt)
