"""The backends table: which model each inference backend runs, and opening it.

Why one place: ``sdwb generate --backend``, ``sdwb bench`` scenarios, the memory probe and the
gate must accept and refuse the same models with the same one-line errors. Every pipeline a
backend opens answers the same call (``sdwb.generate.generate`` runs any of them).

- ``torch``: a model spec (``builtin:NAME``, a diffusers directory, a cached hub id).
- ``onnxruntime``: an ONNX export directory (``sdwb export onnx``: format ``sdwb-onnx-export``).
  The benchmark also takes a torch spec and exports it once (:func:`ensure_export`) into a cache
  directory that is reused while its manifest still verifies, still names the same source
  content (``source.fingerprint``) and was made with the same library versions.
- ``tensorrt``: an engine directory (``sdwb export tensorrt``). A GPU and the tensorrt package
  are checked first, so without them every use fails with the TensorRT runner's one-line reason.
- ``openvino``: an OpenVINO IR export (``sdwb export openvino``, NNCF int8 variants too) or an
  ONNX export, which OpenVINO reads directly; like onnxruntime, the benchmark exports a torch
  spec to ONNX first. Needs the ``openvino`` extra, checked first.

``dtypes``: the precisions a row of that backend may ask for (ONNX Runtime runs the graph's own;
OpenVINO runs a float graph in fp32 or bf16 (``INFERENCE_PRECISION_HINT``); TensorRT's is fixed
when the engines are built).

What an export "weighs" (the benchmark's ``size_mb`` / ``params_m`` of exported rows): size on
disk is the components' graph files (``model.onnx`` + ``model.onnx.data``, or the engine plans),
not the tokenizer and scheduler; parameters are the elements of the weight initializers of each
ONNX graph (float, and 8-bit for quantized graphs). The VAE encoder is not exported, so an
export's ``params_m`` is below its torch row's, which counts the whole VAE; the UNet alone
(``unet_params_m``) matches the torch UNet to within ~1% (the exporter stores identical tensors,
e.g. freshly initialised norm weights, once, and adds a few float constants).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sdwb.errors import SdwbError
from sdwb.variants.files import MB
from sdwb.variants.manifest import ENGINE_FORMAT, OPENVINO_FORMAT, manifest_format
from sdwb.variants.manifest import EXPORT_FORMAT as ONNX_FORMAT


def _open_onnxruntime(directory, *, device: str = "cpu", threads: int | None = None, dtype: str = "fp32"):
    from sdwb.backends.onnxruntime import OrtStableDiffusionPipeline

    return OrtStableDiffusionPipeline.from_export(directory, providers=providers_for(device), threads=threads)


def _open_tensorrt(directory, *, device: str = "cpu", threads: int | None = None, dtype: str = "fp32"):
    from sdwb.backends.tensorrt import TrtRunner

    return TrtRunner.from_engines(directory, device=device if str(device).startswith("cuda") else "cuda")


def _open_openvino(directory, *, device: str = "cpu", threads: int | None = None, dtype: str = "fp32"):
    from sdwb.backends.openvino import OvStableDiffusionPipeline

    if str(device).startswith("cuda"):
        raise SdwbError("--backend openvino runs on the CPU here (device cpu)")
    return OvStableDiffusionPipeline.from_export(directory, threads=threads, precision=dtype)


def _require_openvino() -> None:
    from sdwb.backends.openvino import require_openvino

    require_openvino()


def _require_tensorrt() -> None:
    from sdwb.backends.tensorrt import require_tensorrt

    require_tensorrt()  # no GPU / no tensorrt: the runner's one-line reason, before anything else


@dataclass(frozen=True)
class ExportedBackend:
    """One row of the backends table: how to open what the backend runs, the manifest ``format`` of
    that directory (and ``also`` formats it accepts), and what to say when a model is not one
    (``{flag}`` and ``{spec}`` are filled in): ``wrong`` per format found instead, ``missing``
    otherwise. ``requires`` is checked first."""

    open: Callable
    format: str
    missing: str
    wrong: dict[str, str] = field(default_factory=dict)
    requires: Callable[[], None] | None = None
    also: tuple[str, ...] = ()  # other manifest formats it runs as they are (openvino: ONNX exports)
    dtypes: tuple[str, ...] = ("fp32",)
    exports_spec: bool = False  # the benchmark exports a torch spec to ONNX for it first


# The backends table: name -> row. ``torch`` runs a model spec through ``sdwb.loading``. A new
# backend is one module under sdwb/backends/ and one row here; the CLI's choices, the bench and gate
# schemas and the memory probe read BACKENDS.
TABLE: dict[str, ExportedBackend] = {
    "onnxruntime": ExportedBackend(
        open=_open_onnxruntime,
        format=ONNX_FORMAT,
        missing="{flag} {spec}: not an ONNX export directory (no sdwb manifest.json); run "
                "`sdwb export onnx --model {spec} -o DIR` first, then pass {flag} DIR",
        wrong={ENGINE_FORMAT: "{flag} {spec}: a TensorRT engine directory; --backend onnxruntime needs an "
                              "ONNX export (the --onnx directory those engines were built from)",
               OPENVINO_FORMAT: "{flag} {spec}: an OpenVINO IR export; run it with --backend openvino, or "
                                "pass the ONNX export it was converted from"},
        exports_spec=True,
    ),
    "tensorrt": ExportedBackend(
        open=_open_tensorrt,
        format=ENGINE_FORMAT,
        missing="{flag} {spec}: not a TensorRT engine directory; run `sdwb export onnx --model {spec} "
                "-o ONNX` and `sdwb export tensorrt --onnx ONNX -o DIR` first, then pass {flag} DIR",
        wrong={ONNX_FORMAT: "{flag} {spec}: an ONNX export, not TensorRT engines; run "
                            "`sdwb export tensorrt --onnx {spec} -o DIR` first, then pass {flag} DIR"},
        requires=_require_tensorrt,
        dtypes=("fp32", "fp16"),
    ),
    "openvino": ExportedBackend(
        open=_open_openvino,
        format=OPENVINO_FORMAT,
        also=(ONNX_FORMAT,),
        missing="{flag} {spec}: not an OpenVINO IR or ONNX export directory; run `sdwb export openvino "
                "--model {spec} -o DIR` (or `sdwb export onnx`) first, then pass {flag} DIR",
        wrong={ENGINE_FORMAT: "{flag} {spec}: TensorRT engines; --backend openvino needs an OpenVINO IR "
                              "or ONNX export"},
        requires=_require_openvino,
        dtypes=("fp32", "bf16"),
        exports_spec=True,
    ),
}
BACKENDS = ("torch", *TABLE)
EXPORTED_BACKENDS = tuple(TABLE)
Backend = Literal[BACKENDS]  # the schemas' type of a backend name (bench scenarios, recipes, gate)


def backend_for(spec: str | Path) -> str:
    """The backend that runs ``spec`` as it is: the one whose table row has its manifest format
    first (an ONNX export -> onnxruntime, OpenVINO IR -> openvino, engines -> tensorrt), else torch."""
    found = manifest_format(spec)
    for name, row in TABLE.items():
        if found == row.format:
            return name
    return "torch"


def check_model(backend: str, spec: str | Path, flag: str = "--model") -> Path | None:
    """The directory ``backend`` runs for ``spec`` (None for torch), or a one-line error.

    ``flag`` names the input in the message (``--model``, ``variant fp32: model``).
    """
    if backend not in BACKENDS:
        raise SdwbError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return None
    from sdwb.cache.config import refuse_cache_variant

    refuse_cache_variant(spec, f"--backend {backend}")
    row = TABLE[backend]
    if row.requires is not None:
        row.requires()
    found = manifest_format(spec)
    if found == row.format or found in row.also:
        return Path(str(spec)).expanduser()
    if found == "unreadable":  # a truncated manifest is corrupt, not absent (sdwb.verify's rule)
        manifest = Path(str(spec)).expanduser() / "manifest.json"
        raise SdwbError(f"{flag} {spec}: corrupt {manifest} (not valid JSON: truncated?); re-run the export")
    raise SdwbError(row.wrong.get(found, row.missing).format(flag=flag, spec=spec))


def providers_for(device: str) -> list[str] | None:
    """ONNX Runtime providers for a device: cpu -> CPU only; cuda -> CUDA then CPU; auto -> default."""
    if device == "cpu":
        return ["cpu"]
    if str(device).startswith("cuda"):
        return ["cuda", "cpu"]
    return None


def open_exported(backend: str, directory: str | Path, *, device: str = "cpu", threads: int | None = None,
                  dtype: str = "fp32"):
    """An :class:`sdwb.backends.onnxruntime.ExportedPipeline` for an export (onnxruntime, openvino)
    or engines (tensorrt). ``threads``: the runtime's threads per component (None: one per core);
    ``dtype``: one of the row's ``dtypes`` (OpenVINO's inference precision)."""
    row = TABLE.get(backend)
    if row is None:
        raise SdwbError(f"backend {backend}: not an exported backend (expected "
                        f"{', '.join(EXPORTED_BACKENDS)})")
    if backend != "tensorrt" and dtype not in row.dtypes:
        raise SdwbError(f"dtype {dtype} with backend {backend}: expected {' or '.join(row.dtypes)}")
    return row.open(directory, device=device, threads=threads, dtype=dtype)


def cached_export_reason(directory: Path, spec: str, max_batch: int, encoder: bool = False) -> str | None:
    """None when ``directory`` holds a usable export of ``spec`` (with the VAE encoder when
    ``encoder``: editing needs it); else why it must be (re)made."""
    from sdwb.variants.files import library_versions
    from sdwb.variants.manifest import source_fingerprint, verify_manifest

    if not (directory / "manifest.json").is_file():
        return "no export yet"
    try:
        manifest = verify_manifest(directory)
    except SdwbError as e:
        return str(e)
    source = manifest.get("source") or {}
    if source.get("fingerprint") != source_fingerprint(spec):
        return f"the source {spec} changed since it was exported"
    if manifest.get("libraries") != library_versions():
        return "library versions changed since the export"
    if int(manifest.get("max_batch", 0)) < max_batch:
        return f"exported for batch <= {manifest.get('max_batch')}, need {max_batch}"
    needed = {"text_encoder", "unet", "vae_decoder"} | ({"vae_encoder"} if encoder else set())
    missing = needed - set(manifest.get("components", {}))
    if missing:
        return f"export lacks {', '.join(sorted(missing))}"
    return None


def ensure_export(spec: str, directory: str | Path, *, max_batch: int = 8, encoder: bool = False,
                  timeout: float | None = None) -> dict:
    """Export ``spec`` to ``directory`` unless a valid export of it is already there.

    The export runs as ``sdwb export onnx`` in a fresh interpreter: the caller (a benchmark about
    to load both the torch model and the ONNX Runtime sessions) never holds the export's memory,
    which peaks at ~10 GB for sd15-arch and which the allocator would not hand back, and the
    export's own peak RSS is measured as the command reports it. The export is validated against
    PyTorch as always and written atomically (an older export there is replaced only once the new
    one is complete). Returns ``{"dir", "reused"}`` plus, for a new export, ``export_s`` and
    ``export_peak_rss_mb``; a failed export is a one-line :class:`SdwbError` (its ``error:`` line).
    """
    import os
    import re
    import subprocess
    import sys
    import time

    directory = Path(directory)
    if cached_export_reason(directory, spec, max_batch, encoder) is None:
        return {"dir": directory, "reused": True}
    directory.parent.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "sdwb", "export", "onnx", "--model", spec, "-o", str(directory),
           "--max-batch", str(max(max_batch, 1)), "--overwrite"]
    if encoder:  # the edit metric: img2img / inpainting encode the input image
        cmd += ["--components", "text_encoder,unet,vae_decoder,vae_encoder"]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SdwbError(f"export of {spec} timed out after {timeout} s") from None
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        raise SdwbError(lines[-1].removeprefix("error: ") if lines else
                        f"`sdwb export onnx` exited with {proc.returncode}")
    peak = re.search(r"process peak RSS ([0-9.]+) MB", proc.stdout)
    return {"dir": directory, "reused": False, "export_s": seconds,
            "export_peak_rss_mb": float(peak.group(1)) if peak else None}


def graph_files(directory: str | Path, manifest: dict) -> list[Path]:
    """The graph files of every component (model.onnx + external data, OpenVINO's model.xml +
    model.bin, or engine plans)."""
    directory = Path(directory)
    out = []
    for entry in manifest.get("components", {}).values():
        out += [directory / entry[key] for key in ("file", "external_data", "weights") if entry.get(key)]
    return out


def exported_size_mb(directory: str | Path, manifest: dict) -> float:
    """MB (2**20 bytes) of the components' graph files (see the module doc)."""
    return sum(p.stat().st_size for p in graph_files(directory, manifest)) / MB


