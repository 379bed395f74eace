"""Variant records (``sdwb.json``): what a compressed model is, where it came from, how to reload it.

A variant directory is a diffusers pipeline (torch methods) or an ONNX export (ONNX Runtime
methods) plus ``sdwb.json``: format, stage, method, backend, the parent (spec, path and the
parent's own record, so chains stay traceable), the resolved config, metrics at creation (guard
PSNR, sizes, coverage, calibration), library versions, and sha256 + size of every other file.

Why re-apply on load: torch's dynamically quantized and torchao modules hold packed weights that
safetensors cannot store, and pickle is not allowed, so those variants store the float weights
and :func:`reapply` re-quantizes them from the recorded config when ``sdwb.loading`` opens the
directory (deterministic: same weights, same config, same model). bf16/fp16 variants store
their low-precision weights (half the disk) and the cast is re-applied the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sdwb.errors import SdwbError

RECORD = "sdwb.json"
FORMAT = "sdwb-variant"


def library_versions() -> dict[str, str]:
    """Versions of everything a quantized variant depends on."""
    import importlib.metadata as md

    import sdwb

    out = {"sdwb": sdwb.__version__}
    for dist in (
        "torch",
        "diffusers",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "torchao",
        "numpy",
    ):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def hash_tree(root: Path, skip: tuple[str, ...] = (RECORD, "manifest.json")) -> dict[str, dict]:
    """``{relative path: {"sha256", "size"}}`` of every file under ``root`` except ``skip``."""
    from export.onnx import sha256_file

    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in skip
    }


def build_record(
    *,
    method: str,
    backend: str,
    config: dict,
    parent: dict,
    metrics: dict,
    calibration: dict | None,
    weights: str,
    files: dict,
) -> dict:
    """The ``sdwb.json`` content of a quantized variant."""
    return {
        "format": FORMAT,
        "version": 1,
        "stage": "quantize",
        "method": method,
        "backend": backend,
        "weights": weights,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parent": parent,
        "config": config,
        "calibration": calibration,
        "metrics": metrics,
        "libraries": library_versions(),
        "files": files,
    }


def read_record(directory: str | Path) -> dict | None:
    """The parsed ``sdwb.json`` of ``directory``, or None when it has none."""
    path = Path(directory) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SdwbError(f"corrupt {path}: {exc}") from None
    if not isinstance(record, dict):
        raise SdwbError(f"corrupt {path}: expected a JSON object")
    return record


def verify_files(directory: Path, record: dict) -> None:
    """Refuse a variant whose files differ (size, then sha256) from its record."""
    from export.onnx import sha256_file

    for rel, meta in record.get("files", {}).items():
        path = directory / rel
        if not path.is_file():
            raise SdwbError(f"{path}: missing (listed in {directory / RECORD})")
        if path.stat().st_size != meta["size"]:
            raise SdwbError(
                f"{path}: {path.stat().st_size} bytes, {RECORD} says {meta['size']} (truncated or "
                "modified after the variant was written)"
            )
        if sha256_file(path) != meta["sha256"]:
            raise SdwbError(f"{path}: sha256 differs from {directory / RECORD} (modified since it was made)")


def is_quantized(record: dict | None) -> bool:
    return bool(record) and record.get("stage") == "quantize"


def reapply(pipe, directory: str | Path, record: dict, device: str = "cpu"):
    """Re-apply the recorded torch quantization to a pipeline just loaded (fp32) from ``directory``.

    Returns the pipeline, on ``device``. Verifies the files against the record first. ONNX
    Runtime variants are export directories and are refused here (they load with
    ``OrtStableDiffusionPipeline.from_export`` / ``--backend onnxruntime``).
    """
    from compress.quant_config import backend_of, parse_quant_config
    from compress.quant_torch import apply_torch_method

    directory = Path(directory)
    config = parse_quant_config(record.get("config", {}), str(directory / RECORD))
    if backend_of(config) != "torch":
        raise SdwbError(
            f"{directory}: an ONNX Runtime variant ({config.method}); load it with --backend onnxruntime"
        )
    verify_files(directory, record)
    state = None
    if config.method == "torch-int8-static":
        from compress.quant_w8a8 import RANGES_FILE

        try:
            state = json.loads((directory / RANGES_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise SdwbError(f"{directory / RANGES_FILE}: cannot read the calibrated ranges: {exc}") from None
    if str(device).startswith("cuda"):
        pipe = pipe.to(device)
    apply_torch_method(pipe, config, device, state)
    return pipe