def onnx_param_counts(directory: str | Path, manifest: dict) -> dict[str, float]:
    """Millions of weight initializer elements: all components and the UNet alone.

    Weights are float initializers and the 8-bit ones of quantized graphs (QDQ / integer
    weights); int32/int64 initializers (shapes, indices) are not parameters.

    Reads the graphs without their external data (shapes are in the graph), so it is cheap even
    for sd15-arch.
    """
    import math

    import onnx

    T = onnx.TensorProto
    weights = {T.FLOAT, T.FLOAT16, T.BFLOAT16, T.DOUBLE, T.INT8, T.UINT8}  # not int32/64 shape data
    counts = {}
    for name, entry in manifest.get("components", {}).items():
        graph = onnx.load(str(Path(directory) / entry["file"]), load_external_data=False).graph
        counts[name] = sum(math.prod(t.dims) for t in graph.initializer if t.data_type in weights)
    return {"params_m": sum(counts.values()) / 1e6, "unet_params_m": counts.get("unet", 0) / 1e6}


def openvino_param_counts(directory: str | Path, manifest: dict) -> dict[str, float]:
    """Millions of weight elements of OpenVINO IR graphs: float and 8-bit ``Constant`` ops (an NNCF
    int8 weight counts once, its scale and zero point are not parameters of the model)."""
    import math

    import openvino as ov

    weights = {"f32", "f16", "bf16", "i8", "u8"}
    core, counts = ov.Core(), {}
    for name, entry in manifest.get("components", {}).items():
        model = core.read_model(str(Path(directory) / entry["file"]))
        counts[name] = sum(
            math.prod(op.get_output_shape(0)) for op in model.get_ops()
            if op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() in weights
            and len(op.get_output_shape(0)) >= 2 and not _is_scale(op)
        )
    return {"params_m": sum(counts.values()) / 1e6, "unet_params_m": counts.get("unet", 0) / 1e6}


def _is_scale(op) -> bool:
    """An NNCF decompression constant (per-channel scale / zero point: ``[C, 1, ...]``)."""
    shape = list(op.get_output_shape(0))
    return len(shape) >= 2 and all(d == 1 for d in shape[1:])


def exported_param_counts(directory: str | Path, manifest: dict) -> dict[str, float]:
    """:func:`onnx_param_counts` or :func:`openvino_param_counts`, by the graphs' file type."""
    files = [e["file"] for e in manifest.get("components", {}).values()]
    if files and all(f.endswith(".xml") for f in files):
        return openvino_param_counts(directory, manifest)
    return onnx_param_counts(directory, manifest)
